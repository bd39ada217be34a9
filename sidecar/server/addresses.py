"""Listen addresses in the config ("host:port", IPv6 in brackets), for every listener:
the workers, the side port, the admin API and the dashboard."""

from __future__ import annotations

from sidecar.core.errors import ConfigError


def split_host_port(address: str, key: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"config {key}: {address!r} is not host:port")
    return host.strip("[]"), int(port)
