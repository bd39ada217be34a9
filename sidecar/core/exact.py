"""The x402 v2 `exact` scheme on EVM (EIP-3009 transferWithAuthorization): the offer the
402 carries, and the pure checks of a `PAYMENT-SIGNATURE` envelope against it (PROTOCOL.md
§8). Pure: the facilitator and the ledger are called by the server's `Exact` scheme only
after everything here has passed.

The envelope an official x402 client sends:

    {"x402Version": 2, "accepted": {scheme, network, amount, asset, payTo,
     maxTimeoutSeconds, extra}, "payload": {"authorization": {from, to, value, validAfter,
     validBefore, nonce}, "signature": "0x..."}, "resource": {...}, "extensions": {...}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.core.errors import (
    ConfigError,
    InvoiceExpired,
    InvoiceMismatch,
    MalformedPayment,
    UnsupportedScheme,
    UnsupportedVersion,
)
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer

SCHEME = "exact"
UPFRONT = "upfront"  # extra.paymentFlow of an offer settled before the service runs
X402_VERSION = 2
EVM_NETWORK = re.compile(r"eip155:[1-9][0-9]{0,17}")
ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130,4096}")  # 65 bytes, or longer (ERC-1271/6492)
UINT = re.compile(r"0|[1-9][0-9]{0,77}")  # a uint256 as a decimal string
# CAIP-2: namespace ":" reference. The official TypeScript schema (@x402/core) wants a ":".
CAIP2 = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")
# An authorization must stay valid this long after the check, so settlement can land.
MIN_VALIDITY_SECONDS = 6
# validBefore may exceed now + maxTimeoutSeconds by this much (client clock ahead of ours).
CLOCK_SKEW_SECONDS = 60
# Keccak-256 constants of FiatToken (EIP-3009), so the server needs no keccak of its own:
# the selector of authorizationState(address,bytes32) and the AuthorizationUsed event topic.
AUTHORIZATION_STATE_SELECTOR = "0xe94a0102"
AUTHORIZATION_USED_TOPIC = "0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5"


@dataclass(frozen=True, slots=True)
class OnchainAsset:
    """The on-chain token that backs one ledger asset (config `onchain`)."""

    asset: str  # the ledger asset's code, e.g. USDF
    network: str  # eip155:<chain id>
    token: str  # the token contract's address
    name: str  # EIP-712 domain name, e.g. "USD Coin"
    version: str  # EIP-712 domain version, e.g. "2"
    decimals: int
    usd: bool = True  # a USD stablecoin: the 402 states `price_usd`

    @property
    def chain_id(self) -> int:
        return int(self.network.partition(":")[2])


@dataclass(frozen=True)
class ExactTerms:
    """What the gateway offers through `exact`: tokens by ledger asset, and where to pay."""

    assets: Mapping[str, OnchainAsset]
    pay_to: str  # the operator's address
    facilitator_url: str  # as published (published_url): never the one with credentials
    max_timeout_seconds: int = 300
    topup: Mapping[str, Any] = field(default_factory=dict)  # discovery's `topup`, if any
    # Each network's `extra` from the facilitator's GET /supported (server/handshake.py
    # fills it at run time): it joins the offer's `extra`, our EIP-712 domain wins.
    facilitator_extra: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # Each network's `upto` kind `extra` from GET /supported (its facilitatorAddress): `upto`
    # is offered on a network once its facilitator lists it (core/upto.py).
    upto_extra: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    # The x402 extensions a 402 declares where it offers `upto` (eip2612GasSponsoring).
    upto_extensions: Mapping[str, Any] = field(default_factory=dict)

    def for_price(self, price: Price) -> OnchainAsset | None:
        return self.assets.get(price.asset.code)


def published_url(url: str) -> str:
    """A configured URL as discovery and the 402s publish it: without userinfo, query or
    fragment, where credentials hide (`https://user:key@host/x?token=…` → `https://host/x`).
    The sidecar itself still calls the URL as configured."""
    components = urlsplit(url)
    host = components.netloc.rpartition("@")[2]
    return urlunsplit((components.scheme, host, components.path, "", "")).rstrip("/")


def offer(onchain: OnchainAsset, amount: int, terms: ExactTerms, upfront: bool = True) -> Offer:
    """The x402 v2 `PaymentRequirements` of `exact` for `amount` atomic units. `upfront`:
    settled before the service runs (a route charged on check, a top-up), which the
    standard's `extra.paymentFlow` declares (x402 v2 §6.1); absent, the flow is
    `authorization` (verify, then settle after the service succeeded)."""
    extra = {
        **terms.facilitator_extra.get(onchain.network, {}),
        "name": onchain.name,
        "version": onchain.version,
    }
    if upfront:
        extra["paymentFlow"] = UPFRONT
    return Offer(
        SCHEME,
        onchain.network,
        str(amount),
        onchain.token,
        terms.pay_to,
        terms.max_timeout_seconds,
        extra,
    )


def settle_response(
    auth: Eip3009Authorization, transaction: str, error_reason: str = "", error_message: str = ""
) -> dict[str, Any]:
    """The `PAYMENT-RESPONSE` of an `exact` payment (`standard_settle_response`): the
    authorization's whole value settled, or nothing with an `error_reason`."""
    requirements = auth.requirements
    return standard_settle_response(
        auth.sender, requirements.network, requirements.asset, requirements.amount,
        transaction, error_reason, error_message,
    )  # fmt: skip


