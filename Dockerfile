# The x402 sidecar image: `x402 serve` on a slim Python, as a non-root user.
#   docker build -t x402-sidecar:0.1.0 .
# Without a registry, on a Debian base built locally (docs/kubernetes.md):
#   podman build --build-arg BASE_IMAGE=localhost/x402-base:bookworm -t x402-sidecar:0.1.0 .
# The chart runs it as the `x402` container (and, with no app.image, as the demo service).

# Any image with Python 3.11+ as `python3` (and its venv module).
ARG BASE_IMAGE=python:3.11-slim

# --- build: a virtualenv with the package and its runtime dependencies ----------------
FROM ${BASE_IMAGE} AS build
# A CA bundle for pip when a proxy re-signs TLS (mount it with the build); "": pip's own.
ARG PIP_CERT=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=${PIP_CERT}
# The package's extras: add `cdp` for Coinbase CDP's facilitator (--build-arg
# EXTRAS=server,cdp; config facilitators[].cdp_api_key_file, docs/production.md).
ARG EXTRAS=server
WORKDIR /src
RUN python3 -m venv /opt/x402
# The dependencies first, from pyproject.toml alone (a placeholder package), so a change
# of the sources reuses this layer; then the package itself, without dependencies.
COPY pyproject.toml ./
RUN mkdir sidecar && touch README.md sidecar/__init__.py \
 && /opt/x402/bin/pip install ".[${EXTRAS}]" \
 && /opt/x402/bin/pip uninstall --yes x402-sidecar
COPY README.md ./
COPY sidecar ./sidecar
# The gateway's extra only: Envoy and Redis run as their own containers in the pod.
RUN /opt/x402/bin/pip install --no-deps . \
 && /opt/x402/bin/pip check \
 && /opt/x402/bin/python -c "import sidecar.server.supervisor" \
 && /opt/x402/bin/x402 --version

# --- runtime: the virtualenv only; no compiler, no pip cache, no sources ---------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="x402-sidecar" \
      org.opencontainers.image.description="HTTP 402 payments for any API behind Envoy" \
      org.opencontainers.image.licenses="Apache-2.0"
# Logs unbuffered (decisions appear in `kubectl logs` at once); no .pyc writes, since the
# chart mounts the root filesystem read-only.
ENV PATH=/opt/x402/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/x402 /opt/x402
# The same numeric user the chart's securityContext asks for (runAsNonRoot needs a number).
USER 65532:65532
# 9000: discovery, health, metrics; 9001: ext_authz and gRPC health (worker 0).
EXPOSE 9000 9001
# A command, not an entrypoint: `podman run IMAGE x402 --version` (or `x402 payer ...`).
CMD ["x402", "serve", "--config", "/etc/x402/config/x402.yaml"]
