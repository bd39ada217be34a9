"""A specialist agent as a service, for the swarm lane (examples/swarm_coordinator.py):
it is paid through its own gateway like any x402 API, and to do a task it pays another
API itself (a chained paid call), with its own wallet (X402_WALLET, X402_WALLET_FILE).

Every request is a task: the specialist calls DOWNSTREAM (GET, paid), then answers JSON
with the task, who paid it (the gateway's x-x402-* headers) and the downstream receipt.
`GET /` is its health check.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from sidecar.agent import Wallet, X402Auth, receipt_of
from sidecar.core.decision import UPSTREAM_AMOUNT, UPSTREAM_PAYER, UPSTREAM_RECEIPT


def handler(downstream: str, http: httpx.Client) -> type[BaseHTTPRequestHandler]:
    class Specialist(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/":
                self._answer(200, {"service": "specialist"})
            else:
                self.do_POST()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            task = json.loads(self.rfile.read(length) or b"{}") if length else {}
            paid = http.get(downstream)
            receipt = receipt_of(paid)
            if paid.status_code != 200 or receipt is None or not receipt.verified:
                self._answer(502, {"error": "downstream_failed", "status": paid.status_code})
                return
            self._answer(
                200,
                {
                    "task": task,
                    "paid_by": self.headers.get(UPSTREAM_PAYER),
                    "amount": self.headers.get(UPSTREAM_AMOUNT),
                    "receipt_id": self.headers.get(UPSTREAM_RECEIPT),
                    "downstream": {"amount": receipt.amount, "receipt_id": receipt.receipt_id},
                },
            )

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the gateway's decision log has every request

    return Specialist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--downstream", required=True, help="the paid URL each task calls")
    args = parser.parse_args()
    with httpx.Client(auth=X402Auth(Wallet.from_env(), strict=True), timeout=30) as http:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(args.downstream, http))
        server.serve_forever()


if __name__ == "__main__":
    main()