def standard_settle_response(
    payer: str,
    network: str,
    token: str,
    amount: str,
    transaction: str,
    error_reason: str = "",
    error_message: str = "",
) -> dict[str, Any]:
    """The `PAYMENT-RESPONSE` of an on-chain payment (`exact`, `upto`): the official x402
    SettleResponse (`success`, `transaction`, `network`, `payer`; `amount` settled in the
    token's atomic units, as a string) and the token's address as `asset`. With an
    `error_reason` it says nothing was settled (`success` false, no `amount`), as the
    official servers answer a failed settlement."""
    response: dict[str, Any] = {"success": not error_reason}
    if error_reason:
        response["errorReason"] = error_reason
        response["errorMessage"] = error_message or error_reason
    response.update(payer=payer, transaction=transaction, network=network)
    if not error_reason:
        response["amount"] = amount
    response["asset"] = token
    return response


def invoice_fields(onchain: OnchainAsset, amount: int, terms: ExactTerms) -> dict[str, Any]:
    """What the 402 body's `x402` object gains where `exact` applies (product documents)."""
    fields: dict[str, Any] = {
        "token": onchain.token,
        "chain": onchain.network,
        "facilitator": terms.facilitator_url,
        "payment_target": terms.pay_to,
    }
    if onchain.usd:
        from sidecar.core.money import to_decimal

        fields["price_usd"] = to_decimal(amount, onchain.decimals)
    return fields


@dataclass(frozen=True, slots=True)
class Eip3009Authorization:
    """A checked EIP-3009 authorization and the envelope that carried it."""

    payer: str  # `from`, lower case
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str  # 0x + 64 hex, lower case
    envelope: Mapping[str, Any]  # what goes to the facilitator as paymentPayload, unchanged
    requirements: Offer  # our offer: the facilitator's paymentRequirements

    @property
    def sender(self) -> str:
        """The envelope's `payload.authorization.from` as the agent wrote it (EIP-55 case):
        what receipts and the service are told; `payer` is it in lower case."""
        return str(self.envelope["payload"]["authorization"]["from"])

    @property
    def key(self) -> str:
        """Names the authorization across the ledger: token, payer and nonce."""
        token = self.requirements.asset.lower()
        return f"{self.requirements.network}:{token}:{self.nonce}"


