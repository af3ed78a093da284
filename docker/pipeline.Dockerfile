# syntax=docker/dockerfile:1
# dandelion pipeline: Apache Airflow 3 (the project's `pipeline` extra) with the DAGs, the
# notebooks and the `dandelion` Jupyter kernel that Papermill runs them in. One image for every
# Airflow component (api-server, scheduler, dag-processor, triggerer) and for the pods that the
# KubernetesExecutor starts per task. Compatible with the official Airflow Helm chart: user
# 50000 in group 0, AIRFLOW_HOME=/opt/airflow, `airflow` and `bash` on PATH, and the official
# image's /entrypoint and /clean-logs, which the chart's probes and sidecars run.
# Build from the repository root:  docker build -f docker/pipeline.Dockerfile -t dandelion-pipeline .

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
COPY requirements.lock pyproject.toml README.md ./
# The locked dependencies, installed against an empty package: the environment (TensorFlow,
# Airflow; about 2 GB) depends only on the lock and pyproject.toml, and the `dandelion` command
# and the package's metadata come from pyproject.toml. The library itself is copied over the
# empty package in the final stage, so a change to dandelion_lib/ rebuilds a layer of a few
# hundred KB instead of copying the whole environment again.
# The `pipeline` extra brings `train` (TensorFlow) and psycopg 3, the PostgreSQL driver of the
# Airflow metadata DB (sync and async engines).
RUN mkdir dandelion_lib && touch dandelion_lib/__init__.py \
    && uv pip install --python /opt/venv/bin/python --constraint requirements.lock \
        ".[pipeline]" \
    && /opt/venv/bin/python -m ipykernel install --prefix /opt/venv \
        --name dandelion --display-name "Python (dandelion)" \
    && rm -rf dandelion_lib build dandelion.egg-info

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="dandelion-pipeline" \
      org.opencontainers.image.description="dandelion pipeline: Airflow 3 + Papermill notebooks" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    HOME=/home/airflow \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    DANDELION_WORKDIR=/opt/airflow/dandelion
# uid 50000 / gid 0 is what the official Airflow chart and image use (arbitrary-uid friendly).
# /var/lib/dandelion is the workdir the Kubernetes ConfigMap names (DANDELION_WORKDIR); with a
# read-only root filesystem it is a mount point for a writable volume.
RUN useradd --system --uid 50000 --gid 0 --home-dir /home/airflow --create-home \
       --shell /bin/bash airflow \
    && install -d -o 50000 -g 0 -m 2775 /opt/airflow /opt/airflow/logs /opt/airflow/dandelion \
       /var/lib/dandelion \
    && pip uninstall --no-cache-dir -y -q pip setuptools wheel
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/dandelion-healthcheck
# The official image's contract that the Airflow chart's probes and log-groomer sidecars use:
# `exec /entrypoint airflow jobs check ...` and `bash /clean-logs` (tests/images); executable
# in git, COPY keeps the mode.
COPY docker/entrypoint.sh /entrypoint
COPY docker/clean-logs.sh /clean-logs
# The library over the empty package of the environment's layer, compiled as the rest is.
ARG SITE_PACKAGES=/opt/venv/lib/python3.11/site-packages
COPY dandelion_lib/ ${SITE_PACKAGES}/dandelion_lib/
RUN python -m compileall -q ${SITE_PACKAGES}/dandelion_lib
# Baked-in DAGs and notebooks, on compose and on Kubernetes alike (no git-sync): the DAGs always
# match the library of the same image.
WORKDIR /opt/dandelion
COPY dags/ dags/
COPY notebooks/ notebooks/
WORKDIR /opt/airflow
USER 50000:0
EXPOSE 8080
# Scheduler, dag-processor and triggerer pass when their job heartbeats on this host; compose
# overrides the check for the api-server (HTTP). Kubernetes uses the chart's own probes.
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=3 \
    CMD ["airflow", "jobs", "check", "--local", "--limit", "1"]
CMD ["airflow", "version"]
