"""Structured logs: one JSON line per event on stdout; the decision line is the operator's UI."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# The fields of PROTOCOL.md §7, always present (null when unknown) so `jq` filters stay simple.
DECISION_FIELDS = (
    "decision",
    "status",
    "reason",
    "request_id",
    "method",
    "path",
    "route",
    "price",
    "asset",
    "payer",
    "invoice_id",
    "receipt_id",
    "balance",
    "latency_ms",
)
# Never logged, whatever a caller passes: proofs and signatures are bearer material.
_FORBIDDEN = frozenset({"signature", "proof", "x-payment", "payment-signature", "secret"})


def drop_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _FORBIDDEN & event.keys():
        del event[key]
    return event


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            drop_secrets,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
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
