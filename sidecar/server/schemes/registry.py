"""The one registry of payment kinds: adding one is a module beside this one and a line
here (docs/architecture.md, "Add a payment kind")."""

from __future__ import annotations

from typing import Any

from sidecar.core import protocol
from sidecar.core.decision import Gateway
from sidecar.ledger.accounts import Ledger
from sidecar.server.schemes.base import HoldingScheme, Scheme
from sidecar.server.schemes.channel import Channel
from sidecar.server.schemes.exact import Exact
from sidecar.server.schemes.prepaid import Prepaid
from sidecar.server.schemes.upto import Upto
from sidecar.server.settler import ExactSettler


class Schemes:
    """The schemes this gateway accepts, by their wire name."""

    def __init__(
        self, gateway: Gateway, ledger: Ledger, settler: ExactSettler | None = None
    ) -> None:
        kinds: list[Scheme[Any]] = [Prepaid(gateway, ledger), Channel(gateway, ledger)]
        if gateway.exact is not None and settler is not None:
            kinds += [Exact(gateway, settler), Upto(gateway, settler)]
        self.by_name = {kind.name: kind for kind in kinds}
        # Those with a hold step, for routes charged on success.
        self.holding: dict[str, HoldingScheme[Any]] = {
            kind.name: kind for kind in kinds if isinstance(kind, HoldingScheme)
        }
        # A payment naming no scheme we know is parsed as a proof, which names the reason.
        self.default = self.by_name[protocol.SCHEME]

    def pick(self, name: str) -> Scheme[Any]:
        return self.by_name.get(name, self.default)
