"""Log lines bounded in bytes: the decision line and every structlog line keep at most
FIELD_BYTES of any string value, the clipped fields named in `truncated`."""

from __future__ import annotations

import io
import json

import pytest
import structlog

from sidecar.core.decision import ELLIPSIS, FIELD_BYTES
from sidecar.server import logs

LONG = "/api/" + "x" * 60_000


def test_the_decision_line_clips_a_long_path_and_says_so() -> None:
    out = io.StringIO()
    log = logs.DecisionLog(stream=out)
    log.write({"request_id": "r" * 5000, "method": "GET", "path": LONG, "status": 404})
    log.flush()
    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert len(line) < 1024
    assert entry["truncated"] == ["request_id", "path"]
    assert entry["path"].endswith(ELLIPSIS) and LONG.startswith(entry["path"][:-1])
    assert len(entry["path"].encode()) <= FIELD_BYTES and entry["method"] == "GET"


def test_every_structlog_line_is_bounded_too(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info")  # writes to the sys.stdout of now: capsys's
    try:
        raise ValueError(LONG)
    except ValueError:
        logs.get_logger("test").exception("authz.error", method="GET", path=LONG)
    finally:
        structlog.reset_defaults()
    [line] = capsys.readouterr().out.splitlines()
    entry = json.loads(line)
    assert entry["truncated"] == ["path", "exception"]
    assert len(entry["path"].encode()) <= FIELD_BYTES
    assert len(line) < 20 * 1024  # the traceback is kept up to 16 KiB
    assert entry["event"] == "authz.error" and entry["method"] == "GET"
