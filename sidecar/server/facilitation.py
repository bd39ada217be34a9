"""The x402 facilitator over its standard HTTP API (`POST /verify`, `POST /settle`, body
`{"x402Version": 2, "paymentPayload", "paymentRequirements"}`), and the chain itself over
JSON-RPC for the one question the facilitator cannot answer after a timeout: did this
authorization land?

Why not the official `HTTPFacilitatorClient`: it folds a connection refused, a timeout, a
5xx and a 4xx into one ValueError, and the gateway must tell them apart: a request that
never reached the facilitator settled nothing (the authorization may be sent again), one
that timed out or failed after it was sent has an *unknown* outcome (the reservation
stays; the authorization is looked up on chain). A /settle is answered only by HTTP 200
with a SettleResponse (as the official client reads it): any other status after the
request left (a 502 from a proxy, a 402 re-challenge) is an unknown outcome too, but a
401/403 (our credentials refused at the door: nothing settled). The bodies are the
official ones: the agent's envelope goes through unchanged, the requirements are our
offer. Plain httpx, so the server runs without the `evm` extra.

The facilitators are a list in order, each sent its own credentials (server/credentials.py):
a request that never reached one (`NotReached`: no connection, our credentials refused
with 401/403) goes to the next; `GET /supported` is the handshake's (server/handshake.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from sidecar.core import exact
from sidecar.core.errors import FacilitatorUnavailable, X402Error
from sidecar.server import logs, metrics
from sidecar.server.credentials import Credentials, CredentialsUnusable, NoCredentials

MAX_ANSWER_BYTES = 64 * 1024
MAX_REASON_CHARS = 200
CONNECT_SECONDS = 3.0  # longer without a connection: never reached, the next one is asked
DOWN_SECONDS = 10.0  # a facilitator not reached is asked after the others for this long
SUPPORTED_SECONDS = 10.0  # the handshake's GET /supported

log = logs.get_logger("sidecar.facilitation")


class SettleUnknown(FacilitatorUnavailable):
    """The settle request left and no clear answer came back (timeout, 5xx, garbage): the
    transfer may or may not have landed."""


class NotReached(FacilitatorUnavailable):
    """The request never reached the facilitator's verify or settle: connection refused or
    timed out, a name that does not resolve, our credentials refused (401/403) or unusable.
    Nothing was verified or settled: the next facilitator may be asked. The decision line
    names the facilitator (host only) and what it saw (`seen`: the HTTP status, `unreachable` or
    `credentials_unusable`)."""

    def __init__(self, message: str, host: str, status: int | str) -> None:
        super().__init__(message)
        self.host, self.seen = host, status
        self.logged = {"facilitator": host, "facilitator_status": status}


@dataclass(frozen=True, slots=True)
class Verified:
    valid: bool
    reason: str = ""
    message: str = ""
    payer: str = ""


@dataclass(frozen=True, slots=True)
class Settled:
    success: bool
    transaction: str = ""
    network: str = ""
    payer: str = ""
    reason: str = ""
    message: str = ""


def _text(answer: Mapping[str, Any], name: str) -> str:
    value = answer.get(name)
    return value[:MAX_REASON_CHARS] if isinstance(value, str) else ""


@dataclass(frozen=True)
class Endpoint:
    """One facilitator: its URL (as configured) and the credentials it is sent."""

    url: str
    credentials: Credentials = field(default_factory=NoCredentials)

    @property
    def host(self) -> str:
        """What logs may say of it: the host and port, never a userinfo or a query."""
        return host_of(self.url)


def host_of(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or '?'}{port}"


@dataclass(frozen=True, slots=True)
class Kind:
    """One entry of `GET /supported`'s `kinds` (x402 SupportedKind)."""

    x402_version: int
    scheme: str
    network: str
    extra: Mapping[str, Any]


@dataclass(frozen=True)
class Supported:
    """A facilitator's `GET /supported` answer (x402 SupportedResponse: kinds, extensions,
    signers by CAIP family)."""

    kinds: tuple[Kind, ...]
    extensions: tuple[str, ...] = ()
    signers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def kind(self, scheme: str, network: str) -> Kind | None:
        """The kind for x402 v2 `scheme` on `network`, or a `namespace:*` wildcard's."""
        wildcard = network.partition(":")[0] + ":*"
        for wanted in (network, wildcard):
            for kind in self.kinds:
                if (kind.x402_version, kind.scheme, kind.network) == (
                    exact.X402_VERSION,
                    scheme,
                    wanted,
                ):
                    return kind
        return None

    @classmethod
    def from_wire(cls, answer: Mapping[str, Any]) -> Supported:
        """ValueError when the answer is not a SupportedResponse."""
        kinds, signers = answer.get("kinds"), answer.get("signers", {})
        extensions = answer.get("extensions", [])
        if not isinstance(kinds, list) or not isinstance(signers, dict):
            raise ValueError("not a SupportedResponse (kinds[], signers{})")
        parsed = []
        for kind in kinds:
            if not isinstance(kind, dict):
                raise ValueError("a kind is not an object")
            version, scheme, network = (kind.get(k) for k in ("x402Version", "scheme", "network"))
            extra = kind.get("extra") or {}
            if not (isinstance(version, int) and isinstance(scheme, str)):
                raise ValueError("a kind needs x402Version and scheme")
            if not isinstance(network, str) or not isinstance(extra, dict):
                raise ValueError("a kind needs a network (and an object as extra)")
            parsed.append(Kind(version, scheme, network, extra))
        return cls(
            tuple(parsed),
            tuple(str(e) for e in extensions) if isinstance(extensions, list) else (),
            {
                str(family): tuple(str(a) for a in addresses)
                for family, addresses in signers.items()
                if isinstance(addresses, list)
            },
        )


