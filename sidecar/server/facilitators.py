"""Config `facilitators`: the x402 facilitators `exact` is verified and settled through, in
order, each with its credentials (docs/configuration.md). The single `facilitator_url`
of earlier configs is a list of one without credentials."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import ConfigError
from sidecar.server.credentials import credentials
from sidecar.server.facilitation import Endpoint, host_of

KEYS = ("url", "headers_file", "cdp_api_key_file")


@dataclass(frozen=True, slots=True)
class FacilitatorSpec:
    url: str
    headers_file: str = ""
    cdp_api_key_file: str = ""
    key: str = "facilitator_url"  # where it was configured, for errors

    @property
    def host(self) -> str:
        return host_of(self.url)

    def endpoint(self) -> Endpoint:
        """Its client side, the credential files read (a ConfigError names a bad one)."""
        return Endpoint(self.url, credentials(self.headers_file, self.cdp_api_key_file, self.key))


def specs(listed: Sequence[Any], url: str) -> tuple[FacilitatorSpec, ...]:
    """`facilitators` (a list of mappings) or `facilitator_url`, checked; () if neither."""
    if listed and url:
        raise ConfigError("config facilitators: set it or facilitator_url, not both")
    if url:
        return (_checked(FacilitatorSpec(url)),)
    found = []
    for index, entry in enumerate(listed):
        key = f"config facilitators[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{key}: a mapping with url (and headers_file or cdp_api_key_file)")
        unknown = sorted(set(map(str, entry)) - set(KEYS))
        if unknown:
            raise ConfigError(f"{key}: unknown key {unknown[0]!r} (one of {', '.join(KEYS)})")
        values = {name: entry.get(name, "") for name in KEYS}
        if not all(isinstance(value, str) for value in values.values()):
            raise ConfigError(f"{key}: url, headers_file and cdp_api_key_file are strings")
        if values["headers_file"] and values["cdp_api_key_file"]:
            raise ConfigError(f"{key}: headers_file or cdp_api_key_file, not both")
        found.append(_checked(FacilitatorSpec(**values, key=key.removeprefix("config "))))
    return tuple(found)


def _checked(spec: FacilitatorSpec) -> FacilitatorSpec:
    if not spec.url.startswith(("http://", "https://")):
        raise ConfigError(f"config {spec.key}: an http(s) URL")
    return spec


def endpoints(found: Sequence[FacilitatorSpec]) -> list[Endpoint]:
    """Every facilitator's client side: a missing, unreadable or group/world-readable
    credentials file is a ConfigError naming it (start-up stops)."""
    return [spec.endpoint() for spec in found]
