"""Agents on `requests`: a transport adapter that runs the same payment flow as X402Auth.

    session = x402_session(Wallet.from_env(max_amount="1"))
    response = session.get(url)
    receipt_of(response)  # the verified Receipt

An adapter rather than a requests `AuthBase`: the flow may need to send a discovery
request before the first try, and an auth hook cannot send anything before the request.
`requests` is an optional dependency: the extra `requests` (`pip install -e '.[requests]'`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx
import requests
from requests.adapters import HTTPAdapter

from sidecar.agent.auth import RECEIPT_EXTENSION, REFUSAL_EXTENSION, X402Auth
from sidecar.agent.retries import paid
from sidecar.agent.wallet import Wallet

__all__ = ["X402Adapter", "x402_session"]


class X402Adapter(HTTPAdapter):
    """Sends each request through X402Auth's flow; safe to share across threads."""

    def __init__(self, auth: X402Auth | Wallet, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.auth = auth if isinstance(auth, X402Auth) else X402Auth(auth)

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        flow = self.auth.auth_flow(_to_httpx(request))
        sent = next(flow)
        history: list[requests.Response] = []
        while True:
            try:
                response = self._send_paid(sent, **kwargs)
            except BaseException:
                flow.close()  # a proof in flight becomes PaymentOutcomeUnknown
                raise
            converted = _to_httpx_response(response, sent)
            try:
                sent = flow.send(converted)
            except StopIteration:
                for name in (RECEIPT_EXTENSION, REFUSAL_EXTENSION):
                    if name in converted.extensions:
                        setattr(response, name, converted.extensions[name])
                if history:
                    response.history = [*response.history, *history]
                return response
            response.close()
            history.append(response)

    def _send_paid(self, sent: httpx.Request, **kwargs: Any) -> requests.Response:
        """One request; a paid one is sent again as it is (the same payment) after a
        timeout or a dropped connection, as httpx's RetryPaid transport does."""
        retrying = self.auth.retrying
        attempt = 0
        while True:
            try:
                return super().send(_to_requests(sent), **kwargs)
            except (requests.ConnectionError, requests.Timeout):
                if not paid(sent) or attempt >= retrying.retries:
                    raise
            time.sleep(retrying.delay(None, attempt))
            attempt += 1


def x402_session(auth: X402Auth | Wallet, **kwargs: Any) -> requests.Session:
    """A requests Session that pays for http:// and https:// requests."""
    session = requests.Session()
    adapter = X402Adapter(auth, **kwargs)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _to_httpx(request: requests.PreparedRequest) -> httpx.Request:
    body: Any = request.body  # typed bytes | str | None, but files and generators happen
    if hasattr(body, "read"):  # a file: read it once, it may be sent twice
        body = body.read()
    elif body is not None and not isinstance(body, str | bytes):  # a generator of chunks
        body = b"".join(c.encode() if isinstance(c, str) else c for c in body)
    content: bytes | None = body.encode() if isinstance(body, str) else body
    return httpx.Request(
        str(request.method), str(request.url), headers=dict(request.headers), content=content
    )


def _to_requests(request: httpx.Request) -> requests.PreparedRequest:
    prepared = requests.PreparedRequest()
    prepared.prepare(
        method=request.method,
        url=str(request.url),
        headers=_headers(request.headers),
        data=request.content or None,
    )
    return prepared


def _headers(headers: httpx.Headers) -> dict[str, str]:
    # requests recomputes these for the body it sends.
    return {k: v for k, v in headers.items() if k.lower() not in ("content-length", "host")}


def _to_httpx_response(response: requests.Response, request: httpx.Request) -> httpx.Response:
    headers: Mapping[str, str] = {
        k: v
        for k, v in response.headers.items()
        # requests has decoded the body already; the flow must not decode it again.
        if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")
    }
    return httpx.Response(
        response.status_code, headers=headers, content=response.content, request=request
    )
