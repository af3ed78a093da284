#!/bin/sh
# The backup CronJobs' object-store step (minio/mc image), with the backup credential
# (dandelion-s3-backup: reads the backed-up buckets, writes the backups bucket only).
#   upload.sh postgres DIR   copy DIR's dump folders to s3://$BACKUP_BUCKET/postgres/
#   upload.sh buckets        mirror each of $BACKUP_SOURCE_BUCKETS to
#                            s3://$BACKUP_BUCKET/object-store/<bucket>/ (incremental; deletions
#                            are not propagated, and the backups bucket is versioned)
set -eu
: "${BACKUP_S3_ENDPOINT:?}" "${BACKUP_BUCKET:?}" "${S3_ACCESS_KEY_ID:?}" "${S3_SECRET_ACCESS_KEY:?}"
# --api: no signature probe (the backup credential may not list every bucket).
mc alias set backup "$BACKUP_S3_ENDPOINT" "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY" --api S3v4 >/dev/null
case "${1:?usage: upload.sh postgres DIR | buckets}" in
  postgres)
    mc cp --recursive "${2:?}/" "backup/$BACKUP_BUCKET/postgres/"
    echo "uploaded $2 to s3://$BACKUP_BUCKET/postgres/"
    ;;
  buckets)
    for bucket in ${BACKUP_SOURCE_BUCKETS:?}; do
      mc mirror --overwrite "backup/$bucket" "backup/$BACKUP_BUCKET/object-store/$bucket"
      echo "mirrored s3://$bucket to s3://$BACKUP_BUCKET/object-store/$bucket"
    done
    ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
