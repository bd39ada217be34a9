"""The payment flows' plumbing: a flow is a generator that yields the requests it sends
(and `Wait`s for a top-up another request started), driven by httpx (sync or async) or
the requests adapter; and the top-up flow, shared by X402Auth's auto_topup and `topup()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import anyio
import httpx

from sidecar.agent.discovery import Discovery
from sidecar.agent.exact import (
    TOPUP_KIND,
    ExactOffer,
    TopUp,
    check_exact_receipt,
    exact_offers,
    find_onchain,
)
from sidecar.agent.receipts import receipt_header, refusal
from sidecar.agent.retries import Retrying
from sidecar.agent.wallet import Wallet
from sidecar.core import protocol
from sidecar.core.errors import (
    AmountError,
    ConfigError,
    InvalidChallenge,
    PaymentError,
    TopUpFailed,
)
from sidecar.core.money import Asset

JSON = "application/json"
SIGNATURE_HEADER = "PAYMENT-SIGNATURE"  # the x402 v2 envelope, as official clients send it


@dataclass(frozen=True)
class Wait:
    """Yielded by the flow instead of a request: wait until `event` (a top-up another
    request started) is set, at most `timeout` seconds; the flow gets None back."""

    event: threading.Event
    timeout: float


Step = httpx.Request | Wait
Flow = Generator[Step, httpx.Response | None, None]


def send(request: httpx.Request) -> Generator[Step, httpx.Response | None, httpx.Response]:
    """`response = yield from send(request)`: a request's answer inside a flow."""
    response = yield request
    assert response is not None  # only a Wait is answered with None
    return response


async def wait_async(wait: Wait) -> None:
    """A `Wait` under async httpx: poll the event, never block the event loop. A
    threading.Event, not an anyio one: sync threads and event loops may share the auth."""
    deadline = time.monotonic() + wait.timeout
    while not wait.event.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
        await anyio.sleep(0.005)


def drive(flow: Flow, read: bool = False) -> Generator[httpx.Request, httpx.Response, None]:
    """A flow as an httpx auth flow for sync callers: a `Wait` blocks this thread. With
    `read`, each answer's body is read here, inside the flow, so a timeout while reading it
    reaches the flow (an unknown outcome), not the garbage collector."""
    try:
        step = next(flow)
        while True:
            if isinstance(step, Wait):
                step.event.wait(step.timeout)
                step = flow.send(None)
            else:
                response = yield step
                if read:
                    response.read()
                step = flow.send(response)
    except StopIteration:
        return
    finally:
        flow.close()


def topup_flow(
    wallet: Wallet,
    origin: str,
    amount: str,
    discovery: Discovery,
    keys: Mapping[str, str] | None,
) -> Generator[Step, httpx.Response | None, TopUp]:
    """Buy `amount` of prepaid credit for the wallet's Ed25519 key on the gateway's top-up
    route, paying `exact` with its EVM key: the priced 402, then the paid retry.

    The top-up counts against the wallet's budget in the credited asset (and its asset and
    payee guards); max_amount does not apply (it caps one request's price). Raises
    TopUpFailed when the gateway did not credit the key, GuardRefused before signing."""
    terms = discovery.topup
    if terms is None:
        raise TopUpFailed("this gateway sells no prepaid credit (no `topup` in its discovery)")
    evm = wallet.evm
    if evm is None:
        raise ConfigError("a top-up is paid with an EVM key: this wallet has none")
    asset, atomic = _topup_amount(discovery, amount)
    query = urlencode({"payer": wallet.public_key, "amount": amount})
    url = f"{origin}{terms.path}?{query}"
    priced = yield from send(httpx.Request(terms.method, url, headers={"accept": JSON}))
    if priced.status_code != 402:
        raise _topup_refused(priced, "asking its price")
    offer = _topup_offer(priced, discovery, atomic)
    reservation = wallet.reserve_atomic(
        terms.asset,
        atomic,
        asset.decimals,
        discovery.payee,
        aliases=(offer.token,),
        payee_aliases=(offer.pay_to,),
        per_request=False,
    )
    try:
        header = evm.sign_exact(offer.offer, offer.resource)
    except BaseException:
        reservation.release()
        raise
    paid_request = httpx.Request(
        terms.method, url, headers={"accept": JSON, SIGNATURE_HEADER: header}
    )
    retrying = Retrying()
    try:
        paid = yield from send(paid_request)
        for attempt in range(retrying.retries):  # settlement_pending: the same one again
            if paid.status_code != 503:
                break
            yield Wait(threading.Event(), retrying.delay(paid, attempt))
            paid = yield from send(paid_request)
    except BaseException:
        reservation.commit()  # sent, perhaps settled: it counts
        raise
    if paid.status_code != 200:
        if 400 <= paid.status_code < 500 and refusal(paid) != "nonce_reused":
            reservation.release()  # refused before anything settled
        else:
            reservation.commit()  # a 5xx may come after the chain moved the money
        raise _topup_refused(paid, "paying")
    reservation.commit()
    return _topup_of(paid, wallet, evm.address, discovery, keys, atomic)


