"""Optional rate limits on paid checks: per payer and per client address, in Redis.

Off by default (`rate_limit_payer_per_second`, `rate_limit_ip_per_second`): then the
servicer holds no limiter and a check pays nothing for this module. On, a check whose
proof (or voucher) passed every check but the ledger asks Redis first (rate_limit.lua, one
EVALSHA per limit on the pipelined client) and is refused `429 rate_limited` with
`Retry-After` before the debit, so a refused check charges nothing and leaves its nonce
unused. Only proofs whose signature verified count, so no one can spend another payer's
allowance; a replayed proof takes no token from its payer.

The buckets live in Redis, so a limit holds across every worker and replica. Each is one
key: the payer's under the payer's hash tag, the address's under its own, so each call
goes to one slot on Redis Cluster. Redis unreachable → `503 ledger_unavailable`, never a
pass: a limiter outage is the ledger's outage, no worse.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import RateLimited
from sidecar.ledger import keyspace, scripts
from sidecar.ledger.accounts import Ledger, unavailable
from sidecar.ledger.pipe import RedisPipeError

UNKNOWN_ADDRESS = "unknown"  # a check without a source address: all such share one bucket


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: int  # >= 1
    burst: int  # >= 1: checks allowed at once after a quiet spell


class RateLimiter:
    def __init__(self, ledger: Ledger, payer: Rate | None = None, ip: Rate | None = None) -> None:
        self._pipe = ledger._pipe  # the hot path's pipelined client
        self.payer = payer
        self.ip = ip

    async def check(self, payer: str, address: str, nonce: str | None = None) -> None:
        """Raise RateLimited (429) if either limit is exhausted, LedgerUnavailable if Redis
        does not answer. `nonce`: a proof's nonce, so a replay takes no payer token."""
        calls = []
        if self.ip is not None:
            key = keyspace.ip_rate(address or UNKNOWN_ADDRESS)
            calls.append(self._take("ip", self.ip, (key,)))
        if self.payer is not None:
            keys: tuple[str, ...] = (keyspace.payer_rate(payer),)
            if nonce is not None:
                keys += (keyspace.nonce(payer, nonce),)
            calls.append(self._take("payer", self.payer, keys))
        if len(calls) == 1:
            await calls[0]
        else:  # both limits: sent together, one round trip (two slots on a cluster)
            await asyncio.gather(*calls)

    async def _take(self, limit: str, rate: Rate, keys: tuple[str, ...]) -> None:
        try:
            reply: Any = await self._pipe.evalsha(scripts.RATE, keys, (rate.per_second, rate.burst))
        except RedisPipeError as exc:
            # Fail closed, exactly like the debit would: the limiter is the ledger's Redis.
            raise unavailable(exc) from exc
        if reply[0] == "ok":
            return
        wait_ms = int(reply[1])
        raise RateLimited(
            f"too many paid requests for this {'payer' if limit == 'payer' else 'address'}; "
            f"at most {rate.per_second} per second",
            limit=limit,
            retry_after=max(1, -(-wait_ms // 1000)),  # whole seconds, rounded up
        )


def rate(per_second: int, burst: int) -> Rate | None:
    if per_second <= 0:
        return None
    return Rate(per_second, burst or per_second)
