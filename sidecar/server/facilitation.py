"""The x402 facilitator over its standard HTTP API (`POST /verify`, `POST /settle`, body
`{"x402Version": 2, "paymentPayload", "paymentRequirements"}`), and the chain itself over
JSON-RPC for the one question the facilitator cannot answer after a timeout: did this
authorization land?

Why not the official `HTTPFacilitatorClient`: it folds a connection refused, a timeout, a
5xx and a 4xx into one ValueError, and the gateway must tell them apart: a request that
never reached the facilitator settled nothing (the authorization may be sent again), one
that timed out or failed after it was sent has an *unknown* outcome (the reservation
stays; a top-up looks the authorization up on chain). The bodies are the official ones:
the agent's envelope goes through unchanged, the requirements are our offer. Plain httpx,
so the server runs without the `evm` extra.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sidecar.core import exact
from sidecar.core.errors import FacilitatorUnavailable, X402Error

MAX_ANSWER_BYTES = 64 * 1024
MAX_REASON_CHARS = 200


class SettleUnknown(FacilitatorUnavailable):
    """The settle request left and no clear answer came back (timeout, 5xx, garbage): the
    transfer may or may not have landed."""


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


class FacilitatorClient:
    """One per worker; the httpx client is made in the worker's event loop, on first use."""

    def __init__(self, url: str, verify_timeout: float, settle_timeout: float) -> None:
        self.url = url.rstrip("/")
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

    async def _post(
        self,
        path: str,
        payload: Mapping[str, Any],
        requirements: Mapping[str, Any],
        seconds: float,
        unknown: type[FacilitatorUnavailable],
    ) -> dict[str, Any]:
        body = {
            "x402Version": exact.X402_VERSION,
            "paymentPayload": payload,
            "paymentRequirements": requirements,
        }
        try:
            async with asyncio.timeout(seconds):
                response = await self.client.post(
                    self.url + path, json=body, timeout=httpx.Timeout(seconds)
                )
                content = await response.aread()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Never reached the facilitator: nothing was verified or settled.
            raise FacilitatorUnavailable(
                f"the facilitator is unreachable ({type(exc).__name__}); nothing was settled"
            ) from None
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            raise unknown(
                f"the facilitator did not answer {path} in time ({type(exc).__name__})"
            ) from None
        if response.status_code >= 500 or len(content) > MAX_ANSWER_BYTES:
            raise unknown(f"the facilitator failed {path} (HTTP {response.status_code})")
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            status = response.status_code
            raise unknown(f"the facilitator's {path} answer is not JSON (HTTP {status})")
        return answer

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
            "/settle", payload, requirements, self.settle_timeout, SettleUnknown
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
