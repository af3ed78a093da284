#!/bin/sh
# Bring the MLflow backend store's schema to this image's MLflow version before any server of
# that version starts (k8s/deploy.sh runs it as the Job mlflow-db-upgrade, then rolls MLflow).
# - A database MLflow has never used: create the schema, as the first server would, without
#   two replicas racing to do it.
# - An existing one: `mlflow db upgrade` (Alembic migrations; a no-op when already current).
# Back the database up before an MLflow version change (scripts/backup-postgres.sh).
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?MLFLOW_BACKEND_STORE_URI is required}"

if python -c '
import os, sys
import sqlalchemy
engine = sqlalchemy.create_engine(os.environ["MLFLOW_BACKEND_STORE_URI"])
sys.exit(0 if sqlalchemy.inspect(engine).has_table("alembic_version") else 1)
'; then
  echo "existing MLflow schema: upgrading"
  mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"
else
  echo "database without an MLflow schema: creating it"
  python -c '
import os
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore(os.environ["MLFLOW_BACKEND_STORE_URI"], os.environ.get("TMPDIR", "/tmp") + "/unused-artifacts")
'
fi
echo "MLflow schema is current"
