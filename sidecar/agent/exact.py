"""The agent's view of the x402 `exact` scheme and of top-ups: offers, tokens, receipts.

Pure helpers for `X402Auth` (sidecar.agent.auth): which `accepts[]` entries of a 402 are
`exact` on an EVM chain, which ledger asset (and so which decimals and which budget) a
token stands for, and whether a receipt is the receipt of the payment just made. Signing is
`sidecar.agent.evm`'s (the official x402 client's code).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.agent.receipts import verified
from sidecar.core import protocol
from sidecar.core.errors import AmountError, InvalidChallenge, PaymentError
from sidecar.core.money import to_atomic

EXACT = "exact"
UPTO = "upto"  # the standard's usage-based scheme: a signed maximum, settled for what was used
EVM_NETWORK = re.compile(r"eip155:[1-9][0-9]{0,17}")
ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
UINT = re.compile(r"0|[1-9][0-9]{0,77}")
TOPUP_KIND = "topup"


@dataclass(frozen=True)
class Onchain:
    """A token that backs a ledger asset (discovery's `onchain`): one atomic unit of the
    token is one atomic unit of the asset."""

    asset: str  # the ledger asset's code, e.g. USDF
    network: str  # eip155:<chain id>
    token: str  # the token contract
    decimals: int

    @classmethod
    def parse(cls, spec: Any) -> Onchain | None:
        if not isinstance(spec, Mapping):
            return None
        asset, network, token, decimals = (
            spec.get(k) for k in ("asset", "network", "token", "decimals")
        )
        if not (isinstance(asset, str) and isinstance(network, str) and isinstance(token, str)):
            return None
        if EVM_NETWORK.fullmatch(network) is None or ADDRESS.fullmatch(token) is None:
            return None
        if type(decimals) is not int or not 0 <= decimals <= 18:
            return None
        return cls(asset, network, token, decimals)


@dataclass(frozen=True)
class TopUpTerms:
    """Discovery's `topup`: where an agent buys prepaid credit with `exact`."""

    method: str
    path: str
    asset: str
    min: str  # decimal strings in the asset's units
    max: str

    @classmethod
    def parse(cls, spec: Any) -> TopUpTerms | None:
        if not isinstance(spec, Mapping):
            return None
        values = [spec.get(k) for k in ("method", "path", "asset", "min", "max")]
        if not all(isinstance(v, str) and v for v in values):
            return None
        method, path, asset, low, high = (str(v) for v in values)
        if not path.startswith("/") or "?" in path or "#" in path:
            return None
        return cls(method.upper(), path, asset, low, high)


@dataclass(frozen=True)
class ExactOffer:
    """One `exact` entry of a 402's PAYMENT-REQUIRED `accepts`, shape-checked."""

    offer: Mapping[str, Any]  # as the gateway sent it: what the envelope echoes as `accepted`
    resource: Mapping[str, Any] | None  # the PaymentRequired's `resource`

    @property
    def network(self) -> str:
        return str(self.offer["network"])

    @property
    def token(self) -> str:
        return str(self.offer["asset"])

    @property
    def pay_to(self) -> str:
        return str(self.offer["payTo"])

    @property
    def amount(self) -> int:
        """Atomic units: the price (`exact`), or the most that may be settled (`upto`)."""
        return int(self.offer["amount"])

    @property
    def scheme(self) -> str:
        return str(self.offer["scheme"])


def exact_offers(header: str | None, schemes: tuple[str, ...] = (EXACT,)) -> list[ExactOffer]:
    """The EVM offers of `schemes` (`exact`; with UPTO, `upto` too, after it) in a
    PAYMENT-REQUIRED header value ([] if none or no header)."""
    if not header:
        return []
    try:
        required = protocol.decode_header(header)
    except PaymentError:
        raise InvalidChallenge("the PAYMENT-REQUIRED header is not base64 JSON") from None
    if not isinstance(required, dict) or required.get("x402Version") != 2:
        return []
    resource = required.get("resource")
    resource = resource if isinstance(resource, dict) else None
    accepts = required.get("accepts")
    offers = []
    for scheme in schemes:
        for option in accepts if isinstance(accepts, list) else []:
            if (
                isinstance(option, dict)
                and option.get("scheme") == scheme
                and _is_evm_offer(option)
            ):
                offers.append(ExactOffer(option, resource))
    return offers


def _is_evm_offer(option: Mapping[str, Any]) -> bool:
    network, amount, token, pay_to = (
        option.get(k) for k in ("network", "amount", "asset", "payTo")
    )
    return (
        isinstance(network, str)
        and EVM_NETWORK.fullmatch(network) is not None
        and isinstance(amount, str)
        and UINT.fullmatch(amount) is not None
        and isinstance(token, str)
        and ADDRESS.fullmatch(token) is not None
        and isinstance(pay_to, str)
        and ADDRESS.fullmatch(pay_to) is not None
        and type(option.get("maxTimeoutSeconds")) is int
        and isinstance(option.get("extra"), dict)
    )


def find_onchain(onchain: Iterable[Onchain], network: str, token: str) -> Onchain | None:
    for entry in onchain:
        if entry.network == network and entry.token.lower() == token.lower():
            return entry
    return None


def official_default(network: str, token: str) -> Onchain | None:
    """The official x402 client's table of well-known tokens (USDC on Base, …)."""
    try:
        from x402.mechanisms.evm.default_assets import find_default_asset
    except ImportError:
        return None
    found = find_default_asset(token, network)
    if found is None:
        return None
    return Onchain(str(found["symbol"]), network, token, int(found["decimals"]))


def check_exact_receipt(
    fields: Mapping[str, Any],
    keys: Mapping[str, str] | None,
    *,
    payer: str,
    resource: str | None,
    asset: str,
    atomic: int,
    decimals: int,
    at_most: bool = False,
) -> str | None:
    """Why `fields` is not a valid receipt of the `exact` payment described, or None.

    `payer`: the EVM address that signed (case-insensitive); `resource`: the request's
    `METHOD path` (None for a top-up, whose credit receipt names the Ed25519 key);
    `at_most`: `atomic` is an `upto` maximum, and the receipt's amount may be less."""
    if keys is None:
        return "no gateway keys to verify it (the gateway has no /.well-known/x402)"
    if not verified(fields, keys):
        return "the signature does not verify against the gateway's published keys"
    if fields.get("success") is not True:
        return "it does not say success"
    transaction = fields.get("transaction")
    if not isinstance(transaction, str) or not transaction:
        return "it names no transaction"
    if resource is not None:
        if str(fields.get("payer", "")).lower() != payer.lower():
            return "its payer is not the address that paid"
        if fields.get("resource") != resource:
            return "its resource is not the one paid"
    elif str(fields.get("authorizer", "")).lower() != payer.lower():
        return "its authorizer is not the address that paid"
    if fields.get("asset") != asset:
        return "its asset is not the one paid"
    try:
        paid = to_atomic(str(fields.get("amount")), decimals)
        same = paid <= atomic if at_most else paid == atomic
    except AmountError:
        same = False
    if not same:
        return "its amount is not the amount paid"
    return None


@dataclass(frozen=True)
class TopUp:
    """A completed top-up: prepaid credit bought with `exact`, and the gateway's receipt."""

    payer: str  # the Ed25519 key credited
    asset: str
    credited: str  # decimal, in the asset's units
    balance: str  # the key's ledger balance after the credit
    transaction: str  # the on-chain transfer
    receipt_id: str
    verified: bool  # the credit receipt is signed by the gateway and is for this top-up
    receipt: Mapping[str, Any] = field(repr=False)
    problem: str | None = None  # why it is not verified
