"""The `exact` scheme's pure parts: its config, the offer, and the checks of an envelope
against the offer before anyone is called (core/exact.py)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from eth_utils.crypto import keccak

from sidecar.core import decision, exact, phases, protocol
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    ConfigError,
    InvoiceExpired,
    InvoiceMismatch,
    MalformedPayment,
    PaymentError,
    PaymentRequired,
    UnsupportedScheme,
)
from sidecar.core.identity import Identity, write_secret
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer
from sidecar.server.config import Settings

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OPERATOR = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
PAYER = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"
NONCE = "0x" + "ab" * 32
ONCHAIN = {"USDF": {"network": "eip155:31337", "token": TOKEN, "name": "USD Coin", "version": "2"}}
EXACT = {"onchain": ONCHAIN, "pay_to": OPERATOR, "facilitator_url": "http://127.0.0.1:1"}


def load(raw: dict[str, Any], **env: str) -> Settings:
    return Settings.from_mapping(raw, env)


# -- config -------------------------------------------------------------------------------


def test_onchain_config_becomes_the_exact_terms() -> None:
    terms = load({**EXACT, "onchain": {"USDF": {**ONCHAIN["USDF"], "decimals": 6}}}).exact_terms()
    assert terms is not None
    usdf = terms.assets["USDF"]
    assert (usdf.network, usdf.token, usdf.decimals, usdf.chain_id) == (
        "eip155:31337",
        TOKEN,
        6,
        31337,
    )
    assert (terms.pay_to, terms.facilitator_url, terms.max_timeout_seconds) == (
        OPERATOR,
        "http://127.0.0.1:1",
        300,
    )
    assert terms.topup["path"] == "/x402/topup" and terms.topup["asset"] == "USDF"
    assert (terms.topup["min"], terms.topup["max"]) == ("1", "1000")


def test_no_onchain_asset_no_exact() -> None:
    assert load({}).exact_terms() is None
    assert load({}).network == "fth:ledger"


def test_env_overrides_the_exact_scalars() -> None:
    settings = load(
        EXACT,
        X402_PAY_TO=PAYER,
        X402_FACILITATOR_URL="https://facilitator.example",
        X402_EXACT_MAX_TIMEOUT_SECONDS="60",
        X402_TOPUP_MAX="20",
    )
    terms = settings.exact_terms()
    assert terms is not None
    assert (terms.pay_to, terms.facilitator_url, terms.max_timeout_seconds) == (
        PAYER,
        "https://facilitator.example",
        60,
    )
    assert terms.topup["max"] == "20"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"onchain": {"USDF": {**ONCHAIN["USDF"], "decimals": 18}}}, "onchain.USDF.decimals"),
        ({"onchain": {"EUR": ONCHAIN["USDF"]}}, "onchain.EUR"),
        ({"onchain": {"USDF": {**ONCHAIN["USDF"], "token": "0x12"}}}, "onchain.USDF.token"),
        ({"onchain": {"USDF": {**ONCHAIN["USDF"], "network": "basee"}}}, "onchain.USDF.network"),
        ({"onchain": {"USDF": {**ONCHAIN["USDF"], "name": ""}}}, "onchain.USDF.name"),
        ({"onchain": {"USDF": {**ONCHAIN["USDF"], "chain": 1}}}, "onchain.USDF"),
        ({"pay_to": ""}, "pay_to"),
        ({"facilitator_url": "ftp://x"}, "facilitator_url"),
        ({"network": "fth-ledger"}, "network"),
        ({"topup_min": "5", "topup_max": "1"}, "topup_min"),
        ({"topup_min": "0.0000001"}, "topup_min"),
        ({"topup_asset": "EUR"}, "topup_asset"),
        ({"exact_max_timeout_seconds": 0}, "exact_max_timeout_seconds"),
    ],
)
def test_bad_exact_config_names_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"config {key}"):
        load({**EXACT, **change})


def test_topups_can_be_turned_off() -> None:
    terms = load({**EXACT, "topup_asset": "off"}).exact_terms()
    assert terms is not None and terms.topup == {}


# -- the offer and the envelope -------------------------------------------------------------


def terms() -> exact.ExactTerms:
    found = load(EXACT).exact_terms()
    assert found is not None
    return found


def offer(amount: int = 10_000) -> Offer:
    return exact.offer(terms().assets["USDF"], amount, terms())


def envelope(now: int, **authorization: str) -> dict[str, Any]:
    requirements = offer().to_wire()
    auth = {
        "from": PAYER,
        "to": OPERATOR,
        "value": "10000",
        "validAfter": "0",
        "validBefore": str(now + 300),
        "nonce": NONCE,
        **authorization,
    }
    return {
        "x402Version": 2,
        "accepted": requirements,
        "payload": {"authorization": auth, "signature": "0x" + "11" * 65},
        "resource": {"url": "http://api.test/paid"},
    }


def test_the_offer_is_x402_v2_exact() -> None:
    """Settled before the service runs: the standard's `upfront` flow (x402 v2 §6.1)."""
    assert offer().to_wire() == {
        "scheme": "exact",
        "network": "eip155:31337",
        "amount": "10000",
        "asset": TOKEN,
        "payTo": OPERATOR,
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2", "paymentFlow": "upfront"},
    }


