# syntax=docker/dockerfile:1
# The discovery sidecar's image: a venv built in a throw-away stage, copied alone onto a slim Python.
#
#   docker build -t ghcr.io/example/discovery-sidecar:0.1.0 .
#
# Both stages use the same base image: the venv's interpreter is a symlink into it. To move to a newer
# Python patch release, change PYTHON_IMAGE (or pass --build-arg PYTHON_IMAGE=...).
# tests/integration/test_dockerfile_steps.py replays the builder stage's steps in a clean venv, and
# tests/unit/test_dockerfile.py lints this file with hadolint and checks its structure.
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, read from pyproject.toml alone, so that this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /src/requirements.txt \
    && pip install --no-cache-dir --requirement /src/requirements.txt

# Then the project itself, as a wheel (no editable install, no dev extras). README.m[d]: pyproject.toml
# names README.md as the long description; the glob keeps the build working while it is absent.
COPY pyproject.toml README.m[d] ./
COPY sidecar/ ./sidecar/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir --no-deps /wheels/discovery_sidecar-*.whl \
    && discovery-sidecar --version


FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISCOVERY_LOG_FORMAT=json \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Only the installed venv: no wheels, no pip cache, no build tools, no sources.
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