def scheme_of(decoded: Mapping[str, Any]) -> str:
    """The scheme an x402 v2 envelope carries (`accepted.scheme`), else the payment's own."""
    accepted = decoded.get("accepted")
    if "x402Version" in decoded and isinstance(accepted, Mapping):
        return str(accepted.get("scheme"))
    return str(decoded.get("scheme"))


def field_of(obj: Any, name: str, pattern: re.Pattern[str], what: str, scheme: str = SCHEME) -> str:
    """A string field of `obj` matching `pattern`, else a typed 400 naming it."""
    value = obj.get(name) if isinstance(obj, Mapping) else None
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise MalformedPayment(f"{scheme} payment: {what} {name!r} is missing or malformed")
    return value


def open_envelope(
    decoded: Mapping[str, Any], scheme: str, inner: str, what: str
) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """An x402 v2 PaymentPayload of `scheme`: its `accepted`, its `payload` and the
    payload's `inner` object (`what` names it in errors), shapes checked; typed 400s."""
    if decoded.get("x402Version") != X402_VERSION:
        raise UnsupportedVersion(f"{scheme} payments are x402Version 2 envelopes")
    accepted, payload = decoded.get("accepted"), decoded.get("payload")
    if not isinstance(accepted, Mapping) or not isinstance(payload, Mapping):
        raise MalformedPayment(f"{scheme} payment: the envelope needs `accepted` and `payload`")
    if accepted.get("scheme") != scheme:
        raise UnsupportedScheme(f"scheme must be {scheme!r}")
    found = payload.get(inner)
    if not isinstance(found, Mapping):
        raise MalformedPayment(f"{scheme} payment: payload.{inner} is missing{what}")
    field_of(payload, "signature", SIGNATURE, "payload", scheme)
    return accepted, payload, found


