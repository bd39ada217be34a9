"""bench/profile.py's reading of py-spy and strace output (the tool itself needs a whole
stack and wrk: `python -m bench.profile`)."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import profile

ROOT = "run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118)"
CHECK = ROOT + ";GrpcChecks.check (sidecar/server/authz/grpc_transport.py:50)"
PROCESS = ROOT + ";HttpProcessor.answer (sidecar/server/processing/http_transport.py:120)"


@pytest.mark.parametrize(
    ("stack", "category"),
    [
        (ROOT, "transport framework"),
        (ROOT + ";_handle (grpc/aio/_server.py:10)", "transport framework"),
        ("Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982)",
         "transport framework"),
        (CHECK, "glue"),
        (CHECK + ";verify (sidecar/core/identity.py:130);verify (nacl/signing.py:100)",
         "Ed25519 verify"),
        (CHECK + ";Identity.sign (sidecar/core/identity.py:108)", "Ed25519 sign"),
        (CHECK + ";loads_strict (sidecar/core/protocol.py:97)", "JSON (+base64)"),
        (CHECK + ";DecisionLog.write (sidecar/server/logs.py:95);"
         "JSONEncoder.encode (json/encoder.py:200)", "JSON (+base64)"),
        (CHECK + ";DecisionLog.write (sidecar/server/logs.py:95)", "decision line"),
        (CHECK + ";record (sidecar/server/metrics.py:113);inc (prometheus_client/values.py:1)",
         "metrics"),
        (CHECK + ";RedisPipe.call (sidecar/ledger/pipe.py:216);"
         "Future.__init__ (asyncio/futures.py:1)", "Redis client"),
        (CHECK + ";ok (sidecar/server/authz/grpc_answers.py:113)", "response building"),
        (ROOT + ";AuthzConnection.on_header (sidecar/server/authz/http_transport.py:199)",
         "transport framework"),
        (CHECK + ";HttpAnswers.ok (sidecar/server/authz/http_transport.py:110)",
         "response building"),
        # The response phase over HTTP (a held route): its answer is response building.
        (PROCESS, "glue"),
        (PROCESS + ";encode (sidecar/server/processing/http_transport.py:70)",
         "response building"),
        (PROCESS + ";_header_lines (sidecar/server/processing/http_transport.py:40)",
         "response building"),
        (PROCESS + ";Processor._held (sidecar/server/processing/phase.py:130);"
         "receipt_headers (sidecar/server/processing/phase.py:71)", "response building"),
        ("<module> (somewhere.py:1)", "other"),
    ],
)  # fmt: skip
def test_a_sample_goes_to_its_innermost_named_frame(stack: str, category: str) -> None:
    assert profile.categorize(stack.split(";")) == category


def test_samples_become_microseconds_per_check() -> None:
    raw = [f"{CHECK} 3", f"{ROOT} 1", "garbage"]
    samples = profile.parse_raw(raw)
    assert samples == Counter({"glue": 3, "transport framework": 1})
    per = profile.breakdown(samples, user_seconds=0.4, checks=1000)  # 400 µs a check
    assert per["glue"] == pytest.approx(300.0)
    assert per["transport framework"] == pytest.approx(100.0)
    assert sum(per.values()) == pytest.approx(400.0)


def test_strace_summary_and_decision_lines() -> None:
    summary = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 60.00    0.000600           3       200           write
 40.00    0.000400           1       300        12 recvfrom
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           2       500        12 total"""
    assert profile.strace_counts(summary.splitlines()) == {"write": 200, "recvfrom": 300}
    log = "\n".join(
        [
            '{"worker": 1, "decision": "allow", "reason": "paid", "event": "authz.decision"}',
            '{"worker": 0, "decision": "allow", "reason": "paid", "event": "authz.decision"}',
            '{"worker": 1, "decision": "allow", "reason": "free", "event": "authz.decision"}',
            '{"pid": 41, "listen_grpc": "127.0.0.1:9001", "event": "sidecar.started"}',
            '{"pid": 42, "listen_grpc": "127.0.0.1:9002", "event": "sidecar.started"}',
        ]
    )
    assert profile.paid_checks(log, 1) == 1
    assert profile.paid_checks(log, 1, profile.REASONS["free"]) == 1
    assert profile.worker_pids(log, 9001) == {0: 41, 1: 42}
