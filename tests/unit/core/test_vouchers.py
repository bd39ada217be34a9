"""Channel vouchers without a ledger: parsing, the payer's signature, and every refusal of
verify_voucher with its typed reason."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sidecar.core import vouchers
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import (
    InvalidSignature,
    InvoiceMismatch,
    MalformedPayment,
    PaymentError,
    UnsupportedScheme,
)
from sidecar.core.identity import Identity
from sidecar.core.money import MAX_BALANCE, Asset
from sidecar.core.pricing import Price

GATEWAY = Gateway(Identity.generate(), b"k" * 32)
PRICE = Price("atlas", 250_000, Asset("USDF", 6), "Atlas")
WALLET = Identity.generate()
REQUEST = Request("GET", "/api/atlas")


def terms(**changes: Any) -> dict[str, Any]:
    return {
        "channel_id": "ch_0123456789abcdef",
        "asset": "USDF",
        "cumulative": "1.5",
        "sequence": 3,
        "resource": REQUEST.resource,
        "payee": GATEWAY.payee,
        **changes,
    }


def voucher(wallet: Identity = WALLET, **changes: Any) -> vouchers.Voucher:
    return vouchers.voucher_from(vouchers.sign_voucher(terms(**changes), wallet))


def test_a_good_voucher_verifies_to_its_cumulative_amount() -> None:
    good = voucher()
    assert vouchers.verify_voucher(good, REQUEST, PRICE, GATEWAY) == 1_500_000
    assert (good.payer, good.sequence, good.channel_id) == (
        WALLET.public_key,
        3,
        terms()["channel_id"],
    )


@pytest.mark.parametrize(
    ("change", "error", "says"),
    [
        ({"resource": "GET /api/other"}, InvoiceMismatch, "voucher is for 'GET /api/other'"),
        ({"asset": "EURF"}, InvoiceMismatch, "priced in USDF, not EURF"),
        ({"payee": "gw_other"}, InvoiceMismatch, "voucher is for payee 'gw_other'"),
        ({"cumulative": "1.0000001"}, MalformedPayment, "voucher cumulative"),  # 7 decimals
        ({"cumulative": "-1"}, MalformedPayment, "voucher cumulative"),
        ({"cumulative": "lots"}, MalformedPayment, "voucher cumulative"),
    ],
)
def test_each_refusal_names_its_reason(
    change: dict[str, Any], error: type[PaymentError], says: str
) -> None:
    with pytest.raises(error, match=re.escape(says)) as refused:
        vouchers.verify_voucher(voucher(**change), REQUEST, PRICE, GATEWAY)
    assert refused.value.reason == error.reason


def test_a_cumulative_beyond_any_deposit_is_refused() -> None:
    beyond = PRICE.asset.to_decimal(MAX_BALANCE + 1)
    with pytest.raises(MalformedPayment, match="beyond any deposit"):
        vouchers.verify_voucher(voucher(cumulative=beyond), REQUEST, PRICE, GATEWAY)
    at_most = PRICE.asset.to_decimal(MAX_BALANCE)
    assert vouchers.verify_voucher(voucher(cumulative=at_most), REQUEST, PRICE, GATEWAY) == (
        MAX_BALANCE
    )


def test_a_payer_that_is_not_a_key_is_malformed() -> None:
    signed = vouchers.sign_voucher(terms(), WALLET)
    signed["payer"] = "A" * 44
    with pytest.raises(MalformedPayment, match="payer is not"):
        vouchers.verify_voucher(vouchers.voucher_from(signed), REQUEST, PRICE, GATEWAY)


def test_another_wallets_signature_is_refused() -> None:
    signed = vouchers.sign_voucher(terms(), Identity.generate())
    signed["payer"] = WALLET.public_key
    with pytest.raises(InvalidSignature):
        vouchers.verify_voucher(vouchers.voucher_from(signed), REQUEST, PRICE, GATEWAY)


def test_a_signed_field_changed_afterwards_breaks_the_signature() -> None:
    signed = vouchers.sign_voucher(terms(), WALLET)
    signed["sequence"] = 4
    with pytest.raises(InvalidSignature):
        vouchers.verify_voucher(vouchers.voucher_from(signed), REQUEST, PRICE, GATEWAY)
    assert not vouchers.verify_signature(signed)
    assert vouchers.verify_signature(vouchers.sign_voucher(terms(), WALLET))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"scheme": "prepaid-ed25519"}, UnsupportedScheme),
        ({"sequence": 0}, MalformedPayment),
        ({"sequence": "1"}, MalformedPayment),
        ({"channel_id": "short"}, MalformedPayment),
        ({"channel_id": "ch_with space_0"}, MalformedPayment),
        ({"extra": "field"}, MalformedPayment),
    ],
)
def test_a_malformed_voucher_object_is_refused(
    change: dict[str, Any], error: type[PaymentError]
) -> None:
    with pytest.raises(error):
        vouchers.voucher_from({**vouchers.sign_voucher(terms(), WALLET), **change})
    assert not vouchers.verify_signature({**vouchers.sign_voucher(terms(), WALLET), **change})


def test_a_voucher_missing_a_field_is_refused() -> None:
    signed = vouchers.sign_voucher(terms(), WALLET)
    del signed["cumulative"]
    with pytest.raises(MalformedPayment, match="missing 'cumulative'"):
        vouchers.voucher_from(signed)
