#!/bin/sh
# Idempotent MinIO set-up of the dev overlay (the minio-init Job): the buckets, versioning on
# each, and one user per component with only the buckets/prefixes it needs (the policy
# documents in policies/, mounted at $POLICY_DIR; docs/deployment.md, "Credentials per
# component"). Credentials come from the environment: the root user, then <COMPONENT>_KEY /
# <COMPONENT>_SECRET for api, review, mlflow, pipeline and backup.
# (compose's stack keeps its single-user init-buckets.sh.)
set -eu
: "${POLICY_DIR:=/policies}"

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
for bucket in dandelion mlflow dandelion-sources dandelion-backups; do
  mc mb --ignore-existing "local/$bucket"
  # Versioning: an overwritten or deleted object keeps its earlier versions (between backups).
  mc version enable "local/$bucket"
done

user() {  # user COMPONENT ACCESS_KEY SECRET_KEY
  mc admin user add local "$2" "$3"
  mc admin policy create local "dandelion-$1" "$POLICY_DIR/$1.json"
  # "already attached" on a re-run is not an error.
  mc admin policy attach local "dandelion-$1" --user "$2" >/dev/null 2>&1 || true
  echo "user for $1: policy dandelion-$1"
}
user api "$API_KEY" "$API_SECRET"
user review "$REVIEW_KEY" "$REVIEW_SECRET"
user mlflow "$MLFLOW_KEY" "$MLFLOW_SECRET"
user pipeline "$PIPELINE_KEY" "$PIPELINE_SECRET"
user backup "$BACKUP_KEY" "$BACKUP_SECRET"
echo "buckets ready (versioned): dandelion mlflow dandelion-sources dandelion-backups"