class FacilitatorClient:
    """The facilitators in order, one client per worker (the httpx client is made in the
    worker's event loop, on first use). A request that never reached one (`NotReached`)
    goes to the next, within the same time budget; any other outcome is final, an unknown
    one above all: a settle that may have landed is never sent to a second facilitator.
    One not reached is asked after the others for DOWN_SECONDS (one warning when it goes
    down), so a facilitator that is down costs each payment nothing."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        verify_timeout: float,
        settle_timeout: float,
    ) -> None:
        self.endpoints = [Endpoint(e.url.rstrip("/"), e.credentials) for e in endpoints]
        self._down = [0.0] * len(self.endpoints)  # monotonic time until which one goes last
        self.verify_timeout = verify_timeout
        self.settle_timeout = settle_timeout
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
            self._client = httpx.AsyncClient(limits=limits, trust_env=False)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _send(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        seconds: float,
        unknown: type[FacilitatorUnavailable],
        only_ok: bool = False,
    ) -> dict[str, Any]:
        url, host = endpoint.url + path, endpoint.host
        try:
            headers = endpoint.credentials.headers(method, url)
        except CredentialsUnusable as exc:
            log.error("facilitator.credentials_unusable", facilitator=host, cause=str(exc))
            raise NotReached(
                f"the facilitator {host} was not asked: its credentials are unusable",
                host,
                "credentials_unusable",
            ) from None
        timeout = httpx.Timeout(seconds, connect=min(seconds, CONNECT_SECONDS))
        try:
            async with asyncio.timeout(seconds):
                response = await self.client.request(
                    method, url, json=body, headers=headers, timeout=timeout
                )
                content = await response.aread()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Never reached the facilitator: nothing was verified or settled.
            raise NotReached(
                f"the facilitator {host} is unreachable ({type(exc).__name__}); "
                "nothing was settled",
                host,
                "unreachable",
            ) from None
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            raise unknown(
                f"the facilitator did not answer {path} in time ({type(exc).__name__})"
            ) from None
        status = response.status_code
        if status in (401, 403):  # refused at the door: nothing verified or settled
            raise NotReached(
                f"the facilitator {host} refused the gateway's credentials (HTTP {status}); "
                "nothing was settled",
                host,
                status,
            )
        if status >= 500 or (only_ok and status != 200) or len(content) > MAX_ANSWER_BYTES:
            raise unknown(f"the facilitator failed {path} (HTTP {status})")
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise unknown(f"the facilitator's {path} answer is not JSON (HTTP {status})")
        return answer

    async def _post(
        self,
        path: str,
        payload: Mapping[str, Any],
        requirements: Mapping[str, Any],
        seconds: float,
        unknown: type[FacilitatorUnavailable],
        only_ok: bool = False,
    ) -> dict[str, Any]:
        """The first facilitator that can be reached answers; all within `seconds`."""
        body = {
            "x402Version": exact.X402_VERSION,
            "paymentPayload": payload,
            "paymentRequirements": requirements,
        }
        now = time.monotonic()
        deadline = now + seconds
        # The ones not reached lately go last (asked still, when every other one fails).
        order = sorted(range(len(self.endpoints)), key=lambda i: self._down[i] > now)
        failed: list[tuple[int, NotReached]] = []
        for index in order:
            if failed and deadline - time.monotonic() <= 0:
                break
            try:
                answer = await self._send(
                    self.endpoints[index], "POST", path, body, deadline - time.monotonic(),
                    unknown, only_ok,
                )  # fmt: skip
            except NotReached as exc:
                metrics.facilitator_not_reached(exc.host, exc.seen)
                now = time.monotonic()
                if self._down[index] <= now:  # a line when it goes down, not per request
                    log.warning(
                        "facilitator.not_reached", facilitator=exc.host, status=exc.seen, path=path
                    )
                self._down[index] = now + DOWN_SECONDS
                failed.append((index, exc))
                continue
            self._down[index] = 0.0
            return answer
        # None reached: the refusal the decision line names is a refused credential before
        # a facilitator down, then the first configured.
        raise min(failed, key=lambda f: (f[1].seen == "unreachable", f[0]))[1]

    async def supported(self, endpoint: Endpoint) -> Supported:
        """One facilitator's `GET /supported` (the handshake); FacilitatorUnavailable (or
        NotReached) when it cannot be had."""
        answer = await self._send(
            endpoint, "GET", "/supported", None, SUPPORTED_SECONDS, FacilitatorUnavailable
        )
        try:
            return Supported.from_wire(answer)
        except ValueError as exc:
            raise FacilitatorUnavailable(f"/supported: {exc}") from None

    async def verify(self, payload: Mapping[str, Any], requirements: Mapping[str, Any]) -> Verified:
        answer = await self._post(
            "/verify", payload, requirements, self.verify_timeout, FacilitatorUnavailable
        )
        valid = answer.get("isValid")
        if not isinstance(valid, bool):
            raise FacilitatorUnavailable("the facilitator's /verify answer has no isValid")
        return Verified(
            valid,
            _text(answer, "invalidReason"),
            _text(answer, "invalidMessage"),
            _text(answer, "payer"),
        )

    async def settle(self, payload: Mapping[str, Any], requirements: Mapping[str, Any]) -> Settled:
        answer = await self._post(
            "/settle", payload, requirements, self.settle_timeout, SettleUnknown, only_ok=True
        )
        success = answer.get("success")
        if not isinstance(success, bool):
            raise SettleUnknown("the facilitator's /settle answer has no success")
        return Settled(
            success,
            _text(answer, "transaction"),
            _text(answer, "network"),
            _text(answer, "payer"),
            _text(answer, "errorReason"),
            _text(answer, "errorMessage"),
        )


class ChainRangeError(X402Error):
    """A block range the chain's RPC does not serve (too wide, or past its head)."""


