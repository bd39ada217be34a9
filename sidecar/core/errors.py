"""Every error the product raises, each carrying the machine `reason` of PROTOCOL.md §5."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class X402Error(Exception):
    """Base of every expected failure; `str(error)` is safe to show a user."""


class ConfigError(X402Error):
    """Bad configuration; the message names the offending key, never a secret value."""


class KeySetError(ConfigError):
    """A key or secret file cannot be used: `reason` says why (key_unreadable, key_mode,
    key_malformed, duplicate_kid); the message names the file, never its content."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ToolMissing(X402Error):
    """A tool the product installs by itself (anvil, say) cannot be installed on this
    machine: no npm, no package for the platform. The message says what to do."""


class AmountError(X402Error, ValueError):
    """An amount that does not parse, is negative, or is more precise than its asset."""


class PaymentError(X402Error):
    """A check refused: `reason` and `status` go on the wire as they are."""

    reason: ClassVar[str] = "payment_required"
    status: ClassVar[int] = 402

    def __init__(self, message: str, **details: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        # Facts for the decision line only, never the answer's body (e.g. which
        # facilitator refused and with what status).
        self.logged: dict[str, str | int] = {}


class PaymentRequired(PaymentError):
    reason = "payment_required"


class MalformedPayment(PaymentError):
    reason = "malformed_payment"
    status = 400


class UnsupportedVersion(PaymentError):
    reason = "unsupported_version"
    status = 400


class UnsupportedScheme(PaymentError):
    reason = "unsupported_scheme"
    status = 400


class InvoiceMismatch(PaymentError):
    reason = "invoice_mismatch"


class InvoiceExpired(PaymentError):
    reason = "invoice_expired"


class InvalidInvoice(PaymentError):
    reason = "invalid_invoice"


class InvalidSignature(PaymentError):
    reason = "invalid_signature"


class UnknownPayer(PaymentError):
    reason = "unknown_payer"


class PayerSuspended(PaymentError):
    reason = "payer_suspended"
    status = 403


class NonceReused(PaymentError):
    reason = "nonce_reused"


class InsufficientFunds(PaymentError):
    reason = "insufficient_funds"


class PaymentConflict(PaymentError):
    """A payment identity (payment-identifier id, proof nonce, voucher) already paid for
    another request: another route, query, amount or payee. Nothing charged, nothing
    served; the body's `receipt_id` names the payment's first charge."""

    reason = "payment_identifier_conflict"
    status = 409


class PaymentInProgress(PaymentError):
    """A proof whose hold is still open (its request is being served, or its answer was
    lost before the response was seen): nothing charged yet. Non-terminal: send the SAME
    proof again after Retry-After; once the hold is captured the retry gets the recorded
    answer, once it is released the same proof pays anew. The body's `receipt_id` names
    the hold (docs/protocol.md §13)."""

    reason = "payment_in_progress"
    status = 503


class InvalidPaymentIdentifier(PaymentError):
    """A payment-identifier extension whose id is not the extension's format."""

    reason = "invalid_payment_identifier"
    status = 400


class UnknownChannel(PaymentError):
    """A voucher names a channel this payer has not opened with this gateway."""

    reason = "unknown_channel"


class ChannelClosed(PaymentError):
    """A voucher for a channel that is closed or past its expiry."""

    reason = "channel_closed"


class StaleVoucher(PaymentError):
    """A voucher whose sequence is not above the last accepted one: a replay, or sent out
    of order. The body says the channel's last sequence and cumulative amount."""

    reason = "stale_voucher"


class UnderpaidVoucher(PaymentError):
    """A voucher that raises the cumulative amount by less than the route's price."""

    reason = "underpaid_voucher"


class ChannelExists(PaymentError):
    """Opening a channel under an id already taken (a retried open is refused, not doubled)."""

    reason = "channel_exists"
    status = 409


class RateLimited(PaymentError):
    """Too many paid checks for one payer or one client address (optional limits); the
    body says which `limit` and `retry_after` seconds, also in the Retry-After header."""

    reason = "rate_limited"
    status = 429


class LedgerUnavailable(PaymentError):
    reason = "ledger_unavailable"
    status = 503


class LedgerNotDurable(PaymentError):
    """Top-ups are refused, before anything is verified or settled: the ledger's Redis
    cannot make a credit durable (no WAITAOF and no `appendfsync always`, docs/redis.md)."""

    reason = "ledger_not_durable"
    status = 503


class CreditNotDurable(PaymentError):
    """A top-up settled on chain and was credited, but the ledger did not confirm the
    credit on disk in time: send the same authorization again (it is credited at most
    once, also if this credit was lost); details name the `transaction`."""

    reason = "credit_not_durable"
    status = 503


class FacilitatorUnavailable(PaymentError):
    """The `exact` scheme's facilitator is down, too slow or answered 5xx before anything
    was settled: nothing happened; the same authorization may be sent again."""

    reason = "facilitator_unavailable"
    status = 503


class SettlementPending(PaymentError):
    """An `exact` settle was sent and its outcome is unknown (no answer, a 5xx, a
    transaction not yet seen on chain): the money may have moved. Non-terminal (the
    standard's `settlement_pending`): send the SAME authorization again after Retry-After,
    never a new one; the body carries `transaction` and `network` when known."""

    reason = "settlement_pending"
    status = 503


class InvalidPayment(PaymentError):
    """The facilitator found an `exact` authorization invalid (`isValid: false`); the body
    carries its reason as `facilitator_reason`, and a fresh challenge."""

    reason = "invalid_payment"


class SettlementFailed(PaymentError):
    """An `exact` settlement failed on chain: nothing forwarded, nothing credited.
    `settlement`: the failed SettleResponse the answer's PAYMENT-RESPONSE carries."""

    reason = "settlement_failed"

    def __init__(
        self, message: str, settlement: Mapping[str, Any] | None = None, **details: str | int
    ) -> None:
        super().__init__(message, **details)
        self.settlement = settlement


class BadRequest(PaymentError):
    """A request the gateway refuses before pricing: a non-canonical method, or an odd
    spelling of a priced path that a framework could route to the priced handler."""

    reason = "bad_request"
    status = 400


class UnknownRoute(PaymentError):
    """`unlisted: deny`: the route table lists no route for this request."""

    reason = "unknown_route"
    status = 404


class InternalError(PaymentError):
    """A bug, never expected: the check fails closed rather than letting a request pass."""

    reason = "internal_error"
    status = 503


class McpError(PaymentError):
    """A body on an MCP route that is not a JSON-RPC 2.0 request the gateway can price
    (docs/protocol.md, MCP tool calls): answered by the gateway as a JSON-RPC error with
    `code`, nothing charged, nothing forwarded."""

    code: ClassVar[int] = -32600
    reason = "mcp_invalid_request"
    status = 400


class McpParseError(McpError):
    code = -32700
    reason = "mcp_parse_error"


class McpInvalidParams(McpError):
    code = -32602
    reason = "mcp_invalid_params"


class McpBatchRefused(McpError):
    """A JSON-RPC batch holding a priced tools/call: each priced call is sent alone."""

    reason = "mcp_batch_refused"


class McpBodyTooLarge(McpError):
    reason = "body_too_large"
    status = 413


class InvalidKey(X402Error, ValueError):
    """A payer key that is not base64url of a 32-byte Ed25519 public key."""


class UnknownAsset(X402Error):
    """An asset code the gateway's config does not list."""


class ChannelExhausted(X402Error):
    """The next voucher would go beyond the channel's deposit; nothing was signed."""


class SettlementError(X402Error):
    """A batch that cannot be built or anchored; its claim stays and is retried."""


class AnchorError(SettlementError):
    """The on-chain anchor (ledger/anchors.py) cannot be read or written; `reason` says why:
    chain_unavailable, not_anchor_contract, not_operator, anchor_conflict (the chain holds
    another root for the batch), anchor_reverted. The message never carries the RPC URL."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


BY_REASON: dict[str, type[PaymentError]] = {
    cls.reason: cls
    for cls in (
        PaymentRequired,
        MalformedPayment,
        UnsupportedVersion,
        UnsupportedScheme,
        InvoiceMismatch,
        InvoiceExpired,
        InvalidInvoice,
        InvalidSignature,
        UnknownPayer,
        PayerSuspended,
        NonceReused,
        InsufficientFunds,
        PaymentConflict,
        PaymentInProgress,
        InvalidPaymentIdentifier,
        UnknownChannel,
        ChannelClosed,
        StaleVoucher,
        UnderpaidVoucher,
        ChannelExists,
        RateLimited,
        LedgerUnavailable,
        LedgerNotDurable,
        CreditNotDurable,
        FacilitatorUnavailable,
        SettlementPending,
        InvalidPayment,
        SettlementFailed,
        BadRequest,
        UnknownRoute,
        InternalError,
    )
}

# The ledger's scripts answer a bare reason; these are the words for it.
LEDGER_MESSAGES = {
    "unknown_payer": "this payer key is not registered with the ledger",
    "payer_suspended": "this payer is suspended",
    "nonce_reused": "this proof was already used (replay)",
    "insufficient_funds": "the balance does not cover this request",
    "payment_identifier_conflict": "this payment already paid for another request",
    "payment_in_progress": "this proof's request is still being served (its hold is open); "
    "nothing is charged yet: send this same proof again after Retry-After",
    "unknown_channel": "this payer has no such channel with this gateway",
    "channel_closed": "this channel is closed or expired; pay directly or open another",
    "stale_voucher": "the voucher's sequence is not above the channel's last (replay?)",
    "underpaid_voucher": "the voucher raises the cumulative amount by less than the price",
    "channel_exists": "a channel with this id exists already; nothing was moved",
}


def refusal(reason: str, message: str | None = None, **details: str | int) -> PaymentError:
    """The typed error for a reason a ledger script answered."""
    return BY_REASON[reason](message or LEDGER_MESSAGES.get(reason, reason), **details)


# -- agent side (the client SDK) --------------------------------------------------------


class GuardRefused(X402Error):
    """A spending guard of the agent's wallet refused a payment; nothing was signed.

    `guard` names the guard (max_amount, budget, assets, payees) for programs to branch on.
    """

    guard: ClassVar[str] = "guard"


class MaxAmountExceeded(GuardRefused):
    guard = "max_amount"


class BudgetExceeded(GuardRefused):
    guard = "budget"


class AssetNotAllowed(GuardRefused):
    guard = "assets"


class PayeeNotAllowed(GuardRefused):
    guard = "payees"


class InvalidChallenge(X402Error):
    """A 402 whose invoice cannot be paid: malformed, or not for the request that was sent."""


class InvalidReceipt(X402Error):
    """A receipt that is missing, unsigned by the gateway's key, or not for this payment.
    Raised (strict=True) after the payment was made: `response` is the answer (its body
    read), `receipt` the Receipt as read off it (`.verified` False, `.problem` why), or
    None when there was none; `reason` says what is wrong."""

    def __init__(
        self, message: str, response: Any = None, receipt: Any = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.response = response
        self.receipt = receipt
        self.reason = reason or message


class MalformedReceipt(X402Error, ValueError):
    """A signed receipt that is not one (Receipt.from_wire): not an object, or a common
    field missing or of the wrong type; the message names the field."""

    reason: ClassVar[str] = "malformed_receipt"


class PaymentOutcomeUnknown(X402Error):
    """A proof was sent and its answer never came (a timeout, a dropped connection): the
    gateway may have charged it. The wallet counts it as spent. `payment` is its identity
    (nonce, invoice_id, payer, payee, resource, asset, amount, origin), `resend_headers`
    the same proof, to send again: the gateway charges a proof at most once and answers a
    spent one `402 nonce_reused` with the receipt id that spent it. `__cause__` is the
    transport's error."""

    def __init__(
        self, message: str, payment: dict[str, str], resend_headers: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.payment = payment
        self.resend_headers = resend_headers


class ReceiptWarning(UserWarning):
    """Emitted instead of InvalidReceipt when the client is not in strict mode."""


class TopUpFailed(X402Error):
    """A top-up (buying prepaid credit with `exact`) that did not credit the key: the
    gateway's `reason` (PROTOCOL.md §5, or `http_<status>`) and its `status`; the message
    says what was or was not paid."""

    def __init__(self, message: str, reason: str = "topup_failed", status: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class ChannelRequestFailed(X402Error):
    """A self-serve channel open or close the gateway refused (nothing moved), or whose
    answer this SDK could not trust: the gateway's `reason` (PROTOCOL.md §5, §9, or
    `http_<status>`, `bad_receipt`) and its `status`."""

    def __init__(self, message: str, reason: str = "channel_request_failed", status: int = 0):
        super().__init__(message)
        self.reason = reason
        self.status = status
