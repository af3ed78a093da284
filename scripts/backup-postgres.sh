#!/usr/bin/env bash
# Back up the platform's PostgreSQL databases (MLflow's tracking + registry, Airflow's metadata,
# the API's feedback) as pg_dump custom-format archives, one per database, in a timestamped
# folder with a SHA-256 manifest. Each archive's table of contents is read back as a check.
#   scripts/backup-postgres.sh OUT_DIR
#       dev overlay: pg_dump runs inside the postgres StatefulSet (NAMESPACE, default
#       dandelion-dev), as the superuser over the local socket.
#   COMPOSE=1 scripts/backup-postgres.sh OUT_DIR
#       docker compose (compose.yaml): the same inside the stack's postgres service
#       (`docker compose exec`: run it beside compose.yaml, or set COMPOSE_FILE and
#       COMPOSE_PROJECT_NAME as for docker compose).
#   PGHOST=db.example PGUSER=backup PGPASSWORD=… scripts/backup-postgres.sh OUT_DIR
#       a managed PostgreSQL (prod): the local pg_dump/pg_restore, libpq's PG* variables.
# DATABASES overrides the list (default: "mlflow airflow feedback"). Restore:
# scripts/restore-postgres.sh. docs/deployment.md ("Backup and restore") has the schedule.
set -euo pipefail
out="${1:?usage: backup-postgres.sh OUT_DIR}"
ns="${NAMESPACE:-dandelion-dev}"
read -r -a databases <<< "${DATABASES:-mlflow airflow feedback}"
dir="${out%/}/postgres-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$dir"

in_server() {  # beside the server: compose's postgres service (COMPOSE=1), or the dev StatefulSet
  if [ "${COMPOSE:-0}" = 1 ]; then
    docker compose exec -T postgres "$@"
  else
    kubectl -n "$ns" exec -i statefulset/postgres -c postgres -- "$@"
  fi
}

for db in "${databases[@]}"; do
  archive="$dir/$db.dump"
  if [ -n "${PGHOST:-}" ]; then
    pg_dump --format=custom --no-owner --dbname="$db" --file="$archive"
    pg_restore --list "$archive" > /dev/null
  else
    in_server pg_dump --username=postgres --format=custom --no-owner "$db" > "$archive"
    in_server pg_restore --list < "$archive" > /dev/null
  fi
  echo "backed up $db: $(wc -c < "$archive") bytes"
done
(cd "$dir" && sha256sum -- *.dump > SHA256SUMS)
echo "backup in $dir"