def parse(decoded: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The envelope's `accepted` and `payload.authorization`, shapes checked; typed 400s."""
    accepted, _, authorization = open_envelope(decoded, SCHEME, "authorization", " (EIP-3009)")
    field_of(authorization, "from", ADDRESS, "authorization")
    field_of(authorization, "to", ADDRESS, "authorization")
    field_of(authorization, "nonce", NONCE, "authorization")
    for name in ("value", "validAfter", "validBefore"):
        field_of(authorization, name, UINT, "authorization")
    return accepted, authorization


def same_address(value: Any, ours: str) -> bool:
    """Whether `value` is the address `ours` (EIP-55 checksums compare case-insensitively)."""
    return isinstance(value, str) and value.lower() == ours.lower()


def match_accepted(accepted: Mapping[str, Any], requirements: Offer, amount_is: str) -> None:
    """The envelope's `accepted` against this route's offer (exact and upto): network,
    amount (`amount_is`: what the route's amount is, for the message), asset, payTo."""
    if accepted.get("network") != requirements.network:
        raise InvoiceMismatch(f"this route is paid on {requirements.network}")
    if accepted.get("amount") != requirements.amount:
        raise InvoiceMismatch(f"this route's {amount_is} is {requirements.amount} atomic units now")
    for name, ours in (("asset", requirements.asset), ("payTo", requirements.pay_to)):
        if not same_address(accepted.get(name), ours):
            raise InvoiceMismatch(f"accepted.{name} is not this route's {ours}")


def check_window(
    valid_after: int, until: int, until_name: str, requirements: Offer, now: int
) -> None:
    """An authorization's validity window: valid now, long enough to settle, and no longer
    than the offer's maxTimeoutSeconds (with CLOCK_SKEW_SECONDS of slack)."""
    if valid_after > now:
        raise InvoiceExpired("the authorization is not valid yet (validAfter)")
    if until < now + MIN_VALIDITY_SECONDS:
        raise InvoiceExpired(f"the authorization has expired ({until_name}); sign a fresh one")
    if until > now + requirements.max_timeout_seconds + CLOCK_SKEW_SECONDS:
        limit = requirements.max_timeout_seconds
        raise InvoiceMismatch(f"{until_name} is more than maxTimeoutSeconds ({limit}) ahead")


def verify(decoded: Mapping[str, Any], requirements: Offer, now: int) -> Eip3009Authorization:
    """Match the envelope against this route's offer, cheapest first, before anyone is
    called: scheme, network, amount, asset, payTo, then the authorization's recipient,
    value and validity window."""
    accepted, authorization = parse(decoded)
    match_accepted(accepted, requirements, "price")
    if not same_address(authorization["to"], requirements.pay_to):
        raise InvoiceMismatch("the authorization pays someone else than this gateway's payTo")
    if authorization["value"] != requirements.amount:
        raise InvoiceMismatch("the authorization's value is not this route's price")
    valid_after, valid_before = int(authorization["validAfter"]), int(authorization["validBefore"])
    check_window(valid_after, valid_before, "validBefore", requirements, now)
    return Eip3009Authorization(
        payer=authorization["from"].lower(),
        to=authorization["to"].lower(),
        value=int(authorization["value"]),
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=authorization["nonce"].lower(),
        envelope=decoded,
        requirements=requirements,
    )


def restore(envelope: Mapping[str, Any], requirements: Offer) -> Eip3009Authorization:
    """An authorization `verify` accepted earlier (at the check), rebuilt for its settle in
    the response phase: the shapes are checked again, the clock is not (its validBefore is
    the chain's to enforce, and the reservation's)."""
    _, authorization = parse(envelope)
    return Eip3009Authorization(
        payer=authorization["from"].lower(),
        to=authorization["to"].lower(),
        value=int(authorization["value"]),
        valid_after=int(authorization["validAfter"]),
        valid_before=int(authorization["validBefore"]),
        nonce=authorization["nonce"].lower(),
        envelope=envelope,
        requirements=requirements,
    )


def authorization_state_call(authorizer: str, nonce: str) -> str:
    """eth_call data for FiatToken's authorizationState(authorizer, nonce)."""
    return (
        AUTHORIZATION_STATE_SELECTOR
        + authorizer.lower().removeprefix("0x").rjust(64, "0")
        + nonce.lower().removeprefix("0x")
    )


def authorization_used_topics(authorizer: str, nonce: str) -> list[str]:
    """eth_getLogs topics of the AuthorizationUsed(authorizer, nonce) event."""
    return [
        AUTHORIZATION_USED_TOPIC,
        "0x" + authorizer.lower().removeprefix("0x").rjust(64, "0"),
        nonce.lower(),
    ]


def onchain_from_config(code: str, spec: Any, decimals: int) -> OnchainAsset:
    """One `onchain.<code>` config entry, checked; ConfigError names the key."""
    key = f"config onchain.{code}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: must be a mapping with network, token, name, version")
    unknown = set(spec) - {"network", "token", "name", "version", "decimals", "usd"}
    if unknown:
        raise ConfigError(f"{key}: unknown key {sorted(unknown)[0]!r}")
    network = spec.get("network")
    if not isinstance(network, str) or EVM_NETWORK.fullmatch(network) is None:
        raise ConfigError(f"{key}.network: must be eip155:<chain id>")
    token = spec.get("token")
    if not isinstance(token, str) or ADDRESS.fullmatch(token) is None:
        raise ConfigError(f"{key}.token: must be a 0x-prefixed 20-byte address")
    for name in ("name", "version"):
        if not isinstance(spec.get(name), str) or not spec[name]:
            raise ConfigError(f"{key}.{name}: the token's EIP-712 domain {name} (a string)")
    token_decimals = spec.get("decimals", decimals)
    if type(token_decimals) is not int or token_decimals != decimals:
        raise ConfigError(
            f"{key}.decimals: must equal the ledger asset's decimals ({decimals}); "
            "one atomic unit of the token is one atomic unit of the asset"
        )
    usd = spec.get("usd", True)
    if not isinstance(usd, bool):
        raise ConfigError(f"{key}.usd: must be true or false")
    return OnchainAsset(code, network, token, spec["name"], spec["version"], decimals, usd)
