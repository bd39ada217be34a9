"""The handshake with the facilitators: `GET /supported` of each, at start and then every
`facilitator_supported_seconds` (docs/configuration.md).

Every configured `exact` network must be among a facilitator's kinds (x402 v2, `exact`, the
network or its `eip155:*` wildcard). A facilitator that answers without one is a config
error the sidecar says once, naming the facilitator's host and the network, and holds
against its readiness (`/readyz` 503 `facilitator_unsupported` with the reason) until a
later answer lists it. Until the first round of asking is over the sidecar is not ready
either (`facilitator_pending`). A facilitator that cannot be reached or refuses our
credentials only logs a warning (once, until that changes): `exact` payments then get
their own 503, and prepaid stays served, so readiness does not drop with it.

The answer's `extra` for each network (the first facilitator's that lists it: e.g. a
`feePayer`) joins the offers' `extra` (`ExactTerms.facilitator_extra`, our EIP-712 domain
wins); its `signers` are kept and logged. A network's `upto` kind, when listed, gives its
`extra` (the facilitatorAddress the payer's signature binds) to `ExactTerms.upto_extra`:
`upto` is offered there from then on; not listing it is no error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from sidecar.core import exact, upto
from sidecar.core.errors import FacilitatorUnavailable
from sidecar.server import logs
from sidecar.server.facilitation import Endpoint, FacilitatorClient, Supported

PENDING, READY, UNSUPPORTED = "facilitator_pending", "ready", "facilitator_unsupported"
RETRY_SECONDS = 2.0  # between rounds while no facilitator has ever answered

log = logs.get_logger("sidecar.handshake")


class Handshake:
    def __init__(
        self,
        client: FacilitatorClient,
        networks: Sequence[str],
        extras: MutableMapping[str, Mapping[str, Any]],
        interval: float,
        speak: bool = True,
        upto: MutableMapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """`networks`: the configured `exact` networks; `extras`: where each network's
        facilitator `extra` goes (the offers read it); `speak`: this worker logs (worker
        0; the others only take the extras)."""
        self.client, self.networks, self.extras = client, list(dict.fromkeys(networks)), extras
        self.interval, self.speak = interval, speak
        self.upto = upto  # where each network's `upto` kind extra goes (facilitatorAddress)
        self.state, self.reason = PENDING, "no facilitator has answered GET /supported yet"
        self.signers: dict[str, Mapping[str, tuple[str, ...]]] = {}
        self.answered = False  # has any facilitator ever answered
        self._silent: dict[str, str] = {}  # facilitator → why it did not answer (logged once)

    async def once(self) -> None:
        """Ask every facilitator; update the state, the extras and the signers."""
        problems, answered, extras = [], False, {}
        uptos: dict[str, Mapping[str, Any]] = {}
        for endpoint in self.client.endpoints:
            supported = await self._ask(endpoint)
            if supported is None:
                continue
            answered = True
            self.signers[endpoint.host] = supported.signers
            missing = [n for n in self.networks if supported.kind(exact.SCHEME, n) is None]
            if missing:
                offered = sorted({f"{k.scheme} on {k.network}" for k in supported.kinds})
                problems.append(
                    f"the facilitator {endpoint.host} does not support "
                    f"{', '.join(f'exact on {n}' for n in missing)} "
                    f"(GET /supported lists: {', '.join(offered) or 'nothing'})"
                )
            for network in self.networks:
                kind = supported.kind(exact.SCHEME, network)
                if kind is not None and network not in extras:
                    extras[network] = dict(kind.extra)
                kind = supported.kind(upto.SCHEME, network)  # optional: offered if listed
                if kind is not None and network not in uptos:
                    uptos[network] = dict(kind.extra)
        if answered:
            self.answered = True
            self.extras.clear()
            self.extras.update(extras)
            if self.upto is not None:
                self.upto.clear()
                self.upto.update(uptos)
        if problems:
            self._become(UNSUPPORTED, "; ".join(problems))
        elif answered or self.state == PENDING:
            self._become(READY, "")

    async def _ask(self, endpoint: Endpoint) -> Supported | None:
        try:
            supported = await self.client.supported(endpoint)
        except FacilitatorUnavailable as exc:
            if self.speak and self._silent.get(endpoint.host) != exc.message:
                log.warning("facilitator.unanswered", facilitator=endpoint.host, cause=exc.message)
            self._silent[endpoint.host] = exc.message
            return None
        if self.speak and endpoint.host in self._silent:
            log.info("facilitator.answered", facilitator=endpoint.host)
        self._silent.pop(endpoint.host, None)
        return supported

    def _become(self, state: str, reason: str) -> None:
        changed = (state, reason) != (self.state, self.reason)
        self.state, self.reason = state, reason
        if not (changed and self.speak):
            return
        if state == UNSUPPORTED:
            log.error("facilitator.unsupported", reason=reason)
        elif self.signers:
            signers = {host: dict(found) for host, found in self.signers.items()}
            log.info("facilitator.supported", networks=self.networks, signers=signers)

    async def run(self) -> None:
        """Forever: a round now, then every `interval` (sooner while none ever answered)."""
        while True:
            try:
                await self.once()
            except Exception:  # never let the loop die on a surprise; say it
                log.exception("facilitator.handshake_error")
            await asyncio.sleep(self.interval if self.answered else RETRY_SECONDS)