class ChainReader:
    """Reads an EIP-3009 token over JSON-RPC (config `chain_rpc_url`)."""

    def __init__(self, rpc_url: str, timeout: float = 5.0) -> None:
        self.rpc_url = rpc_url
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=self.timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _call(self, method: str, params: list[Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        try:
            response = await self.client.post(self.rpc_url, json=body)
            answer = response.json()
        except (httpx.HTTPError, ValueError, OSError) as exc:
            # The message never carries the URL: a provider's URL holds its API key.
            raise FacilitatorUnavailable(
                f"the chain is unreachable ({type(exc).__name__})"
            ) from None
        if not isinstance(answer, dict) or "result" not in answer:
            raise FacilitatorUnavailable(f"the chain refused {method}")
        return answer["result"]

    async def read_uint(self, contract: str, data: str) -> int:
        """eth_call `data` on `contract`, its answer as an unsigned integer (0 if empty)."""
        result = await self._call("eth_call", [{"to": contract, "data": data}, "latest"])
        if not isinstance(result, str) or not result.startswith("0x"):
            raise FacilitatorUnavailable("the chain's eth_call answer is not hex")
        return int(result, 16) if len(result) > 2 else 0

    async def head(self) -> int:
        """The chain's latest block number."""
        return int(await self._call("eth_blockNumber", []), 16)

    async def logs(
        self, token: str, topics: list[str | None], first: int, last: int
    ) -> list[dict[str, Any]]:
        """The token's logs matching `topics` in blocks first..last; a range the node does
        not serve raises ChainRangeError with the node's own words (its limit)."""
        query = {"address": token, "fromBlock": hex(first), "toBlock": hex(last), "topics": topics}
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [query]}
        try:
            answer = (await self.client.post(self.rpc_url, json=body)).json()
        except (httpx.HTTPError, ValueError, OSError) as exc:
            raise FacilitatorUnavailable(
                f"the chain is unreachable ({type(exc).__name__})"
            ) from None
        found = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(found, list):
            error = answer.get("error") if isinstance(answer, dict) else None
            said = error.get("message", "") if isinstance(error, dict) else str(answer)[:200]
            raise ChainRangeError(
                f"the RPC cannot serve eth_getLogs over blocks {first}..{last}: "
                f"{str(said)[:MAX_REASON_CHARS]}"
            )
        return [entry for entry in found if isinstance(entry, dict)]

    async def authorization_used(self, token: str, authorizer: str, nonce: str) -> bool:
        """FiatToken's authorizationState(authorizer, nonce): used (or canceled)?"""
        data = exact.authorization_state_call(authorizer, nonce)
        result = await self._call("eth_call", [{"to": token, "data": data}, "latest"])
        return isinstance(result, str) and result.startswith("0x") and int(result, 16) != 0

    async def transaction_of(self, token: str, authorizer: str, nonce: str) -> str:
        """The hash of the transaction that used the authorization ("" if not found in the
        last 10,000 blocks)."""
        latest = await self._call("eth_blockNumber", [])
        start = max(0, int(latest, 16) - 10_000)
        logs = await self._call(
            "eth_getLogs",
            [
                {
                    "address": token,
                    "fromBlock": hex(start),
                    "toBlock": "latest",
                    "topics": exact.authorization_used_topics(authorizer, nonce),
                }
            ],
        )
        if isinstance(logs, list) and logs and isinstance(logs[0], dict):
            return str(logs[0].get("transactionHash", ""))
        return ""
