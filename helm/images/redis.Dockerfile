# Redis for the chart's in-chart ledger (redis.internal) without a registry: Debian's
# redis-server on the locally built Debian base. Runs as the uid the chart asks for.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install --yes --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
USER 999:999
ENTRYPOINT ["redis-server"]
