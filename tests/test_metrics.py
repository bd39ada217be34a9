"""Prometheus /metrics on the side port: the decisions this test makes, summed across two
sidecar workers; revenue in atomic units; latency; settlement lag; ledger errors."""

from __future__ import annotations

from typing import Any

import httpx
from envoy.service.auth.v3 import external_auth_pb2 as authz
from prometheus_client.parser import text_string_to_metric_families

from sidecar.agent.channel import ChannelAuth, PaymentChannel
from sidecar.agent.wallet import Wallet
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.channels import Channels
from sidecar.server import metrics
from sidecar.server.authz.check import CheckService
from sidecar.server.authz.grpc_transport import check_message
from sidecar.server.config import Settings
from sidecar.tools.stack import Stack, free_port
from tests.support.payers import funded_payer, pay_direct
from tests.support.routes import VERIFY
from tests.support.settlement import settle

ATLAS = "/api/v1/agent/pay-api/atlas"


def scrape(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(f"{stack.sideport_url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(page: dict[Any, float], name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


async def test_the_metrics_page_counts_this_tests_decisions_across_workers(
    admin_stack: Stack,
) -> None:
    stack = admin_stack
    ledger = Ledger.from_url(stack.redis_url)
    wallet = await funded_payer(ledger, 10_000_000)
    channel_id, _ = await Channels(ledger).open(
        wallet.public_key, "USDF", 1_000_000, stack.gateway_identity.kid
    )
    before = scrape(stack)

    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        for _ in range(7):  # challenges
            assert (await client.get(ATLAS)).status_code == 402
        for n in range(5):  # direct payments of 0.01
            path = VERIFY.format(n=n)
            headers = pay_direct(stack, wallet, f"GET {path}", "0.01")
            assert (await client.get(path, headers=headers)).status_code == 200
        for _ in range(3):  # free
            assert (await client.get("/api/v1/health")).status_code == 200
        bad = {"X-Payment": "not base64!"}
        assert (await client.get(ATLAS, headers=bad)).status_code == 400
    lane = PaymentChannel(Wallet(wallet), channel_id)
    async with httpx.AsyncClient(base_url=stack.url, auth=ChannelAuth(lane), timeout=10) as agent:
        for n in range(4):  # vouchers of 0.01
            assert (await agent.get(VERIFY.format(n=n))).status_code == 200
    await ledger.close()

    after = scrape(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    decisions = "x402_decisions_total"
    assert delta(decisions, decision="deny", reason="payment_required", route="atlas") == 7
    assert delta(decisions, decision="deny", reason="malformed_payment", route="atlas") == 1
    assert delta(decisions, decision="allow", reason="paid", route="verify") == 5
    assert delta(decisions, decision="allow", reason="channel", route="verify") == 4
    assert delta(decisions, decision="allow", reason="free", route="") == 3
    revenue = "x402_revenue_atomic_total"
    assert delta(revenue, asset="USDF", route="verify") == 9 * 10_000
    assert delta(revenue, asset="USDF", route="atlas") == 0
    assert delta("x402_check_latency_seconds_count") == 7 + 1 + 5 + 4 + 3
    # Both workers answered some of these checks: the page really sums two processes.
    workers = {line.get("worker") for line in stack.decisions()}
    assert workers == {0, 1}


async def test_the_settlement_lag_is_on_the_page(admin_stack: Stack) -> None:
    await settle(admin_stack)  # everything settled: no lag
    assert value(scrape(admin_stack), "x402_settlement_lag_seconds") == 0.0


async def test_ledger_errors_are_counted(stack: Stack) -> None:
    """The real servicer with a Redis that does not answer: fails closed, counts an error."""
    settings = Settings.load(stack.config_path)
    dead = Ledger.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    servicer = CheckService(settings.route_table(), settings.gateway(), dead)
    live = Ledger.from_url(stack.redis_url)
    wallet = await funded_payer(live, 1_000_000)
    await live.close()
    path = VERIFY.format(n=1)
    check = authz.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host = "GET", path, "gw"
    http.headers.update(pay_direct(stack, wallet, f"GET {path}", "0.01") | {"x-request-id": "m"})
    http.headers["x-payment"] = http.headers.pop("X-Payment")
    errors_before = value(page_in_process(), "x402_ledger_errors_total")

    response = await check_message(servicer, check)

    assert response.denied_response.status.code == 503
    assert value(page_in_process(), "x402_ledger_errors_total") == errors_before + 1
    await dead.close()


def page_in_process() -> dict[Any, float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def test_render_without_a_settle_pass_has_no_lag() -> None:
    assert b"x402_settlement_lag_seconds" not in metrics.render(None)
    assert b"x402_settlement_lag_seconds 12.5" in metrics.render(12.5)
