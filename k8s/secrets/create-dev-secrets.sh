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
# (connection URLs, the components' S3 keys) always agree with the databases and MinIO.
value() {  # value SECRET KEY [DEFAULT]  -> stored value, else DEFAULT, else a fresh random one
  local stored
  stored="$(kubectl -n "$ns" get secret "$1" -o "jsonpath={.data.$2}" 2>/dev/null || true)"
  if [ -n "$stored" ]; then printf '%s' "$stored" | base64 -d; elif [ -n "${3:-}" ]; then printf '%s' "$3"; else rand; fi
}
pg_mlflow="$(value dandelion-postgres mlflow-db-password)"
pg_airflow="$(value dandelion-postgres airflow-db-password)"
pg_feedback="$(value dandelion-postgres feedback-db-password)"
pg_backup="$(value dandelion-postgres backup-db-password)"
# Every database URL bounds the connection attempt and keeps idle connections alive through
# NATs and load balancers (docs/deployment.md, "Database connections"). The in-cluster dev
# PostgreSQL serves no TLS: sslmode=disable here; prod's URLs use sslmode=verify-full.
db_params="sslmode=disable&connect_timeout=10&keepalives=1&keepalives_idle=30&keepalives_interval=10&keepalives_count=3"

create minio-root --from-literal=root-user="root-$(rand | cut -c1-12)" \
  --from-literal=root-password="$(rand)"
create dandelion-postgres --from-literal=postgres-password="$(rand)" \
  --from-literal=mlflow-db-password="$pg_mlflow" \
  --from-literal=airflow-db-password="$pg_airflow" \
  --from-literal=feedback-db-password="$pg_feedback" \
  --from-literal=backup-db-password="$pg_backup"
# One MinIO user per component, each with only its buckets/prefixes (k8s/overlays/dev/minio/
# policies/, created by the minio-init Job). Access keys stay within MinIO's 20 characters.
s3_key() { value "dandelion-s3-$1" access-key-id "$1-$(rand | cut -c1-12)"; }
s3_secret() { value "dandelion-s3-$1" secret-access-key; }
create dandelion-s3-api --from-literal=access-key-id="$(s3_key api)" \
  --from-literal=secret-access-key="$(s3_secret api)"
create dandelion-s3-review --from-literal=access-key-id="$(s3_key review)" \
  --from-literal=secret-access-key="$(s3_secret review)"
create dandelion-s3-mlflow --from-literal=access-key-id="$(s3_key mlflow)" \
  --from-literal=secret-access-key="$(s3_secret mlflow)"
create dandelion-s3-backup --from-literal=access-key-id="$(s3_key backup)" \
  --from-literal=secret-access-key="$(s3_secret backup)"
# Every Airflow pod's environment (extraEnvFrom): the pipeline's S3 credential and the
# feedback database.
create dandelion-pipeline-env \
  --from-literal=AWS_ACCESS_KEY_ID="$(value dandelion-pipeline-env AWS_ACCESS_KEY_ID "pipeline-$(rand | cut -c1-11)")" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$(value dandelion-pipeline-env AWS_SECRET_ACCESS_KEY)" \
  --from-literal=DANDELION_FEEDBACK_DB_URL="postgresql+psycopg://dandelion:${pg_feedback}@postgres:5432/feedback?${db_params}"
create dandelion-api --from-literal=admin-token="$(rand)" \
  --from-literal=feedback-db-url="postgresql+psycopg://dandelion:${pg_feedback}@postgres:5432/feedback?${db_params}"
# The reviewer page's token: read it with
#   kubectl -n <ns> get secret dandelion-review -o jsonpath='{.data.token}' | base64 -d
create dandelion-review --from-literal=token="$(rand)"
create dandelion-mlflow \
  --from-literal=backend-store-uri="postgresql+psycopg://mlflow:${pg_mlflow}@postgres:5432/mlflow?${db_params}"
create airflow-metadata \
  --from-literal=connection="postgresql+psycopg://airflow:${pg_airflow}@postgres:5432/airflow?${db_params}" \
  --from-literal=async-connection="postgresql+psycopg_async://airflow:${pg_airflow}@postgres:5432/airflow?${db_params}"
# The backup CronJobs' database login (libpq variables; the role `backup` reads every database).
create dandelion-backup-db --from-literal=PGHOST=postgres --from-literal=PGPORT=5432 \
  --from-literal=PGUSER=backup --from-literal=PGPASSWORD="$pg_backup" \
  --from-literal=PGSSLMODE=disable --from-literal=PGCONNECT_TIMEOUT=10
create airflow-fernet-key --from-literal=fernet-key="$(fernet)"
create airflow-api-secret-key --from-literal=api-secret-key="$(rand)"
create airflow-jwt-secret --from-literal=jwt-secret="$(rand)"
# The Airflow admin: read the password with
#   kubectl -n <ns> get secret airflow-admin -o jsonpath='{.data.password}' | base64 -d
create airflow-admin --from-literal=username=admin --from-literal=password="$(rand)" \
  --from-literal=email=admin@dandelion.local
