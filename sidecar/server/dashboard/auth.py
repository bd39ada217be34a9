"""Who may see the dashboard: the admin token, as a bearer header or through a login form
that opens a session (cookie HttpOnly, SameSite=Strict); CSRF checks on every POST.

The token is compared in constant time (hmac.compare_digest). Sessions live in worker 0's
memory (the only process serving the dashboard): a restart logs everyone out. A session
carries its own CSRF token, required in every state-changing form; a POST whose Origin
(or Sec-Fetch-Site) says it came from another site is refused before anything else.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

COOKIE = "x402_dashboard"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000


@dataclass
class Session:
    csrf: str
    expires: float


class Sessions:
    def __init__(self, token: bytes, lifetime: float = SESSION_SECONDS) -> None:
        self._token = token
        self.lifetime = lifetime
        self._live: dict[str, Session] = {}

    def token_matches(self, given: str) -> bool:
        """Constant time in the token's content (hmac.compare_digest)."""
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._token)

    def bearer(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

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
        key = request.cookies.get(COOKIE, "")
        session = self._live.get(key) if key else None
        if session is None or session.expires <= time.monotonic():
            return None
        return session

    def close(self, request: web.Request) -> None:
        self._live.pop(request.cookies.get(COOKIE, ""), None)


def set_cookie(response: web.StreamResponse, key: str, secure: bool) -> None:
    response.set_cookie(
        COOKIE,
        key,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=secure,
        max_age=SESSION_SECONDS,
    )


def same_origin(request: web.Request) -> bool:
    """A browser's POST says where it came from: Origin (or Sec-Fetch-Site). Absent both
    (curl, a bearer client), the CSRF token or the bearer header decides."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == f"{request.scheme}://{request.host}"


def csrf_matches(session: Session, given: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), session.csrf.encode())
