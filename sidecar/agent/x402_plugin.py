"""Agents on the official x402 Python client pay our `prepaid-ed25519` scheme: one line.

    from x402 import x402Client
    from x402.http.clients import x402HttpxClient
    from sidecar.agent import Wallet
    from sidecar.agent.x402_plugin import PREPAID_NETWORK, PrepaidEd25519

    client = x402Client()
    client.register(PREPAID_NETWORK, PrepaidEd25519(Wallet.from_env(max_amount="1")))
    async with x402HttpxClient(client) as http:
        response = await http.get(url)  # 402 → signed prepaid proof → 200 + receipt

`PrepaidEd25519` implements the official client-side scheme interface (x402's
`SchemeNetworkClient`: a `scheme` name and `create_payment_payload(requirements)` returning
the inner payload, which the client wraps in its v2 `PAYMENT-SIGNATURE` envelope). The
inner payload is our signed proof (PROTOCOL.md §3) of the invoice the gateway put in the
offer's `extra`. The wallet's guards run before anything is signed.

The module imports nothing of `x402` itself (the interface is structural), so it loads
with the base install; only the official client, which the agent brings, needs it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sidecar.agent.wallet import Reservation, Wallet
from sidecar.core.decision import Gateway
from sidecar.core.errors import AmountError, InvalidChallenge
from sidecar.core.money import to_atomic
from sidecar.core.protocol import SCHEME, Invoice

if TYPE_CHECKING:  # the agent's own x402 install
    from x402.schemas import PaymentRequirements, PaymentResponseContext

__all__ = ["PREPAID_NETWORK", "PrepaidEd25519"]

# The `network` of the gateway's prepaid-ed25519 offers.
PREPAID_NETWORK: str = Gateway.network
# Payments awaiting the official client's response hook; older ones are forgotten (they
# stay counted as spent, the safe side).
MAX_PENDING = 4096


class PrepaidEd25519:
    """The `prepaid-ed25519` scheme for `x402Client` / `x402ClientSync`.

    `decimals`: the ledger assets this scheme pays ({code: decimals}; default USDF, 6).
    The official client pays only assets a scheme knows (or that its `spend_controls`
    list), capped by default at "$1" a payment: here one unit of the asset counts as $1.
    A price in an asset not listed is refused by the official client, as an unknown token
    is. `set_spend_controls` raises or lifts the cap, as for any scheme.

    Accounting: a signed proof counts as spent at once; when the gateway refuses it (a
    402 answer to the paid retry, seen through the client's `on_payment_response` hook)
    the amount goes back to the wallet's budget.
    """

    scheme = SCHEME

    def __init__(self, wallet: Wallet, *, decimals: Mapping[str, int] | None = None) -> None:
        self.wallet = wallet
        self.decimals = dict(decimals) if decimals is not None else {"USDF": 6}
        self._pending: OrderedDict[str, Reservation] = OrderedDict()
        self._lock = threading.Lock()
        # The official client calls a scheme's own hooks (x402 hook_adapters).
        self.scheme_hooks = {"on_payment_response": self.on_payment_response}

    def __repr__(self) -> str:
        return f"PrepaidEd25519({self.wallet!r})"

    def find_default_asset(self, asset: str, network: str) -> dict[str, Any] | None:
        """What the official client's spend controls know of `asset` (None: unknown)."""
        decimals = self.decimals.get(asset)
        if decimals is None:
            return None
        return {"asset": asset, "name": asset, "symbol": asset, "decimals": decimals}

    def create_payment_payload(self, requirements: PaymentRequirements) -> dict[str, Any]:
        """Our signed proof of the invoice in `requirements.extra`; guards first."""
        invoice = offer_invoice(requirements.extra)
        if requirements.asset != invoice.asset or requirements.pay_to != invoice.payee:
            raise InvalidChallenge("the offer's asset or payTo differ from its invoice")
        decimals = self.decimals.get(invoice.asset)
        if decimals is not None:
            try:
                same = to_atomic(invoice.amount, decimals) == int(requirements.amount)
            except (AmountError, ValueError):
                same = False
            if not same:
                raise InvalidChallenge("the offer's amount differs from its invoice's")
        reservation = self.wallet.reserve(invoice.asset, invoice.amount, invoice.payee)
        try:
            proof = self.wallet.sign(invoice)
        except BaseException:
            reservation.release()
            raise
        reservation.commit()
        with self._lock:
            self._pending[proof["nonce"]] = reservation
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        return proof

    def on_payment_response(self, context: PaymentResponseContext) -> None:
        """The paid retry's answer: a refusal (a 402 again, or a failed settlement) gives
        the amount back to the budget; anything else leaves it spent."""
        payload = getattr(context.payment_payload, "payload", None)
        nonce = payload.get("nonce") if isinstance(payload, dict) else None
        if not isinstance(nonce, str):
            return
        with self._lock:
            reservation = self._pending.pop(nonce, None)
        if reservation is None:
            return
        settled = context.settle_response
        if settled is not None:
            refused = not settled.success
        else:  # no receipt: a 402 again says refused; nothing at all says nothing
            refused = context.payment_required is not None
        if refused:
            reservation.refund()


def offer_invoice(extra: Any) -> Invoice:
    """The invoice fields of a `prepaid-ed25519` offer's `extra`, checked."""
    if not isinstance(extra, dict):
        raise InvalidChallenge("the prepaid-ed25519 offer carries no invoice in `extra`")
    return Invoice.from_wire(extra, "the offer's invoice")
