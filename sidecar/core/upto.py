"""The x402 v2 `upto` scheme on EVM (a Permit2 witness transfer through the x402 upto
proxy): the offer the 402 carries on routes settled at the response, and the pure checks of
a `PAYMENT-SIGNATURE` envelope against it (docs/protocol.md §12). The payer signs a
maximum; the gateway settles what the response phase captured (usage x unit price, capped
at the maximum), once. Pure: the facilitator and the ledger are called by the server's
`Upto` scheme only after everything here has passed.

The envelope an official x402 client sends (x402/mechanisms/evm/upto/client.py):

    {"x402Version": 2, "accepted": {scheme: "upto", network, amount (the maximum), asset,
     payTo, maxTimeoutSeconds, extra: {facilitatorAddress, …}},
     "payload": {"permit2Authorization": {from, permitted: {token, amount}, spender, nonce,
     deadline, witness: {to, facilitator, validAfter}}, "signature": "0x..."},
     "extensions": {"eip2612GasSponsoring": {...}}?}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import InvoiceMismatch
from sidecar.core.exact import (
    ADDRESS,
    UINT,
    ExactTerms,
    OnchainAsset,
    check_window,
    field_of,
    match_accepted,
    open_envelope,
    same_address,
    standard_settle_response,
)
from sidecar.core.pricing import Price
from sidecar.core.protocol import Offer

SCHEME = "upto"
# The canonical addresses the official package uses (x402/mechanisms/evm/constants.py).
PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
FACILITATOR_ADDRESS = "facilitatorAddress"  # the extra the facilitator's /supported gives
# The x402 extension that lets a payer with no Permit2 approval pay: an EIP-2612 permit
# for Permit2, signed beside the authorization and sent by the facilitator in one step.
GAS_SPONSORING = "eip2612GasSponsoring"
# Permit2's nonceBitmap(address,uint256) selector: a settle whose answer was lost is looked
# up there (the nonce's bit is set once a transfer used it).
NONCE_BITMAP_SELECTOR = "0x4fe02b44"


def nonce_bitmap_call(owner: str, nonce: str) -> tuple[str, int]:
    """eth_call data for Permit2's nonceBitmap(owner, word) holding `nonce`, and the bit
    that says it is used."""
    value = int(nonce)
    word = format(value >> 8, "x").rjust(64, "0")
    return (
        NONCE_BITMAP_SELECTOR + owner.lower().removeprefix("0x").rjust(64, "0") + word,
        1 << (value & 0xFF),
    )


def offer(onchain: OnchainAsset, maximum: int, terms: ExactTerms, facilitator: str) -> Offer:
    """The x402 v2 `PaymentRequirements` of `upto` for at most `maximum` atomic units, as the
    official server builds them (x402/mechanisms/evm/upto/server.py): Permit2 always, the
    token's EIP-712 domain, and `facilitatorAddress` from the facilitator's /supported
    (the payer's signature binds it)."""
    extra = {
        "name": onchain.name,
        "version": onchain.version,
        "assetTransferMethod": "permit2",
        FACILITATOR_ADDRESS: facilitator,
    }
    return Offer(
        SCHEME,
        onchain.network,
        str(maximum),
        onchain.token,
        terms.pay_to,
        terms.max_timeout_seconds,
        extra,
    )


def offer_for(onchain: OnchainAsset | None, price: Price, terms: ExactTerms | None) -> list[Offer]:
    """The route's `upto` offer, if any: on a route settled at the response (charge
    on_success, or metered: the hold is the maximum) whose asset a token backs, once the
    facilitator's /supported has named its address for the network."""
    if onchain is None or terms is None or price.phase is None:
        return []
    facilitator = terms.upto_extra.get(onchain.network, {}).get(FACILITATOR_ADDRESS)
    if not isinstance(facilitator, str) or not facilitator:
        return []
    return [offer(onchain, price.amount, terms, facilitator)]


@dataclass(frozen=True, slots=True)
class Permit2Authorization:
    """A checked upto Permit2 authorization and the envelope that carried it."""

    payer: str  # `from`, lower case
    maximum: int  # permitted.amount: never settled beyond it
    nonce: str  # Permit2's unordered nonce, a decimal uint256
    valid_before: int  # the permit's deadline (the reservation lasts until then)
    envelope: Mapping[str, Any]  # what goes to the facilitator as paymentPayload, unchanged
    requirements: Offer  # our offer (amount: the maximum)

    @property
    def sender(self) -> str:
        """`from` as the agent wrote it (EIP-55 case): what receipts and the service say."""
        return str(self.envelope["payload"]["permit2Authorization"]["from"])

    @property
    def key(self) -> str:
        """Names the authorization across the ledger: Permit2's nonces are per owner, one
        use each, across every token."""
        return f"{self.requirements.network}:permit2:{self.nonce}"

    def for_amount(self, amount: int) -> Offer:
        """The requirements a settle of `amount` sends: the official facilitator settles
        `paymentRequirements.amount` (at most the signed maximum)."""
        r = self.requirements
        return Offer(r.scheme, r.network, str(amount), r.asset, r.pay_to,
                     r.max_timeout_seconds, r.extra)  # fmt: skip

    def settle_response(
        self, amount: int, transaction: str, error_reason: str = "", error_message: str = ""
    ) -> dict[str, Any]:
        """The standard `PAYMENT-RESPONSE`: `amount` is what settled, not the maximum."""
        r = self.requirements
        return standard_settle_response(
            self.sender, r.network, r.asset, str(amount), transaction, error_reason, error_message
        )


def _field(obj: Any, name: str, pattern: Any, what: str) -> str:
    return field_of(obj, name, pattern, what, SCHEME)


def parse(decoded: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The envelope's `accepted` and `payload.permit2Authorization`, shapes checked."""
    accepted, _, permit = open_envelope(decoded, SCHEME, "permit2Authorization", "")
    for name in ("from", "spender"):
        _field(permit, name, ADDRESS, "permit2Authorization")
    for name in ("nonce", "deadline"):
        _field(permit, name, UINT, "permit2Authorization")
    _field(permit.get("permitted"), "token", ADDRESS, "permitted")
    _field(permit.get("permitted"), "amount", UINT, "permitted")
    for name in ("to", "facilitator"):
        _field(permit.get("witness"), name, ADDRESS, "witness")
    _field(permit.get("witness"), "validAfter", UINT, "witness")
    return accepted, permit


def verify(decoded: Mapping[str, Any], requirements: Offer, now: int) -> Permit2Authorization:
    """Match the envelope against this route's offer, cheapest first, before anyone is
    called: scheme, network, maximum, asset, payTo; then the permit's token, maximum,
    spender (the upto proxy), recipient, facilitator and validity window."""
    accepted, permit = parse(decoded)
    match_accepted(accepted, requirements, "maximum")
    permitted, witness = permit["permitted"], permit["witness"]
    if not same_address(permitted["token"], requirements.asset):
        raise InvoiceMismatch("the permit is for another token than this route's")
    if permitted["amount"] != requirements.amount:
        raise InvoiceMismatch("the permit's maximum is not this route's")
    if not same_address(permit["spender"], UPTO_PROXY):
        raise InvoiceMismatch(f"the permit's spender must be the x402 upto proxy {UPTO_PROXY}")
    if not same_address(witness["to"], requirements.pay_to):
        raise InvoiceMismatch("the authorization pays someone else than this gateway's payTo")
    facilitator = str(requirements.extra.get(FACILITATOR_ADDRESS, ""))
    if not same_address(witness["facilitator"], facilitator):
        raise InvoiceMismatch("the authorization names another facilitator than this offer's")
    check_window(int(witness["validAfter"]), int(permit["deadline"]), "deadline", requirements, now)
    return restore(decoded, requirements)


def restore(envelope: Mapping[str, Any], requirements: Offer) -> Permit2Authorization:
    """An authorization `verify` accepted at the check, rebuilt for its settle in the
    response phase: shapes checked again, the clock not (the deadline is the chain's)."""
    _, permit = parse(envelope)
    return Permit2Authorization(
        payer=permit["from"].lower(),
        maximum=int(permit["permitted"]["amount"]),
        nonce=permit["nonce"],
        valid_before=int(permit["deadline"]),
        envelope=envelope,
        requirements=requirements,
    )
