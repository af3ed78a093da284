#!/usr/bin/env bash
# Deploy one overlay with the images CD just pushed (pinned by digest), then Airflow with the
# official chart. Used by .github/workflows/cd.yml; runnable by hand with the same variables:
#   OVERLAY=dev NAMESPACE=dandelion-dev VERSION=1.2.3 \
#   API_IMAGE=ghcr.io/o/dandelion-api@sha256:… APP_IMAGE=… MLFLOW_IMAGE=… \
#   PIPELINE_REPOSITORY=ghcr.io/o/dandelion-pipeline [PIPELINE_IMAGE=<repository>@sha256:…] \
#   [GIT_REPO_URL=https://github.com/o/r.git] \
#   [KUBECONFIG_DATA=<base64 kubeconfig>] \
#   bash k8s/deploy.sh
# Needs kubectl, kustomize and helm (preinstalled on GitHub's Ubuntu runners).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OVERLAY:?}" "${NAMESPACE:?}" "${VERSION:?}" "${API_IMAGE:?}" "${APP_IMAGE:?}" \
  "${MLFLOW_IMAGE:?}" "${PIPELINE_REPOSITORY:?}"
AIRFLOW_CHART_VERSION="${AIRFLOW_CHART_VERSION:-1.22.0}"

if [ -n "${KUBECONFIG_DATA:-}" ]; then
  export KUBECONFIG="${RUNNER_TEMP:-$(mktemp -d)}/kubeconfig"
  printf '%s' "$KUBECONFIG_DATA" | base64 -d > "$KUBECONFIG"
  chmod 600 "$KUBECONFIG"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r k8s "$work/"
(
  cd "$work/k8s/overlays/$OVERLAY"
  kustomize edit set image "dandelion-api=${API_IMAGE}" "dandelion-app=${APP_IMAGE}" \
    "dandelion-mlflow=${MLFLOW_IMAGE}"
)
kustomize build "$work/k8s/overlays/$OVERLAY" > "$work/rendered.yaml"
grep -q ':latest' "$work/rendered.yaml" && { echo "refusing to deploy a :latest image" >&2; exit 1; }

# A finished one-shot Job (dev bucket set-up) is immutable: replace it rather than patch it.
kubectl -n "$NAMESPACE" delete job -l app.kubernetes.io/name=minio-init --ignore-not-found
kubectl apply --server-side -f "$work/rendered.yaml"
kubectl -n "$NAMESPACE" rollout status deployment/mlflow --timeout=10m
kubectl -n "$NAMESPACE" rollout status deployment/api --timeout=10m
kubectl -n "$NAMESPACE" rollout status deployment/app --timeout=10m

helm_args=(--set "images.airflow.repository=${PIPELINE_REPOSITORY}"
           --set "images.airflow.tag=${VERSION}")
# The pipeline image by digest too, when CD passes the pushed one (PIPELINE_IMAGE=ref@sha256:…).
if [[ "${PIPELINE_IMAGE:-}" == *@sha256:* ]]; then
  helm_args+=(--set "images.airflow.digest=${PIPELINE_IMAGE#*@}")
fi
# git-sync pulls the DAGs and notebooks from this repository (GIT_REPO_URL, set by CD).
if [ -n "${GIT_REPO_URL:-}" ]; then
  helm_args+=(--set "dags.gitSync.repo=${GIT_REPO_URL}")
fi
helm repo add apache-airflow https://airflow.apache.org --force-update >/dev/null
helm upgrade --install airflow apache-airflow/airflow --version "$AIRFLOW_CHART_VERSION" \
  --namespace "$NAMESPACE" \
  -f k8s/airflow/values.yaml -f "k8s/airflow/values-${OVERLAY}.yaml" \
  "${helm_args[@]}" \
  --wait --timeout 15m
echo "deployed ${OVERLAY} ${VERSION} to namespace ${NAMESPACE}"
