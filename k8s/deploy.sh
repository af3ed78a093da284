#!/usr/bin/env bash
# Deploy one overlay with the images CD just pushed (pinned by digest), in the order an empty
# cluster needs (docs/deployment.md, "Bootstrap order"):
#   1. secrets       the registry pull secret from REGISTRY_USERNAME/REGISTRY_PASSWORD; dev: the
#                    rest created if missing (k8s/secrets/create-dev-secrets.sh); prod: checked
#   2. foundation    namespace, ConfigMaps, policies, RBAC, Services, backup CronJobs; dev:
#                    PostgreSQL + MinIO (ready; buckets, versioning, per-component users)
#   3. MLflow        schema Job (create or `mlflow db upgrade`), then the server rolls out
#   4. Airflow       our migration Job (`airflow db migrate`), THEN the pinned chart with
#                    `--wait` (no Helm hook: nothing waits on a post-install Job), then the
#                    admin user
#   5. champion      if the registry has no champion yet: run the pipeline DAG and wait for it
#   6. serving       the API (ready only with a champion), the web app and the reviewer page
# No step waits on a later one, so a fresh environment cannot deadlock. Every wait has a bound
# (the *_TIMEOUT_S below); their sum, WORST_CASE_S, is what CD's job timeout must exceed
# (tests/deploy checks it).
#
# Used by .github/workflows/cd.yml and kind.yml; runnable by hand with the same variables:
#   OVERLAY=dev NAMESPACE=dandelion-dev VERSION=1.2.3 \
#   API_IMAGE=ghcr.io/o/dandelion-api@sha256:… APP_IMAGE=… MLFLOW_IMAGE=… \
#   PIPELINE_REPOSITORY=ghcr.io/o/dandelion-pipeline [PIPELINE_IMAGE=<repository>@sha256:…] \
#   [REGISTRY_USERNAME=… REGISTRY_PASSWORD=… [REGISTRY_SERVER=ghcr.io]] \
#   [KUBECONFIG_DATA=<base64 kubeconfig>] [SKIP_FIRST_RUN=1] [SEED_SOURCES_DIR=<folder>] \
#   bash k8s/deploy.sh
# Needs kubectl, kustomize and helm (preinstalled on GitHub's Ubuntu runners), and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OVERLAY:?}" "${NAMESPACE:?}" "${VERSION:?}" "${API_IMAGE:?}" "${APP_IMAGE:?}" \
  "${MLFLOW_IMAGE:?}" "${PIPELINE_REPOSITORY:?}"
AIRFLOW_CHART_VERSION="${AIRFLOW_CHART_VERSION:-1.22.0}"
AIRFLOW_RELEASE=airflow
DAG_ID=dandelion_pipeline

# Bounds of each waiting step, in seconds.
DATA_TIMEOUT_S=600          # PostgreSQL, MinIO and the bucket Job (dev)
MLFLOW_SCHEMA_TIMEOUT_S=600 # the schema Job
MLFLOW_TIMEOUT_S=600        # MLflow rollout
AIRFLOW_MIGRATE_TIMEOUT_S=900 # the Airflow migration Job
AIRFLOW_TIMEOUT_S=1200      # helm --wait: every Airflow component ready
ADMIN_TIMEOUT_S=600         # the admin-user Job
DAG_PARSE_TIMEOUT_S=300     # the DAG processor has parsed the baked-in DAGs
PIPELINE_TIMEOUT_S="${PIPELINE_TIMEOUT_S:-3600}" # first pipeline run up to a champion
SERVING_TIMEOUT_S=600       # API and app rollouts
REVIEW_TIMEOUT_S=300        # reviewer page rollout (one pod; no model to load)
WORST_CASE_S=$((DATA_TIMEOUT_S * 2 + MLFLOW_SCHEMA_TIMEOUT_S + MLFLOW_TIMEOUT_S \
  + AIRFLOW_MIGRATE_TIMEOUT_S + AIRFLOW_TIMEOUT_S \
  + ADMIN_TIMEOUT_S + DAG_PARSE_TIMEOUT_S + PIPELINE_TIMEOUT_S + SERVING_TIMEOUT_S * 2 \
  + REVIEW_TIMEOUT_S))

