"""Hold and metering math (core/phases.py) and the route terms that describe it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core import phases
from sidecar.core.errors import ConfigError
from sidecar.core.money import Asset
from sidecar.core.phases import ResponsePhase, captured
from sidecar.core.pricing import RouteTable

USDF = Asset("USDF", 6)
ROWS = ResponsePhase(unit="row", unit_price=1000, max_units=100, min_units=2)
FIXED = ResponsePhase()


def test_a_fixed_route_captures_the_hold_below_the_threshold() -> None:
    assert captured(FIXED, 250_000, 200, None) == phases.Capture(250_000, False)
    assert captured(FIXED, 250_000, 404, None) == phases.Capture(250_000, False)
    assert captured(FIXED, 250_000, 500, None).release
    assert captured(ResponsePhase(failure_status=400), 250_000, 404, None).release


def test_metered_usage_times_unit_price_never_above_the_hold() -> None:
    assert captured(ROWS, 100_000, 200, "37") == phases.Capture(37_000, False, 37, "reported")
    assert captured(ROWS, 100_000, 200, "5000") == phases.Capture(100_000, False, 100, "capped")
    assert captured(ROWS, 100_000, 200, "0").amount == 2_000  # the minimum


@pytest.mark.parametrize("usage", [None, "", "12 rows", "-5", "1e3", "0x10", "9" * 40])
def test_missing_or_malformed_usage_follows_the_rule(usage: str | None) -> None:
    assert captured(ROWS, 100_000, 200, usage).amount == 100_000  # default: the hold
    minimum = ResponsePhase(unit_price=1000, max_units=100, min_units=2, usage_missing="minimum")
    assert captured(minimum, 100_000, 200, usage).amount == 2_000


@given(st.integers(0, 10**20), st.integers(100, 599), st.integers(1, 10**6))
def test_a_capture_is_never_above_the_hold(usage: int, status: int, price: int) -> None:
    phase = ResponsePhase(unit_price=price, max_units=1000)
    outcome = captured(phase, phase.maximum, status, str(usage))
    assert 0 <= outcome.amount <= phase.maximum
    assert outcome.release == (status >= 500)


def test_route_terms_parse_and_fail_naming_the_key() -> None:
    phase = phases.phase_from(
        "routes.rows", {"unit": "row", "unit_price": "0.001", "max_units": 100}, USDF
    )
    assert phase == ResponsePhase(unit="row", unit_price=1000, max_units=100)
    assert phase.maximum == 100_000
    assert phases.phase_from("routes.a", {"price": "1"}, USDF) is None
    bad: list[tuple[dict[str, object], str]] = [
        ({"charge": "later"}, "routes.a.charge"),
        ({"unit_price": "0.001", "max_units": 1, "charge": "on_check"}, "routes.a.charge"),
        ({"unit_price": "0.0000001", "max_units": 1}, "routes.a.unit_price"),
        ({"unit_price": 1, "max_units": 1}, "routes.a.unit_price"),
        ({"unit_price": "0.001"}, "routes.a.max_units"),
        ({"failure_status": 400}, "routes.a.failure_status"),  # only with on_success
        ({"charge": "on_success", "failure_status": 99}, "routes.a.failure_status"),
        ({"charge": "on_success", "usage_header": "x-x402-usage"}, "routes.a.usage_header"),
        ({"charge": "on_success", "hold_seconds": 0}, "routes.a.hold_seconds"),
        ({"charge": "on_success", "max_units": 3}, "routes.a.max_units"),
    ]
    for spec, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            phases.phase_from("routes.a", spec, USDF)


def test_annotations_round_trip_through_the_route_table() -> None:
    phase = ResponsePhase(unit="token", unit_price=10, max_units=4000, hold_seconds=30)
    extensions = {
        "x402.route": "llm",
        "x402.asset": "USDF",
        **phases.phase_annotations(phase, USDF),
    }
    table = RouteTable([], {"USDF": USDF}, "USDF")
    price = table.price_for("POST", "/llm", extensions)
    assert price is not None and price.phase == phase and price.amount == 40_000
    assert phases.from_annotations("x", extensions, USDF) == phase
    fixed = table.price_for("GET", "/r", {"x402.price": "0.25", "x402.charge": "on_success"})
    assert fixed is not None and fixed.phase == ResponsePhase() and fixed.amount == 250_000
    plain = table.price_for("GET", "/r", {"x402.price": "0.25"})
    assert plain is not None and plain.phase is None


def test_envoy_waits_for_the_service_no_longer_than_the_hold_lives() -> None:
    assert phases.route_timeout({"price": "1"}, 15) == 15
    assert phases.route_timeout({"charge": "on_success", "hold_seconds": 5}, 15) == 4
    assert phases.route_timeout({"charge": "on_success"}, 15) == 15
    assert phases.route_timeout({"charge": "on_success", "hold_seconds": 30}, 0) == 29
