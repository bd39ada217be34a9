"""A payment's identity and fingerprint (core/retries.py), against the official
payment-identifier extension's format."""

from __future__ import annotations

from typing import Any

import pytest
from x402.extensions.payment_identifier import generate_payment_id, is_valid_payment_id

from sidecar.core import protocol, retries
from sidecar.core.errors import InvalidPaymentIdentifier


def envelope(extension: Any) -> dict[str, Any]:
    return {"x402Version": 2, "extensions": {retries.PAYMENT_IDENTIFIER: extension}}


def test_the_official_clients_id_is_read() -> None:
    payment_id = generate_payment_id()
    found = retries.identifier(envelope({"info": {"required": False, "id": payment_id}}))
    assert found == payment_id
    assert retries.identifier({"x402Version": 2}) is None
    assert retries.identifier(envelope({"info": {"required": True}})) is None


@pytest.mark.parametrize(
    "extension",
    [
        {"info": {"required": False, "id": "short"}},
        {"info": {"required": False, "id": "x" * 129}},
        {"info": {"required": False, "id": "pay_" + "é" * 16}},
        {"info": {"required": False, "id": 1234567890123456789}},
        {"info": "pay_0123456789abcdef"},
        "pay_0123456789abcdef",
    ],
)
def test_a_malformed_id_is_refused_as_the_extension_would(extension: Any) -> None:
    identifier = extension.get("info", {}) if isinstance(extension, dict) else None
    if isinstance(identifier, dict) and isinstance(identifier.get("id"), str):
        assert not is_valid_payment_id(identifier["id"])  # the official check agrees
    with pytest.raises(InvalidPaymentIdentifier) as raised:
        retries.identifier(envelope(extension))
    assert (raised.value.reason, raised.value.status) == ("invalid_payment_identifier", 400)


def test_the_envelope_carries_the_id_beside_a_prepaid_proof() -> None:
    payment_id = generate_payment_id()
    value = protocol.encode_header(
        {
            "x402Version": 2,
            "payload": {"version": protocol.VERSION},
            "extensions": {
                retries.PAYMENT_IDENTIFIER: {"info": {"required": False, "id": payment_id}}
            },
        }
    )
    assert protocol.decode_paid(value, 4096) == ({"version": protocol.VERSION}, payment_id)


def test_the_fingerprint_covers_every_part_and_identities_never_collide() -> None:
    base = ("GET", "/a", "q=1", 10, "gw", "route")
    assert retries.fingerprint(*base) == retries.fingerprint(*base)
    assert retries.fingerprint(*base) != retries.fingerprint("GET", "/a", "q=2", 10, "gw", "route")
    assert retries.fingerprint("GET", "/a\nb", "") != retries.fingerprint("GET", "/a", "b")
    assert retries.identity("n1", "n1") != retries.identity(None, "n1")
