"""Settings: one YAML file, then `X402_<KEY>` environment overrides for every scalar key.

Bad config stops start-up with a message naming the key; secret values are never echoed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sidecar.core import exact, phases
from sidecar.core.decision import Gateway
from sidecar.core.errors import AmountError, ConfigError
from sidecar.core.identity import KeySet, load_signing_key, read_secret
from sidecar.core.money import MAX_BALANCE, Asset
from sidecar.core.pricing import (
    ANY_METHOD,
    UNLISTED,
    Price,
    Route,
    RouteTable,
    refuse_ambiguity,
    validate_path,
)
from sidecar.server.durability_settings import Durability
from sidecar.server.envoy.contract import TOPUP_PATH
from sidecar.server.envoy.edge import Edge

ENV_PREFIX = "X402_"
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", ANY_METHOD}
# String keys that take one of a few words (case-insensitive).
CHOICES = {
    "log_level": ("debug", "info", "warning", "error"),
    "unlisted": UNLISTED,
    "path_case": ("sensitive", "insensitive"),
    "transport": ("grpc", "http"),
}
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class Settings:
    listen_grpc: str = "127.0.0.1:9001"  # ext_authz, the response phase, gRPC health
    # How Envoy asks for checks: "grpc" (ext_authz v3 Check on listen_grpc) or "http"
    # (Envoy's http_service mode on listen_authz_http; server/authz/http_transport.py).
    transport: str = "grpc"
    listen_authz_http: str = "127.0.0.1:9101"  # transport http: worker i on this port + i
    listen_http: str = "127.0.0.1:9000"  # discovery, /healthz, /readyz (below the workers)
    # /healthz and /readyz alone on a port of their own (worker 0), for kubelet probes when
    # the check and side ports are bound to loopback; "": only on listen_http.
    listen_health: str = ""
    side_port_max_connections: int = 256  # listen_http's open connections at once (worker 0)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_ms: int = 500
    signing_key_file: str = ""  # the current key: the payee of new invoices, signs receipts
    # Keys before a rotation (docs/operations.md): still payees, and they (re-)sign what was
    # paid to them; drop one once its receipts are settled and its channels closed.
    previous_signing_key_files: tuple[str, ...] = ()
    previous_payees_until: int = 0  # unix seconds; after it, proofs to previous keys refused
    invoice_secret_file: str = ""
    log_level: str = "info"
    network: str = "fth:ledger"  # CAIP-2 shaped (namespace:reference), prepaid's `network`
    public_url: str = ""
    invoice_ttl_seconds: int = 300
    max_direct_ttl_seconds: int = 300
    max_proof_bytes: int = 4096
    workers: int = field(default_factory=lambda: available_cores())  # ext_authz processes
    default_asset: str = "USDF"
    assets: Mapping[str, int] = field(default_factory=lambda: {"USDF": 6})
    routes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    unlisted: str = "pass"  # a path no route lists: "pass" (free) or "deny" (404)
    path_case: str = "sensitive"  # "insensitive": /API/x reaches the route /api/x
    # The facilitator admin API (sidecar/admin.py): off unless a credential is configured.
    listen_admin: str = "127.0.0.1:8999"  # below the side port, clear of the workers' ports
    admin_token_file: str = ""  # bearer token, >= 16 bytes
    admin_tls_cert_file: str = ""  # TLS on the admin port ...
    admin_tls_key_file: str = ""
    admin_tls_client_ca_file: str = ""  # ... and mutual TLS: clients need a cert of this CA
    # The operator's web dashboard (server/dashboard): on worker 0 beside the admin API,
    # behind the same admin token; "" turns it off. It needs admin_token_file.
    listen_dashboard: str = "127.0.0.1:8998"
    # Where browsers reach the dashboard behind a TLS proxy (https://ops.example.com): its
    # Origin is accepted on POSTs, and with https the cookie is Secure and __Host-.
    dashboard_public_origin: str = ""
    # Recent decision lines kept in a capped Redis stream for the dashboard (written only
    # while the dashboard is on); 0: none kept.
    decision_stream_max: int = 10000
    # ... and at most about this many bytes of Redis memory (MEMORY USAGE), whatever the
    # lines: each keeps at most 256 bytes of any field (core/decision.FIELD_BYTES).
    decision_stream_max_bytes: int = 4 * 1024 * 1024
    # Settlement batches (sidecar/settlement.py; `x402 settle`, or in the sidecar).
    settle_batch_size: int = 1000  # receipts per batch at most
    settle_max_age_seconds: int = 60  # a partial batch is settled once this old
    settle_lease_seconds: int = 30  # a crashed worker's claim is taken over after this
    settle_interval_seconds: int = 0  # > 0: worker 0 of the sidecar settles this often
    # Settled receipts older than this leave the ledger at the next settle pass (their
    # batch manifests stay); unsettled ones always stay. 0: keep every receipt for ever.
    receipt_retention_seconds: int = 30 * 86400
    # Holds (charge: on_success): worker 0 releases every payer's expired holds this often.
    hold_sweep_seconds: int = 5
    anchor_file: str = "x402-anchors.jsonl"  # append-only manifest log; "" for Redis only
    # Optional rate limits on paid checks (sidecar/ratelimit.py); 0 turns a limit off.
    rate_limit_payer_per_second: int = 0  # paid checks per payer and second
    rate_limit_payer_burst: int = 0  # checks at once after a quiet spell; 0: the rate
    rate_limit_ip_per_second: int = 0  # paid checks per client address and second
    rate_limit_ip_burst: int = 0
    # Envoy's edge hardening, read by `x402 envoy-config` and the stack (Edge below).
    edge: Mapping[str, Any] = field(default_factory=dict)
    # Envoy's admin interface (stats, /ready), as `x402 envoy-config` renders it: keep it on
    # loopback, it can drain and stop Envoy.
    envoy_admin: str = "127.0.0.1:9901"
    # The x402 `exact` scheme (docs/configuration.md): which on-chain token backs which
    # ledger asset ({USDF: {network, token, name, version, decimals}}), who is paid, and the
    # facilitator that verifies and settles. Empty `onchain`: prepaid only.
    onchain: Mapping[str, Any] = field(default_factory=dict)
    facilitator_url: str = ""  # the standard x402 facilitator API (/verify, /settle)
    pay_to: str = ""  # the operator's address, the `payTo` of every exact offer
    exact_max_timeout_seconds: int = 300  # the offer's maxTimeoutSeconds
    facilitator_verify_timeout_ms: int = 5000  # past it: 503 facilitator_unavailable
    facilitator_settle_timeout_ms: int = 20000  # a real chain's settle fits in it
    chain_rpc_url: str = ""  # JSON-RPC of the chain: resolves a settle whose answer was lost
    chain_lookup_ms: int = 3000  # how long the chain is watched for such a settle
    # Self-serve top-ups (POST /x402/topup): an agent buys prepaid credit with `exact`.
    topup_asset: str = ""  # "": the default asset, if a token backs it; "off": no top-ups
    topup_min: str = "1"  # per top-up, in the asset's decimals
    topup_max: str = "1000"
    # Durable money-in and reconciliation with the chain (server/durability_settings.py).
    durability: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        raw: Any = {}
        if path is not None:
            try:
                text = Path(path).read_text(encoding="utf-8")
                raw = yaml.load(text, UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
            except OSError as exc:
                raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
            except ConfigError as exc:
                raise ConfigError(f"config {path} {exc}") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"config {path} is not valid YAML: {_one_line(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError("config must be a YAML mapping of keys to values")
        return cls.from_mapping(raw, os.environ if env is None else env)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
        known = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"config: unknown key {key!r}")
        values: dict[str, Any] = {}
        from_env: set[str] = set()  # errors about these keys name the variable
        for name, spec in known.items():
            env_value = env.get(ENV_PREFIX + name.upper())
            default = spec.default_factory() if spec.default is MISSING else spec.default  # type: ignore[operator]
            value = raw.get(name, default)
            if env_value is not None and isinstance(default, int | str):
                value = env_value
                from_env.add(name)
            values[name] = _coerce(name, value, default, from_env)
        settings = cls(**values)
        try:  # validate routes and assets now, not at the first request
            settings.route_table()
            settings.edge_config()
            settings.exact_terms()
            settings.dashboard_origin()
            settings.durability_config()
        except ConfigError as exc:
            raise _named(exc, from_env) from None
        return settings

    @property
    def dashboard_enabled(self) -> bool:
        """The dashboard is served (by worker 0) only behind the admin token."""
        return bool(self.listen_dashboard and self.admin_token_file)

    def dashboard_origin(self) -> str:
        """`dashboard_public_origin`, checked and as browsers send it ("" when unset)."""
        origin = self.dashboard_public_origin.strip().rstrip("/").lower()
        if not origin:
            return ""
        components = urlsplit(origin)
        if (
            components.scheme not in ("http", "https")
            or not components.hostname
            or "@" in components.netloc
            or components.path
            or components.query
            or components.fragment
        ):
            raise ConfigError(
                "config dashboard_public_origin: scheme://host[:port], nothing more "
                "(e.g. https://ops.example.com)"
            )
        return origin

    def exact_terms(self) -> exact.ExactTerms | None:
        """The `exact` scheme's config, checked (None: no on-chain asset configured)."""
        if exact.CAIP2.fullmatch(self.network) is None:
            raise ConfigError(
                "config network: must be CAIP-2 shaped, namespace:reference (e.g. fth:ledger)"
            )
        if not self.onchain:
            return None
        assets = self.asset_table()
        tokens: dict[str, exact.OnchainAsset] = {}
        for code, spec in self.onchain.items():
            if str(code) not in assets:
                raise ConfigError(f"config onchain.{code}: not a ledger asset (see assets)")
            tokens[str(code)] = exact.onchain_from_config(
                str(code), spec, assets[str(code)].decimals
            )
        if exact.ADDRESS.fullmatch(self.pay_to) is None:
            raise ConfigError("config pay_to: the operator's 0x address (required with onchain)")
        if not self.facilitator_url.startswith(("http://", "https://")):
            raise ConfigError("config facilitator_url: an http(s) URL (required with onchain)")
        if self.chain_rpc_url and not self.chain_rpc_url.startswith(("http://", "https://")):
            raise ConfigError("config chain_rpc_url: an http(s) URL")
        for key in ("exact_max_timeout_seconds", "facilitator_verify_timeout_ms"):
            if getattr(self, key) == 0:
                raise ConfigError(f"config {key}: must be at least 1")
        if self.facilitator_settle_timeout_ms == 0:
            raise ConfigError("config facilitator_settle_timeout_ms: must be at least 1")
        if self.chain_lookup_ms < 0:
            raise ConfigError("config chain_lookup_ms: must be 0 or more")
        return exact.ExactTerms(
            tokens,
            self.pay_to,
            exact.published_url(self.facilitator_url),
            self.exact_max_timeout_seconds,
            self.topup_terms(tokens, assets),
        )

    def topup_terms(
        self, tokens: Mapping[str, exact.OnchainAsset], assets: Mapping[str, Asset]
    ) -> dict[str, Any]:
        """Discovery's `topup` entry ({} when top-ups are off), checked."""
        code = self.topup_asset or self.default_asset
        if self.topup_asset.lower() == "off" or (not self.topup_asset and code not in tokens):
            return {}
        if code not in tokens:
            raise ConfigError(f"config topup_asset: {code!r} is not backed by a token (onchain)")
        asset = assets[code]
        bounds = []
        for key in ("topup_min", "topup_max"):
            try:
                bounds.append(asset.to_atomic(getattr(self, key)))
            except AmountError as exc:
                raise ConfigError(f"config {key}: {exc}") from None
        low, high = bounds
        if not 0 < low <= high <= MAX_BALANCE:
            raise ConfigError("config topup_min, topup_max: need 0 < topup_min <= topup_max")
        return {
            "method": "POST",
            "path": TOPUP_PATH,
            "asset": code,
            "min": asset.to_decimal(low),
            "max": asset.to_decimal(high),
            "min_atomic": low,
            "max_atomic": high,
        }

    def durability_config(self) -> Durability:
        """The `durability` mapping, checked."""
        return Durability.from_mapping(self.durability)

    def edge_config(self) -> Edge:
        """The `edge` mapping, checked: Envoy's timeouts, limits and header policy."""
        return Edge.from_mapping(self.edge)

    def asset_table(self) -> dict[str, Asset]:
        assets: dict[str, Asset] = {}
        for code, spec in self.assets.items():
            decimals = spec.get("decimals") if isinstance(spec, Mapping) else spec
            if type(decimals) is not int or not 0 <= decimals <= 18:
                raise ConfigError(f"config assets.{code}: decimals must be an integer 0..18")
            assets[str(code)] = Asset(str(code), decimals)
        if self.default_asset not in assets:
            raise ConfigError(f"config default_asset: {self.default_asset!r} is not in assets")
        return assets

    def route_table(self) -> RouteTable:
        assets = self.asset_table()
        routes = []
        for name, spec in self.routes.items():
            key = f"config routes.{name}"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{key}: must be a mapping with method, path and price")
            unknown = set(spec) - {"method", "path", "price", "asset", "description"}
            unknown -= set(phases.ROUTE_KEYS)  # charge: on_success and metering
            if unknown:
                raise ConfigError(f"{key}: unknown key {sorted(unknown)[0]!r}")
            method = str(spec.get("method", ANY_METHOD)).upper()
            if method not in METHODS:
                raise ConfigError(f"{key}.method: {method!r} is not an HTTP method or '*'")
            path = spec.get("path")
            try:
                validate_path(path)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ConfigError(f"{key}.path: {exc}") from None
            asset = assets.get(str(spec.get("asset", self.default_asset)))
            if asset is None:
                raise ConfigError(f"{key}.asset: unknown asset {spec.get('asset')!r}")
            phase = phases.phase_from(key, spec, asset)
            if phase is not None and phase.metered:
                if "price" in spec:
                    raise ConfigError(f"{key}.price: a metered route is priced by unit_price")
                spec = {**spec, "price": asset.to_decimal(phase.maximum)}
            price = spec.get("price")
            if isinstance(price, int) and not isinstance(price, bool):
                price = str(price)
            if not isinstance(price, str):
                raise ConfigError(f'{key}.price: write the price as a string, like "0.25"')
            try:
                amount = asset.to_atomic(price)
            except AmountError as exc:
                raise ConfigError(f"{key}.price: {exc}") from None
            if amount > MAX_BALANCE:
                raise ConfigError(f"{key}.price: larger than the ledger's maximum balance")
            description = str(spec.get("description", ""))
            routes.append(
                Route(
                    str(name),
                    method,
                    str(path),
                    Price(str(name), amount, asset, description, phase),
                )
            )
        case_sensitive = self.path_case == "sensitive"
        refuse_ambiguity(routes, case_sensitive)
        return RouteTable(routes, assets, self.default_asset, self.unlisted, case_sensitive)

    def signing_keys(self) -> KeySet:
        """The current signing key and the previous ones; a KeySetError (reason
        key_unreadable, key_mode, key_malformed, duplicate_kid) names the file at fault."""
        if not self.signing_key_file:
            raise ConfigError("config signing_key_file: required (create one: x402 keygen)")
        current = load_signing_key(self.signing_key_file, "config signing_key_file")
        previous = tuple(
            load_signing_key(path, f"config previous_signing_key_files[{index}]")
            for index, path in enumerate(self.previous_signing_key_files)
        )
        return KeySet(current, previous)

    def gateway(self) -> Gateway:
        """Load the secrets this config points at."""
        keys = self.signing_keys()
        if not self.invoice_secret_file:
            raise ConfigError("config invoice_secret_file: required (create one: x402 secret)")
        secret = read_secret(
            self.invoice_secret_file, "config invoice_secret_file", MIN_SECRET_BYTES
        )
        return Gateway(
            identity=keys.current,
            previous=keys.previous,
            previous_until=self.previous_payees_until,
            invoice_secret=secret,
            invoice_ttl=self.invoice_ttl_seconds,
            max_direct_ttl=self.max_direct_ttl_seconds,
            max_proof_bytes=self.max_proof_bytes,
            network=self.network,
            public_url=exact.published_url(self.public_url),
            exact=self.exact_terms(),
        )


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


def _one_line(error: yaml.YAMLError) -> str:
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


def _named(error: ConfigError, from_env: set[str]) -> ConfigError:
    """`config workers: …` → `env X402_WORKERS: …` when the value came from there."""
    found = re.match(r"config (\w+)\b", str(error))
    if found is None or found.group(1) not in from_env:
        return error
    return ConfigError(f"env {ENV_PREFIX}{found.group(1).upper()}{str(error)[found.end() :]}")


def _coerce(name: str, value: Any, default: Any, from_env: set[str]) -> Any:
    """Check one top-level value against its default's type; env values arrive as str."""
    try:
        return _coerced(name, value, default)
    except ConfigError as exc:
        raise _named(exc, from_env) from None


def _coerced(name: str, value: Any, default: Any) -> Any:
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
    if not isinstance(value, Mapping):
        raise ConfigError(f"config {name}: must be a mapping")
    return dict(value)
