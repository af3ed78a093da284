# syntax=docker/dockerfile:1
# dandelion web app: Voila serving dashboards/app.ipynb on port 8866 (`python -m dashboards.serve`).
# The app calls the API over HTTP (DANDELION_API_URL); its kernel needs no TensorFlow, so this
# image installs only pyproject.toml's `app` extra (Voila, ipywidgets, ipykernel) and the core
# dependencies (httpx, Pillow for thumbnails, the settings'), pinned by the lock. The same image
# serves the reviewer page on port 8867 (`python -m dashboards.serve --review`, compose's
# `review` service, k8s/base/review/), whose kernel reads the feedback database and the store
# directly: SQLAlchemy + psycopg, boto3, NumPy (image checks), pandas + pyarrow (the latest
# dataset manifest). Still no TensorFlow.
# Build from the repository root:  docker build -f docker/app.Dockerfile -t dandelion-app .

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
# The dependencies of the `app` extra (the project itself is copied as source below).
RUN uv pip install --python /opt/venv/bin/python --constraint requirements.lock \
        -r pyproject.toml --extra app \
    && /opt/venv/bin/python -m ipykernel install --prefix /opt/venv \
        --name dandelion --display-name "Python (dandelion)"

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="dandelion-app" \
      org.opencontainers.image.description="dandelion web app (Voila)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/dandelion \
    JUPYTER_RUNTIME_DIR=/tmp/jupyter-runtime \
    JUPYTER_CONFIG_DIR=/tmp/jupyter-config \
    IPYTHONDIR=/tmp/ipython \
    DANDELION_WORKDIR=/tmp/dandelion \
    DANDELION_APP_HOST=0.0.0.0 \
    DANDELION_API_URL=http://api:8000
RUN groupadd --system --gid 10001 dandelion \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/dandelion --create-home \
       --shell /usr/sbin/nologin dandelion \
    && pip uninstall --no-cache-dir -y -q pip setuptools wheel
COPY --from=builder /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/dandelion-healthcheck
WORKDIR /app
# dandelion_lib is copied as source: the app imports only its core and data modules (the
# reviewer page's feedback store and review queue).
COPY dandelion_lib/ dandelion_lib/
COPY dashboards/ dashboards/
USER 10001:10001
EXPOSE 8866
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/dandelion-healthcheck", "http://127.0.0.1:8866/health/live"]
CMD ["python", "-m", "dashboards.serve"]
