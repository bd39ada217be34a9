"""A protected service with credentialed CORS for its own origin, as a cookie-authenticated
web app answers: `python -m tests.support.cors_service PORT`. Every answer's body lists the
Cookie headers that reached it."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ORIGIN = "https://service.example"  # the service's own web app
SERVICE_HEADER = "x-service-token"  # what its own preflight allows


class Handler(BaseHTTPRequestHandler):
    def _cors(self) -> None:
        self.send_header("access-control-allow-origin", ORIGIN)
        self.send_header("access-control-allow-credentials", "true")
        self.send_header("vary", "origin")

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self._cors()
        self.send_header("access-control-allow-methods", "PUT")
        self.send_header("access-control-allow-headers", SERVICE_HEADER)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = json.dumps({"cookies": self.headers.get_all("cookie") or []}).encode()
        self.send_response(200)
        self._cors()
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
