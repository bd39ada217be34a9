"""The dashboard's web app: its routes, the guard in front of every handler (the admin
token as a bearer header or a login session, CSRF on every POST: auth.py) and the
handlers, which read through data.py, draw through views.py and change the ledger
through its `Payers` service, as the CLI and the admin API do.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.core.decision import Gateway
from sidecar.core.errors import ConfigError, X402Error
from sidecar.core.identity import read_secret
from sidecar.ledger.accounts import Ledger
from sidecar.server import wiring
from sidecar.server.addresses import split_host_port
from sidecar.server.config import Settings
from sidecar.server.dashboard import auth, views
from sidecar.server.dashboard.data import DashboardData
from sidecar.server.dashboard.html import page
from sidecar.server.logs import get_logger

MIN_TOKEN_BYTES = 16
log = get_logger("sidecar.server.dashboard")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    def __init__(self, ledger: Ledger, gateway: Gateway, settings: Settings, token: bytes):
        self.payers = wiring.payers(settings, ledger, gateway.payee)
        self.data = DashboardData(ledger, gateway, self.payers)
        self.sessions = auth.Sessions(token, public_origin=settings.dashboard_origin())

    # -- plumbing ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=64 * 1024)
        app.router.add_get("/login", self.login_form)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/", self.overview)
        app.router.add_get("/decisions", self.decisions)
        app.router.add_get("/payers", self.payer_list)
        app.router.add_get("/payers/{payer}", self.payer)
        app.router.add_post("/payers/{payer}/status", self.set_status)
        app.router.add_post("/payers/{payer}/credit", self.credit)
        app.router.add_get("/settlement", self.settlement)
        app.router.add_get("/evidence", self.evidence)
        app.router.add_get("/api/summary", self.api_summary)
        app.router.add_get("/api/decisions", self.api_decisions)
        return app

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        nonce = secrets.token_urlsafe(16)
        request["nonce"] = nonce
        try:
            response = await self._guarded(request, handler)
        except web.HTTPException as exc:
            response = exc
        auth.harden(response, nonce)
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and not self.sessions.same_origin(request):
            return _plain(403, "cross-site request refused")
        if request.path == "/login":
            return await handler(request)
        session = self.sessions.find(request)
        bearer = session is None and self.sessions.bearer(request)
        if isinstance(bearer, web.Response):  # this address must wait: 429
            return bearer
        if session is None and not bearer:
            if request.path.startswith("/api/"):
                return web.json_response({"error": "unauthenticated"}, status=401)
            return self._login_page(request, 401, "")
        request["csrf"] = session.csrf if session is not None else ""
        if request.method == "POST" and session is not None:
            form = await request.post()
            given = form.get("csrf")
            if not isinstance(given, str) or not auth.csrf_matches(session, given):
                return _plain(403, "missing or wrong CSRF token")
            request["form"] = form
        elif request.method == "POST":  # bearer: a header no other site can make a browser send
            request["form"] = await request.post()
        return await handler(request)

    def _page(self, request: web.Request, title: str, body: str, status: int = 200) -> web.Response:
        return web.Response(
            text=page(title, body, request["nonce"], request.get("csrf", "")),
            content_type="text/html",
            status=status,
        )

    # -- login ---------------------------------------------------------------------------

    def _login_page(self, request: web.Request, status: int, message: str) -> web.Response:
        return web.Response(
            text=page("Sign in", views.login(message), request["nonce"], user=False),
            content_type="text/html",
            status=status,
        )

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self.sessions.find(request) is not None:
            raise web.HTTPSeeOther("/")
        return self._login_page(request, 200, "")

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        given = form.get("token")
        token = given.strip() if isinstance(given, str) else ""
        checked = self.sessions.check(request, token, "login")  # logged and counted if wrong
        if isinstance(checked, web.Response):  # this address must wait: 429
            return checked
        if not checked:
            return self._login_page(request, 401, "Wrong token.")
        key, _session = self.sessions.open()
        response = web.HTTPSeeOther("/")
        self.sessions.set_cookie(response, request, key)
        log.info("dashboard.login", remote=request.remote)
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.close(request)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(
            self.sessions.cookie(request), path="/", secure=self.sessions.secure(request)
        )
        return response

    # -- reading ------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.StreamResponse:
        summary = await self.data.summary()
        return self._page(request, "Overview", views.overview(summary, self.data.show))

    async def decisions(self, request: web.Request) -> web.StreamResponse:
        found = await self.data.decisions(dict(request.query))
        return self._page(request, "Decisions", views.decisions(found))

    async def payer_list(self, request: web.Request) -> web.StreamResponse:
        balances = await self.data.payer_balances()
        return self._page(request, "Payers", views.payer_list(balances))

    async def payer(self, request: web.Request) -> web.StreamResponse:
        payer = request.match_info["payer"]
        return await self._payer_page(request, payer, "", "")

    async def _payer_page(
        self, request: web.Request, payer: str, flash: str, error: str, status: int = 200
    ) -> web.StreamResponse:
        try:
            balance = await self.payers.balance(payer)
        except X402Error as exc:
            return self._page(request, "Payer", views.payer_missing(payer, exc), 404)
        detail = await self.data.payer(payer, balance)
        csrf = request.get("csrf", "")
        body = views.payer(detail, self.payers, csrf, flash, error)
        return self._page(request, "Payer", body, status)

    async def settlement(self, request: web.Request) -> web.StreamResponse:
        state = await self.data.settlement()
        return self._page(request, "Settlement", views.settlement(state, self.data.show))

    async def evidence(self, request: web.Request) -> web.StreamResponse:
        try:
            bundle = await self.data.evidence(request.query.get("payer", ""))
        except X402Error as exc:
            return _plain(400, str(exc))
        name = f"evidence-{secrets.token_hex(4)}.json"
        return web.Response(
            body=json.dumps(bundle, indent=1, sort_keys=True).encode(),
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    # -- changing ------------------------------------------------------------------------

    async def set_status(self, request: web.Request) -> web.StreamResponse:
        payer = request.match_info["payer"]
        action = request["form"].get("action")
        try:
            if action == "suspend":
                status = await self.payers.suspend(payer)
            elif action == "activate":
                status = await self.payers.activate(payer)
            else:
                return _plain(400, "action: suspend or activate")
        except X402Error as exc:
            return await self._payer_page(request, payer, "", str(exc), 400)
        log.info("dashboard.payer_status", payer=payer, status=status)
        return await self._payer_page(request, payer, f"Payer is now {status}.", "")

    async def credit(self, request: web.Request) -> web.StreamResponse:
        payer = request.match_info["payer"]
        form = request["form"]
        fields = {k: str(form.get(k, "")).strip() for k in ("amount", "asset", "idempotency_key")}
        if form.get("confirm") != "yes":
            try:  # check before asking: the asset exists, the amount parses
                self.payers.asset(fields["asset"]).to_atomic(fields["amount"])
                if not fields["idempotency_key"]:
                    raise X402Error("an idempotency key is required")
            except X402Error as exc:
                return await self._payer_page(request, payer, "", str(exc), 400)
            body = views.confirm_credit(payer, fields, request.get("csrf", ""))
            return self._page(request, "Confirm", body)
        try:
            credited = await self.payers.credit(
                payer, fields["amount"], fields["asset"], fields["idempotency_key"]
            )
        except X402Error as exc:
            return await self._payer_page(request, payer, "", str(exc), 400)
        log.info("dashboard.credit", payer=payer, asset=credited.asset, applied=credited.applied)
        flash = (
            f"Credited {fields['amount']} {credited.asset}; balance {credited.balance}."
            if credited.applied
            else f"Idempotency key seen before: nothing credited; balance {credited.balance}."
        )
        return await self._payer_page(request, payer, flash, "")

    # -- JSON ----------------------------------------------------------------------------

    async def api_summary(self, request: web.Request) -> web.StreamResponse:
        s, show = await self.data.summary(), self.data.show
        revenue = s.revenue
        return web.json_response(
            {
                "revenue": [
                    {
                        "route": route,
                        "asset": asset,
                        "receipts": revenue.count[(route, asset)],
                        "last_hour": show(asset, revenue.hour[(route, asset)]),
                        "last_day": show(asset, revenue.day[(route, asset)]),
                        "total": show(asset, total),
                    }
                    for (route, asset), total in sorted(revenue.total.items())
                ],
                "decisions": [
                    {"decision": d, "reason": r, "count": n}
                    for (d, r), n in sorted(s.by_reason.items())
                ],
                "top_payers": [
                    {"payer": p, "asset": a, "spent": show(a, n)}
                    for p, a, n in revenue.top_payers(10)
                ],
                "open_holds": s.open_holds,
                "settlement_lag_seconds": s.lag,
            }
        )

    async def api_decisions(self, request: web.Request) -> web.StreamResponse:
        found = await self.data.decisions(dict(request.query))
        return web.json_response({"decisions": found.chosen})


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


async def start_dashboard(
    settings: Settings, ledger: Ledger, gateway: Gateway
) -> web.AppRunner | None:
    """The dashboard, started on listen_dashboard; None when off or without a token."""
    if not settings.dashboard_enabled:  # off, or no admin token to put it behind
        return None
    host, port = split_host_port(settings.listen_dashboard, "listen_dashboard")
    token = read_secret(settings.admin_token_file, "config admin_token_file", MIN_TOKEN_BYTES)
    runner = web.AppRunner(
        Dashboard(ledger, gateway, settings, token).app(), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"config listen_dashboard: cannot listen on {settings.listen_dashboard}: {exc.strerror}"
        ) from None
    log.info("dashboard.started", listen_dashboard=settings.listen_dashboard)
    return runner
