#!/usr/bin/env bash
# Create the dev overlay's secrets with fresh random values (idempotent: existing secrets are
# kept, so re-running never rotates a password that a database already uses).
#   k8s/secrets/create-dev-secrets.sh [namespace]      (default: dandelion-dev)
# Prints nothing secret. Needs kubectl and python3.
set -euo pipefail
ns="${1:-dandelion-dev}"
rand() { python3 -c "import secrets; print(secrets.token_hex(24))"; }
fernet() { python3 -c "import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"; }

create() {  # create NAME --from-literal=k=v ... unless it exists
  local name="$1"; shift
  if kubectl -n "$ns" get secret "$name" >/dev/null 2>&1; then
    echo "kept    secret/$name"
  else
    kubectl -n "$ns" create secret generic "$name" "$@" >/dev/null
    kubectl -n "$ns" label secret "$name" app.kubernetes.io/part-of=dandelion >/dev/null
    echo "created secret/$name"
  fi
}

kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null

# A value already stored in a secret wins over a new random one, so the derived secrets
# (connection URLs, the pipeline's S3 keys) always agree with the databases and MinIO.
value() {  # value SECRET KEY  -> stored value, or a fresh random one
  local stored
  stored="$(kubectl -n "$ns" get secret "$1" -o "jsonpath={.data.$2}" 2>/dev/null || true)"
  if [ -n "$stored" ]; then printf '%s' "$stored" | base64 -d; else rand; fi
}
s3_key="$(value dandelion-s3 access-key-id)"; s3_secret="$(value dandelion-s3 secret-access-key)"
pg_mlflow="$(value dandelion-postgres mlflow-db-password)"
pg_airflow="$(value dandelion-postgres airflow-db-password)"
pg_feedback="$(value dandelion-postgres feedback-db-password)"

create minio-root --from-literal=root-user="root-$(rand | cut -c1-12)" \
  --from-literal=root-password="$(rand)"
create dandelion-postgres --from-literal=postgres-password="$(rand)" \
  --from-literal=mlflow-db-password="$pg_mlflow" \
  --from-literal=airflow-db-password="$pg_airflow" \
  --from-literal=feedback-db-password="$pg_feedback"
create dandelion-s3 --from-literal=access-key-id="$s3_key" --from-literal=secret-access-key="$s3_secret"
create dandelion-pipeline-env --from-literal=AWS_ACCESS_KEY_ID="$s3_key" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$s3_secret"
create dandelion-api --from-literal=admin-token="$(rand)" \
  --from-literal=feedback-db-url="postgresql+psycopg://dandelion:${pg_feedback}@postgres:5432/feedback"
# The reviewer page's token: read it with
#   kubectl -n <ns> get secret dandelion-review -o jsonpath='{.data.token}' | base64 -d
create dandelion-review --from-literal=token="$(rand)"
create dandelion-mlflow \
  --from-literal=backend-store-uri="postgresql+psycopg://mlflow:${pg_mlflow}@postgres:5432/mlflow"
create airflow-metadata \
  --from-literal=connection="postgresql+psycopg://airflow:${pg_airflow}@postgres:5432/airflow" \
  --from-literal=async-connection="postgresql+psycopg_async://airflow:${pg_airflow}@postgres:5432/airflow"
create airflow-fernet-key --from-literal=fernet-key="$(fernet)"
create airflow-api-secret-key --from-literal=api-secret-key="$(rand)"
create airflow-jwt-secret --from-literal=jwt-secret="$(rand)"
# The Airflow admin: read the password with
#   kubectl -n <ns> get secret airflow-admin -o jsonpath='{.data.password}' | base64 -d
create airflow-admin --from-literal=username=admin --from-literal=password="$(rand)" \
  --from-literal=email=admin@dandelion.local
