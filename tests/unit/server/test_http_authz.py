"""The HTTP transport's answers, read back with the same parser family Envoy's peers use."""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools

from sidecar.core import phases
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.server.authz.http_transport import HttpAnswers, client_address
from sidecar.server.envoy.contract import (
    ASSET,
    DENIAL_HEADERS,
    DENIAL_METADATA_KEY,
    ENVELOPE,
    HELD,
    HOLD,
    HOLD_FACTS,
    HOLD_METADATA_KEYS,
    METADATA_KEYS,
    REMOVE_HEADER,
    REQUEST_ID,
    ROUTE,
    UNAVAILABLE_MARK,
    UNAVAILABLE_STAND_IN,
)
from sidecar.server.schemes.base import Held, Payment, metadata, unpacked


@dataclass
class Parsed:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def parse(answer: bytes) -> Parsed:
    parsed = Parsed()
    parser = httptools.HttpResponseParser(parsed)
    parser.feed_data(answer)
    parsed.status = parser.get_status_code()
    assert parsed.complete, "one whole HTTP/1.1 message"
    return parsed


def test_free_strips_the_proofs_and_every_gateway_assertion() -> None:
    parsed = parse(HttpAnswers.free)
    assert parsed.status == 200 and parsed.body == b""
    removed = set(parsed.headers[REMOVE_HEADER].split(","))
    assert removed == {
        "x-payment",
        "payment-signature",
        "x-x402-payer",
        "x-x402-amount",
        "x-x402-receipt-id",
        "x-x402-hold",
    }


def test_ok_carries_upstream_client_and_metadata_headers() -> None:
    answer = HttpAnswers().ok(
        (("x-x402-payer", "P"), ("x-x402-amount", "0.01")),
        (("x-payment-response", "R"),),
        {"payer": "P", "receipt_id": "rcpt_1"},
    )
    parsed = parse(answer)
    assert parsed.status == 200
    assert parsed.headers["x-x402-payer"] == "P" and parsed.headers["x-payment-response"] == "R"
    assert parsed.headers["receipt_id"] == "rcpt_1"
    assert parsed.headers[REMOVE_HEADER] == "x-payment,payment-signature"


def test_a_denial_keeps_status_headers_body_and_is_marked() -> None:
    body = b'{"error":"payment_required"}'
    parsed = parse(HttpAnswers().denied(402, (("content-type", "application/json"),), body))
    assert (parsed.status, parsed.body) == (402, body)
    assert parsed.headers[DENIAL_METADATA_KEY] == "denied"
    assert "content-type" in DENIAL_HEADERS


def test_a_503_travels_as_the_stand_in_envoy_restores() -> None:
    # Envoy takes any 5xx from an HTTP authorization server for the server's own failure
    # and drops its answer; the stand-in keeps the body, the mark brings the 503 back.
    body = b'{"error":"ledger_unavailable"}'
    parsed = parse(HttpAnswers().denied(503, (("retry-after", "1"),), body))
    assert parsed.status == UNAVAILABLE_STAND_IN and not 500 <= parsed.status < 600
    assert parsed.headers[DENIAL_METADATA_KEY] == UNAVAILABLE_MARK
    assert parsed.body == body and parsed.headers["retry-after"] == "1"


def test_the_client_address_is_counted_from_the_right_past_trusted_hops() -> None:
    assert client_address("9.9.9.9, 10.0.0.7", 0) == "10.0.0.7"
    assert client_address("9.9.9.9, 10.0.0.7", 1) == "9.9.9.9"
    assert client_address("10.0.0.7", 3) == "10.0.0.7"  # never past the first entry
    assert client_address("", 0) == ""


def test_every_metadata_key_the_decision_writes_travels_as_a_header() -> None:
    usd = Asset("USDF", 6)
    phase = phases.phase_from(
        "routes.rows",
        {"unit": "row", "unit_price": "0.001", "max_units": 10, "usage_missing": "minimum"},
        usd,
    )
    assert phase is not None
    price = Price("rows", 10_000, usd, phase=phase)
    held = Held("r_hold", 10_000, "0.99", {ENVELOPE: '{"x402Version":2}'})
    written = metadata(held, Payment("payer-key", None), "prepaid-ed25519", price, "req-1")
    assert set(written) == set(HOLD_METADATA_KEYS) <= set(METADATA_KEYS)
    # The hold's facts travel in one key, and come back whole for the response phase.
    facts = unpacked(dict(written))
    assert HOLD_FACTS not in facts
    assert phases.phase_annotations(phase, usd).items() <= facts.items()
    assert (facts[HOLD], facts[HELD], facts[ASSET], facts[ROUTE]) == (
        "r_hold",
        "10000",
        "USDF",
        "rows",
    )
    assert (facts[REQUEST_ID], facts[ENVELOPE]) == ("req-1", '{"x402Version":2}')
    assert unpacked({HOLD: "r", HOLD_FACTS: "not json"}) == {HOLD: "r"}  # incomplete: refused
    for name in METADATA_KEYS:  # valid header names: Envoy would refuse anything else
        assert name == name.lower() and " " not in name and ":" not in name
