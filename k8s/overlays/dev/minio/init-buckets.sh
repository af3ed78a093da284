#!/bin/sh
# Idempotent MinIO set-up (compose `minio-init` and the dev overlay's Job): the dandelion store
# bucket, the MLflow artifact bucket, and a non-root service account with read-write access to
# both. Credentials come from the environment.
set -eu

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$DANDELION_BUCKET" "local/$MLFLOW_BUCKET"
mc admin user add local "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY"
mc admin policy attach local readwrite --user "$S3_ACCESS_KEY_ID" >/dev/null 2>&1 || true
echo "buckets ready: $DANDELION_BUCKET $MLFLOW_BUCKET"
