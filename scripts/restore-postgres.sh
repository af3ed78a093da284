#!/usr/bin/env bash
# Restore databases from a folder written by scripts/backup-postgres.sh. Destructive: each
# database's objects are dropped and recreated from its archive, owned by the component's role.
# Stop the writers first (docs/deployment.md, "Backup and restore"): scale api and mlflow to
# 0 and `helm upgrade … --set scheduler.replicas=0`, then restore, then scale back.
#   scripts/restore-postgres.sh BACKUP_DIR --yes [DATABASE ...]
# Same modes as the backup: the dev StatefulSet (NAMESPACE), docker compose's postgres service
# (COMPOSE=1; compose: stop api, mlflow and the Airflow services first), or a managed
# PostgreSQL (PGHOST…). The roles and empty databases must exist (a fresh server gets them from
# k8s/overlays/dev/postgres/init-databases.sh on its first start).
set -euo pipefail
dir="${1:?usage: restore-postgres.sh BACKUP_DIR --yes [DATABASE ...]}"
[ "${2:-}" = --yes ] || { echo "restoring overwrites the databases: pass --yes" >&2; exit 2; }
shift 2
ns="${NAMESPACE:-dandelion-dev}"
in_server() {  # beside the server: compose's postgres service (COMPOSE=1), or the dev StatefulSet
  if [ "${COMPOSE:-0}" = 1 ]; then
    docker compose exec -T postgres "$@"
  else
    kubectl -n "$ns" exec -i statefulset/postgres -c postgres -- "$@"
  fi
}
(cd "$dir" && sha256sum --check --quiet SHA256SUMS)
if [ "$#" -gt 0 ]; then databases=("$@"); else databases=(mlflow airflow feedback); fi

owner() {  # the role each database belongs to (k8s/overlays/dev/postgres/init-databases.sh)
  case "$1" in feedback) echo dandelion ;; *) echo "$1" ;; esac
}

for db in "${databases[@]}"; do
  archive="$dir/$db.dump"
  [ -f "$archive" ] || { echo "no archive for $db in $dir" >&2; exit 1; }
  args=(--clean --if-exists --no-owner --role="$(owner "$db")" --single-transaction
        --exit-on-error)
  if [ -n "${PGHOST:-}" ]; then
    pg_restore "${args[@]}" --dbname="$db" "$archive"
  else
    in_server pg_restore --username=postgres "${args[@]}" --dbname="$db" < "$archive"
  fi
  echo "restored $db"
done
