"""Who may see the dashboard: the admin token, as a bearer header or through a login form
that opens a session (cookie HttpOnly, SameSite=Strict); CSRF checks on every POST.

The token is compared in constant time (hmac.compare_digest). Sessions live in worker 0's
memory (the only process serving the dashboard): a restart logs everyone out. A session
carries its own CSRF token, required in every state-changing form; a POST whose Origin
(or Sec-Fetch-Site) says it came from another site is refused before anything else.

Behind a TLS proxy (`dashboard_public_origin: https://…`) the browser's Origin is the
public one, and the cookie is `Secure` and `__Host-`-prefixed (bound to that host, never
sent over plain HTTP). Every wrong token, by form or bearer header, is logged as one line
(`admin.auth_refused`, never the token) and counted (x402_admin_auth_failures); past a few,
its client address waits (LoginBackoff) and is answered 429 with Retry-After until then.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from sidecar.core.errors import RateLimited
from sidecar.server import metrics
from sidecar.server.logs import get_logger

COOKIE = "x402_dashboard"
SECURE_COOKIE = "__Host-x402_dashboard"  # Secure, Path=/, no Domain: the browser enforces it
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000
FREE_FAILURES = 20  # wrong tokens an address may send before it has to wait
MAX_WAIT_SECONDS = 300  # the longest wait: 2, 4, 8 … seconds, capped here
FORGET_SECONDS = 3600  # an address quiet this long past its wait starts afresh
MAX_ADDRESSES = 10_000  # the backoff table's size; the longest-quiet address goes first
log = get_logger("sidecar.server.dashboard")


@dataclass
class Session:
    csrf: str
    expires: float


def client_key(address: str | None) -> str:
    """The backoff's key for a client address: IPv6 by its /64 (one host often holds a
    whole /64), anything else as is."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginBackoff:
    """Wrong tokens per client address: after FREE_FAILURES, each further wrong token makes
    the address wait 2, 4, 8 … seconds (at most MAX_WAIT_SECONDS) before its next try; a
    right token clears it. At most `max_addresses` are remembered (the longest quiet
    forgotten first), so a flood of addresses costs bounded memory."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_addresses: int = MAX_ADDRESSES
    ) -> None:
        self.clock, self.max_addresses = clock, max_addresses
        self._table: OrderedDict[str, tuple[int, float]] = OrderedDict()  # failures, until

    def __len__(self) -> int:
        return len(self._table)

    def wait(self, address: str) -> int:
        """Whole seconds until `address` may try a token again; 0: now."""
        entry = self._table.get(address)
        return 0 if entry is None else max(0, math.ceil(entry[1] - self.clock()))

    def failed(self, address: str) -> None:
        now = self.clock()
        failures, until = self._table.pop(address, (0, now))
        if now - until > FORGET_SECONDS:
            failures = 0
        failures += 1
        delay = 0 if failures <= FREE_FAILURES else 2 ** min(failures - FREE_FAILURES, 9)
        self._table[address] = (failures, now + min(delay, MAX_WAIT_SECONDS))
        while len(self._table) > self.max_addresses:
            self._table.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._table.pop(address, None)


class Sessions:
    def __init__(
        self, token: bytes, lifetime: float = SESSION_SECONDS, public_origin: str = ""
    ) -> None:
        self._token = token
        self.lifetime = lifetime
        self.public_origin = public_origin  # "": none; else scheme://host[:port]
        self.backoff = LoginBackoff()
        self._live: dict[str, Session] = {}

    def token_matches(self, given: str) -> bool:
        """Constant time in the token's content (hmac.compare_digest)."""
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._token)

    def check(self, request: web.Request, given: str, via: str) -> bool | web.Response:
        """A token from a client: True if right; False (logged, counted, the address's
        backoff advanced) if wrong; a 429 answer, unchecked, while the address must wait."""
        address = client_key(request.remote)
        wait = self.backoff.wait(address)
        if wait:
            return too_many(request, wait)
        if self.token_matches(given):
            self.backoff.succeeded(address)
            return True
        self.backoff.failed(address)
        log.warning("admin.auth_refused", api="dashboard", via=via, remote=request.remote)
        metrics.admin_auth_failed("dashboard")
        return False

    def bearer(self, request: web.Request) -> bool | web.Response:
        """No bearer token: False (nothing was tried). A bearer token: as `check`."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return self.check(request, value.strip(), "bearer")

    def secure(self, request: web.Request) -> bool:
        """Served over TLS: here, or behind the proxy of an https public origin."""
        return request.secure or self.public_origin.startswith("https://")

    def cookie(self, request: web.Request) -> str:
        return SECURE_COOKIE if self.secure(request) else COOKIE

    def open(self) -> tuple[str, Session]:
        now = time.monotonic()
        for key in [k for k, s in self._live.items() if s.expires <= now]:
            del self._live[key]
        if len(self._live) >= MAX_SESSIONS:  # the oldest goes
            del self._live[min(self._live, key=lambda k: self._live[k].expires)]
        key = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now + self.lifetime)
        self._live[key] = session
        return key, session

    def find(self, request: web.Request) -> Session | None:
        key = request.cookies.get(self.cookie(request), "")
        session = self._live.get(key) if key else None
        if session is None or session.expires <= time.monotonic():
            return None
        return session

    def close(self, request: web.Request) -> None:
        self._live.pop(request.cookies.get(self.cookie(request), ""), None)

    def set_cookie(self, response: web.StreamResponse, request: web.Request, key: str) -> None:
        response.set_cookie(
            self.cookie(request),
            key,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=self.secure(request),
            max_age=SESSION_SECONDS,
        )

    def same_origin(self, request: web.Request) -> bool:
        """A browser's POST says where it came from: Origin (or Sec-Fetch-Site). Absent
        both (curl, a bearer client), the CSRF token or the bearer header decides. The
        Origin may be this server's own or the configured public origin."""
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        return origin == f"{request.scheme}://{request.host}" or (
            bool(self.public_origin) and origin.lower() == self.public_origin
        )


def too_many(request: web.Request, wait: int) -> web.Response:
    """429 with Retry-After: JSON with the machine reason, or a line of text for a browser."""
    headers = {"Retry-After": str(wait)}
    message = f"too many wrong tokens from this address; try again in {wait} s"
    if "text/html" in request.headers.get("Accept", ""):
        return web.Response(status=429, text=message, headers=headers)
    body = {"error": RateLimited.reason, "message": message, "retry_after": wait}
    return web.json_response(body, status=429, headers=headers)


def csrf_matches(session: Session, given: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), session.csrf.encode())


def harden(response: web.StreamResponse, nonce: str) -> None:
    """Every answer: no script, no framing, no sniffing, no caching."""
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"  # no-referrer would make Origin "null"
    response.headers["Cache-Control"] = "no-store"
