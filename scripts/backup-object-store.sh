#!/usr/bin/env bash
# Back up the object store's buckets (the dandelion store: raw images, datasets, embeddings,
# feedback, Airflow task logs; MLflow's artifacts: the models) to a local folder, with the AWS
# CLI (`aws s3 sync`: incremental, so a second run into the same folder copies only changes),
# and each object's recorded sha256 beside it (OUT_DIR/<bucket>.sha256, deploy/object_checksums.py:
# a folder keeps only the bytes), every file checked against it.
#   scripts/backup-object-store.sh OUT_DIR
# Buckets: BUCKETS (default "dandelion mlflow", the dev overlay's; prod: set yours).
# Where: S3_ENDPOINT_URL and the AWS_* credentials when set (prod: AWS S3, no endpoint);
# otherwise the dev overlay's MinIO (NAMESPACE), through a port-forward and MinIO's root keys.
# Scheduled in-cluster backups: the object-store-backup CronJob (k8s/base/backup/). Restore: scripts/restore-object-store.sh. For prod, also enable bucket
# versioning: it covers deletions between backups.
set -euo pipefail
out="${1:?usage: backup-object-store.sh OUT_DIR}"
ns="${NAMESPACE:-dandelion-dev}"
read -r -a buckets <<< "${BUCKETS:-dandelion mlflow}"
here="$(cd "$(dirname "$0")" && pwd)"
endpoint_args=()  # set by object_store_env
# shellcheck disable=SC1091  # sourced from this script's folder
. "$here/object-store-env.sh"
object_store_env "$ns"

for bucket in "${buckets[@]}"; do
  mkdir -p "${out%/}/$bucket"
  aws_cli "${endpoint_args[@]}" s3 sync --only-show-errors "s3://$bucket" "${out%/}/$bucket"
  object_checksums record "$bucket" "$out"
  echo "backed up s3://$bucket: $(find "${out%/}/$bucket" -type f | wc -l) objects"
done
