"""Agents pay through a state channel with httpx: `ChannelAuth` signs one voucher per request.

    channel = PaymentChannel.open("https://api.example", wallet, "10")  # from its balance
    with httpx.Client(auth=ChannelAuth(channel)) as http:
        http.get(url)  # X-Payment: a voucher raising the cumulative amount by the price
    channel.close()  # the unspent deposit returns to the wallet's prepaid balance

The agent opens and closes its own channel with requests signed by its key
(`PaymentChannel.open` / `aopen`, `close` / `aclose`; channel_open.py), or the operator
opens one for it (`x402 channel open PAYER DEPOSIT`, the admin API) and
`PaymentChannel(wallet, "ch_…", deposit="10")` takes its id. Vouchers are a sequence:
send them from one place at a time (a channel per concurrent lane). A voucher the gateway
refuses because another got there first (stale_voucher) or because a lost answer left the
two sides apart (underpaid_voucher) is re-issued once from the gateway's state, which can
never be above what this wallet signed: the agent pays for each request at most once.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Mapping
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.agent.channel_open import Closed, Opened, arun, close_flow, open_flow, run
from sidecar.agent.discovery import Discovery, DiscoveryCache, origin_of, path_of
from sidecar.agent.proofs import PROOF_HEADER, parse_invoice
from sidecar.agent.receipts import (
    NOT_JSON,
    attach,
    bad_receipt,
    receipt_fields,
    receipt_header,
    refusal,
    report,
    verified,
)
from sidecar.agent.wallet import Reservation, Wallet, scaled, unscaled
from sidecar.core import protocol, vouchers
from sidecar.core.errors import (
    AmountError,
    ChannelExhausted,
    X402Error,
)

RESYNC_REASONS = frozenset({"stale_voucher", "underpaid_voucher"})


@dataclass(frozen=True)
class Issued:
    voucher: dict[str, Any]
    amount: int  # scaled (wallet.SCALE decimals)
    before: int  # the cumulative amount before this voucher, scaled
    reservation: Reservation


class PaymentChannel:
    """The agent's side of one channel: the cumulative amount and sequence it has signed.

    Amounts are decimal strings in the channel's asset (`cumulative`, `spent`, `deposit`
    as given); internally integers at the wallet's scale. Thread-safe.
    """

    def __init__(
        self,
        wallet: Wallet,
        channel_id: str,
        *,
        asset: str = "USDF",
        deposit: str | None = None,
        cumulative: str = "0",
        sequence: int = 0,
    ) -> None:
        """`cumulative`/`sequence`: where a resumed channel stands (0 for a new one)."""
        self.wallet = wallet
        self.channel_id = channel_id
        self.asset = asset
        self._deposit = None if deposit is None else scaled(deposit, "deposit")
        self._total = scaled(cumulative, "cumulative")  # the cumulative amount signed
        self.sequence = sequence
        self._high_water = self._total  # the most this wallet ever signed for
        self._lock = threading.Lock()
        self.gateway_url: str | None = None  # where it was opened (self-serve), for close()
        self.opened: Opened | None = None  # the open's answer and receipt (self-serve)
        self.closed: Closed | None = None  # the close's answer and receipt, once closed

    @classmethod
    def open(
        cls,
        gateway_url: str,
        wallet: Wallet,
        deposit: str,
        *,
        ttl_seconds: int | None = None,
        client: httpx.Client | None = None,
        request_timeout: float = 30.0,
    ) -> PaymentChannel:
        """Lock `deposit` (a decimal string in the gateway's channel asset) of the wallet's
        prepaid balance into a new channel at the gateway, signed by the wallet's key.
        `ttl_seconds`: its lifetime (default: the longest the gateway allows). Raises
        ChannelRequestFailed with the gateway's reason (nothing moved)."""
        flow = open_flow(gateway_url, wallet.identity, deposit, ttl_seconds)
        with ExitStack() as stack:
            http = client or stack.enter_context(httpx.Client(timeout=request_timeout))
            opened: Opened = run(flow, http)
        return cls._from(wallet, opened)

    @classmethod
    async def aopen(
        cls,
        gateway_url: str,
        wallet: Wallet,
        deposit: str,
        *,
        ttl_seconds: int | None = None,
        client: httpx.AsyncClient | None = None,
        request_timeout: float = 30.0,
    ) -> PaymentChannel:
        """`open` for asyncio (or trio) callers."""
        flow = open_flow(gateway_url, wallet.identity, deposit, ttl_seconds)
        async with AsyncExitStack() as stack:
            http = client
            if http is None:
                http = await stack.enter_async_context(httpx.AsyncClient(timeout=request_timeout))
            opened: Opened = await arun(flow, http)
        return cls._from(wallet, opened)

    @classmethod
    def _from(cls, wallet: Wallet, opened: Opened) -> PaymentChannel:
        channel = cls(wallet, opened.channel_id, asset=opened.asset, deposit=opened.deposit)
        channel.gateway_url, channel.opened = opened.gateway.origin, opened
        return channel

    def close(
        self,
        gateway_url: str | None = None,
        *,
        client: httpx.Client | None = None,
        request_timeout: float = 30.0,
    ) -> Closed:
        """Close the channel at the gateway with a request signed by the wallet's key: the
        unspent deposit returns to the prepaid balance. Closing twice answers the first
        close again (`already_closed`). `gateway_url`: where it lives, if not opened here."""
        flow = close_flow(self._where(gateway_url), self.wallet.identity, self.channel_id)
        with ExitStack() as stack:
            http = client or stack.enter_context(httpx.Client(timeout=request_timeout))
            self.closed = run(flow, http)
        return self.closed

    async def aclose(
        self,
        gateway_url: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        request_timeout: float = 30.0,
    ) -> Closed:
        """`close` for asyncio (or trio) callers."""
        flow = close_flow(self._where(gateway_url), self.wallet.identity, self.channel_id)
        async with AsyncExitStack() as stack:
            http = client
            if http is None:
                http = await stack.enter_async_context(httpx.AsyncClient(timeout=request_timeout))
            self.closed = await arun(flow, http)
        return self.closed

    def _where(self, gateway_url: str | None) -> str:
        where = gateway_url or self.gateway_url
        if where is None:
            raise X402Error(f"channel {self.channel_id}: name the gateway_url to close it at")
        return where

    def issue(self, resource: str, amount: str, payee: str) -> Issued:
        """Guards first (they raise), then sign a voucher raising the total by `amount`."""
        value = scaled(amount)
        reservation = self.wallet.reserve(self.asset, amount, payee)
        with self._lock:
            total = self._total + value
            if self._deposit is not None and total > self._deposit:
                reservation.release()
                raise ChannelExhausted(
                    f"channel {self.channel_id}: {unscaled(total)} {self.asset} would pass "
                    f"the {unscaled(self._deposit)} deposit"
                )
            before = self._total
            self._total, self.sequence = total, self.sequence + 1
            self._high_water = max(self._high_water, total)
            voucher = vouchers.sign_voucher(
                {
                    "channel_id": self.channel_id,
                    "asset": self.asset,
                    "cumulative": unscaled(total),
                    "sequence": self.sequence,
                    "resource": resource,
                    "payee": payee,
                },
                self.wallet.identity,
            )
        return Issued(voucher, value, before, reservation)

    def refused(self, issued: Issued) -> None:
        """The gateway did not take this voucher: give its amount back, if no voucher was
        issued after it (else the next one already covers the gap; the gateway takes
        any raise of at least the price, so at worst that one overpays by this amount)."""
        issued.reservation.release()
        with self._lock:
            if self.sequence == issued.voucher["sequence"]:
                self._total = issued.before

    def resync(self, body: Any) -> bool:
        """Adopt the gateway's last sequence and cumulative amount from a refusal's body;
        False if there is none, or it claims more than this wallet ever signed."""
        if not isinstance(body, dict):
            return False
        sequence, cumulative = body.get("sequence"), body.get("cumulative")
        if type(sequence) is not int or not isinstance(cumulative, str):
            return False
        try:
            theirs = scaled(cumulative)
        except AmountError:
            return False
        with self._lock:
            if theirs > self._high_water:
                return False  # never sign on the word of a gateway claiming more
            self._total = theirs
            self.sequence = max(self.sequence, sequence)
        return True

    @property
    def cumulative(self) -> str:
        """The cumulative amount of the last voucher signed, in the channel's asset ("1.5")."""
        with self._lock:
            return unscaled(self._total)

    @property
    def deposit(self) -> str | None:
        return None if self._deposit is None else unscaled(self._deposit)

    @property
    def spent(self) -> str:
        """What the channel has paid so far: its cumulative amount."""
        return self.cumulative


class ChannelAuth(httpx.Auth):
    """httpx auth that pays each priced request with a voucher of `channel`.

    Prices come from the gateway's /.well-known/x402 (fetched once per origin, cached
    `discovery_ttl` seconds); a route it does not list is paid for from its 402's invoice.
    Receipts are verified against the gateway's keys and put in
    `response.extensions["x402_receipt"]`; a bad one raises InvalidReceipt when strict,
    else warns.
    """

    requires_request_body = True  # a route missing from the price list is sent twice
    requires_response_body = True

    def __init__(
        self, channel: PaymentChannel, *, strict: bool = False, discovery_ttl: float = 300.0
    ) -> None:
        self.channel = channel
        self.strict = strict
        self.discoveries = DiscoveryCache(discovery_ttl)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        origin = origin_of(request.url)
        cached = self.discoveries.fresh(origin)
        if cached is None:
            found = yield DiscoveryCache.request(request)
            discovery = self.discoveries.store(origin, found)
        else:
            discovery = cached.discovery
        if discovery is None:
            yield request  # no price list, no payee: nothing this auth can pay
            return

        resource = f"{request.method} {path_of(request.url)}"
        price = discovery.price(request.method, path_of(request.url))
        if price is not None and price.asset.code == self.channel.asset:
            amount = price.display
        else:
            response = yield request
            invoice = parse_invoice(response) if response.status_code == 402 else None
            if invoice is None or invoice.asset != self.channel.asset:
                return
            amount = invoice.amount

        for attempt in (1, 2):
            issued = self.channel.issue(resource, amount, discovery.payee)
            request.headers[PROOF_HEADER] = protocol.encode_header(issued.voucher)
            response = yield request
            reason = refusal(response)
            if reason is None:
                issued.reservation.commit()
                self._check(response, issued.voucher, discovery)
                return
            self.channel.refused(issued)
            if attempt == 2 or reason not in RESYNC_REASONS or not self._resync(response):
                return

    def _resync(self, response: httpx.Response) -> bool:
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            return False
        return self.channel.resync(body)

    def _check(
        self, response: httpx.Response, voucher: Mapping[str, Any], discovery: Discovery
    ) -> None:
        header = receipt_header(response)
        if header is None:
            bad_receipt("no payment receipt on the response", self.strict, response)
            return
        fields = receipt_fields(header)
        if fields is None:
            bad_receipt(NOT_JSON, self.strict, response)
            return
        problem = _receipt_problem(fields, voucher, discovery)
        report(attach(response, fields, problem), problem, self.strict, response)


def _receipt_problem(
    fields: Mapping[str, Any], voucher: Mapping[str, Any], discovery: Discovery
) -> str | None:
    if not verified(fields, discovery.keys):
        return "the receipt's signature does not verify against the gateway's keys"
    for name in ("channel_id", "sequence", "payer", "resource", "asset"):
        if fields.get(name) != voucher.get(name):
            return f"the receipt's {name} is not the voucher's"
    try:
        same = scaled(str(fields.get("cumulative"))) == scaled(str(voucher.get("cumulative")))
    except AmountError:
        same = False
    return None if same else "the receipt's cumulative amount is not the voucher's"
