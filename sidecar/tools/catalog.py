"""The discovery catalog of `x402 facilitator serve`: `GET /discovery/resources`, as the
standard facilitator API (the bazaar extension) lists the resources it has seen paid.

As the standard's facilitators do, a resource enters the catalog when a payment for it
settles and its envelope carries a valid `bazaar` extension (the client copies the 402's
`extensions` into its payment): `extract_discovery_info`, the official package's own
reader, decides what is catalogued. Each item is the official `DiscoveryResource` in its
wire form; the list is `{x402Version, items, pagination: {limit, offset, total}}`, with
the filters of the official client (`type`, `payTo`, `scheme`, `network`, `extensions`)
and `limit`/`offset`. Kept in memory, at most MAX_ITEMS resources (the oldest go first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from x402.extensions.bazaar import extract_discovery_info
from x402.extensions.bazaar.facilitator_client import DiscoveryResource

log = logging.getLogger("sidecar.facilitator")

MAX_ITEMS = 10_000
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


class BadQuery(ValueError):
    """A `limit` or `offset` that is not a non-negative integer."""


class Catalog:
    def __init__(self, max_items: int = MAX_ITEMS) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def record(self, payload: Mapping[str, Any], requirements: Mapping[str, Any]) -> None:
        """A settled payment: catalog its resource if it declared itself discoverable."""
        try:
            found = extract_discovery_info(dict(payload), dict(requirements))
        except Exception as exc:  # a declaration the official reader cannot read
            log.warning("discovery: not catalogued (%s)", type(exc).__name__)
            return
        if found is None:
            return
        key = (found.resource_url, found.method)
        self._items.pop(key, None)
        self._items[key] = DiscoveryResource(
            resource=found.resource_url,
            type="mcp" if found.tool_name else "http",
            x402_version=found.x402_version,
            accepts=[dict(requirements)],
            last_updated=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            description=found.description,
            mime_type=found.mime_type,
            service_name=found.service_name,
            tags=found.tags,
            icon_url=found.icon_url,
            extensions=found.extensions,
        ).to_dict()
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def page(self, query: Mapping[str, str]) -> dict[str, Any]:
        """One page of the catalog, newest last, filtered as the official client asks."""
        limit = min(_count(query, "limit", DEFAULT_LIMIT), MAX_LIMIT)
        offset = _count(query, "offset", 0)
        items = [item for item in self._items.values() if _matches(item, query)]
        return {
            "x402Version": 2,
            "items": items[offset : offset + limit],
            "pagination": {"limit": limit, "offset": offset, "total": len(items)},
        }


def _count(query: Mapping[str, str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise BadQuery(f"{name} must be a non-negative integer")
    return int(value)


def _matches(item: Mapping[str, Any], query: Mapping[str, str]) -> bool:
    if "type" in query and item["type"] != query["type"]:
        return False
    if "extensions" in query and query["extensions"] not in (item.get("extensions") or {}):
        return False
    wanted = {key: query[key] for key in ("payTo", "scheme", "network") if key in query}
    if not wanted:
        return True
    return any(
        all(str(offer.get(key, "")).lower() == value.lower() for key, value in wanted.items())
        for offer in item["accepts"]
    )
