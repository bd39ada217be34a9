"""The handshake against small real facilitators on loopback (aiohttp): what `GET /supported`
answers decides readiness, its `extra` joins the offers, its `signers` are kept; a refusal
of our credentials or a facilitator down does not hold readiness back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from sidecar.core import exact
from sidecar.core.exact import ExactTerms, OnchainAsset
from sidecar.server import handshake
from sidecar.server.facilitation import Endpoint, FacilitatorClient
from sidecar.server.handshake import Handshake
from sidecar.tools.stack import LOOPBACK, free_port

NETWORK = "eip155:84532"
SIGNER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
Serve = Callable[[web.Response], Awaitable[str]]


@pytest.fixture
async def facilitator() -> AsyncIterator[Serve]:
    """Start a facilitator whose GET /supported answers `response`; its URL."""
    runners: list[web.AppRunner] = []

    async def start(response: web.Response) -> str:
        async def supported(_: web.Request) -> web.Response:
            return response

        app = web.Application()
        app.router.add_get("/supported", supported)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, LOOPBACK, port).start()
        runners.append(runner)
        return f"http://{LOOPBACK}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def kinds(*networks: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    more = {"extra": extra} if extra else {}
    return {
        "kinds": [{"x402Version": 2, "scheme": "exact", "network": n, **more} for n in networks],
        "extensions": [],
        "signers": {"eip155:*": [SIGNER]},
    }


def shaking(*urls: str) -> tuple[Handshake, dict[str, Any]]:
    client = FacilitatorClient([Endpoint(url) for url in urls], 5.0, 5.0)
    extras: dict[str, Any] = {}
    return Handshake(client, [NETWORK], extras, 60.0), extras


async def test_the_facilitators_extra_joins_the_offer_and_its_signers_are_kept(
    facilitator: Serve,
) -> None:
    url = await facilitator(web.json_response(kinds(NETWORK, extra={"feePayer": "F"})))
    shake, extras = shaking(url)
    assert shake.state == handshake.PENDING
    await shake.once()
    assert (shake.state, shake.reason) == (handshake.READY, "")
    assert extras == {NETWORK: {"feePayer": "F"}}
    assert shake.signers == {url.removeprefix("http://"): {"eip155:*": (SIGNER,)}}
    usdc = OnchainAsset("USDF", NETWORK, SIGNER, "USDC", "2", 6)
    terms = ExactTerms({"USDF": usdc}, SIGNER, url, facilitator_extra=extras)
    offered = exact.offer(usdc, 10_000, terms, upfront=False)
    assert offered.extra == {"feePayer": "F", "name": "USDC", "version": "2"}  # ours win


async def test_an_upto_kind_gives_its_facilitator_address_and_its_absence_is_no_error(
    facilitator: Serve,
) -> None:
    listed = kinds(NETWORK)
    listed["kinds"].append(
        {"x402Version": 2, "scheme": "upto", "network": NETWORK,
         "extra": {"facilitatorAddress": SIGNER}}
    )  # fmt: skip
    client = FacilitatorClient([Endpoint(await facilitator(web.json_response(listed)))], 5.0, 5.0)
    uptos: dict[str, Any] = {}
    shake = Handshake(client, [NETWORK], {}, 60.0, True, uptos)
    await shake.once()
    assert shake.state == handshake.READY
    assert uptos == {NETWORK: {"facilitatorAddress": SIGNER}}
    # A later answer without upto: no longer offered, and the sidecar stays ready.
    client = FacilitatorClient([Endpoint(await facilitator(web.json_response(kinds(NETWORK))))],
                               5.0, 5.0)  # fmt: skip
    shake = Handshake(client, [NETWORK], {}, 60.0, True, uptos)
    await shake.once()
    assert (shake.state, uptos) == (handshake.READY, {})


async def test_a_facilitator_without_the_network_is_named_and_holds_readiness(
    facilitator: Serve,
) -> None:
    good = await facilitator(web.json_response(kinds("eip155:*")))  # a wildcard kind
    other = await facilitator(web.json_response(kinds("eip155:8453")))
    shake, _ = shaking(good, other)
    await shake.once()
    assert shake.state == handshake.UNSUPPORTED
    host = other.removeprefix("http://")
    assert shake.reason == (
        f"the facilitator {host} does not support exact on {NETWORK} "
        "(GET /supported lists: exact on eip155:8453)"
    )


@pytest.mark.parametrize("status", [401, 403, 500])
async def test_a_facilitator_that_cannot_be_asked_does_not_hold_readiness(
    facilitator: Serve, status: int
) -> None:
    refusing = await facilitator(web.json_response({"error": "unauthorized"}, status=status))
    shake, extras = shaking(f"http://{LOOPBACK}:{free_port()}", refusing)  # down, refusing
    await shake.once()
    assert (shake.state, shake.answered, extras) == (handshake.READY, False, {})


async def test_an_answer_that_is_not_a_supported_response_counts_as_no_answer(
    facilitator: Serve,
) -> None:
    url = await facilitator(web.json_response({"kinds": "all"}))
    shake, _ = shaking(url)
    await shake.once()
    assert (shake.state, shake.answered) == (handshake.READY, False)
