"""The facilitators in order, against small real facilitators on loopback (aiohttp): a
request that never reached one goes to the next, an unknown outcome never does, and one
not reached is asked last for a while."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from sidecar.server.facilitation import (
    Endpoint,
    FacilitatorClient,
    NotReached,
    SettleUnknown,
)
from sidecar.tools.stack import LOOPBACK, free_port

VERIFIED = {"isValid": True, "payer": "0xabc"}
SETTLED = {"success": True, "transaction": "0x" + "1" * 64, "network": "eip155:84532"}


@dataclass
class Double:
    """A facilitator that answers every POST with `status` and `body`, counting them."""

    url: str = ""
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)


Start = Callable[[int, dict[str, Any]], Awaitable[Double]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def starting(status: int, body: dict[str, Any]) -> Double:
        double = Double(status=status, body=body)

        async def answer(request: web.Request) -> web.Response:
            double.hits.append(request.path)
            return web.json_response(double.body, status=double.status)

        app = web.Application()
        app.router.add_post("/{name}", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, LOOPBACK, port).start()
        runners.append(runner)
        double.url = f"http://{LOOPBACK}:{port}"
        return double

    yield starting
    for runner in runners:
        await runner.cleanup()


def client(*urls: str) -> FacilitatorClient:
    return FacilitatorClient([Endpoint(url) for url in urls], 5.0, 5.0)


async def test_not_reached_goes_to_the_next_and_is_asked_last_for_a_while(start: Start) -> None:
    refusing = await start(401, {"error": "unauthorized"})
    good = await start(200, VERIFIED)
    dead = f"http://{LOOPBACK}:{free_port()}"
    facilitators = client(dead, refusing.url, good.url)
    assert (await facilitators.verify({}, {})).valid
    assert (refusing.hits, good.hits) == (["/verify"], ["/verify"])
    good.body = SETTLED
    settled = await facilitators.settle({}, {})  # the two set aside are not asked first
    assert settled.success and (refusing.hits, good.hits) == (["/verify"], ["/verify", "/settle"])


async def test_none_reached_names_a_refused_credential_before_one_down(start: Start) -> None:
    refusing = await start(403, {})
    dead = f"http://{LOOPBACK}:{free_port()}"
    with pytest.raises(NotReached) as caught:
        await client(dead, refusing.url).verify({}, {})
    assert caught.value.logged == {
        "facilitator": refusing.url.removeprefix("http://"),
        "facilitator_status": 403,
    }
    assert caught.value.reason == "facilitator_unavailable" and caught.value.status == 503


@pytest.mark.parametrize("status", [500, 502])
async def test_an_unknown_settle_is_never_sent_to_the_next(start: Start, status: int) -> None:
    failing = await start(status, {"error": "boom"})
    good = await start(200, SETTLED)
    with pytest.raises(SettleUnknown):
        await client(failing.url, good.url).settle({}, {})
    assert (failing.hits, good.hits) == (["/settle"], [])
