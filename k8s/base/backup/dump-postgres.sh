#!/bin/bash
# The postgres-backup CronJob's first step: scripts/backup-postgres.sh's managed-database mode
# in the cluster. One pg_dump custom-format archive per database in a timestamped folder with a
# SHA-256 manifest, each archive's table of contents read back as a check; the same layout, so
# scripts/restore-postgres.sh restores it. libpq's PG* variables come from the
# dandelion-backup-db Secret (a role that reads every database and writes none).
set -euo pipefail
out="${1:?usage: dump-postgres.sh OUT_DIR}"
read -r -a databases <<< "${DATABASES:-mlflow airflow feedback}"
dir="${out%/}/postgres-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$dir"
for db in "${databases[@]}"; do
  archive="$dir/$db.dump"
  pg_dump --format=custom --no-owner --dbname="$db" --file="$archive"
  pg_restore --list "$archive" > /dev/null
  echo "backed up $db: $(wc -c < "$archive") bytes"
done
(cd "$dir" && sha256sum -- *.dump > SHA256SUMS)
echo "backup in $dir"
