"""What an answer that may have cost money tells the agent: refusals with their next step,
payments whose outcome is unknown, and the rule that a proof goes to one URL only.

- A refused payment (the gateway's `reason`, nothing charged) becomes the typed error of
  `sidecar.core.errors` for that reason (UnknownPayer, InsufficientFunds, …) with a
  `next_step`; it rides on the response (`refusal_of(response)`), it is not raised.
- A proof sent whose answer never came (a timeout, a dropped connection) may have been
  charged: the flow raises PaymentOutcomeUnknown carrying the payment's identity.
- A proof is signed for one request: `ProofGuard` (an httpcore `trace` hook) strips the
  payment headers from any redirected request httpx sends after it, and `answer_of` finds
  the paid hop among the redirects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpcore
import httpx

from sidecar.core.errors import BY_REASON, PaymentError, PaymentOutcomeUnknown

REFUSAL_EXTENSION = "x402_refusal"  # the typed refusal of a refused payment
PAYMENT_HEADERS = (b"x-payment", b"payment-signature")  # what a redirect must not carry
SEND_HEADERS = ("http11.send_request_headers.started", "http2.send_request_headers.started")

TOPUP_HINT = "`x402 topup --amount AMOUNT {origin}` with an EVM key, or X402Auth(auto_topup=...)"
NEXT_STEPS = {
    "unknown_payer": (
        "this key ({payer}) has no account at {origin}: ask its operator to run `x402 payer "
        "register {payer}` and credit it, or buy credit yourself: " + TOPUP_HINT
    ),
    "insufficient_funds": (
        "the balance{balance} does not cover this request: add credit with "
        + TOPUP_HINT
        + ", or ask the gateway's operator (`x402 payer credit`)"
    ),
    "payer_suspended": "ask the gateway's operator why this key is suspended",
    "nonce_reused": (
        "this proof was already charged{receipt}: that payment stands, do not pay again "
        "to learn its outcome"
    ),
    "rate_limited": "wait {retry_after} s, then send the request again (nothing was charged)",
    "ledger_unavailable": "nothing was charged: send the same proof again shortly",
    "facilitator_unavailable": "nothing settled: send the same payment again shortly",
    "settlement_pending": (
        "the settlement's outcome is not known yet and the money may have moved: send the "
        "SAME payment again after Retry-After (never a newly signed one); it is settled once"
    ),
    "payment_in_progress": (
        "this proof's request is still being served and nothing is charged yet: send the "
        "SAME proof again after Retry-After (never a newly signed one)"
    ),
    "unsupported_scheme": "pay this route another way (a prepaid proof or `exact`)",
    "payment_required": "this wallet has nothing this route accepts (see the 402's offers)",
}


def refusal_of(response: Any) -> PaymentError | None:
    """The typed refusal of an httpx or requests response paid through this SDK, if the
    gateway refused the payment (nothing was charged), else None."""
    extensions = getattr(response, "extensions", None)
    if isinstance(extensions, Mapping) and REFUSAL_EXTENSION in extensions:
        found = extensions[REFUSAL_EXTENSION]
        return found if isinstance(found, PaymentError) else None
    found = getattr(response, REFUSAL_EXTENSION, None)
    return found if isinstance(found, PaymentError) else None


def raise_for_payment(response: Any) -> None:
    """Raise the typed refusal (UnknownPayer, InsufficientFunds, …) of a refused payment."""
    found = refusal_of(response)
    if found is not None:
        raise found


def attach_refusal(response: httpx.Response, reason: str, payer: str) -> PaymentError | None:
    """The refusal as its typed error, with what to do next, put on the response; None for
    a reason this protocol does not name (a plain HTTP error of the service)."""
    kind = BY_REASON.get(reason)
    if kind is None:
        return None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    body = body if isinstance(body, dict) else {}
    said = body.get("message") if isinstance(body.get("message"), str) else kind.reason
    balance, receipt = body.get("balance"), body.get("receipt_id")
    url = response.request.url
    next_step = NEXT_STEPS.get(reason, "see the gateway's message").format(
        payer=payer or "?",
        origin=f"{url.scheme}://{url.netloc.decode('ascii')}",
        balance=f" ({balance})" if balance is not None else "",
        receipt=f" (receipt {receipt})" if isinstance(receipt, str) else "",
        retry_after=body.get("retry_after", response.headers.get("retry-after", "a few")),
    )
    details = {k: v for k, v in body.items() if isinstance(v, str | int) and k != "message"}
    error = kind(f"{response.status_code} {reason}: {said}. Next: {next_step}", **details)
    error.next_step = next_step  # type: ignore[attr-defined]
    response.extensions = {**response.extensions, REFUSAL_EXTENSION: error}
    return error


TRANSPORT_ERRORS = (
    httpx.TransportError,
    OSError,  # requests' errors, raw sockets
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
)
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpcore.ConnectError)


def transport_cause(closing: BaseException, request: httpx.Request) -> BaseException | None:
    """The exception that abandoned a flow, seen from the GeneratorExit that closed it (a
    sync flow is closed while it propagates), else as the ProofGuard saw it fail (an async
    generator's close does not chain it): a transport error, or None (a cancellation, an
    interrupt: those propagate untouched)."""
    seen: BaseException | None = closing
    while isinstance(seen, GeneratorExit):
        seen = seen.__context__
    if seen is None:
        seen = getattr(request.extensions.get("trace"), "failure", None)
    return seen if isinstance(seen, TRANSPORT_ERRORS) else None


def never_sent(cause: BaseException) -> bool:
    """A connection that never opened: the proof did not leave this machine."""
    return isinstance(cause, NEVER_SENT)


def outcome_unknown(
    request: httpx.Request, identity: Mapping[str, Any], cause: BaseException
) -> PaymentOutcomeUnknown:
    """The error for a proof sent whose answer never came."""
    facts = {k: str(v) for k, v in identity.items() if v not in (None, "")}
    amount = f"{facts.get('amount', '?')} {facts.get('asset', '')}".rstrip()
    what = f"{request.method} {request.url}"
    resend = {
        name: request.headers[name]
        for name in ("X-Payment", "PAYMENT-SIGNATURE")
        if name in request.headers
    }
    return PaymentOutcomeUnknown(
        f"{what}: {type(cause).__name__} after the payment was sent: {amount} "
        f"(nonce {facts.get('nonce', '?')}) may have been charged. Counted as spent. "
        "Re-send the same proof (`.resend_headers`): it is charged at most once (a spent "
        "one is answered 402 nonce_reused with its receipt id); never sign a new one for "
        "this request until this one is known refused",
        facts,
        resend,
    )


def answer_of(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    """The answer to `request` itself: with follow_redirects httpx hands the flow the last
    hop, and the paid answer (a 3xx with the receipt) is in its history."""
    for hop in reversed([*response.history, response]):
        if hop.request is request:
            return hop
    return response


def _strip(info: Mapping[str, Any], url: bytes) -> None:
    wire = info.get("request")
    target = getattr(wire, "url", None)
    # through a forwarding HTTP proxy the target is the whole URL
    if target is None or url in (bytes(target), target.target):
        return
    headers = wire.headers  # type: ignore[union-attr]
    headers[:] = [(k, v) for k, v in headers if k.lower() not in PAYMENT_HEADERS]


class ProofGuard:
    """An httpcore `trace` hook that sends payment headers to the URL they were signed for
    and to no other: httpx copies every header but Authorization onto a redirect, and the
    hook runs just before each hop's headers go out. The caller's own trace still runs."""

    def __init__(self, url: httpx.URL, inner: Callable[..., Any] | None) -> None:
        wire = httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        )
        self.url = bytes(wire)
        self.inner = inner
        self.failure: BaseException | None = None  # the last step that failed, if any

    def see(self, event: str, info: dict[str, Any]) -> None:
        if event in SEND_HEADERS:
            _strip(info, self.url)
        elif event.endswith(".failed"):
            self.failure = info.get("exception")

    def __call__(self, event: str, info: dict[str, Any]) -> Any:
        self.see(event, info)
        return self.inner(event, info) if self.inner is not None else None


class AsyncProofGuard(ProofGuard):
    async def __call__(self, event: str, info: dict[str, Any]) -> None:
        self.see(event, info)
        if self.inner is not None:
            result = self.inner(event, info)
            if isinstance(result, Awaitable):
                await result


def guard(request: httpx.Request, asynchronous: bool) -> None:
    """Arm `request` (and every redirect httpx makes of it) with the ProofGuard."""
    inner = request.extensions.get("trace")
    if isinstance(inner, ProofGuard):
        return
    kind = AsyncProofGuard if asynchronous else ProofGuard
    request.extensions = {**request.extensions, "trace": kind(request.url, inner)}


__all__ = ["REFUSAL_EXTENSION", "PaymentOutcomeUnknown", "raise_for_payment", "refusal_of"]
