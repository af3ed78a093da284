#!/bin/sh
# First-start initialisation of the local PostgreSQL (compose and the dev overlay): one role and
# one database per component. Passwords come from the environment, never from the repository.
# Runs once, from /docker-entrypoint-initdb.d, as the superuser with an empty data directory.
set -eu

create() {
  role="$1"; password="$2"; database="$3"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set=role="$role" --set=password="$password" --set=db="$database" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
SQL
}

create mlflow "$MLFLOW_DB_PASSWORD" mlflow
create airflow "$AIRFLOW_DB_PASSWORD" airflow
create dandelion "$FEEDBACK_DB_PASSWORD" feedback

# The backup CronJobs' read-only login (dev overlay; compose runs without it): every table of
# every database, nothing writable (pg_read_all_data, PostgreSQL 14+).
if [ -n "${BACKUP_DB_PASSWORD:-}" ]; then
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set=password="$BACKUP_DB_PASSWORD" <<'SQL'
CREATE ROLE backup LOGIN PASSWORD :'password' IN ROLE pg_read_all_data;
SQL
fi
