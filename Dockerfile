# erp-broker container image.
#
#   docker build -t ghcr.io/example/erp-broker:0.1.0 .
#   docker run --rm --read-only --tmpfs /tmp -p 127.0.0.1:8080:8080 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/config/broker.yaml:/etc/erp-broker/broker.yaml:ro" -v "$PWD/secrets:/secrets:ro" \
#     -e IFS_CLIENT_ID -e IFS_USER \
#     ghcr.io/example/erp-broker:0.1.0 --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090
#
# Arguments after the image go to `erp-broker run`; inside a container it must listen on
# 0.0.0.0 for a published port to reach it (docs/operations.md, "The image").
#
# The builder stage makes a wheel of this project and installs it, with its dependencies, into a
# virtualenv at /opt/erp-broker; the final stage copies only that virtualenv onto the same slim
# base, so nothing used to build ends up in the image. Every dependency the project has ships
# manylinux wheels for CPython 3.11 on amd64 and arm64, so no compiler is needed in either stage.
# Both stages must use the same base image: the virtualenv links to its Python.

FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# Build tools pinned here, not resolved at build time, so that rebuilding the same commit gives
# the same wheel.
RUN python -m pip install --no-cache-dir pip==24.3.1 setuptools==75.6.0 wheel==0.45.1

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY broker ./broker
# requirements.lock pins every runtime dependency, transitive ones included: the image holds
# exactly the versions that were tested and audited. The otel extra is in the image, so that
# `tracing` in the config works there; without `tracing` it is never imported.
RUN python -m pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
 && python -m venv /opt/erp-broker \
 && for wheel in /wheels/*.whl; do \
      /opt/erp-broker/bin/pip install --no-cache-dir -c requirements.lock "${wheel}[otel]"; \
    done \
 && /opt/erp-broker/bin/pip uninstall --yes pip setuptools

FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="erp-broker" \
      org.opencontainers.image.description="Credential-broker sidecar for IFS Applications 10, IFS PSO and Infor ION" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID/GID, so that Kubernetes' runAsNonRoot can verify it and runAsUser,
# fsGroup and the image agree. /var/lib/erp-broker holds the SQLite token store; with a
# read-only root filesystem it must be a volume (an emptyDir in Kubernetes).
RUN groupadd --system --gid 10001 erp-broker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin erp-broker \
 && mkdir -p /etc/erp-broker /var/lib/erp-broker \
 && chown 10001:10001 /var/lib/erp-broker \
 && chmod 0700 /var/lib/erp-broker

COPY --from=builder /opt/erp-broker /opt/erp-broker

ENV PATH=/opt/erp-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ERP_BROKER_CONFIG=/etc/erp-broker/broker.yaml

USER 10001:10001
WORKDIR /var/lib/erp-broker
VOLUME ["/var/lib/erp-broker"]

# 8080: proxy (listen); 9090: admin — /healthz, /readyz, /metrics (admin_listen).
EXPOSE 8080 9090

# The slim image has no curl; Python's urllib does the same. Point ERP_BROKER_HEALTHCHECK_URL
# elsewhere when admin_listen is not on port 9090.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('ERP_BROKER_HEALTHCHECK_URL', 'http://127.0.0.1:9090/healthz'), timeout=3)"]

ENTRYPOINT ["erp-broker", "run"]
