"""What the dashboard's recent-decisions feed costs the paid path: the real ext_authz
servicer in process against a real Redis, paid direct proofs, CPU time per check with
the decision log's lines also going to the capped stream (server/feed.py) and without.

    .venv/bin/python -m bench.feed [--checks 20000] [--rounds 3]

Both variants run in the same process, alternating, and the best round of each counts
(the machine is shared). The numbers go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import time
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as authz

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.ledger import decisions
from sidecar.ledger.accounts import Ledger
from sidecar.server.authz.check import CheckService
from sidecar.server.authz.grpc_transport import check_message
from sidecar.server.config import Settings
from sidecar.server.feed import DecisionFeed
from sidecar.server.logs import DecisionLog
from sidecar.tools.stack import Stack

PATH = "/api/v1/trade/verify/T-{n}"
ROUTES = {"verify": {"method": "GET", "path": "/api/v1/trade/verify/{trade_id}", "price": "0.01"}}
CONCURRENCY = 64


def requests(stack: Stack, wallet: Identity, count: int, offset: int) -> list[authz.CheckRequest]:
    made = []
    expires = int(time.time()) + 280
    for n in range(offset, offset + count):
        path = PATH.format(n=n)
        terms = protocol.direct_terms(
            f"GET {path}", "USDF", "0.01", stack.gateway_identity.kid, expires
        )
        request = authz.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path, http.host, http.scheme = "GET", path, "bench", "http"
        http.headers["x-payment"] = protocol.encode_header(protocol.sign_proof(terms, wallet))
        made.append(request)
    return made


async def run(servicer: CheckService, batch: list[authz.CheckRequest]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for the batch, CONCURRENCY checks in flight."""
    queue = list(reversed(batch))

    async def worker() -> None:
        while queue:
            response = await check_message(servicer, queue.pop())
            assert response.status.code == 0, response

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    servicer.decisions.flush()
    return time.process_time() - cpu, time.perf_counter() - wall


async def main_async(checks: int, rounds: int) -> dict[str, Any]:
    stack = Stack(ROUTES)
    try:
        stack.write_files()
        stack.start_redis()
        settings = Settings.load(stack.config_path, env={})
        ledger = Ledger.from_url(stack.redis_url)
        wallet = Identity.generate()
        await ledger.register(wallet.public_key)
        await ledger.credit(wallet.public_key, "USDF", 10**15, "bench")
        feed = DecisionFeed(ledger)
        variants = {
            "without feed": DecisionLog(stream=io.StringIO()),
            "with feed": DecisionLog(stream=io.StringIO(), sink=feed),
        }
        best: dict[str, float] = {}
        offset = 0
        for _round in range(rounds):
            for name, log in variants.items():
                servicer = CheckService(
                    settings.route_table(), settings.gateway(), ledger, decisions=log
                )
                batch = requests(stack, wallet, checks, offset)
                offset += checks
                log.stream = io.StringIO()
                cpu, _wall = await run(servicer, batch)
                await feed.close()
                per_check = cpu / checks * 1e6
                best[name] = min(best.get(name, per_check), per_check)
                print(f"{name}: {per_check:.1f} µs CPU per paid check")
        kept = await decisions.kept(ledger)
        await ledger.close()
        return {"best_us": best, "dropped": feed.dropped, "stream_length": kept}
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    result = asyncio.run(main_async(args.checks, args.rounds))
    best = result["best_us"]
    ratio = best["with feed"] / best["without feed"]
    print(
        f"best: without {best['without feed']:.1f} µs, with {best['with feed']:.1f} µs "
        f"per paid check (x{ratio:.3f}); lines dropped {result['dropped']}, "
        f"stream length {result['stream_length']}"
    )


if __name__ == "__main__":
    main()
