"""Structured logs: one JSON line per event on stdout; the decision line is the operator's UI."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from sidecar.core.decision import FIELD_BYTES, TRUNCATED, bound, clipped
from sidecar.core.protocol import json_encoder

# Never logged, whatever a caller passes: proofs and signatures are bearer material.
_FORBIDDEN = frozenset({"signature", "proof", "x-payment", "payment-signature", "secret"})
_DUMPS = json_encoder()  # json.dumps, its C encoder built once


def drop_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _FORBIDDEN & event.keys():
        del event[key]
    return event


# A traceback may quote a request's values too: bounded as well, more generously.
_EXCEPTION_BYTES = 16 * 1024


def bound_values(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Every string value at most FIELD_BYTES (the decision line's rule, core/decision.py),
    a rendered traceback at most _EXCEPTION_BYTES: no outsider makes a log line long."""
    line = dict(event)
    exception = line.pop("exception", None)
    bound(line, FIELD_BYTES)
    if isinstance(exception, str):
        short = clipped(exception, _EXCEPTION_BYTES)
        if short is not None:
            line[TRUNCATED] = [*line.get(TRUNCATED, ()), "exception"]
        line["exception"] = short or exception
    return line


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            drop_secrets,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
            bound_values,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class DecisionLog:
    """The decision line of PROTOCOL.md §7 on the hot path.

    The same line structlog writes (the caller's keys in order, then `event`, `level` and
    a UTC `timestamp`), built with one JSON encode. Lines are written together at most
    `FLUSH_SECONDS` after the first of them (or at `MAX_PENDING`): a write per check costs
    far more CPU under load (docs/performance.md, "The hot path"). The caller's keys
    are the fixed decision fields: no secret can get in. Call `flush` before exiting.
    """

    FLUSH_SECONDS = 0.01
    MAX_PENDING = 256

    def __init__(
        self,
        level: str = "info",
        stream: TextIO | None = None,
        sink: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.printing = logging.getLevelNamesMapping()[level.upper()] <= logging.INFO
        self.enabled = self.printing or sink is not None
        self.stream = stream  # None: sys.stdout when writing
        self.sink = sink  # also given each batch of lines (the dashboard's recent decisions)
        self.pending: list[str] = []
        self.timer: asyncio.TimerHandle | None = None
        self.second, self.prefix = -1, ""

    def timestamp(self) -> str:
        """ISO 8601 UTC with microseconds, as structlog's TimeStamper writes it; the part up
        to the second is formatted once per second."""
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((now - second) * 1_000_000):06d}Z"

    def write(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line["event"] = "authz.decision"
        line["level"] = "info"
        line["timestamp"] = self.timestamp()
        bound(line)  # a request's path, method, id: at most FIELD_BYTES each
        self.pending.append(_DUMPS(line))
        if len(self.pending) >= self.MAX_PENDING:
            self.flush()
        elif self.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop: write now
                self.flush()
            else:
                self.timer = loop.call_later(self.FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        lines, self.pending = self.pending, []
        if lines and self.sink is not None:
            self.sink(lines)
        if lines and self.printing:
            out = self.stream or sys.stdout
            out.write("\n".join(lines) + "\n")
            out.flush()
