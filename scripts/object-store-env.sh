#!/usr/bin/env bash
# Sourced by scripts/backup-object-store.sh and restore-object-store.sh: `aws_cli` runs the AWS
# CLI (`aws` on PATH, else a pinned one fetched and run by uv, as scripts/pip.sh does for pip);
# `object_checksums` runs deploy/object_checksums.py (the objects' recorded sha256 kept across
# a backup and a restore) with a Python that has boto3, else with a pinned boto3 through uv;
# `object_store_env` sets `endpoint_args` for both. With S3_ENDPOINT_URL (or AWS credentials for AWS S3) in the environment it
# uses them; otherwise it port-forwards the dev overlay's MinIO and takes MinIO's root keys
# from the minio-root Secret (an operator's tool: a restore writes to every bucket, which no
# component's credential may do; stopped when the calling script exits).
set -euo pipefail
AWSCLI_VERSION=1.45.11
BOTO3_VERSION=1.44.8

aws_cli() {
  if command -v aws >/dev/null 2>&1; then
    aws "$@"
  elif command -v uv >/dev/null 2>&1; then
    uv tool run --quiet --from "awscli==$AWSCLI_VERSION" aws "$@"
  else
    echo "no AWS CLI: install it (pip install awscli) or uv" >&2
    return 1
  fi
}

object_checksums() {
  local tool endpoint=""
  tool="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/deploy/object_checksums.py"
  [ "${#endpoint_args[@]}" -eq 2 ] && endpoint="${endpoint_args[1]}"
  if python3 -c "import boto3" >/dev/null 2>&1; then
    S3_ENDPOINT_URL="$endpoint" python3 "$tool" "$@"
  elif command -v uv >/dev/null 2>&1; then
    S3_ENDPOINT_URL="$endpoint" uv run --quiet --no-project --with "boto3==$BOTO3_VERSION" python3 "$tool" "$@"
  else
    echo "no boto3: install it (pip install boto3) or uv" >&2
    return 1
  fi
}

# shellcheck disable=SC2034  # endpoint_args is read by the sourcing script
object_store_env() {
  local ns="$1"
  endpoint_args=()
  if [ -n "${S3_ENDPOINT_URL:-}" ]; then
    endpoint_args=(--endpoint-url "$S3_ENDPOINT_URL")
  elif [ -z "${AWS_ACCESS_KEY_ID:-}" ] && kubectl -n "$ns" get service minio >/dev/null 2>&1; then
    local port=19000
    kubectl -n "$ns" port-forward service/minio "${port}:9000" >/dev/null 2>&1 &
    forward_pid=$!
    trap 'kill "$forward_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 30); do
      curl -sf "http://127.0.0.1:${port}/minio/health/live" >/dev/null && break
      sleep 1
    done
    AWS_ACCESS_KEY_ID="$(kubectl -n "$ns" get secret minio-root -o 'jsonpath={.data.root-user}' | base64 -d)"
    AWS_SECRET_ACCESS_KEY="$(kubectl -n "$ns" get secret minio-root -o 'jsonpath={.data.root-password}' | base64 -d)"
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
    endpoint_args=(--endpoint-url "http://127.0.0.1:${port}")
  fi
}
