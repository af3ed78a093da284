# syntax=docker/dockerfile:1
# dandelion serving API: `python -m api` (Litestar on uvicorn), port 8000.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t dandelion-api .

# --- build stage: the `serve` extra, at the versions of requirements.lock ----------------------
FROM python:3.11.14-slim-bookworm AS builder
# Optional: another package index (a mirror, or the loopback wheelhouse index of
# `nox -s images` on machines without index access): --build-arg PIP_INDEX_URL=URL
# --build-arg UV_DEFAULT_INDEX=URL. Build stage only: nothing of it reaches the final image.
ARG PIP_INDEX_URL
ARG UV_DEFAULT_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv==0.13.9 && python -m venv --without-pip /opt/venv
WORKDIR /src
COPY requirements.lock pyproject.toml ./
# The dependencies of pyproject.toml's `serve` extra (the project itself is copied as source
# below), exactly at the lock's versions. No TensorFlow or Keras: the model runs on ONNX Runtime
# (the artifact every version gets at registration, dandelion_lib/serving/runtime.py); MLflow's
# client only (mlflow-skinny), scipy for the drift tests.
RUN uv pip install --python /opt/venv/bin/python --constraint requirements.lock \
        -r pyproject.toml --extra serve

# --- runtime stage: no compilers, no uv, no sources beyond the API package --------------------
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="dandelion-api" \
      org.opencontainers.image.description="dandelion prediction API (MLflow champion model)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/dandelion \
    DANDELION_WORKDIR=/var/lib/dandelion \
    DANDELION_API_HOST=0.0.0.0 \
    DANDELION_API_PORT=8000
# glibc malloc: at most 2 arenas (by default every thread that allocates may get its own, up to
# 8 per core of the node, whatever the CPU limit) and a fixed 1 MiB mmap threshold (by default
# it rises to 32 MiB, so the model's large activation buffers land in the arenas and stay there
# once freed). Measured with `nox -s bench -- soak` (docs/reliability.md, "Memory under a soak"):
# with glibc's defaults RSS grew 1176 -> 1264 MiB in 6 min with 16 arenas holding up to 395 MiB
# freed; with these settings the arenas held 12 MiB freed and RSS stayed at ~880-995 MiB.
ENV MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576
RUN groupadd --system --gid 10001 dandelion \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dandelion --create-home \
       --shell /usr/sbin/nologin dandelion \
    && install -d -o 10001 -g 10001 /var/lib/dandelion \
    && pip uninstall --no-cache-dir -y -q pip setuptools wheel
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/dandelion-healthcheck
WORKDIR /app
# dandelion_lib as source: the API imports only its serving modules (no TensorFlow import).
COPY dandelion_lib/ dandelion_lib/
COPY api/ api/
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/usr/local/bin/dandelion-healthcheck", "http://127.0.0.1:8000/health/live"]
CMD ["python", "-m", "api"]
