# The x402 sidecar image: `x402 serve` on a slim Python, as a non-root user.
#   docker build -t x402-sidecar:0.1.0 .
# The chart runs it as the `x402` container (and, with no app.image, as the demo service).

ARG PYTHON_VERSION=3.11

# --- build: a virtualenv with the package and its runtime dependencies ----------------
FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/x402
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# The gateway's extra only: Envoy and Redis run as their own containers in the pod.
RUN /opt/x402/bin/pip install '.[server]' \
 && /opt/x402/bin/python -c "import sidecar.server.supervisor" \
 && /opt/x402/bin/x402 --version

# --- runtime: the virtualenv only; no compiler, no pip cache, no sources ---------------
FROM python:${PYTHON_VERSION}-slim
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
EXPOSE 9001 9002
ENTRYPOINT ["x402", "serve"]
CMD ["--config", "/etc/x402/config/x402.yaml"]