def test_an_offer_settled_after_the_service_declares_no_flow() -> None:
    """`authorization` (verify, serve, settle) is the flow an absent paymentFlow means."""
    settled_after = exact.offer(terms().assets["USDF"], 10_000, terms(), upfront=False)
    assert settled_after.to_wire()["extra"] == {"name": "USD Coin", "version": "2"}


def test_the_settle_response_is_the_official_one_with_atomic_amount_and_token() -> None:
    """PAYMENT-RESPONSE of an `exact` payment: the official SettleResponse, nothing more
    than `asset` beside it; a failed one says why and settles no amount."""
    from x402.schemas import SettleResponse

    now = int(time.time())
    auth = exact.verify(envelope(now), offer(), now)
    settled = exact.settle_response(auth, "0x" + "ab" * 32)
    assert settled == {
        "success": True,
        "payer": PAYER,
        "transaction": "0x" + "ab" * 32,
        "network": "eip155:31337",
        "amount": "10000",
        "asset": TOKEN,
    }
    official = SettleResponse.model_validate(settled)
    assert (official.amount, official.payer, official.network) == ("10000", PAYER, "eip155:31337")
    failed = exact.settle_response(auth, "", "insufficient_funds", "the payer has no funds")
    assert failed == {
        "success": False,
        "errorReason": "insufficient_funds",
        "errorMessage": "the payer has no funds",
        "payer": PAYER,
        "transaction": "",
        "network": "eip155:31337",
        "asset": TOKEN,
    }
    assert SettleResponse.model_validate(failed).error_reason == "insufficient_funds"


def test_a_matching_envelope_passes_addresses_in_any_case() -> None:
    now = int(time.time())
    data = envelope(now, to=OPERATOR.lower())
    data["accepted"] = {**data["accepted"], "asset": TOKEN.lower(), "payTo": OPERATOR.upper()}
    data["accepted"]["payTo"] = "0x" + OPERATOR[2:].upper()
    auth = exact.verify(data, offer(), now)
    assert (auth.payer, auth.nonce, auth.value) == (PAYER.lower(), NONCE, 10_000)
    assert auth.key == f"eip155:31337:{TOKEN.lower()}:{NONCE}"


def test_an_authorization_is_restored_for_its_settle_after_success() -> None:
    """The response phase rebuilds the authorization the check verified (from Envoy's
    metadata): the same key and facts, whatever the clock says by then."""
    now = int(time.time())
    verified = exact.verify(envelope(now), offer(), now)
    later = exact.restore(verified.envelope, verified.requirements)
    assert later == verified
    assert exact.restore(envelope(now, validBefore="1"), offer()).valid_before == 1
    with pytest.raises(MalformedPayment):
        exact.restore(envelope(now, nonce="0x12"), offer())


def test_a_metered_routes_402_offers_no_exact() -> None:
    """An EIP-3009 authorization is for one fixed value; a metered route charges the units
    served: its challenge offers prepaid only, a fixed on_success route's offers both."""
    usdf = Asset("USDF", 6)
    gateway = Gateway(Identity.generate(), b"k" * 32, exact=terms())
    request = Request("GET", "/rows", "api.test", "http", None)
    metered = phases.ResponsePhase(unit="row", unit_price=1_000, max_units=100)
    for phase, schemes in (
        (metered, ["prepaid-ed25519"]),
        (phases.ResponsePhase(), ["prepaid-ed25519", "exact"]),
        (None, ["prepaid-ed25519", "exact"]),
    ):
        price = Price("rows", 100_000, usdf, phase=phase)
        fresh = decision.invoice(request, price, gateway, int(time.time()))
        required = decision.payment_required(fresh, request, price, gateway, "r", "m")
        assert [offer["scheme"] for offer in required["accepts"]] == schemes


@pytest.mark.parametrize(
    ("accepted", "authorization", "error"),
    [
        ({"network": "eip155:8453"}, {}, InvoiceMismatch),
        ({"amount": "1"}, {}, InvoiceMismatch),
        ({"asset": PAYER}, {}, InvoiceMismatch),
        ({"payTo": PAYER}, {}, InvoiceMismatch),
        ({}, {"to": PAYER}, InvoiceMismatch),
        ({}, {"value": "9999"}, InvoiceMismatch),
        ({}, {"validBefore": "1"}, InvoiceExpired),
        ({}, {"validAfter": str(2**40)}, InvoiceExpired),
        ({}, {"validBefore": str(2**40)}, InvoiceMismatch),  # far beyond maxTimeoutSeconds
        ({}, {"nonce": "0x12"}, MalformedPayment),
        ({}, {"value": "1e4"}, MalformedPayment),
        ({}, {"from": "alice"}, MalformedPayment),
        ({"scheme": "upto"}, {}, UnsupportedScheme),
    ],
)
def test_a_mismatch_is_refused_before_anyone_is_called(
    accepted: dict[str, str], authorization: dict[str, str], error: type[PaymentError]
) -> None:
    now = int(time.time())
    data = envelope(now, **authorization)
    data["accepted"] = {**data["accepted"], **accepted}
    with pytest.raises(error):
        exact.verify(data, offer(), now)


