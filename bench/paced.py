"""Paid requests at a constant rate (wrk only runs closed-loop), one pre-signed proof each.

Request i is due at start + i / rate, whatever happened to earlier ones (open loop), on the
first idle keep-alive connection; latency runs from the due time, so a stall is not hidden.
Raw HTTP/1.1 on asyncio streams: the client costs a few µs a request, not httpx's ~0.5 ms,
so at 500 req/s on 2 cores it leaves the CPU to the stack it measures.

    python -m bench.paced --url http://127.0.0.1:10000/api/v1/bench/paid --rate 500 \
        --seconds 10 --proofs proofs.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from sidecar.tools.load import percentiles


async def run(url: str, rate: float, seconds: float, proofs: list[str], connections: int) -> Any:
    components = urlsplit(url)
    host, port = components.hostname or "127.0.0.1", components.port or 80
    head = f"GET {components.path} HTTP/1.1\r\nHost: {components.netloc}\r\nX-Payment: "
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, port))
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    total = min(len(proofs), int(rate * seconds))
    start = time.perf_counter() + 0.05

    async def one(index: int, due: float) -> None:
        reader, writer = await idle.get()
        try:
            writer.write(f"{head}{proofs[index]}\r\n\r\n".encode())
            status_line = await reader.readuntil(b"\r\n")
            headers = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in headers.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            statuses[int(status_line.split()[1])] += 1
            latencies.append((time.perf_counter() - due) * 1000)
        finally:
            idle.put_nowait((reader, writer))

    pending = []
    for index in range(total):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.ensure_future(one(index, due)))
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait()[1].close()
    return {
        "sent": total,
        "seconds": round(elapsed, 3),
        "rate": round(total / elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_ms": percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--proofs", required=True, help="one X-Payment value per line")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with open(args.proofs, encoding="ascii") as lines:
        proofs = lines.read().split()
    import uvloop

    result = uvloop.run(run(args.url, args.rate, args.seconds, proofs, args.connections))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
