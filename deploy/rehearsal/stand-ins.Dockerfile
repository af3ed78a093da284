# Rehearsal-only stand-ins for the third-party images of compose.yaml that cannot be pulled
# here (never shipped): one image, started with different commands.
#   postgres        -> Debian's PostgreSQL 15 behind an entrypoint with the official contract
#   minio           -> the moto server (S3 protocol) on port 9000; minio-init -> a boto3 script
#   prometheus      -> Debian's Prometheus; statsd-exporter -> a StatsD receiver in Python
# Base: dandelion-rehearsal/services (scripts/docker-stand-ins.sh: debootstrap + Debian packages).
FROM dandelion-rehearsal/services:bookworm
ARG PIP_INDEX_URL
RUN python3 -m venv /opt/moto \
    && /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check -q \
       "moto[server]" boto3
COPY deploy/rehearsal/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
COPY deploy/rehearsal/s3_init.py /usr/local/bin/s3-init
COPY deploy/rehearsal/statsd_stand_in.py /usr/local/bin/statsd-stand-in
ENV PATH=/opt/moto/bin:/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["bash"]