# Which rendered objects each stage applies (kubectl apply -l). Every object of an overlay falls
# in exactly one stage (tests/deploy checks it).
STAGE_FOUNDATION='app.kubernetes.io/name notin (mlflow,mlflow-db-upgrade,api,app,review)'
STAGE_MLFLOW_SCHEMA='app.kubernetes.io/name=mlflow-db-upgrade'
STAGE_MLFLOW='app.kubernetes.io/name=mlflow'
STAGE_SERVING='app.kubernetes.io/name in (api,app,review)'

log() { printf '[deploy %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
k() { kubectl -n "$NAMESPACE" "$@"; }
# Server-side apply that takes the fields back from another manager (e.g. after the documented
# `kubectl rollout undo`, which writes the Deployment as kubectl-rollout): without
# --force-conflicts the next deploy would fail on those fields.
apply() { kubectl apply --server-side --force-conflicts "$@"; }

if [ -n "${KUBECONFIG_DATA:-}" ]; then
  export KUBECONFIG="${RUNNER_TEMP:-$(mktemp -d)}/kubeconfig"
  printf '%s' "$KUBECONFIG_DATA" | base64 -d > "$KUBECONFIG"
  chmod 600 "$KUBECONFIG"
fi
log "deploying ${OVERLAY} ${VERSION} to ${NAMESPACE} (worst case ${WORST_CASE_S}s)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r k8s "$work/"
(
  cd "$work/k8s/overlays/$OVERLAY"
  kustomize edit set image "dandelion-api=${API_IMAGE}" "dandelion-app=${APP_IMAGE}" \
    "dandelion-mlflow=${MLFLOW_IMAGE}"
)
pipeline_image="${PIPELINE_IMAGE:-${PIPELINE_REPOSITORY}:${VERSION}}"
for job in admin-user migrate-db; do
  (
    cd "$work/k8s/airflow/$job"
    kustomize edit set namespace "$NAMESPACE"
    kustomize edit set image "dandelion-pipeline=${pipeline_image}"
  )
  kustomize build "$work/k8s/airflow/$job" > "$work/$job.yaml"
done
kustomize build "$work/k8s/overlays/$OVERLAY" > "$work/rendered.yaml"
grep -q ':latest' "$work/rendered.yaml" "$work/admin-user.yaml" "$work/migrate-db.yaml" \
  && { echo "refusing to deploy a :latest image" >&2; exit 1; }
grep -q "^  namespace: ${NAMESPACE}\$" "$work/rendered.yaml" \
  || { echo "overlay ${OVERLAY} does not render into namespace ${NAMESPACE}" >&2; exit 1; }

# --- 1. secrets ------------------------------------------------------------------------------
if [ "$OVERLAY" = dev ]; then
  bash k8s/secrets/create-dev-secrets.sh "$NAMESPACE"
fi
# The registry pull secret (every pod's imagePullSecrets; the chart's registry.secretName), from
# the environment: built in python so the password never appears on a command line. Without
# credentials an existing secret is kept (the check below fails when there is none).
if [ -n "${REGISTRY_USERNAME:-}" ] && [ -n "${REGISTRY_PASSWORD:-}" ]; then
  REGISTRY_SERVER="${REGISTRY_SERVER:-${PIPELINE_REPOSITORY%%/*}}" NAMESPACE="$NAMESPACE" python3 -c '
import base64, json, os
user, password = os.environ["REGISTRY_USERNAME"], os.environ["REGISTRY_PASSWORD"]
auth = base64.b64encode(f"{user}:{password}".encode()).decode()
config = {"auths": {os.environ["REGISTRY_SERVER"]: {"username": user, "password": password, "auth": auth}}}
print(json.dumps({
    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
    "metadata": {"name": "dandelion-registry", "namespace": os.environ["NAMESPACE"],
                 "labels": {"app.kubernetes.io/part-of": "dandelion"}},
    "data": {".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
}))' | apply -f -
fi
missing=()
for secret in $(python3 -c '
import re, sys
print(" ".join(re.findall(r"^  name: (\S+)$", open(sys.argv[1]).read(), re.M)))
' k8s/secrets/secrets.example.yaml); do
  case "$OVERLAY:$secret" in prod:minio-root | prod:dandelion-postgres) continue ;; esac
  k get secret "$secret" >/dev/null 2>&1 || missing+=("$secret")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing secrets in ${NAMESPACE}: ${missing[*]} (templates: k8s/secrets/)" >&2
  exit 1
fi

# --- 2. foundation and data services ---------------------------------------------------------
# A finished one-shot Job is immutable: replace it rather than patch it.
k delete job -l app.kubernetes.io/name=minio-init --ignore-not-found --wait=true
apply -f "$work/rendered.yaml" -l "$STAGE_FOUNDATION"
for sts in $(k get statefulset -l app.kubernetes.io/part-of=dandelion -o name); do
  k rollout status "$sts" --timeout="${DATA_TIMEOUT_S}s"
done
if k get job minio-init >/dev/null 2>&1; then
  k wait --for=condition=complete job/minio-init --timeout="${DATA_TIMEOUT_S}s"
fi
# dev: seed the sources bucket from a local folder (SEED_SOURCES_DIR/dandelion-sources/<source>/
# <label>/…; the kind job does), with the operator's restore script (MinIO root, AWS CLI).
if [ -n "${SEED_SOURCES_DIR:-}" ]; then
  [ "$OVERLAY" = dev ] || { echo "SEED_SOURCES_DIR is for the dev overlay's MinIO only" >&2; exit 1; }
  BUCKETS=dandelion-sources bash scripts/restore-object-store.sh "$SEED_SOURCES_DIR" --yes
fi

# --- 3. MLflow: schema first, then the server ------------------------------------------------
k delete job -l app.kubernetes.io/name=mlflow-db-upgrade --ignore-not-found --wait=true
apply -f "$work/rendered.yaml" -l "$STAGE_MLFLOW_SCHEMA"
k wait --for=condition=complete job/mlflow-db-upgrade --timeout="${MLFLOW_SCHEMA_TIMEOUT_S}s" || {
  k logs job/mlflow-db-upgrade --tail=50 >&2 || true
  exit 1
}
apply -f "$work/rendered.yaml" -l "$STAGE_MLFLOW"
k rollout status deployment/mlflow --timeout="${MLFLOW_TIMEOUT_S}s"

# --- 4. Airflow: our migration Job, then the chart, then the admin user ----------------------
# The chart's own migration Job is off (a post-install hook: `helm --wait` would deadlock on
# it). Ours runs first and completes; the components' wait-for-migrations init containers
# then find the schema current, and --wait only waits for them to be Ready.
k delete job -l app.kubernetes.io/name=airflow-migrate-db --ignore-not-found --wait=true
apply -f "$work/migrate-db.yaml"
k wait --for=condition=complete job/airflow-migrate-db --timeout="${AIRFLOW_MIGRATE_TIMEOUT_S}s" || {
  k logs job/airflow-migrate-db --tail=50 >&2 || true
  exit 1
}
# Task pods: the executor's worker_container_* and the pod template, by digest when CD passes
# the pushed image (tag `<version>@sha256:…`, see k8s/airflow/values.yaml).
task_tag="$VERSION"
helm_args=(--set "images.airflow.repository=${PIPELINE_REPOSITORY}"
           --set-string "images.airflow.tag=${VERSION}")
# The pipeline image by digest too, when CD passes the pushed one (PIPELINE_IMAGE=ref@sha256:…).
if [[ "${PIPELINE_IMAGE:-}" == *@sha256:* ]]; then
  helm_args+=(--set "images.airflow.digest=${PIPELINE_IMAGE#*@}")
  task_tag="${VERSION}@${PIPELINE_IMAGE#*@}"
fi
helm_args+=(--set "images.pod_template.repository=${PIPELINE_REPOSITORY}"
            --set-string "images.pod_template.tag=${task_tag}"
            --set "config.kubernetes_executor.worker_container_repository=${PIPELINE_REPOSITORY}"
            --set-string "config.kubernetes_executor.worker_container_tag=${task_tag}")
helm repo add apache-airflow https://airflow.apache.org --force-update >/dev/null
helm upgrade --install "$AIRFLOW_RELEASE" apache-airflow/airflow --version "$AIRFLOW_CHART_VERSION" \
  --namespace "$NAMESPACE" \
  -f k8s/airflow/values.yaml -f "k8s/airflow/values-${OVERLAY}.yaml" \
  -f monitoring/airflow-statsd-values.yaml \
  "${helm_args[@]}" \
  --wait --timeout "${AIRFLOW_TIMEOUT_S}s"
k delete job -l app.kubernetes.io/name=airflow-admin-user --ignore-not-found --wait=true
apply -f "$work/admin-user.yaml"
k wait --for=condition=complete job/airflow-admin-user --timeout="${ADMIN_TIMEOUT_S}s"

# --- 5. a champion before the API: the first pipeline run of a fresh environment -------------
has_champion() {
  k exec deploy/mlflow -c mlflow -- python -c '
from mlflow import MlflowClient
MlflowClient("http://127.0.0.1:5000").get_model_version_by_alias("dandelion", "champion")
' >/dev/null 2>&1
}
airflow_cli() { k exec "deploy/${AIRFLOW_RELEASE}-scheduler" -c scheduler -- airflow "$@"; }
if has_champion; then
  log "registry has a champion: no first run needed"
elif [ "${SKIP_FIRST_RUN:-0}" = 1 ]; then
  log "no champion yet and SKIP_FIRST_RUN=1: the API stays unready until a pipeline run promotes one"
else
  log "no champion yet: running ${DAG_ID} once (bound ${PIPELINE_TIMEOUT_S}s)"
  deadline=$((SECONDS + DAG_PARSE_TIMEOUT_S))
  until airflow_cli dags unpause "$DAG_ID" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "DAG ${DAG_ID} not parsed after ${DAG_PARSE_TIMEOUT_S}s" >&2; exit 1; }
    sleep 10
  done
  run_id="deploy-$(date -u +%Y%m%dT%H%M%S)"
  airflow_cli dags trigger "$DAG_ID" --run-id "$run_id" >/dev/null
  deadline=$((SECONDS + PIPELINE_TIMEOUT_S))
  until has_champion; do
    state="$(airflow_cli dags state "$DAG_ID" "$run_id" 2>/dev/null | tail -n 1 || true)"
    if [ "$state" = failed ]; then
      echo "pipeline run ${run_id} failed: see its task logs (remote logging) in Airflow" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "no champion after ${PIPELINE_TIMEOUT_S}s (run ${run_id}: ${state:-unknown})" >&2
      exit 1
    fi
    sleep 30
  done
  log "champion registered by run ${run_id}"
fi

# --- 6. serving ------------------------------------------------------------------------------
apply -f "$work/rendered.yaml" -l "$STAGE_SERVING"
k rollout status deployment/api --timeout="${SERVING_TIMEOUT_S}s"
k rollout status deployment/app --timeout="${SERVING_TIMEOUT_S}s"
k rollout status deployment/review --timeout="${REVIEW_TIMEOUT_S}s"
log "deployed ${OVERLAY} ${VERSION} to namespace ${NAMESPACE}"
