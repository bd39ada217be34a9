"""Self-serve channel requests without a ledger: the signing domain pinned by fixed
vectors, parsing, and every refusal of verify_request with its typed reason."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sidecar.core import channel_requests, protocol, vouchers
from sidecar.core.decision import Gateway
from sidecar.core.errors import (
    InvalidSignature,
    InvoiceExpired,
    InvoiceMismatch,
    MalformedPayment,
    PaymentError,
    UnsupportedVersion,
)
from sidecar.core.identity import Identity


def _identity(first: int) -> Identity:
    seed = base64.urlsafe_b64encode(bytes(range(first, first + 32))).rstrip(b"=")
    return Identity.from_seed_text(seed.decode())


WALLET, KEY = _identity(0), _identity(1)
GATEWAY = Gateway(KEY, b"k" * 32, max_direct_ttl=300)
NOW = 1_763_711_000
CHANNEL = "ch_" + "d" * 22
OPEN = {
    "action": "open",
    "channel_id": CHANNEL,
    "asset": "USDF",
    "deposit": "2.5",
    "ttl_seconds": 3600,
    "payee": KEY.kid,
    "nonce": "n_" + "a" * 22,
    "expires_at": NOW + 60,
}
CLOSE = {
    "action": "close",
    "channel_id": CHANNEL,
    "payee": KEY.kid,
    "nonce": "n_" + "b" * 22,
    "expires_at": NOW + 60,
}
# The bytes signed and the signatures, fixed: a change of encoding breaks every agent.
OPEN_MESSAGE = (
    b'fth-x402/2.0 channel-open\n{"action":"open","asset":"USDF","channel_id":'
    b'"ch_dddddddddddddddddddddd","deposit":"2.5","expires_at":1763711060,"nonce":'
    b'"n_aaaaaaaaaaaaaaaaaaaaaa","payee":"gw_ZbYGc9btiEvwHCwi","payer":'
    b'"A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg","ttl_seconds":3600,"version":"fth-x402/2.0"}'
)
OPEN_SIGNATURE = (
    "rtu3WgRp3kllfBb6IIs5gTQ2fNbmR__bX3XCIlrt0Y9GZoqeZIL9o7f2-g3BZ7tfx0-kBADGu9sNOmNSRRM1AQ"
)
CLOSE_MESSAGE = (
    b'fth-x402/2.0 channel-open\n{"action":"close","channel_id":"ch_dddddddddddddddddddddd",'
    b'"expires_at":1763711060,"nonce":"n_bbbbbbbbbbbbbbbbbbbbbb","payee":"gw_ZbYGc9btiEvwHCwi",'
    b'"payer":"A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg","version":"fth-x402/2.0"}'
)
CLOSE_SIGNATURE = (
    "46Z0-1o416rgdgYbbS_sVWh0HcAKXu_t7_XFV1GUmeYaYM5Pz-tMAC5TbsnsY03uHoNJsbjMTkWqNiyh4IboCw"
)


@pytest.mark.parametrize(
    ("terms", "message", "signature"),
    [(OPEN, OPEN_MESSAGE, OPEN_SIGNATURE), (CLOSE, CLOSE_MESSAGE, CLOSE_SIGNATURE)],
)
def test_the_signing_domain_is_pinned_by_fixed_vectors(
    terms: dict[str, Any], message: bytes, signature: str
) -> None:
    signed = channel_requests.sign_request(terms, WALLET)
    assert signed["signature"] == signature
    parsed = channel_requests.request_from(signed)
    assert parsed.signed_message == message
    channel_requests.verify_request(parsed, GATEWAY, NOW)  # raises if refused


def test_an_open_request_parses_to_its_terms() -> None:
    parsed = channel_requests.request_from(channel_requests.sign_request(OPEN, WALLET))
    assert (parsed.action, parsed.channel_id, parsed.asset, parsed.deposit) == (
        "open",
        CHANNEL,
        "USDF",
        "2.5",
    )
    assert (parsed.ttl_seconds, parsed.payer, parsed.expires_at) == (
        3600,
        WALLET.public_key,
        NOW + 60,
    )


def test_no_other_signed_object_passes_for_a_request() -> None:
    """The same terms signed as a voucher or a proof never verify as a request."""
    signed = channel_requests.sign_request(OPEN, WALLET)
    unsigned = protocol.canonical_json({k: v for k, v in signed.items() if k != "signature"})
    for domain in (vouchers.VOUCHER_DOMAIN, protocol.PROOF_DOMAIN, protocol.RECEIPT_DOMAIN):
        forged = {**signed, "signature": WALLET.sign(domain + unsigned)}
        with pytest.raises(InvalidSignature):
            channel_requests.verify_request(channel_requests.request_from(forged), GATEWAY, NOW)


def signed(**changes: Any) -> dict[str, Any]:
    return {**channel_requests.sign_request(OPEN, WALLET), **changes}


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ([], MalformedPayment),
        (signed(version="fth-x402/1.0"), UnsupportedVersion),
        (signed(action="withdraw"), MalformedPayment),
        (signed(deposit=5), MalformedPayment),
        (signed(ttl_seconds=0), MalformedPayment),
        (signed(ttl_seconds=True), MalformedPayment),
        (signed(channel_id="short"), MalformedPayment),
        (signed(nonce="n_short"), MalformedPayment),
        (signed(extra="x"), MalformedPayment),
        ({k: v for k, v in signed().items() if k != "nonce"}, MalformedPayment),
        ({**channel_requests.sign_request(CLOSE, WALLET), "deposit": "1"}, MalformedPayment),
    ],
)
def test_malformed_requests_are_typed_400s(obj: Any, error: type[PaymentError]) -> None:
    with pytest.raises(error) as raised:
        channel_requests.request_from(obj)
    assert raised.value.status == 400


@pytest.mark.parametrize(
    ("obj", "now", "error"),
    [
        (signed(), NOW + 61, InvoiceExpired),  # stale
        (
            channel_requests.sign_request({**OPEN, "expires_at": NOW + 301}, WALLET),
            NOW,
            InvoiceExpired,
        ),
        (
            channel_requests.sign_request({**OPEN, "payee": "gw_other"}, WALLET),
            NOW,
            InvoiceMismatch,
        ),
        (signed(deposit="250"), NOW, InvalidSignature),  # altered after signing
        (signed(payer=Identity.generate().public_key), NOW, InvalidSignature),
        (signed(payer="not-a-key"), NOW, MalformedPayment),
    ],
)
def test_refusals_are_typed(obj: dict[str, Any], now: int, error: type[PaymentError]) -> None:
    with pytest.raises(error):
        channel_requests.verify_request(channel_requests.request_from(obj), GATEWAY, now)