def _topup_amount(discovery: Discovery, amount: str) -> tuple[Asset, int]:
    """The credited asset and `amount` in its atomic units, within the gateway's limits."""
    terms = discovery.topup
    assert terms is not None
    asset = discovery.routes.assets.get(terms.asset)
    if asset is None:
        raise TopUpFailed(f"the gateway's discovery lists no decimals for {terms.asset}")
    atomic = asset.to_atomic(amount)  # AmountError: not an amount of this asset
    try:
        low, high = asset.to_atomic(terms.min), asset.to_atomic(terms.max)
    except AmountError:
        raise TopUpFailed("the gateway's top-up limits do not parse") from None
    if not low <= atomic <= high:
        raise TopUpFailed(
            f"a top-up is {terms.min} to {terms.max} {terms.asset}; {amount} is not",
            "bad_request",
        )
    return asset, atomic


def _topup_offer(priced: httpx.Response, discovery: Discovery, atomic: int) -> ExactOffer:
    """The top-up 402's `exact` offer in a token backing the credited asset, for `atomic`."""
    terms = discovery.topup
    assert terms is not None
    offers = [
        offer
        for offer in exact_offers(priced.headers.get("payment-required"))
        if (found := find_onchain(discovery.onchain, offer.network, offer.token)) is not None
        and found.asset == terms.asset
    ]
    if not offers:
        raise InvalidChallenge(
            f"the top-up's 402 offers exact in no token the gateway lists for {terms.asset}"
        )
    offer = offers[0]
    if offer.amount != atomic:
        raise InvalidChallenge(
            f"the top-up's offer is for {offer.amount} atomic units, not the {atomic} asked for"
        )
    return offer


def _topup_of(
    paid: httpx.Response,
    wallet: Wallet,
    evm_address: str,
    discovery: Discovery,
    keys: Mapping[str, str] | None,
    atomic: int,
) -> TopUp:
    """The paid top-up's answer as a TopUp, its receipt checked."""
    terms = discovery.topup
    assert terms is not None
    try:
        body = paid.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    body = body if isinstance(body, dict) else {}
    fields = body.get("receipt")
    if not isinstance(fields, dict):
        header_value = receipt_header(paid)
        try:
            fields = protocol.decode_header(header_value) if header_value else {}
        except PaymentError:
            fields = {}
    fields = fields if isinstance(fields, dict) else {}
    problem = check_exact_receipt(
        fields,
        keys,
        payer=evm_address,
        resource=None,
        asset=terms.asset,
        atomic=atomic,
        decimals=discovery.routes.assets[terms.asset].decimals,
    )
    payer = wallet.public_key
    if problem is None and (fields.get("payer") != payer or fields.get("kind") != TOPUP_KIND):
        problem = "it does not credit this wallet's key"

    def text(name: str) -> str:
        value = body.get(name, fields.get(name, ""))
        return value if isinstance(value, str) else str(value)

    return TopUp(
        payer=payer,
        asset=terms.asset,
        credited=text("credited") or str(fields.get("amount", "")),
        balance=text("balance"),
        transaction=text("transaction"),
        receipt_id=str(fields.get("receipt_id", "")),
        verified=problem is None,
        receipt=fields,
        problem=problem,
    )


def _topup_refused(response: httpx.Response, doing: str) -> TopUpFailed:
    reason = refusal(response) or f"http_{response.status_code}"
    message = ""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = f": {body['message']}"
    return TopUpFailed(
        f"top-up refused while {doing}: HTTP {response.status_code} {reason}{message}",
        reason,
        response.status_code,
    )
