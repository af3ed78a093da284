# syntax=docker/dockerfile:1
# MLflow tracking + registry server: PostgreSQL backend store, S3 (MinIO) artifacts proxied by
# the server (clients never need S3 credentials for models). Configured by environment:
# MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_SERVER_ALLOWED_HOSTS,
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / MLFLOW_S3_ENDPOINT_URL. Prometheus metrics on
# /metrics (--expose-prometheus; the workers share them through files under /tmp).
# Build from the repository root:  docker build -f docker/mlflow.Dockerfile -t dandelion-mlflow .

FROM python:3.11.14-slim-bookworm AS builder
# Optional: another package index (a mirror, or the loopback wheelhouse index of
# `nox -s images` on machines without index access): --build-arg PIP_INDEX_URL=URL
# --build-arg UV_DEFAULT_INDEX=URL. Build stage only: nothing of it reaches the final image.
ARG PIP_INDEX_URL
ARG UV_DEFAULT_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN pip install --no-cache-dir uv==0.13.9 && python -m venv --without-pip /opt/venv
WORKDIR /src
COPY requirements.lock ./
RUN uv pip install --python /opt/venv/bin/python --constraint requirements.lock \
        mlflow boto3 "psycopg[binary]" prometheus-flask-exporter

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="dandelion-mlflow" \
      org.opencontainers.image.description="MLflow tracking and registry server for dandelion" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/mlflow \
    MLFLOW_TMP_DIR=/tmp
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/mlflow --create-home \
       --shell /usr/sbin/nologin mlflow \
    && pip uninstall --no-cache-dir -y -q pip setuptools wheel
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/dandelion-healthcheck
WORKDIR /home/mlflow
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/dandelion-healthcheck", "http://127.0.0.1:5000/health"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "2", "--serve-artifacts", \
     "--expose-prometheus", "/tmp/mlflow-metrics"]
