"""The metrics module's own pieces (the /metrics page end to end: tests/test_metrics.py)."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sidecar.server import metrics


def test_process_id_is_the_pid_and_follows_a_fork() -> None:
    assert metrics.process_id() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, f"{metrics.process_id()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    seen, actual = os.read(read, 64).decode().split()
    os.close(read)
    os.waitpid(child, 0)
    assert seen == actual == str(child)


def _parsed_decisions() -> dict[tuple[str, str, str], int]:
    """x402_decisions as a scraper reads them from the rendered page."""
    found: dict[tuple[str, str, str], int] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if family.name == "x402_decisions" and sample.name.endswith("_total"):
                labels = sample.labels
                found[(labels["decision"], labels["reason"], labels["route"])] = int(sample.value)
    return found


def _record(route: str, times: int) -> None:
    for _ in range(times):
        metrics.record_phase(
            {"decision": "deny", "reason": "upstream_failed", "route": route}, 0, 0.001
        )


def test_decision_counts_read_from_the_registry_are_what_the_page_shows() -> None:
    _record("counted-here", 3)
    counts = metrics.decision_counts()
    assert counts[("deny", "upstream_failed", "counted-here")] >= 3
    assert counts == _parsed_decisions()


def test_decision_counts_merge_every_process_in_multiprocess_mode(tmp_path: Path) -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        metrics.use_multiprocess(str(tmp_path))
        _record("merged", 2)
        grandchild = os.fork()  # a second worker, writing its own file
        if grandchild == 0:
            _record("merged", 5)
            os._exit(0)
        os.waitpid(grandchild, 0)
        counts = metrics.decision_counts()
        agrees = counts == _parsed_decisions()
        os.write(write, f"{counts.get(('deny', 'upstream_failed', 'merged'), 0)} {agrees}".encode())
        os._exit(0)
    os.close(write)
    merged, agrees_text = os.read(read, 64).decode().split()
    os.close(read)
    os.waitpid(child, 0)
    assert (merged, agrees_text) == ("7", "True")
