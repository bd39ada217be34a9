"""Response phases: charge for what was served. Pure: the route's response-phase terms and the math
that turns a response (its status, the usage the service reported) into what to capture.

A route with a response phase is charged in two steps. At check time the ledger places a
hold (the route's price, or for a metered route its maximum: `max_units` x `unit_price`)
in the same atomic step that checks payer, nonce and balance. When Envoy's ext_proc filter
shows the sidecar the response, the hold is captured (status below `failure_status`;
metered: usage x unit price, never above the hold) or released whole (failure), which also
frees the proof's nonce so the same proof can be retried. A hold nobody captures within
`hold_seconds` is released by the ledger itself (docs/protocol.md §holds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.core.errors import AmountError, ConfigError
from sidecar.core.money import MAX_BALANCE, Asset
from sidecar.core.protocol import ASSERTED_PREFIXES

ON_CHECK, ON_SUCCESS = "on_check", "on_success"
CHARGES = (ON_CHECK, ON_SUCCESS)
# What a metered route captures when the service reports no usage, or a malformed one.
USAGE_HOLD, USAGE_MINIMUM = "hold", "minimum"
USAGE_MISSING = (USAGE_HOLD, USAGE_MINIMUM)
DEFAULT_FAILURE_STATUS = 500  # a response status at or above this releases the hold
DEFAULT_USAGE_HEADER = "x402-usage"
DEFAULT_HOLD_SECONDS = 60
MAX_HOLD_SECONDS = 3600
MAX_USAGE_DIGITS = 18
_USAGE = re.compile(r"(0|[1-9][0-9]*)")
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")

# The route keys of the sidecar config and the Envoy per-route annotations
# (ext_authz context_extensions) that describe a response phase.
ROUTE_KEYS = (
    "charge",
    "failure_status",
    "usage_header",
    "usage_missing",
    "unit",
    "unit_price",
    "max_units",
    "min_units",
    "hold_seconds",
)
EXT_CHARGE = "x402.charge"
EXT_FAILURE_STATUS = "x402.failure_status"
EXT_USAGE_HEADER = "x402.usage_header"
EXT_USAGE_MISSING = "x402.usage_missing"
EXT_UNIT = "x402.unit"
EXT_UNIT_PRICE = "x402.unit_price"
EXT_MAX_UNITS = "x402.max_units"
EXT_MIN_UNITS = "x402.min_units"
EXT_HOLD_SECONDS = "x402.hold_seconds"
# Set by the Envoy config renderer (and the chart) on exactly the routes whose ext_proc
# filter is enabled: a hold is placed only when Envoy will show the sidecar the response.
EXT_PHASE, PHASE_RESPONSE = "x402.phase", "response"
# Every key `phase_annotations` may write.
PHASE_KEYS = (
    EXT_CHARGE,
    EXT_PHASE,
    EXT_FAILURE_STATUS,
    EXT_USAGE_HEADER,
    EXT_HOLD_SECONDS,
    EXT_UNIT,
    EXT_UNIT_PRICE,
    EXT_MAX_UNITS,
    EXT_MIN_UNITS,
    EXT_USAGE_MISSING,
)


@dataclass(frozen=True, slots=True)
class ResponsePhase:
    """A route's `charge: on_success` terms."""

    failure_status: int = DEFAULT_FAILURE_STATUS
    usage_header: str = DEFAULT_USAGE_HEADER
    usage_missing: str = USAGE_HOLD
    unit: str = ""  # metered when unit_price > 0
    unit_price: int = 0  # atomic units per unit
    max_units: int = 0
    min_units: int = 0
    hold_seconds: int = DEFAULT_HOLD_SECONDS

    @property
    def metered(self) -> bool:
        return self.unit_price > 0

    @property
    def maximum(self) -> int:
        """A metered route's hold: the most it can charge."""
        return self.unit_price * self.max_units


@dataclass(frozen=True, slots=True)
class Capture:
    """What to do with a hold once the response is seen."""

    amount: int  # atomic units to capture; the rest of the hold goes back
    release: bool  # the whole hold goes back and the nonce is freed (a failed response)
    units: int | None = None  # metered: the units charged
    usage: str = ""  # metered: "reported", "missing", "malformed" or "capped"
    response: str = ""  # the response kept for the payment's retries (server/replays.py)


def captured(phase: ResponsePhase, held: int, status: int, usage: str | None) -> Capture:
    """The capture for a response with `status` and the service's usage value (None: not
    reported). Never more than `held`."""
    if status >= phase.failure_status or status < 100:
        return Capture(0, True)
    if not phase.metered:
        return Capture(held, False)
    units, note = _usage(usage, phase.max_units)
    if units is None:
        if phase.usage_missing == USAGE_MINIMUM:
            units = phase.min_units
        else:
            units = held // phase.unit_price if phase.unit_price else 0
    units = max(units, phase.min_units)
    return Capture(min(units * phase.unit_price, held), False, units, note)


def _usage(value: str | None, max_units: int) -> tuple[int | None, str]:
    if value is None:
        return None, "missing"
    value = value.strip()
    if len(value) > MAX_USAGE_DIGITS or not _USAGE.fullmatch(value):
        return None, "malformed"
    units = int(value)
    if units > max_units:
        return max_units, "capped"
    return units, "reported"


