"""The agent's discovery cache: what it keeps when a gateway answers well, badly or not."""

from __future__ import annotations

import httpx

from sidecar.agent.discovery import DiscoveryCache
from sidecar.core.protocol import DISCOVERY_PATH, VERSION

ORIGIN = "http://gateway.test:8080"
DOC = {
    "version": VERSION,
    "payee": "fth:payee",
    "max_direct_ttl_seconds": 60,
    "keys": [{"kid": "k1", "public_key": "AAAA"}],
}


def answer(status: int, body: object = None) -> httpx.Response:
    request = httpx.Request("GET", ORIGIN + DISCOVERY_PATH)
    return httpx.Response(status, json=body, request=request)


def test_a_5xx_keeps_the_last_good_document() -> None:
    cache = DiscoveryCache(ttl=300)
    good = cache.store(ORIGIN, answer(200, DOC))
    assert good is not None and good.keys == {"k1": "AAAA"}
    # A worker restarting answers 503: the keys stay, receipts stay verifiable.
    assert cache.store(ORIGIN, answer(503, {"error": "unavailable"})) == good
    assert cache.fresh(ORIGIN) is not None and cache.fresh(ORIGIN).discovery == good  # type: ignore[union-attr]


def test_a_missing_document_replaces_the_last_one() -> None:
    cache = DiscoveryCache(ttl=300)
    cache.store(ORIGIN, answer(200, DOC))
    assert cache.store(ORIGIN, answer(404, {"error": "not found"})) is None
    entry = cache.fresh(ORIGIN)
    assert entry is not None and entry.discovery is None


def test_a_5xx_before_any_document_caches_nothing() -> None:
    cache = DiscoveryCache(ttl=300)
    assert cache.store(ORIGIN, answer(502)) is None
    assert cache.fresh(ORIGIN) is None  # asked again on the next request
