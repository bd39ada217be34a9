"""From settings to objects: the one place that reads `Settings` to build the ledger's
pieces (the packages below the server take plain values, not the config)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sidecar.core.decision import Gateway
from sidecar.core.errors import AnchorError, ConfigError
from sidecar.core.identity import KeySet, read_evm_key
from sidecar.ledger import settlement
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.authorizations import Authorizations
from sidecar.ledger.durability import DurableWrites
from sidecar.ledger.payers import Payers
from sidecar.ledger.rate_limit import RateLimiter, rate
from sidecar.server import facilitators
from sidecar.server.anchor_settings import AnchorChain
from sidecar.server.config import Settings
from sidecar.server.facilitation import ChainReader, Endpoint, FacilitatorClient
from sidecar.server.feed import DecisionFeed
from sidecar.server.paywall import Paywall
from sidecar.server.reconcile import Reconciler
from sidecar.server.settler import ExactSettler


def ledger(settings: Settings) -> Ledger:
    return Ledger.from_url(settings.redis_url, timeout=settings.redis_timeout_ms / 1000)


def rate_limiter(settings: Settings, ledger: Ledger) -> RateLimiter | None:
    """None when both limits are off: the servicer then skips the limiter entirely."""
    payer = rate(settings.rate_limit_payer_per_second, settings.rate_limit_payer_burst)
    ip = rate(settings.rate_limit_ip_per_second, settings.rate_limit_ip_burst)
    if payer is None and ip is None:
        return None
    return RateLimiter(ledger, payer, ip)


def paywall(settings: Settings, gateway: Gateway) -> Paywall | None:
    """The browsers' page on priced routes (None: off everywhere), its bundle loaded now."""
    configured = settings.paywall_settings()
    if not configured.anywhere:
        return None
    built = Paywall(configured, gateway)
    built.warm()
    return built


def decision_feed(settings: Settings, ledger: Ledger) -> DecisionFeed | None:
    """Each batch of decision lines also goes to the dashboard's stream (feed.py), capped
    in lines and bytes, while there is a dashboard to read it."""
    if not (settings.dashboard_enabled and settings.decision_stream_max):
        return None
    return DecisionFeed(ledger, settings.decision_stream_max, settings.decision_stream_max_bytes)


def anchor_sinks(
    settings: Settings,
    ledger: Ledger,
    anchor_file: str | None = None,
    fault: settlement.Fault | None = None,
) -> list[settlement.AnchorSink]:
    """The default sinks: the JSONL file (unless "") first, then Redis, then the chain's
    anchor contract where `anchor_chain` is configured."""
    path = settings.anchor_file if anchor_file is None else anchor_file
    sinks: list[settlement.AnchorSink] = [settlement.JsonlSink(path, fault)] if path else []
    sinks.append(settlement.RedisSink(ledger))
    chain = settings.anchor_chain_config()
    if chain is not None:
        sinks.append(chain_sink(chain))
    return sinks


def chain_sink(chain: AnchorChain) -> settlement.AnchorSink:
    """The on-chain sink (ledger/anchors.py, the `evm` extra); ConfigError when the extra
    is missing or the operator's key file is not a private hex key."""
    key = read_evm_key(chain.key_file, "config anchor_chain.key_file")
    try:
        from sidecar.ledger import anchors
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"config anchor_chain: the chain anchor needs the evm extra ({exc.name} is "
            "missing): pip install 'x402-sidecar[evm]'"
        ) from None
    w3 = anchors.connect(chain.rpc_url, float(chain.timeout_seconds))
    try:
        contract = anchors.AnchorContract(w3, chain.contract, float(chain.timeout_seconds))
    except AnchorError as exc:  # a mixed-case address whose checksum is wrong
        raise ConfigError(f"config anchor_chain.contract: {exc}") from None
    return anchors.ChainSink(contract, key)


def settler(
    settings: Settings,
    ledger: Ledger,
    keys: KeySet,
    fault: settlement.Fault | None = None,
    **overrides: Any,
) -> settlement.Settler:
    """A settle worker configured like the sidecar; `overrides` replace Options fields;
    `fault` is the crash tests' hook (settlement.Fault)."""
    options = settlement.Options(
        batch_size=settings.settle_batch_size,
        max_age=float(settings.settle_max_age_seconds),
        lease=float(settings.settle_lease_seconds),
        retention=float(settings.receipt_retention_seconds),
    )
    anchor_file = overrides.pop("anchor_file", None)
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    sinks = anchor_sinks(settings, ledger, anchor_file, fault)
    return settlement.Settler(ledger, keys, settings.asset_table(), sinks, options, fault)


def payers(settings: Settings, ledger: Ledger, payee: str | None = None) -> Payers:
    """The operator's payer service; `payee` (the gateway's key id) is needed for channels."""
    return Payers(ledger, settings.asset_table(), settings.default_asset, payee)


def facilitator_endpoints(settings: Settings) -> list[Endpoint]:
    """The facilitators with their credentials read: a ConfigError names an unusable
    credentials file (missing, readable by others, malformed)."""
    return facilitators.endpoints(settings.facilitator_specs()) if settings.onchain else []


def exact_settler(settings: Settings, ledger: Ledger) -> ExactSettler | None:
    """The facilitator, the chain reader and the reservations of the `exact` scheme; None
    when no on-chain asset is configured."""
    if not settings.onchain:
        return None
    facilitator = FacilitatorClient(
        facilitator_endpoints(settings),
        settings.facilitator_verify_timeout_ms / 1000,
        settings.facilitator_settle_timeout_ms / 1000,
    )
    chain = ChainReader(settings.chain_rpc_url) if settings.chain_rpc_url else None
    lookup = settings.chain_lookup_ms / 1000
    durability = settings.durability_config()
    durable = DurableWrites(ledger, durability.enabled, durability.replicas, durability.timeout_ms)
    return ExactSettler(Authorizations(ledger, durable), facilitator, chain, lookup)


def reconciler(
    settings: Settings, ledger: Ledger, rpc_url: str = ""
) -> tuple[Reconciler, ChainReader]:
    """`x402 reconcile`'s parts: the chain (rpc_url, else chain_rpc_url) and the ledger's
    authorizations, for every `onchain` token paying `pay_to`; close the reader after."""
    terms = settings.exact_terms()
    url = rpc_url or settings.chain_rpc_url
    if terms is None or not url:
        raise ConfigError("reconcile needs an `onchain` token, pay_to and chain_rpc_url")
    chain = ChainReader(url)
    return Reconciler(chain, Authorizations(ledger), terms.assets, terms.pay_to), chain
