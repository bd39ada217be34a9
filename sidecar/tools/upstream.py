"""A small demo service to put behind Envoy: it answers JSON and shows what the gateway
told it (payer, amount, receipt id) and that no proof header reached it. With
`log_headers` (the stack's), each request's headers also go to stdout as one JSON line
(upstream.log), so a test sees what reached the service, even for a HEAD.

For routes charged on success it also fails, dawdles and meters on request:
- any path: `?fail=500` answers that status; `?sleep=2.5` waits that long first;
  `?redirect=/path` answers `302 Found` with that Location;
- `POST /api/v1/llm/generate` (JSON `{"prompt", "max_tokens"}`): "generates" max_tokens
  tokens (or one per 4 bytes of body) and reports them in `x402-usage`;
- `GET /api/v1/data/rows?limit=N`: returns N rows and reports `x402-usage: N`;
- `?usage=VALUE` reports that usage value as it is (tests of malformed usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import parse_qs

from sidecar.core.decision import (
    UPSTREAM_AMOUNT,
    UPSTREAM_HOLD,
    UPSTREAM_PAYER,
    UPSTREAM_RECEIPT,
)
from sidecar.core.protocol import PROOF_HEADERS

Headers = dict[str, str]
USAGE_HEADER = "x402-usage"
LLM_PATH, ROWS_PATH = "/api/v1/llm/generate", "/api/v1/data/rows"
MAX_BODY_BYTES = 65536
MAX_SLEEP_SECONDS = 60.0
MAX_ROWS = 100_000
_REASONS = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
}


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


async def respond(
    method: str, path: str, headers: Headers, query: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, Headers, bytes]:  # fmt: skip
    """Status, extra response headers and the JSON body of one request."""
    query = query or {}
    if "sleep" in query:
        with contextlib.suppress(ValueError):
            await asyncio.sleep(min(max(float(query["sleep"]), 0.0), MAX_SLEEP_SECONDS))
    answer: dict[str, object] = {
        "service": "demo-upstream",
        "method": method,
        "path": path,
        "payer": headers.get(UPSTREAM_PAYER),
        "amount": headers.get(UPSTREAM_AMOUNT),
        "receipt_id": headers.get(UPSTREAM_RECEIPT),
        "hold": headers.get(UPSTREAM_HOLD),
        "proof_header_seen": any(h in headers for h in PROOF_HEADERS),
    }
    extra: Headers = {}
    status = _int(query.get("fail"), 200)
    if not 200 <= status <= 599:
        status = 500
    if status >= 400:
        answer["error"] = "demo_failure"
    elif path == LLM_PATH:
        tokens = len(body) // 4
        with contextlib.suppress(ValueError, AttributeError):
            tokens = int(json.loads(body or b"{}").get("max_tokens", tokens))
        tokens = max(0, min(tokens, MAX_ROWS))
        answer["text"] = " ".join("lorem" for _ in range(min(tokens, 64)))
        answer["tokens"] = tokens
        extra[USAGE_HEADER] = str(tokens)
    elif path == ROWS_PATH:
        rows = max(0, min(_int(query.get("limit"), 10), MAX_ROWS))
        answer["rows"] = [{"id": i, "value": i * i} for i in range(rows)]
        extra[USAGE_HEADER] = str(rows)
    if "usage" in query:
        extra[USAGE_HEADER] = query["usage"]
    if query.get("redirect", "").startswith("/"):  # a local path only: no open redirect
        status, extra["location"] = 302, query["redirect"]
    return status, extra, json.dumps(answer).encode()


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log_headers: bool
) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: Headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = min(_int(headers.get("content-length"), 0), MAX_BODY_BYTES)
        body = await reader.readexactly(length) if length > 0 else b""
        path, _, raw_query = target.partition("?")
        query = {k: v[-1] for k, v in parse_qs(raw_query).items()}
        if log_headers:
            print(json.dumps({"method": method, "path": path, "headers": headers}), flush=True)
        status, extra, answer = await respond(method, path, headers, query, body)
        fields = "".join(f"{name}: {value}\r\n" for name, value in extra.items())
        writer.write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(answer)}\r\n"
            f"Cache-Control: no-store\r\n{fields}Connection: close\r\n\r\n".encode()
            + (b"" if method == "HEAD" else answer)
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
        pass  # a broken client; nothing to answer
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int, log_headers: bool = False) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(reader, writer, log_headers)

    server = await asyncio.start_server(handle, host, port, limit=MAX_BODY_BYTES)
    async with server:
        await server.serve_forever()


def run(host: str, port: int, log_headers: bool = False) -> None:
    asyncio.run(serve(host, port, log_headers))