def _integer(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(f"{key}: must be an integer {low}..{high}")
    return value


def phase_from(key: str, spec: Mapping[str, object], asset: Asset) -> ResponsePhase | None:
    """A route's response-phase terms from its config keys (ROUTE_KEYS) or, with the same
    names under `x402.`, its Envoy annotations; None for `charge: on_check` (the default,
    unless the route is metered). Raises ConfigError naming `key.<name>`."""
    charge = str(spec.get("charge", "")).lower()
    metered = spec.get("unit_price") not in (None, "")
    if charge and charge not in CHARGES:
        raise ConfigError(f"{key}.charge: one of {', '.join(CHARGES)}")
    if metered and charge == ON_CHECK:
        raise ConfigError(f"{key}.charge: a metered route is charged on_success")
    if not metered and charge != ON_SUCCESS:
        extra = [name for name in ROUTE_KEYS if name != "charge" and name in spec]
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: only for charge: on_success routes")
        return None
    missing = str(spec.get("usage_missing", USAGE_HOLD)).lower()
    if missing not in USAGE_MISSING:
        raise ConfigError(f"{key}.usage_missing: one of {', '.join(USAGE_MISSING)}")
    header = str(spec.get("usage_header", DEFAULT_USAGE_HEADER)).lower()
    if not _HEADER_NAME.fullmatch(header) or header.startswith(ASSERTED_PREFIXES):
        raise ConfigError(f"{key}.usage_header: {header!r} is not a header name of its own")
    phase = ResponsePhase(
        failure_status=_integer(
            f"{key}.failure_status", spec.get("failure_status", DEFAULT_FAILURE_STATUS), 200, 600
        ),
        usage_header=header,
        usage_missing=missing,
        hold_seconds=_integer(
            f"{key}.hold_seconds",
            spec.get("hold_seconds", DEFAULT_HOLD_SECONDS),
            1,
            MAX_HOLD_SECONDS,
        ),
    )
    if not metered:
        for name in ("unit", "max_units", "min_units"):
            if name in spec:
                raise ConfigError(f"{key}.{name}: only with unit_price (a metered route)")
        return phase
    unit_price = spec.get("unit_price")
    if not isinstance(unit_price, str):
        raise ConfigError(f'{key}.unit_price: write the unit price as a string, like "0.001"')
    try:
        atomic = asset.to_atomic(unit_price)
    except AmountError as exc:
        raise ConfigError(f"{key}.unit_price: {exc}") from None
    if atomic <= 0:
        raise ConfigError(f"{key}.unit_price: must be above zero")
    max_units = _integer(f"{key}.max_units", spec.get("max_units"), 1, MAX_BALANCE)
    min_units = _integer(f"{key}.min_units", spec.get("min_units", 0), 0, max_units)
    if atomic * max_units > MAX_BALANCE:
        raise ConfigError(f"{key}.max_units: the hold exceeds the ledger's maximum balance")
    unit = str(spec.get("unit", "unit"))
    return ResponsePhase(
        phase.failure_status,
        header,
        missing,
        unit,
        atomic,
        max_units,
        min_units,
        phase.hold_seconds,
    )


def phase_annotations(phase: ResponsePhase | None, asset: Asset) -> dict[str, str]:
    """The Envoy per-route annotations (context_extensions) of a response phase."""
    if phase is None:
        return {}
    out = {
        EXT_CHARGE: ON_SUCCESS,
        EXT_PHASE: PHASE_RESPONSE,
        EXT_FAILURE_STATUS: str(phase.failure_status),
        EXT_USAGE_HEADER: phase.usage_header,
        EXT_HOLD_SECONDS: str(phase.hold_seconds),
    }
    if phase.metered:
        out.update(
            {
                EXT_UNIT: phase.unit,
                EXT_UNIT_PRICE: asset.to_decimal(phase.unit_price),
                EXT_MAX_UNITS: str(phase.max_units),
                EXT_MIN_UNITS: str(phase.min_units),
                EXT_USAGE_MISSING: phase.usage_missing,
            }
        )
    return out


def from_annotations(key: str, extensions: Mapping[str, str], asset: Asset) -> ResponsePhase | None:
    """The response phase of Envoy's `x402.*` annotations (see `phase_annotations`)."""
    spec = {name: extensions[f"x402.{name}"] for name in ROUTE_KEYS if f"x402.{name}" in extensions}
    return phase_from(key, spec, asset)


def describe(phase: ResponsePhase | None, asset: Asset) -> dict[str, str]:
    """A route's charge terms for discovery and the 402 (wire decimals)."""
    if phase is None:
        return {}
    out = {"charge": ON_SUCCESS, "failure_status": str(phase.failure_status)}
    if phase.metered:
        out.update(
            unit=phase.unit,
            unit_price=asset.to_decimal(phase.unit_price),
            max_units=str(phase.max_units),
            min_units=str(phase.min_units),
            usage_missing=phase.usage_missing,
        )
    return out


def spec_annotations(spec: Mapping[str, object]) -> dict[str, str]:
    """A config route's response-phase keys as Envoy annotations, as written (the sidecar
    checks them: from_annotations); {} for a route charged on check."""
    charge = str(spec.get("charge", "")).lower()
    if charge != ON_SUCCESS and spec.get("unit_price") in (None, ""):
        return {}
    out = {f"x402.{name}": str(spec[name]) for name in ROUTE_KEYS if name in spec}
    out.update({EXT_CHARGE: ON_SUCCESS, EXT_PHASE: PHASE_RESPONSE})
    return out


def route_timeout(spec: Mapping[str, object], upstream_timeout: int) -> int:
    """Envoy's route timeout (seconds) for a route: with a response phase, the service must
    answer within the hold's lifetime, so the response can still capture it."""
    if not spec_annotations(spec):
        return upstream_timeout
    hold_seconds = int(str(spec.get("hold_seconds", DEFAULT_HOLD_SECONDS)))
    limit = max(1, hold_seconds - 1)
    return limit if upstream_timeout == 0 else min(upstream_timeout, limit)
