#!/usr/bin/env bash
# Restore buckets from a folder written by scripts/backup-object-store.sh (`aws s3 sync` back:
# objects missing or different in the bucket are uploaded). With RESTORE_DELETE=1, objects
# that are not in the backup are deleted too (an exact copy of the backup). The backup is
# checked against the recorded checksums it keeps (<bucket>.sha256) before anything is written,
# and the restored objects get their recorded sha256 back (deploy/object_checksums.py).
#   scripts/restore-object-store.sh BACKUP_DIR --yes
# Same buckets and endpoints as the backup (BUCKETS, S3_ENDPOINT_URL, NAMESPACE).
set -euo pipefail
src="${1:?usage: restore-object-store.sh BACKUP_DIR --yes}"
[ "${2:-}" = --yes ] || { echo "restoring overwrites objects in the buckets: pass --yes" >&2; exit 2; }
ns="${NAMESPACE:-dandelion-dev}"
read -r -a buckets <<< "${BUCKETS:-dandelion mlflow}"
here="$(cd "$(dirname "$0")" && pwd)"
endpoint_args=()  # set by object_store_env
# shellcheck disable=SC1091  # sourced from this script's folder
. "$here/object-store-env.sh"
object_store_env "$ns"

delete=()
[ "${RESTORE_DELETE:-0}" = 1 ] && delete=(--delete)
for bucket in "${buckets[@]}"; do
  [ -d "${src%/}/$bucket" ] || { echo "no backup of $bucket in $src" >&2; exit 1; }
  object_checksums verify "$bucket" "$src" || { echo "backup of $bucket damaged: nothing restored" >&2; exit 1; }
done
for bucket in "${buckets[@]}"; do
  aws_cli "${endpoint_args[@]}" s3 sync --only-show-errors "${delete[@]}" "${src%/}/$bucket" "s3://$bucket"
  object_checksums reattach "$bucket" "$src"
  echo "restored s3://$bucket"
done
