"""The chart and the Python side say the same: Envoy's config is the renderer's, the
sidecar's route table is the values' routes (prices to the unit), the edge defaults are
the renderer's, and the Dockerfile runs what the chart runs."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.core.pricing import is_pattern
from sidecar.server.config import Settings
from sidecar.server.durability_settings import Durability
from sidecar.server.envoy import contract, phase_call
from sidecar.server.envoy.chart import contract_template
from sidecar.server.envoy.edge import Edge, Endpoints
from sidecar.server.envoy.render import render, timeouts
from sidecar.tools.stack import LOOPBACK
from tests.support.charts import (
    CHART,
    REPO,
    VALUES,
    Rendered,
    listed_amount,
    merge,
    ordered_routes,
    render_chart,
    rendered_values,
    snake_case,
)


def without_probe(config: dict[str, Any]) -> dict[str, Any]:
    """The chart's Envoy config less what the chart alone adds for the kubelet: the probe
    listener (GET /ready) and its cluster, the loopback admin (tests/helm/test_drain.py)."""
    static = config["static_resources"]
    listeners = [item for item in static["listeners"] if item["name"] != "probe"]
    clusters = [item for item in static["clusters"] if item["name"] != "envoy_admin"]
    assert len(listeners) == len(static["listeners"]) - 1
    assert len(clusters) == len(static["clusters"]) - 1
    return {**config, "static_resources": {**static, "listeners": listeners, "clusters": clusters}}


def test_envoy_config_has_the_shape_of_the_python_renderer(rendered: Rendered) -> None:
    assert without_probe(rendered.envoy_config) == renderers_envoy_config(rendered)


@pytest.mark.parametrize("name", [name for name in VALUES if name != "http"])
def test_every_values_file_over_http_has_the_shape_of_the_python_renderer(name: str) -> None:
    rendered = render_chart(name, "--set", "sidecar.transport=http")
    rendered.values = merge(rendered.values, {"sidecar": {"transport": "http"}})
    assert without_probe(rendered.envoy_config) == renderers_envoy_config(rendered)


@pytest.mark.parametrize("name", ["exact", "many-routes"])
def test_without_kept_responses_the_phase_call_sends_no_body_as_the_renderers(
    name: str,
) -> None:
    """sidecar.retries.replayPerPayer 0: the held routes' phase call sends no body; an MCP
    route (many-routes has one) keeps its ext_proc over gRPC: both as the renderer."""
    rendered = render_chart(name, "--set", "sidecar.retries.replayPerPayer=0")
    rendered.values = merge(rendered.values, {"sidecar": {"retries": {"replayPerPayer": 0}}})
    assert without_probe(rendered.envoy_config) == renderers_envoy_config(rendered)
    chain = rendered.envoy_config["static_resources"]["listeners"][0]["filter_chains"][0]
    filters = chain["filters"][0]["typed_config"]["http_filters"]
    [call] = [f["typed_config"] for f in filters if f["name"] == phase_call.NAME]
    assert "local keep = 0" in call["source_codes"][phase_call.SOURCE]["inline_string"]
    any_mcp = any("mcp" in spec for spec in rendered.values["routes"].values())
    assert any(f["name"] == contract.EXT_PROC for f in filters) is any_mcp


def renderers_envoy_config(rendered: Rendered) -> dict[str, Any]:
    """What `render(...)` makes of the values, as `x402 envoy-config` would."""
    v = rendered.values
    endpoints = Endpoints(
        listen=("0.0.0.0", v["envoy"]["port"]),
        admin=(v["envoy"]["adminAddress"], v["envoy"]["adminPort"]),
        service=(LOOPBACK, v["app"]["port"]),
        authz=(LOOPBACK, v["sidecar"]["grpcPort"]),
        authz_workers=v["sidecar"]["workers"],
        transport=v["sidecar"]["transport"],
        authz_http=(LOOPBACK, v["sidecar"]["authzHttpPort"]),
        sideport=(LOOPBACK, v["sidecar"]["httpPort"]),
        authz_timeout=v["envoy"]["authzTimeout"],
        keep_responses=v["sidecar"]["retries"]["replayPerPayer"] > 0,
    )
    if v["exact"]["onchain"]:  # the renderer's timeouts for this sidecar config, as the CLI
        authz, topup = timeouts(Settings.from_mapping(rendered.sidecar_config, env={}))
        assert topup, "the exact values turn top-ups on"
        endpoints = dataclasses.replace(endpoints, authz_timeout=authz, topup_timeout=topup)
    if v["existingService"]["name"]:  # a Service by name: a STRICT_DNS cluster
        service = (v["existingService"]["name"], v["existingService"]["port"])
        endpoints = dataclasses.replace(endpoints, service=service)
    edge = Edge.from_mapping({snake_case(key): value for key, value in v["envoy"]["edge"].items()})
    return render(ordered_routes(v["routes"]), v["defaultAsset"], endpoints, edge)


def test_the_charts_contract_is_generated_from_the_contract_module() -> None:
    generated = CHART / "templates" / "_contract.tpl"
    assert generated.read_text() == contract_template(), (
        "the chart's _contract.tpl is stale: "
        "python -m sidecar.server.envoy.chart > helm/x402-sidecar/templates/_contract.tpl"
    )


def test_the_charts_envoy_template_keeps_no_copy_of_the_contract() -> None:
    """The header names, paths and metadata keys come from _contract.tpl: none is written
    by hand in the template (comments aside), neither as a Go string nor as YAML."""
    template = (CHART / "templates" / "_envoy.tpl").read_text()
    code = re.sub(r"\{\{-? */\*.*?\*/ *-?\}\}", "", template, flags=re.DOTALL)
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#"))
    names = {
        *contract.HTTP_REQUEST_HEADERS,
        *contract.UPSTREAM_HEADERS,
        *contract.DENIAL_HEADERS,
        *contract.SUCCESS_HEADERS,
        *contract.METADATA_KEYS,
        *contract.METHOD_OVERRIDE_HEADERS,
        *contract.ASSERTED_PREFIXES,
        contract.TIMEOUT_HEADER,
        contract.PHASE_HEADER,
        contract.DISCOVERY_PATH,
        contract.TOPUP_PATH,
        contract.UNAVAILABLE_MARK,
    }
    quoted = {name for name in names if f'"{name}"' in code}
    bare = {name for name in names if "-" in name or "/" in name if f" {name}\n" in code}
    assert not quoted | bare


def test_the_charts_edge_defaults_are_the_renderers() -> None:
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["envoy"]
    assert Edge.from_mapping({snake_case(key): value for key, value in chart["edge"].items()}) == (
        Edge()
    )
    assert {snake_case(key) for key in chart["edge"]} == set(dataclasses.asdict(Edge()))
    admin = f"{chart['adminAddress']}:{chart['adminPort']}"
    assert admin == Settings().envoy_admin == ":".join(map(str, Endpoints().admin))


@pytest.mark.parametrize(
    "over",
    [
        {
            "envoy": {
                "edge": {"corsOrigins": ["https://app.example", "https://pay.app.example:8443"]}
            }
        },
        {"envoy": {"edge": {"corsOrigins": []}}},
        {
            "existingService": {"name": "orders-api", "port": 8081, "podSelector": {"app": "o"}},
            "envoy": {"adminAddress": "::1"},
        },
    ],
)
def test_the_browser_and_address_values_have_the_shape_of_the_python_renderer(
    over: dict[str, Any], tmp_path: Path
) -> None:
    """Configured CORS origins (or none), a Service by name and the admin address."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(over))
    rendered = render_chart("default", "-f", str(values))
    rendered.values = merge(rendered.values, over)
    assert without_probe(rendered.envoy_config) == renderers_envoy_config(rendered)
    # The kubelet's probe asks Envoy's admin API where it listens.
    [admin] = [
        c
        for c in rendered.envoy_config["static_resources"]["clusters"]
        if c["name"] == "envoy_admin"
    ]
    [endpoint] = admin["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = rendered.envoy_config["admin"]["address"]["socket_address"]["address"]
    assert endpoint["endpoint"]["address"]["socket_address"]["address"] == address


def test_the_charts_transport_defaults_are_the_sidecars() -> None:
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["sidecar"]
    defaults = {field.name: field.default for field in dataclasses.fields(Settings)}
    assert chart["transport"] == defaults["transport"] == Endpoints().transport
    port = int(str(defaults["listen_authz_http"]).rpartition(":")[2])
    assert chart["authzHttpPort"] == port == Endpoints().authz_http[1]


def test_the_charts_retry_and_durability_defaults_are_the_sidecars() -> None:
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["sidecar"]
    defaults = Settings()
    retries = {snake_case(key): value for key, value in chart["retries"].items()}
    assert retries == {
        "redelivery_limit": defaults.redelivery_limit,
        "replay_body_max_bytes": defaults.replay_body_max_bytes,
        "replay_per_payer": defaults.replay_per_payer,
    }
    durability = {snake_case(key): value for key, value in chart["durability"].items()}
    assert Durability.from_mapping(durability) == Durability()
    assert set(durability) == set(dataclasses.asdict(Durability()))


def test_sidecar_config_is_the_same_route_table(rendered: Rendered) -> None:
    v = rendered.values
    config = rendered.sidecar_config
    settings = Settings.from_mapping(config, env={})
    table = settings.route_table()

    expected = set()
    for name, spec in v["routes"].items():
        asset = spec.get("asset", v["defaultAsset"])
        amount = listed_amount(spec, v, asset)
        expected.add((name, spec.get("method", "*"), spec["path"], asset, amount))
    actual = {(r.name, r.method, r.path, r.price.asset.code, r.price.amount) for r in table.routes}
    assert actual == expected
    # The sidecar looks exact paths up first, then tries templated ones in table order;
    # Envoy's routes are in that same order, so both pick the same route for a path.
    routes = ordered_routes(v["routes"])
    templated = [name for name in routes if is_pattern(routes[name]["path"])]
    assert [r.name for r in table.routes if r.is_template] == templated
    # Envoy is in the pod: the check ports are loopback's; the side port is the pod's only
    # while Prometheus scrapes it; the kubelet probes the health port.
    assert settings.listen_grpc == f"127.0.0.1:{v['sidecar']['grpcPort']}"
    side = "0.0.0.0" if v["serviceMonitor"]["enabled"] else "127.0.0.1"
    assert settings.listen_http == f"{side}:{v['sidecar']['httpPort']}"
    assert settings.listen_health == f"0.0.0.0:{v['sidecar']['healthPort']}"
    assert settings.transport == v["sidecar"]["transport"]
    assert settings.listen_authz_http == f"127.0.0.1:{v['sidecar']['authzHttpPort']}"
    assert settings.workers == v["sidecar"]["workers"]
    assert "redis_url" not in config  # it carries the password: env from a Secret only


def test_prices_at_the_edges_render() -> None:
    rendered = render_chart(
        "default",
        "--set-string",
        "routes.max.path=/max",
        "--set-string",
        "routes.max.price=9007199254.740991",
        "--set-string",
        "routes.micro.path=/micro",
        "--set-string",
        "routes.micro.price=0.000001",
        "--set-string",
        "routes.free.path=/free",
        "--set-string",
        "routes.free.price=0",
    )
    prices = {
        r.name: r.price.amount
        for r in Settings.from_mapping(rendered.sidecar_config, env={}).route_table().routes
    }
    assert prices == {"free": 0, "max": 2**53 - 1, "micro": 1}


def test_dockerfile_runs_x402_serve_as_the_charts_user() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    final = dockerfile.split("\nFROM ")[-1]  # the runtime stage

    def instruction(name: str) -> str:
        match = re.search(rf"^{name} (.+)$", final, re.MULTILINE)
        assert match, f"no {name} in the final stage"
        return match.group(1)

    x402 = rendered_values("default").container("x402")
    # A command, no entrypoint: `podman run IMAGE x402 --version` runs (test_containers.py).
    assert "ENTRYPOINT" not in final
    assert x402["command"] == ["x402", "serve"]
    assert json.loads(instruction("CMD")) == [*x402["command"], *x402["args"]]
    context = x402["securityContext"]
    assert instruction("USER") == f"{context['runAsUser']}:{context['runAsGroup']}"
    assert "AS build" in dockerfile  # multi-stage: the build stage stays behind
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final)
