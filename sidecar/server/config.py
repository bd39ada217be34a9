"""Settings: one YAML file, then `X402_<KEY>` environment overrides for every scalar key.

Bad config stops start-up with a message naming the key; secret values are never echoed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from sidecar.core import exact, mcp, phases
from sidecar.core.decision import Gateway
from sidecar.core.errors import AmountError, ConfigError
from sidecar.core.identity import KeySet, load_signing_key, read_secret
from sidecar.core.money import MAX_BALANCE, Asset
from sidecar.core.pricing import (
    ANY_METHOD,
    Price,
    Route,
    RouteTable,
    refuse_ambiguity,
    validate_path,
)
from sidecar.server import listing, networks
from sidecar.server.anchor_settings import AnchorChain
from sidecar.server.channel_config import ChannelTerms
from sidecar.server.config_values import (
    ENV_PREFIX,
    UniqueKeyLoader,
    available_cores,
    coerce,
    named,
    one_line,
)
from sidecar.server.durability_settings import Durability
from sidecar.server.envoy.contract import TOPUP_PATH
from sidecar.server.envoy.edge import Edge
from sidecar.server.envoy.routes import listens_http
from sidecar.server.facilitators import FacilitatorSpec, specs
from sidecar.server.paywall_settings import ROUTE_KEY as PAYWALL_ROUTE_KEY
from sidecar.server.paywall_settings import PaywallSettings
from sidecar.server.replay_settings import DEFAULT_BODY_MAX_BYTES, DEFAULT_PER_PAYER, ReplaySettings

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", ANY_METHOD}
MIN_SECRET_BYTES = 16
MAX_REDELIVERIES = 100


@dataclass(frozen=True)
class Settings:
    listen_grpc: str = "127.0.0.1:9001"  # ext_authz, MCP routes' response phase, gRPC health
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
    # Batches' Merkle roots on chain too (AnchorChain below): {rpc_url, contract, key_file}.
    anchor_chain: Mapping[str, Any] = field(default_factory=dict)
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
    # Or several, in order, with credentials (server/facilitators.py): [{url, headers_file
    # | cdp_api_key_file}]; asked GET /supported at start and this often (readiness).
    facilitators: list[Mapping[str, Any]] = field(default_factory=list)
    facilitator_supported_seconds: int = 60
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
    # Self-serve channels (POST /x402/channel/open, /close): server/channel_config.py.
    channels: Mapping[str, Any] = field(default_factory=dict)
    # What browsers get on a priced route (on, off, or a mapping): server/paywall_settings.py.
    paywall: Any = None
    # A retry of a payment already charged (lost answer): served again, uncharged, at most
    # this many times per payment; then nonce_reused (docs/protocol.md §13).
    redelivery_limit: int = 3
    # Durable money-in and reconciliation with the chain (server/durability_settings.py).
    durability: Mapping[str, Any] = field(default_factory=dict)
    # A retry on a route with a response phase is answered with the recorded response:
    # bodies up to this many bytes, this many per payer at once (server/replay_settings.py).
    replay_body_max_bytes: int = DEFAULT_BODY_MAX_BYTES
    replay_per_payer: int = DEFAULT_PER_PAYER

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
                raise ConfigError(f"config {path} is not valid YAML: {one_line(exc)}") from None
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
            values[name] = coerce(name, value, default, from_env)
        settings = cls(**values)
        try:  # validate routes and assets now, not at the first request
            settings.route_table()
            settings.route_extensions()
            settings.edge_config()
            settings.exact_terms()
            settings.dashboard_origin()
            settings.anchor_chain_config()
            settings.channel_terms()
            settings.paywall_settings()
            settings.replay_settings()
            if not 0 <= settings.redelivery_limit <= MAX_REDELIVERIES:
                raise ConfigError(f"config redelivery_limit: 0 to {MAX_REDELIVERIES}")
            settings.durability_config()
        except ConfigError as exc:
            raise named(exc, from_env) from None
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
            entry = networks.resolve(str(code), spec)  # `network: base-sepolia` presets
            tokens[str(code)] = exact.onchain_from_config(
                str(code), entry, assets[str(code)].decimals
            )
            networks.check_address(f"config onchain.{code}.token", tokens[str(code)].token)
        if not self.pay_to:
            raise ConfigError("config pay_to: the operator's 0x address (required with onchain)")
        networks.check_address("config pay_to", self.pay_to)
        facilitators = self.facilitator_specs()
        if not facilitators:
            raise ConfigError("config facilitator_url or facilitators: required with onchain")
        if self.chain_rpc_url and not self.chain_rpc_url.startswith(("http://", "https://")):
            raise ConfigError("config chain_rpc_url: an http(s) URL")
        for key in ("exact_max_timeout_seconds", "facilitator_verify_timeout_ms",
                    "facilitator_settle_timeout_ms"):  # fmt: skip
            if getattr(self, key) == 0:
                raise ConfigError(f"config {key}: must be at least 1")
        if self.chain_lookup_ms < 0:
            raise ConfigError("config chain_lookup_ms: must be 0 or more")
        return exact.ExactTerms(
            tokens,
            self.pay_to,
            exact.published_url(facilitators[0].url),
            self.exact_max_timeout_seconds,
            self.topup_terms(tokens, assets),
            upto_extensions=_upto_extensions(),
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

    def facilitator_specs(self) -> tuple[FacilitatorSpec, ...]:
        """`facilitators`, or `facilitator_url` as a list of one, checked."""
        return specs(self.facilitators, self.facilitator_url)

    def channel_terms(self) -> ChannelTerms | None:
        """The `channels` group, checked (None: self-serve channels are off)."""
        return ChannelTerms.from_mapping(self.channels, self.asset_table(), self.default_asset)

    def replay_settings(self) -> ReplaySettings:
        """The recorded-response limits, checked (server/replay_settings.py)."""
        return ReplaySettings.from_config(self.replay_body_max_bytes, self.replay_per_payer)

    def paywall_settings(self) -> PaywallSettings:
        """The `paywall` value and each route's `paywall: on|off`, checked."""
        return PaywallSettings.from_config(self.paywall, self.routes)

    def durability_config(self) -> Durability:
        """The `durability` mapping, checked."""
        return Durability.from_mapping(self.durability)

    def edge_config(self) -> Edge:
        """The `edge` mapping, checked: Envoy's timeouts, limits and header policy."""
        return Edge.from_mapping(self.edge)

    def anchor_chain_config(self) -> AnchorChain | None:
        """The `anchor_chain` mapping, checked; None: batches are not anchored on chain."""
        return AnchorChain.from_mapping(self.anchor_chain)

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

    @property
    def listens_http(self) -> bool:
        """Workers listen on listen_authz_http (envoy/routes.py listens_http)."""
        return listens_http(self.transport, self.routes)

    def route_table(self) -> RouteTable:
        assets = self.asset_table()
        routes = []
        for name, spec in self.routes.items():
            key = f"config routes.{name}"
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{key}: must be a mapping with method, path and price")
            unknown = set(spec) - {"method", "path", "price", "asset", "description"}
            unknown -= set(phases.ROUTE_KEYS)  # charge: on_success and metering
            unknown -= set(listing.ROUTE_KEYS)  # the 402's extensions (bazaar, …)
            unknown.discard(PAYWALL_ROUTE_KEY)  # what browsers get (paywall_settings.py)
            unknown.discard(mcp.ROUTE_KEY)  # an MCP server's tool prices (core/mcp.py)
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
            tools = mcp.route_prices(key, spec, method, asset, phase)
            if tools is not None:
                spec = {**spec, "price": asset.to_decimal(tools.maximum)}
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
                    Price(str(name), amount, asset, description, phase, tools),
                )
            )
        case_sensitive = self.path_case == "sensitive"
        refuse_ambiguity(routes, case_sensitive)
        return RouteTable(routes, assets, self.default_asset, self.unlisted, case_sensitive)

    def route_extensions(self) -> listing.Declarations:
        """Each priced route's x402 extensions (bazaar, payment-identifier), by route and
        method, built once here (server/listing.py)."""
        priced = (r for r in self.route_table().routes if r.price.amount)
        return listing.declarations((r.name, r.method, self.routes[r.name]) for r in priced)

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
            trusted_proxies=self.edge_config().xff_num_trusted_hops,
            exact=self.exact_terms(),
            extensions=self.route_extensions(),
            redelivery_limit=self.redelivery_limit,
            replay_body_max_bytes=self.replay_body_max_bytes,
            replay_per_payer=self.replay_per_payer,
        )


def _upto_extensions() -> dict[str, Any]:
    """What a 402 offering `upto` declares: the official eip2612GasSponsoring extension (a
    payer without a Permit2 approval signs the token's EIP-2612 permit beside it)."""
    from x402.extensions.eip2612_gas_sponsoring import declare_eip2612_gas_sponsoring_extension

    return declare_eip2612_gas_sponsoring_extension()
