"""`x402 load` against a real stack: the summary adds up and matches the ledger."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.tools.stack import Stack
from tests.support.routes import ROUTES

VERIFY_PRICE = 10_000  # atomic units of 0.01 USDF


@pytest.fixture(scope="module")
def load_stack() -> Iterator[Stack]:
    with Stack(ROUTES, workers=2) as running:
        yield running


def x402_load(stack: Stack, tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.tools.cli", "load", "--url", stack.url,
         "--redis", stack.redis_url, "--json", str(out), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(out.read_text())
    return summary, done.stdout


def debited(stack: Stack) -> int:
    """Every debit in the ledger, over all accounts."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    total = sum(
        int(client.hget(key, "debited:USDF") or 0) for key in client.scan_iter("x402:{*}:account")
    )
    client.flushdb()  # the next run starts from an empty ledger
    client.close()
    return total


def test_challenge_loops_add_up_and_match_the_ledger(load_stack: Stack, tmp_path: Path) -> None:
    summary, shown = x402_load(
        load_stack, tmp_path, "--route", "/api/v1/trade/verify/{trade_id}",
        "--route", "GET /api/v1/agent/pay-api/atlas", "--duration", "2s", "--concurrency", "4",
    )  # fmt: skip

    assert summary["cleared"] > 0
    assert summary["attempted"] == summary["cleared"] + sum(summary["errors"].values())
    assert summary["errors"] == {}
    # Each loop is one challenge and one paid retry.
    assert summary["statuses"] == {"200": summary["cleared"], "402": summary["attempted"]}
    assert debited(load_stack) == summary["charged_atomic"]["USDF"]
    assert summary["loop_ms"]["p50"] is not None and summary["challenge_ms"]["p99"] is not None
    assert "loops/s" in shown and "latency (ms)" in shown


def test_unexpected_answers_are_counted_by_reason(load_stack: Stack, tmp_path: Path) -> None:
    # Two agents funded for two calls each: every later loop meets insufficient_funds.
    summary, shown = x402_load(
        load_stack, tmp_path, "--route", "/api/v1/trade/verify/T-7", "--direct",
        "--agents", "2", "--concurrency", "2", "--fund", "0.02", "--duration", "2s",
    )  # fmt: skip

    assert summary["cleared"] == 4
    assert summary["errors"] == {"paid: 402 insufficient_funds": summary["attempted"] - 4}
    assert summary["statuses"] == {"200": 4, "402": summary["attempted"] - 4}
    assert summary["challenge_ms"]["p50"] is None  # direct: no challenge leg
    assert debited(load_stack) == 4 * VERIFY_PRICE == summary["charged_atomic"]["USDF"]
    assert "insufficient_funds" in shown


def test_processes_report_one_merged_summary_that_matches_the_ledger(
    load_stack: Stack, tmp_path: Path
) -> None:
    summary, shown = x402_load(
        load_stack, tmp_path, "--route", "/api/v1/trade/verify/{trade_id}",
        "--route", "GET /api/v1/agent/pay-api/atlas", "--duration", "2s", "--concurrency", "5",
        "--processes", "2",
    )  # fmt: skip

    assert summary["processes"] == 2
    assert summary["cleared"] > 0 and summary["errors"] == {}
    assert summary["attempted"] == summary["cleared"] + sum(summary["errors"].values())
    assert summary["statuses"] == {"200": summary["cleared"], "402": summary["attempted"]}
    assert debited(load_stack) == summary["charged_atomic"]["USDF"]
    # Every proof was signed in a loop, after its 402.
    assert summary["proofs"] == {"presigned": 0, "signed_in_loop": summary["cleared"]}
    cpu = summary["generator_cpu"]
    assert cpu["cpu_seconds"] > 0 and cpu["cores"] > 0 and cpu["us_per_loop"] > 0
    assert "2 processes" in shown and "generator CPU" in shown


def test_direct_payments_use_proofs_signed_before_the_clock(
    load_stack: Stack, tmp_path: Path
) -> None:
    summary, _ = x402_load(
        load_stack, tmp_path, "--route", "/api/v1/trade/verify/{trade_id}", "--direct",
        "--duration", "1s", "--concurrency", "2", "--processes", "1", "--rate", "200",
    )  # fmt: skip

    assert summary["cleared"] > 100 and summary["errors"] == {}
    assert summary["statuses"] == {"200": summary["cleared"]}  # one request a loop, no 402
    # 200 loops/s over 1 s between 2 agents: 100 + 2 each, all signed beforehand.
    assert summary["proofs"] == {"presigned": 204, "signed_in_loop": 0}
    assert summary["generator_cpu"]["cores"] > 0
    assert debited(load_stack) == summary["cleared"] * VERIFY_PRICE


def test_an_unknown_route_is_a_readable_error(load_stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.tools.cli", "load", "--url", load_stack.url,
         "--redis", load_stack.redis_url, "--route", "/nope", "--duration", "1s"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: route '/nope' is not in the price list")
