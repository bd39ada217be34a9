"""Sending a payment again, safely: the SAME payment (the same proof or authorization,
the same payment id), never a newly signed one for the same request, at most a few times.

- `Retrying`: the policy X402Auth applies to a paid answer whose outcome is unknown (a 503
  without a receipt): wait `Retry-After` (or an exponential backoff), send it again.
- `RetryPaid` / `AsyncRetryPaid`: httpx transports for what an auth flow never sees — a
  timeout or a dropped connection while a paid request was in flight (httpx closes the
  auth flow on a transport error). They re-send a request that carries a payment header,
  as it is, after such an error:

      auth = X402Auth(wallet)
      with httpx.Client(auth=auth, transport=RetryPaid()) as http:
          http.get(url)

  A request without a payment header is never retried by them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
import httpx

PAYMENT_HEADERS = ("x-payment", "payment-signature")


@dataclass(frozen=True)
class Retrying:
    """`retries` more sends at most, after `Retry-After` (whole seconds, at most `longest`)
    or else `backoff` * 2**attempt seconds."""

    retries: int = 3
    backoff: float = 0.25
    longest: float = 30.0

    def delay(self, response: httpx.Response | None, attempt: int) -> float:
        said = response.headers.get("retry-after", "") if response is not None else ""
        if said.isdigit():
            return min(float(said), self.longest)
        return min(self.backoff * float(1 << attempt), self.longest)


def paid(request: httpx.Request) -> bool:
    return any(name in request.headers for name in PAYMENT_HEADERS)


class RetryPaid(httpx.BaseTransport):
    """Re-sends a paid request as it is after a transport error (a timeout, a dropped or
    refused connection), at most `retrying.retries` times; then the error propagates (and
    X402Auth raises PaymentOutcomeUnknown)."""

    def __init__(
        self, transport: httpx.BaseTransport | None = None, retrying: Retrying | None = None
    ) -> None:
        self.transport = transport if transport is not None else httpx.HTTPTransport()
        self.retrying = retrying if retrying is not None else Retrying()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return self.transport.handle_request(request)
            except httpx.TransportError:
                if not paid(request) or attempt >= self.retrying.retries:
                    raise
            time.sleep(self.retrying.delay(None, attempt))
            attempt += 1

    def close(self) -> None:
        self.transport.close()


class AsyncRetryPaid(httpx.AsyncBaseTransport):
    """RetryPaid for httpx.AsyncClient (asyncio or trio)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        retrying: Retrying | None = None,
    ) -> None:
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self.retrying = retrying if retrying is not None else Retrying()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await self.transport.handle_async_request(request)
            except httpx.TransportError:
                if not paid(request) or attempt >= self.retrying.retries:
                    raise
            await anyio.sleep(self.retrying.delay(None, attempt))
            attempt += 1

    async def aclose(self) -> None:
        await self.transport.aclose()


__all__ = ["AsyncRetryPaid", "RetryPaid", "Retrying"]
