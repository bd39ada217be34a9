"""`/verify` off the settling process, for `x402 facilitator serve --verify-processes N`
(tools/facilitator.py).

One process holds the signing key's nonces, so every settlement stays in it; but the
official scheme's Python (web3's encoders and middleware, the signature checks, the
simulation) is GIL-bound, and one process ran out of CPU near 20-30 payments/s
(docs/performance.md). A /verify signs nothing, so it can run anywhere: here in a pool of
processes, each with its own copy of the official facilitator, built as the serving one
is (tools/facilitator.py `build_known`, asking nothing of the chain). A process that dies
(killed, out of memory) breaks the pool for good: the next /verify replaces it and is
answered there.

A payment's /settle usually follows its /verify within a few hundred milliseconds, and the
official `exact` settle verifies again, simulating the transfer once more. `Simulated`
remembers, for FRESH_SECONDS, the payloads a /verify of this process simulated and found
valid; their settle skips only the second simulation (every other check still runs). A
payload settled is forgotten, so the same payload settled again is simulated and refused
before anything is broadcast.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from x402.schemas import SchemeNotFoundError, VerifyResponse

FRESH_SECONDS = 10.0  # how long a /verify's simulation stands for the settle that follows
MAX_REMEMBERED = 100_000  # a bound on memory if settles never come

_worker: Any = None  # the pool process's own official facilitator
log = logging.getLogger("sidecar.facilitator")


def _start(build: Callable[[str, str, str], Any], rpc_url: str, key: str, network: str) -> None:
    global _worker
    _worker = build(rpc_url, key, network).facilitator


def _ready() -> None:
    time.sleep(0.2)  # long enough that each warm-up call lands in a process of its own


def _verify(payload: Any, requirements: Any) -> VerifyResponse | tuple[str, str, str]:
    """The official /verify, in a pool process; a refusal the server reports as an
    invalid payment comes back as (reason, message, network): exceptions may not pickle."""
    try:
        result: VerifyResponse = _worker.verify(payload, requirements)
        return result
    except SchemeNotFoundError as exc:
        return ("unsupported_scheme", str(exc), str(exc.network))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return ("invalid_payload", str(exc), str(payload.get_network()))


class VerifyPool:
    """`processes` pool processes answering /verify with the official facilitator, each
    built by `build` (tools/facilitator.py's, passed by reference to each process)."""

    def __init__(
        self,
        processes: int,
        build: Callable[[str, str, str], Any],
        rpc_url: str,
        key: str,
        network: str,
    ) -> None:
        self.processes = processes
        self.initargs = (build, rpc_url, key, network)
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),  # never fork a threaded server
            initializer=_start,
            initargs=self.initargs,
        )

    async def start(self) -> None:
        """Every process up and its facilitator built, before the server says it is ready."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self.pool, _ready) for _ in range(self.processes))
        )

    async def verify(self, payload: Any, requirements: Any) -> VerifyResponse | tuple[str, ...]:
        """/verify in a pool process. A pool whose process died (killed, out of memory) is
        broken for good: it is replaced, and the call asked again there (a /verify moves
        nothing, so asking twice is safe)."""
        loop = asyncio.get_running_loop()
        pool = self.pool
        try:
            return await loop.run_in_executor(pool, _verify, payload, requirements)
        except BrokenProcessPool:
            if self.pool is pool:  # the first call to see it replaces it
                log.warning("a /verify process died: its pool of %d is replaced", self.processes)
                pool.shutdown(wait=False, cancel_futures=True)
                self.pool = self._new_pool()
            return await loop.run_in_executor(self.pool, _verify, payload, requirements)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Simulated:
    """The `exact` payloads a /verify simulated and found valid moments ago."""

    def __init__(self, fresh: float = FRESH_SECONDS) -> None:
        self.fresh = fresh
        self.until: dict[str, float] = {}

    @staticmethod
    def key(body: dict[str, Any]) -> str:
        """The payload and the requirements it was verified against, as sent."""
        both = [body["paymentPayload"], body["paymentRequirements"]]
        return hashlib.sha256(json.dumps(both, sort_keys=True).encode()).hexdigest()

    def remember(self, body: dict[str, Any]) -> None:
        now = time.monotonic()
        if len(self.until) >= MAX_REMEMBERED:
            self.until = {k: t for k, t in self.until.items() if t > now}
            if len(self.until) >= MAX_REMEMBERED:
                return  # all fresh: this one's settle simulates, as it would anyway
        self.until[self.key(body)] = now + self.fresh

    def take(self, body: dict[str, Any]) -> bool:
        """Was this payload simulated moments ago? Forgotten either way: only its first
        settle may skip the simulation."""
        return self.until.pop(self.key(body), 0.0) > time.monotonic()
