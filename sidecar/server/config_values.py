"""How a config value is read: YAML that refuses a key given twice, `X402_*` environment
overrides, and each top-level value checked against its default's type. The settings
themselves are server/config.py."""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from sidecar.core.errors import ConfigError
from sidecar.core.pricing import UNLISTED

ENV_PREFIX = "X402_"
# String keys that take one of a few words (case-insensitive).
CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "unlisted": UNLISTED,
    "path_case": ("sensitive", "insensitive"),
    "transport": ("grpc", "http"),
}


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the
    last one silently: a route, a price or a secret's file overridden by a typo)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # YAML's own constructor refuses it
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(
                    f"line {line}: the key {key!r} appears twice in one mapping "
                    "(YAML would keep only the last)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def one_line(error: yaml.YAMLError) -> str:
    """A YAML error without its multi-line snippet: the problem and where."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        return f"{error.problem} at line {error.problem_mark.line + 1}"
    return " ".join(str(error).split())


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit), so a pod limited to 2 CPUs on a 64-core node runs 2 workers."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # ceiling
    except (OSError, ValueError):
        pass
    return cores


def named(error: ConfigError, from_env: set[str]) -> ConfigError:
    """`config workers: …` → `env X402_WORKERS: …` when the value came from there."""
    found = re.match(r"config (\w+)\b", str(error))
    if found is None or found.group(1) not in from_env:
        return error
    return ConfigError(f"env {ENV_PREFIX}{found.group(1).upper()}{str(error)[found.end() :]}")


def coerce(name: str, value: Any, default: Any, from_env: set[str]) -> Any:
    """Check one top-level value against its default's type; env values arrive as str."""
    try:
        return coerced(name, value, default)
    except ConfigError as exc:
        raise named(exc, from_env) from None


def coerced(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if type(value) is not int or value < 0:
            raise ConfigError(f"config {name}: must be a non-negative integer")
        if (
            name
            in (
                "workers",
                "invoice_ttl_seconds",
                "max_direct_ttl_seconds",
                "max_proof_bytes",
                "settle_batch_size",
                "settle_lease_seconds",
                "hold_sweep_seconds",
                "decision_stream_max_bytes",
                "side_port_max_connections",
                "facilitator_supported_seconds",
            )
            and value == 0
        ):
            raise ConfigError(f"config {name}: must be at least 1")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config {name}: must be a string")
        choices = CHOICES.get(name)
        if choices is not None and value.lower() not in choices:
            raise ConfigError(f"config {name}: one of {', '.join(choices)}")
        return value.lower() if choices is not None else value
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple) or not all(
            isinstance(item, str) and item for item in value
        ):
            raise ConfigError(f"config {name}: must be a list of file paths")
        return tuple(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"config {name}: must be a list")
        return list(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"config {name}: must be a mapping")
    return dict(value)
