"""The `paywall` settings group: what a person with a browser gets from a priced route
(server/paywall.py, docs/protocol.md §14).

    paywall: on                # or off; or the mapping below
    paywall:
      enabled: true            # false: every client gets the JSON 402
      app_name: "Atlas API"    # shown on the page and to the wallet ("" : none)
      app_logo: "https://atlas.example/logo.svg"   # an https (or http) URL, "" : none

and per route `paywall: on|off` (routes.<name>.paywall), which wins over the global
switch. Parsed and checked here (ConfigError naming the key); config.py only holds the
raw values and asks for `PaywallSettings.from_config` at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sidecar.core.errors import ConfigError

ROUTE_KEY = "paywall"  # routes.<name>.paywall: on|off
KEYS = ("enabled", "app_name", "app_logo")
MAX_TEXT = 200  # app_name and app_logo: a name and a URL, not a document


@dataclass(frozen=True)
class PaywallSettings:
    """The paywall as configured: on or off, the operator's name and logo, and the routes
    that say otherwise than the global switch."""

    enabled: bool = True
    app_name: str = ""
    app_logo: str = ""
    routes: Mapping[str, bool] = field(default_factory=dict)  # route name → on/off

    def on_for(self, route: str) -> bool:
        """Whether browsers get the page on `route` (a route's own switch wins)."""
        return self.routes.get(route, self.enabled)

    @property
    def anywhere(self) -> bool:
        """Whether any route may answer a browser with the page (else: no paywall at all)."""
        return self.enabled or any(self.routes.values())

    @classmethod
    def from_config(cls, raw: Any, routes: Mapping[str, Any]) -> PaywallSettings:
        """The checked `paywall` value (a switch or a mapping) and each route's switch."""
        spec: dict[str, Any] = {}
        if raw is None:
            pass
        elif isinstance(raw, bool):
            spec["enabled"] = raw
        elif isinstance(raw, Mapping):
            unknown = set(raw) - set(KEYS)
            if unknown:
                raise ConfigError(f"config paywall: unknown key {sorted(unknown)[0]!r}")
            spec.update(raw)
        else:
            raise ConfigError("config paywall: on, off, or a mapping (enabled, app_name, app_logo)")
        enabled = spec.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError("config paywall.enabled: must be on or off")
        name, logo = (_text(key, spec.get(key, "")) for key in ("app_name", "app_logo"))
        if logo and urlsplit(logo).scheme not in ("https", "http"):
            raise ConfigError("config paywall.app_logo: an https:// (or http://) URL")
        switches: dict[str, bool] = {}
        for route, route_spec in routes.items():
            if not isinstance(route_spec, Mapping) or ROUTE_KEY not in route_spec:
                continue
            value = route_spec[ROUTE_KEY]
            if not isinstance(value, bool):
                raise ConfigError(f"config routes.{route}.paywall: must be on or off")
            switches[str(route)] = value
        return cls(enabled, name, logo, switches)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or "\n" in value:
        raise ConfigError(f"config paywall.{key}: a one-line string of at most {MAX_TEXT}")
    return value
