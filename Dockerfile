# syntax=docker/dockerfile:1
# The discovery sidecar's image: a venv made from uv.lock in a throw-away stage, copied alone onto a slim
# Python.
#
#   docker build -t ghcr.io/example/discovery-sidecar:0.2.0 .
#
# Both stages use the same base image, pinned by digest (the multi-arch index of the tag it names): the
# venv's interpreter is a symlink into it. To move to a newer Python patch release, change PYTHON_IMAGE
# (tag and digest: `docker buildx imagetools inspect python:<tag>` prints the digest). The digest below could
# not be checked from the project's machines (no route to Docker Hub); the release workflow checks it before it
# builds, and docs/image.md says how to check it by hand.
# Without Docker, `python -m devcluster.image build` makes an image with this file's final-stage config from
# Debian's packages and the same lock (docs/image.md); tests/integration/test_image.py runs it as a sidecar.
# tests/integration/test_dockerfile_steps.py replays the builder stage's steps in a clean directory, and
# tests/unit/test_dockerfile.py lints this file with hadolint and checks its structure.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie@sha256:193fdd0bbcb3d2ae612bd6cc3548d2f7c78d65b549fcaa8af75624c47474444d

FROM ${PYTHON_IMAGE} AS builder
# UV_COMPILE_BYTECODE: the venv ships its modules' bytecode (.pyc). The running sidecar never writes any
# (PYTHONDONTWRITEBYTECODE, and a read-only root filesystem), so without them every start compiled every
# module it imports again: about a second of CPU at each pod's start-up, for ~10 MiB more image (docs/image.md).
# SOURCE_DATE_EPOCH makes that bytecode hash-checked (py_compile's default under it), not checked against the
# sources' modification times, which a layer's copy may change (then Python would ignore it and compile again).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 \
    SOURCE_DATE_EPOCH=315532800 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src

# uv, pinned by hash: the one tool that is not installed from uv.lock (it reads the lock).
COPY hack/uv.requirements ./hack/
RUN python -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --require-hashes --requirement hack/uv.requirements

# Dependencies first, exactly as uv.lock pins them (versions and hashes), so that this layer is rebuilt only
# when the lock changes. The workspace's pyproject files are all uv needs to read the lock.
COPY pyproject.toml uv.lock ./
COPY clients/python/pyproject.toml ./clients/python/
RUN /opt/uv/bin/uv sync --frozen --no-install-workspace --no-cache --python python

# Then the sidecar and its client, built and installed as wheels (no editable install, no extras).
# README.m[d]: pyproject.toml names README.md as the long description; the glob keeps the build working
# while it is absent.
COPY LICENSE README.m[d] ./
COPY sidecar/ ./sidecar/
COPY clients/python/ ./clients/python/
RUN /opt/uv/bin/uv sync --frozen --no-editable --no-cache --python python \
    && discovery-sidecar --version


FROM ${PYTHON_IMAGE}
# Written by `make version` with the rest of the release (tests/unit/test_version.py).
ARG VERSION=0.2.0
LABEL org.opencontainers.image.title="discovery-sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISCOVERY_LOG_FORMAT=json \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Only the installed venv: no uv, no wheels, no caches, no build tools, no sources.
COPY --from=builder /opt/venv /opt/venv
# A fixed numeric non-root user, so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
WORKDIR /
# HTTP: /healthz, /readyz, /metrics, /debug/peers (DISCOVERY_HTTP_LISTEN, default 0.0.0.0:8090).
EXPOSE 8090
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8090/healthz', timeout=4)"]
ENTRYPOINT ["discovery-sidecar"]
CMD ["run"]
