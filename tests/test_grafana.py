"""The Grafana dashboard of the Prometheus metrics: a valid dashboard model, and every
metric it queries is on /metrics of a running sidecar (after paid and refused traffic and
a settle pass)."""

from __future__ import annotations

import httpx
import jsonschema
from prometheus_client.parser import text_string_to_metric_families

from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support import grafana
from tests.support.payers import funded_payer, paid_requests
from tests.support.settlement import settle


def test_the_dashboard_is_a_valid_grafana_dashboard() -> None:
    dashboard = grafana.load()
    jsonschema.Draft202012Validator.check_schema(grafana.SCHEMA)
    jsonschema.validate(dashboard, grafana.SCHEMA, cls=jsonschema.Draft202012Validator)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("reason", "revenue", "latency", "ledger", "settlement lag"):
        assert topic in titles, topic


async def test_every_metric_it_queries_is_on_the_sidecars_metrics(
    admin_stack: Stack,
) -> None:
    ledger = Ledger.from_url(admin_stack.redis_url)
    try:
        wallet = await funded_payer(ledger, 1_000_000)
        async with httpx.AsyncClient(base_url=admin_stack.url, timeout=10) as client:
            await paid_requests(client, admin_stack, wallet, 3)
            assert (await client.get("/api/v1/agent/pay-api/atlas")).status_code == 402
    finally:
        await ledger.close()
    assert (await settle(admin_stack)).code == 0
    async with httpx.AsyncClient(base_url=admin_stack.sideport_url, timeout=10) as side:
        page = (await side.get("/metrics")).text
    exposed = {
        sample.name for family in text_string_to_metric_families(page) for sample in family.samples
    }
    queried = grafana.queried_metrics(grafana.load())
    assert {
        "x402_decisions_total",
        "x402_revenue_atomic_total",
        "x402_check_latency_seconds_bucket",
        "x402_ledger_errors_total",
        "x402_settlement_lag_seconds",
    } <= queried
    assert queried <= exposed, sorted(queried - exposed)