@pytest.mark.parametrize(
    "broken",
    [
        {"x402Version": 2, "accepted": "exact", "payload": {}},
        {"x402Version": 2, "accepted": {"scheme": "exact"}, "payload": {"signature": "0x00"}},
        {"x402Version": 2, "accepted": {"scheme": "exact"}, "payload": {"authorization": {}}},
    ],
)
def test_a_malformed_envelope_is_400(broken: dict[str, Any]) -> None:
    with pytest.raises(PaymentError) as caught:
        exact.verify(broken, offer(), int(time.time()))
    assert caught.value.status == 400


def test_the_header_decoder_keeps_an_exact_envelope_and_unwraps_a_prepaid_one() -> None:
    now = int(time.time())
    data = envelope(now)
    decoded = protocol.decode_payment(protocol.encode_header(data), 4096)
    assert decoded == data and exact.scheme_of(decoded) == "exact"
    proof = {"version": protocol.VERSION, "scheme": protocol.SCHEME, "nonce": "n"}
    wrapped = {"x402Version": 2, "accepted": {"scheme": protocol.SCHEME}, "payload": proof}
    assert protocol.decode_payment(protocol.encode_header(wrapped), 4096) == proof
    assert exact.scheme_of(proof) == protocol.SCHEME


def test_the_fiat_token_constants_are_keccak_of_their_signatures() -> None:
    selector = keccak(text="authorizationState(address,bytes32)")[:4].hex()
    assert "0x" + selector == exact.AUTHORIZATION_STATE_SELECTOR
    topic = keccak(text="AuthorizationUsed(address,bytes32)").hex()
    assert "0x" + topic == exact.AUTHORIZATION_USED_TOPIC
    call = exact.authorization_state_call(PAYER, NONCE)
    assert call == "0x" + selector + "0" * 24 + PAYER[2:].lower() + "ab" * 32


def test_the_server_needs_no_evm_extra() -> None:
    """Without an on-chain asset the gateway runs on the [server] extra: nothing of the
    official x402 package or web3 is imported by the server's modules."""
    code = (
        "import sys; import sidecar.server.supervisor, sidecar.server.topup, "
        "sidecar.server.facilitation, sidecar.core.exact; "
        "evm = ('x402', 'web3', 'eth_account'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in evm))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# -- the published facilitator URL ----------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "published"),
    [
        ("https://user:s3cret@facilitator.example/x402?key=s3cret#s3cret", "https://facilitator.example/x402"),
        ("https://:s3cret@facilitator.example:8443/", "https://facilitator.example:8443"),
        ("http://s3cret@[::1]:9000/api", "http://[::1]:9000/api"),
        ("https://facilitator.example", "https://facilitator.example"),
    ],
)  # fmt: skip
def test_discovery_and_every_402_publish_the_facilitator_without_credentials(
    configured: str, published: str, tmp_path: Path
) -> None:
    from sidecar.server.side_port import discovery_document

    Identity.generate().save(tmp_path / "signing.key")
    write_secret(tmp_path / "invoice.secret", "s" * 64 + "\n")
    settings = load(
        {
            **EXACT,
            "facilitator_url": configured,
            "public_url": configured,
            "signing_key_file": str(tmp_path / "signing.key"),
            "invoice_secret_file": str(tmp_path / "invoice.secret"),
        }
    )
    gateway = settings.gateway()
    document = discovery_document(settings.route_table(), gateway)
    price = Price("atlas", 250_000, Asset("USDF", 6))
    refusal = PaymentRequired("GET /api/atlas costs 0.25 USDF")
    denial = decision.deny(refusal, Request("GET", "/api/atlas", "gw"), price, gateway, 1)
    header = json.loads(base64.b64decode(dict(denial.headers)["payment-required"]))
    everything = denial.body.decode() + json.dumps(header) + json.dumps(document)
    assert "s3cret" not in everything and "user" not in everything
    assert document["facilitator"] == published
    body = json.loads(denial.body)
    assert body["x402"]["facilitator"] == published
    assert body["x402"]["facilitator_url"] == f"{published}/.well-known/x402"
    assert header["resource"]["url"] == f"{published}/api/atlas"
    assert header["accepts"][0]["extra"]["facilitator_url"] == f"{published}/.well-known/x402"
