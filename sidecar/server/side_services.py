"""What a worker serves on its side port beside the checks: the top-up, self-serve
channels and the facilitators' handshake (readiness); and the start-up line that says how
money paid in is made durable. Built by server/supervisor.py for each worker."""

from __future__ import annotations

from typing import Any

from sidecar.core.decision import Gateway
from sidecar.core.errors import LedgerNotDurable
from sidecar.core.pricing import RouteTable
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.durability import DurableWrites
from sidecar.server.config import Settings
from sidecar.server.handshake import Handshake
from sidecar.server.self_channels import SelfChannels
from sidecar.server.settler import ExactSettler
from sidecar.server.side_port import SidePort
from sidecar.server.topup import TopupService


def side_port(
    settings: Settings,
    routes: RouteTable,
    gateway: Gateway,
    ledger: Ledger,
    settler: ExactSettler | None,
    worker: int,
) -> SidePort:
    """The side port's services: the top-up, self-serve channels, the facilitators'
    handshake (its readiness)."""
    topup = None
    if settler is not None and gateway.exact is not None and gateway.exact.topup:
        asset = routes.assets[gateway.exact.topup["asset"]]
        topup = TopupService(gateway, settler, settler.authorizations, asset)
    terms = settings.channel_terms()
    channels = SelfChannels(gateway, ledger, terms, routes.assets) if terms else None
    side = SidePort(routes, gateway, ledger, topup, channels)
    side.handshake = handshake(settings, settler, gateway, worker)
    return side


def handshake(
    settings: Settings, settler: ExactSettler | None, gateway: Gateway, worker: int
) -> Handshake | None:
    """GET /supported of the facilitators, at start and periodically (server/handshake.py):
    worker 0's says whether the sidecar is ready, and logs; every worker takes the extras."""
    if settler is None or gateway.exact is None:
        return None
    networks = [onchain.network for onchain in gateway.exact.assets.values()]
    interval = float(settings.facilitator_supported_seconds)
    extras = gateway.exact.facilitator_extra
    uptos = gateway.exact.upto_extra
    return Handshake(settler.facilitator, networks, extras, interval, worker == 0, uptos)


async def log_durability(log: Any, durable: DurableWrites) -> None:
    """How this ledger makes a top-up's credit durable, at start; refused: an error line
    (top-ups answer 503 ledger_not_durable until the server allows them; /readyz says so)."""
    mode = await durable.refresh()
    log.info("ledger.durability", money_in=mode.kind, detail=mode.detail, replicas=durable.replicas)
    if not mode.takes_money:
        log.error("topup.refused", reason=LedgerNotDurable.reason, detail=mode.detail)
