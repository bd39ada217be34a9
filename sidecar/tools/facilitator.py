"""`x402 facilitator serve`: the standard x402 facilitator HTTP API on one EVM chain.

`POST /verify`, `POST /settle` (body `{"x402Version", "paymentPayload",
"paymentRequirements"}`), `GET /supported` and `GET /discovery/resources` (the bazaar
extension's catalog of what settled here, tools/catalog.py), answered by the official
`x402` package's facilitator (`x402FacilitatorSync` + its `exact` and `upto` EVM schemes
on a `FacilitatorWeb3Signer`, `simulate_in_settle=True`; the `eip2612GasSponsoring`
extension declared). This module only carries HTTP; every verification and settlement
decision is the official code's. Settlements run concurrently (tools/settling.py: the
signer's own nonces and one receipt watcher; up to settling.THREADS blocking calls in
flight).

Answers follow the official facilitators: a payment that does not pass is HTTP 200 with
`isValid: false` / `success: false` and the reason (the scheme's own codes, or the x402 v2
standard ones: `invalid_payload`, `invalid_payment_requirements`, `unsupported_scheme`,
`invalid_network`); a body that is not a JSON object carrying both objects is 400; an
exception the official code lets out is 500 (`unexpected_verify_error` /
`unexpected_settle_error`). The official scheme reports an unreachable RPC as a failed
payment, so `GET /health` is 200 only while the chain answers (503 otherwise).

`--require-bearer-file FILE` serves it as hosted facilitators do, behind credentials: every
call but `/health` needs `Authorization: Bearer <the file's token>`, else 401.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import ValidationError
from x402 import x402FacilitatorSync
from x402.extensions.bazaar import BAZAAR
from x402.extensions.eip2612_gas_sponsoring import EIP2612_GAS_SPONSORING
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmSchemeConfig
from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme, UptoEvmSchemeConfig
from x402.pending_settlement_store import InMemoryPendingSettlementStore
from x402.schemas import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequirements,
    PaymentRequirementsV1,
    SchemeNotFoundError,
    SettleResponse,
    VerifyResponse,
    parse_payment_payload,
    parse_payment_requirements,
)

from sidecar.core.errors import ConfigError
from sidecar.core.identity import read_evm_key, read_secret
from sidecar.tools.catalog import BadQuery, Catalog
from sidecar.tools.settling import THREADS, ConcurrentSigner
from sidecar.tools.verifying import Simulated, VerifyPool

log = logging.getLogger("sidecar.facilitator")

MAX_BODY = 64 * 1024  # a payload with its requirements is ~1.5 KiB

Payload = PaymentPayload | PaymentPayloadV1
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Requirements = PaymentRequirements | PaymentRequirementsV1


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def rpc_secrets(rpc_url: str) -> list[str]:
    """The components of an RPC URL that may carry a provider's API key (path, query, user)."""
    components = urlsplit(rpc_url)
    found = [
        rpc_url,
        components.path.rstrip("/"),
        components.query,
        components.username,
        components.password,
    ]
    return sorted({part for part in found if part and len(part) > 3}, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<rpc-url>")
    return text


def rpc_host(rpc_url: str) -> str:
    """What a message may say of the RPC URL: scheme, host and port only."""
    components = urlsplit(rpc_url)
    port = f":{components.port}" if components.port else ""
    return f"{components.scheme}://{components.hostname}{port}"


@dataclass(frozen=True)
class Official:
    """The official facilitator on one chain, and its twin for the payloads this process's
    /verify simulated moments ago (tools/verifying.py): the same signer, schemes and pending
    store, but its `exact` settle does not simulate the transfer a second time."""

    facilitator: x402FacilitatorSync
    presimulated: x402FacilitatorSync
    network: str


def build(rpc_url: str, key: str, network: str | None = None) -> Official:
    """The official facilitator with the `exact` and `upto` EVM schemes on the chain behind
    `rpc_url`.

    The network defaults to the chain's own id; a given one must match it. Only x402 v2 on
    this one network is registered (register_exact_evm_facilitator would add v1 for every
    public EVM network, which this signer's RPC does not serve).
    """
    signer = ConcurrentSigner(key, rpc_url)
    try:
        chain_id = signer.get_chain_id()
    except Exception as exc:  # the error's text would quote the whole URL
        raise ConfigError(
            f"cannot reach the chain at {rpc_host(rpc_url)}: {type(exc).__name__}"
        ) from None
    actual = f"eip155:{chain_id}"
    if network is not None and network != actual:
        raise ConfigError(f"--network {network} but the chain at {rpc_host(rpc_url)} is {actual}")
    return _assembled(signer, actual)


def build_known(rpc_url: str, key: str, network: str) -> Official:
    """`build` on a network `build` already checked against the chain (the /verify pool's
    processes): nothing is asked of the chain, so a pool replaced during an outage starts
    and answers, as the serving process does, that the payment cannot be verified."""
    return _assembled(ConcurrentSigner(key, rpc_url), network)


def _assembled(signer: ConcurrentSigner, actual: str) -> Official:
    # `upto` (Permit2 witness transfers through the x402 upto proxy): /supported gives its
    # extra.facilitatorAddress, which the payer's signature binds. Simulated at settle too,
    # so a replayed authorization is refused before anything is broadcast.
    upto = UptoEvmFacilitatorScheme(signer, UptoEvmSchemeConfig(simulate_in_settle=True))
    pending = InMemoryPendingSettlementStore()  # a settle left pending is found by either
    built = []
    for simulate in (True, False):
        facilitator = x402FacilitatorSync()
        config = ExactEvmSchemeConfig(simulate_in_settle=simulate)
        facilitator.register([actual], ExactEvmFacilitatorScheme(signer, config, pending))
        facilitator.register([actual], upto)
        facilitator.register_extension(BAZAAR)  # /supported lists it; the catalog serves it
        facilitator.register_extension(EIP2612_GAS_SPONSORING)  # upto's permit for Permit2
        built.append(facilitator)
    return Official(built[0], built[1], actual)


@dataclass
class Invalid(Exception):
    """The request is a payment that cannot be checked: reported as a failed payment."""

    reason: str
    message: str
    network: str = ""


def _parse(body: Any) -> tuple[Payload, Requirements]:
    payload_data = body.get("paymentPayload")
    requirements_data = body.get("paymentRequirements")
    network = ""
    if isinstance(payload_data, dict):
        accepted = payload_data.get("accepted")
        found = accepted.get("network") if isinstance(accepted, dict) else None
        network = str(found or payload_data.get("network") or "")
    try:
        payload = parse_payment_payload(payload_data)
    except (ValidationError, ValueError) as exc:
        raise Invalid("invalid_payload", _first_error(exc), network) from None
    try:
        requirements = parse_payment_requirements(payload.x402_version, requirements_data)
    except (ValidationError, ValueError) as exc:
        raise Invalid("invalid_payment_requirements", _first_error(exc), network) from None
    return payload, requirements


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(exc)


class Server:
    """The aiohttp app around one official facilitator."""

    def __init__(
        self, official: Official, rpc_url: str, bearer: str = "", pool: VerifyPool | None = None
    ) -> None:
        self.official = official
        self.pool = pool
        self.simulated = Simulated()
        self.rpc_url = rpc_url
        self.secrets = rpc_secrets(rpc_url)
        self.catalog = Catalog()
        self.bearer = f"Bearer {bearer}".encode() if bearer else b""
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self.guard])
        self.app.router.add_post("/verify", self.verify)
        self.app.router.add_post("/settle", self.settle)
        self.app.router.add_get("/supported", self.supported)
        self.app.router.add_get("/discovery/resources", self.discovery)
        self.app.router.add_get("/health", self.health)
        self.app.on_startup.append(_threads)
        if pool is not None:
            self.app.on_startup.append(lambda _: pool.start())
            self.app.on_cleanup.append(lambda _: _closed(pool))

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With a bearer token: 401 without it (but for /health, the probes')."""
        if self.bearer and request.path != "/health":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self.bearer):
                return web.json_response(
                    {"error": "unauthorized", "message": "a valid bearer token is required"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            raise _bad_request(f"body larger than {MAX_BODY} bytes") from None
        except (ValueError, UnicodeDecodeError):
            raise _bad_request("body is not JSON") from None
        if not isinstance(body, dict):
            raise _bad_request("body is not a JSON object")
        for field in ("paymentPayload", "paymentRequirements"):
            if not isinstance(body.get(field), dict):
                raise _bad_request(f"missing {field} object")
        return body

    async def _run(
        self,
        name: str,
        request: web.Request,
        call: Callable[[dict[str, Any], Payload, Requirements], Awaitable[Any]],
        failed: Callable[[Invalid], dict[str, Any]],
    ) -> web.Response:
        body = await self._body(request)
        try:
            payload, requirements = _parse(body)
            # The official facilitator routes every eip155:* network to a scheme registered
            # for one; this signer's RPC serves exactly one chain.
            for network in (payload.get_network(), str(requirements.network)):
                if network != self.official.network:
                    raise Invalid(
                        "invalid_network",
                        f"this facilitator serves {self.official.network}",
                        payload.get_network(),
                    )
            try:
                result = await call(body, payload, requirements)
            except SchemeNotFoundError as exc:
                raise Invalid("unsupported_scheme", str(exc), exc.network) from None
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # The scheme reads the inner payload without checking its shape first.
                raise Invalid("invalid_payload", str(exc), payload.get_network()) from None
        except Invalid as invalid:
            return self._answer(failed(invalid))
        except Exception as exc:
            log.error("%s failed: %s", name, scrub(repr(exc), self.secrets))
            return web.json_response(
                {"error": f"unexpected_{name}_error", "message": f"{name} failed"}, status=500
            )
        answer: VerifyResponse | SettleResponse = result
        if isinstance(answer, SettleResponse) and answer.success:
            self.catalog.record(body["paymentPayload"], body["paymentRequirements"])
        return self._answer(answer.model_dump(by_alias=True, exclude_none=True))

    def _answer(self, answer: dict[str, Any]) -> web.Response:
        # The official scheme puts exception text in the messages; an RPC error names the URL,
        # and a provider's URL carries its API key.
        for field in ("invalidMessage", "errorMessage"):
            if isinstance(answer.get(field), str):
                answer[field] = scrub(answer[field], self.secrets)
        return web.json_response(answer)

    async def verify(self, request: web.Request) -> web.Response:
        def failed(invalid: Invalid) -> dict[str, Any]:
            return {
                "isValid": False,
                "invalidReason": invalid.reason,
                "invalidMessage": invalid.message,
            }

        return await self._run("verify", request, self._verify, failed)

    async def _verify(
        self, body: dict[str, Any], payload: Payload, requirements: Requirements
    ) -> VerifyResponse:
        if self.pool is None:  # the official signer is blocking web3: off the event loop
            verified = await asyncio.to_thread(
                self.official.facilitator.verify, payload, requirements
            )
        else:
            answer = await self.pool.verify(payload, requirements)
            if isinstance(answer, tuple):
                raise Invalid(*answer)
            verified = answer
        if verified.is_valid and requirements.scheme == "exact":
            self.simulated.remember(body)  # the official exact /verify simulates the transfer
        return verified

    async def settle(self, request: web.Request) -> web.Response:
        def failed(invalid: Invalid) -> dict[str, Any]:
            return {
                "success": False,
                "errorReason": invalid.reason,
                "errorMessage": invalid.message,
                "transaction": "",
                "network": invalid.network,
            }

        return await self._run("settle", request, self._settle, failed)

    async def _settle(
        self, body: dict[str, Any], payload: Payload, requirements: Requirements
    ) -> SettleResponse:
        official = self.official
        simulated = requirements.scheme == "exact" and self.simulated.take(body)
        facilitator = official.presimulated if simulated else official.facilitator
        return await asyncio.to_thread(facilitator.settle, payload, requirements)

    async def supported(self, request: web.Request) -> web.Response:
        supported = self.official.facilitator.get_supported()
        return web.json_response(supported.model_dump(by_alias=True, exclude_none=True))

    async def discovery(self, request: web.Request) -> web.Response:
        """The bazaar catalog: the resources whose payments settled here."""
        try:
            return web.json_response(self.catalog.page(request.query))
        except BadQuery as exc:
            raise _bad_request(str(exc)) from None

    async def health(self, request: web.Request) -> web.Response:
        """200 while the chain answers: a failed check says nothing of an outage (the
        official scheme reports an unreachable RPC as a failed payment), this does."""
        try:
            block = await asyncio.to_thread(_block_number, self.rpc_url)
        except Exception:
            return web.json_response(
                {"status": "chain_unavailable", "network": self.official.network}, status=503
            )
        return web.json_response({"status": "ok", "network": self.official.network, "block": block})


async def _closed(pool: VerifyPool) -> None:
    pool.close()


async def _threads(_: web.Application) -> None:
    """asyncio.to_thread's pool, wide enough for every settlement in flight (each holds a
    thread while it waits for its receipt); the default is cores + 4."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(THREADS))


def _block_number(rpc_url: str) -> int:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"}).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(rpc_url, body, headers=headers)  # noqa: S310
    with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
        return int(json.loads(response.read())["result"], 16)


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "invalid_request", "message": message}),
        content_type="application/json",
    )


def serve(
    rpc_url: str,
    key_file: str,
    listen: str,
    network: str | None = None,
    bearer_file: str = "",
    verify_processes: int = 0,
) -> None:
    """Run until SIGTERM or SIGINT; `verify_processes`: /verify in that many processes of
    its own (tools/verifying.py; 0: in this one)."""
    host, port = parse_listen(listen)
    key = read_evm_key(key_file, "key file")
    bearer = ""
    if bearer_file:
        bearer = read_secret(bearer_file, "--require-bearer-file", 16).decode("utf-8", "replace")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # The official package logs every signature check at INFO.
    logging.getLogger("x402").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    official = build(rpc_url, key, network)
    actual = official.network
    signers = official.facilitator.get_supported().signers.get("eip155:*", [])
    pool = None
    if verify_processes > 0:
        pool = VerifyPool(verify_processes, build_known, rpc_url, key, actual)
    server = Server(official, rpc_url, bearer, pool)

    def ready(_: str) -> None:
        signer = ", ".join(signers)
        log.info(
            "Facilitator listening on http://%s:%d (%s, signer %s)", host, port, actual, signer
        )

    web.run_app(server.app, host=host, port=port, print=ready, access_log=None)
