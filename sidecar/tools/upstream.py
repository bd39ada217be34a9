"""A small demo service to put behind Envoy: it answers JSON and shows what the gateway
told it (payer, amount, receipt id) and that no proof header reached it. With
`log_headers` (the stack's), each request's headers also go to stdout as one JSON line
(upstream.log), so a test sees what reached the service, even for a HEAD."""

from __future__ import annotations

import asyncio
import json

from sidecar.core.decision import UPSTREAM_AMOUNT, UPSTREAM_PAYER, UPSTREAM_RECEIPT
from sidecar.core.protocol import PROOF_HEADERS
from sidecar.server.side_port import Headers, Reply, start_http


async def respond(method: str, path: str, headers: Headers) -> Reply:
    body = {
        "service": "demo-upstream",
        "method": method,
        "path": path,
        "payer": headers.get(UPSTREAM_PAYER),
        "amount": headers.get(UPSTREAM_AMOUNT),
        "receipt_id": headers.get(UPSTREAM_RECEIPT),
        "proof_header_seen": any(h in headers for h in PROOF_HEADERS),
    }
    return 200, "application/json", json.dumps(body).encode()


async def respond_logged(method: str, path: str, headers: Headers) -> Reply:
    print(json.dumps({"method": method, "path": path, "headers": headers}), flush=True)
    return await respond(method, path, headers)


async def serve(host: str, port: int, log_headers: bool = False) -> None:
    server = await start_http(respond_logged if log_headers else respond, host, port)
    async with server:
        await server.serve_forever()


def run(host: str, port: int, log_headers: bool = False) -> None:
    asyncio.run(serve(host, port, log_headers))
