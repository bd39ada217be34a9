"""The operator's web dashboard: revenue, decisions, payers and settlement, on worker 0
beside the admin API, behind the same admin token (docs/operations.md, "The dashboard").

Served with aiohttp on `listen_dashboard` (127.0.0.1 by default, like the admin API),
never through the gateway. Pages are HTML drawn here (html.py), no script and no build
step; charts are inline SVG. What it shows comes from the ledger (receipt and credit
streams, batches, the recent-decisions stream) and the Prometheus metrics; what it
changes goes through the ledger's `Payers` service, as the CLI and the admin API do.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.core.batches import signed_receipt
from sidecar.core.decision import Gateway
from sidecar.core.errors import ConfigError, SettlementError, X402Error
from sidecar.core.identity import read_secret
from sidecar.core.protocol import verify_receipt
from sidecar.ledger import decisions, evidence, reports, settlement
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.payers import Payers, checked_key
from sidecar.server import metrics, wiring
from sidecar.server.config import Settings
from sidecar.server.dashboard import auth
from sidecar.server.dashboard.html import (
    bar_chart,
    esc,
    hbar_chart,
    hidden,
    link,
    page,
    payer_link,
    section,
    table,
)
from sidecar.server.logs import get_logger

MIN_TOKEN_BYTES = 16
# Decisions: allow and deny at the check; capture and release in the response phase.
COLOURS = {"allow": "#2f9e57", "capture": "#1f7a8c", "deny": "#d0473c", "release": "#d08a2c"}
RECENT_DECISIONS = 500  # read from the stream per page; filtered here
SHOWN_DECISIONS = 200
log = get_logger("sidecar.server.dashboard")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    def __init__(self, ledger: Ledger, gateway: Gateway, settings: Settings, token: bytes):
        self.ledger, self.gateway = ledger, gateway
        self.payers = wiring.payers(settings, ledger, gateway.payee)
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
        note = f'<p class="deny">{esc(message)}</p>' if message else ""
        body = section(
            "Sign in",
            f'{note}<form method="post" action="/login"><label>Admin token '
            '<input type="password" name="token" autocomplete="current-password" '
            'autofocus required></label> <button type="submit">Sign in</button></form>'
            '<p class="muted">The admin token of this sidecar (admin_token_file).</p>',
        )
        return web.Response(
            text=page("Sign in", body, request["nonce"], user=False),
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

    def show(self, asset: str, atomic: int) -> str:
        return self.payers.show(asset, atomic)

    async def _metric_decisions(self) -> dict[tuple[str, str, str], int]:
        """x402_decisions from /metrics (every worker): (decision, reason, route) → count."""
        text = metrics.render().decode()
        counts: dict[tuple[str, str, str], int] = defaultdict(int)
        for family in text_string_to_metric_families(text):
            if family.name != "x402_decisions":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    key = (labels["decision"], labels["reason"], labels["route"])
                    counts[key] += int(sample.value)
        return counts

    async def _summary(self) -> dict[str, Any]:
        among = await reports.payers(self.ledger)
        revenue = await reports.revenue(self.ledger, among)
        by_reason: dict[tuple[str, str], int] = defaultdict(int)
        for (decision, reason, _route), count in (await self._metric_decisions()).items():
            by_reason[(decision, reason)] += count
        try:
            async with asyncio.timeout(1):
                lag = await settlement.settlement_lag(self.ledger)
        except (X402Error, OSError, TimeoutError):
            lag = None
        return {
            "payers": among,
            "revenue": revenue,
            "by_reason": dict(by_reason),
            "open_holds": await reports.open_holds(self.ledger, among),
            "credits": await reports.credits(self.ledger, among, per_payer=10),
            "lag": lag,
        }

    async def overview(self, request: web.Request) -> web.StreamResponse:
        s = await self._summary()
        revenue: reports.Revenue = s["revenue"]
        rows = [
            (
                f'<a href="{link("/decisions", route=route)}">{esc(route or "-")}</a>',
                esc(asset),
                str(revenue.count[(route, asset)]),
                esc(self.show(asset, revenue.hour[(route, asset)])),
                esc(self.show(asset, revenue.day[(route, asset)])),
                esc(self.show(asset, total)),
            )
            for (route, asset), total in sorted(revenue.total.items())
        ]
        totals: dict[str, int] = defaultdict(int)
        for (_route, asset), total in revenue.total.items():
            totals[asset] += total
        rows += [
            ("<b>total</b>", esc(asset), "", "", "", f"<b>{esc(self.show(asset, t))}</b>")
            for asset, t in sorted(totals.items())
        ]
        revenue_table = table(
            ("Route", "Asset", "Receipts", "Last hour", "Last day", "Total"),
            rows,
            "revenue",
            numeric=4,
        )
        charts = ""
        for asset, hourly in sorted(revenue.hourly.items()):
            now_hour = revenue.now // 3600
            captions = [
                time.strftime("%H:00", time.gmtime((now_hour - 23 + i) * 3600)) if i % 3 == 2
                else ""
                for i in range(24)
            ]  # fmt: skip
            shown = [f"{self.show(asset, v)} {asset}" for v in hourly]
            charts += f"<p>{esc(asset)} per hour, last 24 hours</p>" + bar_chart(
                f"revenue per hour in {asset}", hourly, captions, shown
            )
        by_reason = sorted(s["by_reason"].items(), key=lambda item: (-item[1], item[0]))
        reason_chart = hbar_chart(
            "decisions by reason",
            [(f"{d}: {r}", n, COLOURS.get(d, "#8a94a6")) for (d, r), n in by_reason],
        )
        reason_rows = [
            (
                f'<span class="{esc(d)}">{esc(d)}</span>',
                f'<a href="{link("/decisions", reason=r)}">{esc(r)}</a>',
                str(n),
            )
            for (d, r), n in by_reason
        ]
        top = [(payer_link(p), esc(a), esc(self.show(a, n))) for p, a, n in revenue.top_payers(10)]
        phases: dict[str, int] = defaultdict(int)  # the response phase's decisions
        for (decision, reason), n in s["by_reason"].items():
            phases["held" if reason == "held" else decision] += n
        holds_rows = [
            ("open now (ledger)", str(s["open_holds"])),
            ("placed (metrics)", str(phases["held"])),
            ("captured (metrics)", str(phases["capture"])),
            ("released: the service failed (metrics)", str(phases["release"])),
        ]
        topups = [
            (
                payer_link(t.payer),
                esc(t.asset),
                esc(self.show(t.asset, t.amount)),
                esc(t.source or "operator credit"),
                f"<code>{esc(t.transaction)}</code>",
                esc(_when(t.at)),
            )
            for t in s["credits"][:20]
        ]
        lag = s["lag"]
        body = (
            section("Revenue per route (ledger receipts)", revenue_table + charts, "revenue-sec")
            + '<div class="grid">'
            + section("Paid vs refused by reason (metrics)", reason_chart
                      + table(("Decision", "Reason", "Count"), reason_rows, "reasons", 1))
            + section("Top payers by spend", table(("Payer", "Asset", "Spent"), top, "top", 1))
            + section("Holds", table(("Holds", "Count"), holds_rows, "holds", 1))
            + section("Settlement", f'<p>Lag: <b id="lag">{esc(_lag(lag))}</b> · '
                      f'{len(s["payers"])} payers · <a href="/settlement">batches</a></p>')
            + "</div>"
            + section("Credits and top-ups", table(
                ("Payer", "Asset", "Amount", "Source", "Transaction", "At"), topups, "topups", 0))
        )  # fmt: skip
        return self._page(request, "Overview", body)

    async def _decisions(self, request: web.Request) -> tuple[list[dict[str, Any]], dict[str, str]]:
        wanted = {k: request.query.get(k, "") for k in ("route", "payer", "reason")}
        found = await decisions.recent(self.ledger, RECENT_DECISIONS)
        chosen = [
            d for d in found if all(not v or str(d.get(k) or "") == v for k, v in wanted.items())
        ][:SHOWN_DECISIONS]
        return chosen, wanted

    async def decisions(self, request: web.Request) -> web.StreamResponse:
        chosen, wanted = await self._decisions(request)
        seen = await decisions.recent(self.ledger, RECENT_DECISIONS)
        reasons = sorted({str(d.get("reason") or "") for d in seen} | {wanted["reason"]})
        options = "".join(
            f'<option value="{esc(r)}"{" selected" if r == wanted["reason"] else ""}>'
            f"{esc(r or 'any reason')}</option>"
            for r in ["", *[r for r in reasons if r]]
        )
        filters = (
            '<form method="get" action="/decisions" id="filters">'
            f'<label>Route <input name="route" value="{esc(wanted["route"])}"></label> '
            f'<label>Payer <input name="payer" value="{esc(wanted["payer"])}"></label> '
            f'<label>Reason <select name="reason" id="reason">{options}</select></label> '
            '<button type="submit">Filter</button> <a href="/decisions">clear</a></form>'
        )
        rows = [
            (
                esc(str(d.get("timestamp") or "")[11:23]),
                f'<span class="{esc(d.get("decision"))}">{esc(d.get("decision"))}</span>',
                esc(d.get("status")),
                f'<span class="reason">{esc(d.get("reason"))}</span>',
                esc(d.get("method")),
                f'<span class="path">{esc(d.get("path"))}</span>',
                esc(d.get("route") or ""),
                payer_link(str(d.get("payer") or "")),
                esc(f"{d.get('price')} {d.get('asset')}" if d.get("price") else ""),
                esc(d.get("latency_ms")),
            )
            for d in chosen
        ]
        body = section(
            "Live decisions, newest first",
            filters
            + table(
                (
                    "Time (UTC)",
                    "Decision",
                    "Status",
                    "Reason",
                    "Method",
                    "Path",
                    "Route",
                    "Payer",
                    "Price",
                    "ms",
                ),
                rows,
                "decisions",
                numeric=1,
            ),
        )
        return self._page(request, "Decisions", body)

    async def payer_list(self, request: web.Request) -> web.StreamResponse:
        rows = []
        for payer in (await reports.payers(self.ledger))[:500]:
            try:
                balance = await self.payers.balance(payer)
            except X402Error:
                continue
            amounts = ", ".join(f"{a.balance} {a.asset}" for a in balance.assets)
            rows.append((payer_link(payer), esc(balance.status), esc(amounts)))
        return self._page(
            request,
            "Payers",
            section("Payers", table(("Payer", "Status", "Balance"), rows, "payers")),
        )

    async def payer(self, request: web.Request) -> web.StreamResponse:
        payer = request.match_info["payer"]
        return await self._payer_page(request, payer, "", "")

    async def _payer_page(
        self, request: web.Request, payer: str, flash: str, error: str, status: int = 200
    ) -> web.StreamResponse:
        try:
            balance = await self.payers.balance(payer)
        except X402Error as exc:
            body = section("Not found", f"<p>{esc(payer)}: {esc(exc)}</p>", kind="error")
            return self._page(request, "Payer", body, 404)
        notes = ""
        if flash:
            notes += section("Done", f'<p id="flash">{esc(flash)}</p>', kind="flash")
        if error:
            notes += section("Refused", f'<p id="error">{esc(error)}</p>', kind="error")
        assets = table(
            ("Asset", "Balance", "In channels", "Credited", "Debited"),
            [
                (esc(a.asset), f'<span class="balance">{esc(a.balance)}</span>',
                 esc(a.channeled), esc(a.credited), esc(a.debited))
                for a in balance.assets
            ],
            "balances",
            numeric=4,
        )  # fmt: skip
        target = f"/payers/{esc(_quote(payer))}"
        csrf = {"csrf": request.get("csrf", "")}
        action = "activate" if balance.status == "suspended" else "suspend"
        status_form = (
            f'<form method="post" action="{target}/status" class="inline">'
            f'{hidden({**csrf, "action": action})}<button id="{action}">'
            f"{esc(action.capitalize())}</button></form>"
        )
        credit_form = (
            f'<form method="post" action="{target}/credit" id="credit">{hidden(csrf)}'
            '<label>Amount <input name="amount" required placeholder="1.50"></label> '
            f'<label>Asset <select name="asset">{_asset_options(self.payers)}</select></label> '
            '<label>Idempotency key <input name="idempotency_key" required '
            f'value="{esc("dash-" + secrets.token_hex(8))}"></label> '
            '<button type="submit">Credit…</button></form>'
            '<p class="muted">A credit is applied once per idempotency key; you confirm it '
            "on the next page.</p>"
        )
        receipts = await reports.recent_receipts(self.ledger, payer, 50)
        cursor = await reports.settled_cursor(self.ledger, payer)
        keys = self.gateway.keys.public_keys()
        rows = []
        for r in receipts:
            try:
                ok = verify_receipt(
                    signed_receipt(payer, r.fields, self.payers.assets, self.gateway.keys),
                    keys,
                )
            except SettlementError:
                ok = False
            settled = not reports.stream_after(r.stream_id, cursor)
            rows.append(
                (
                    esc(_when(r.issued_at)),
                    f"<code>{esc(r.fields.get('receipt_id', ''))}</code>",
                    esc(r.route or "-"),
                    f'<span class="path">{esc(r.fields.get("resource", ""))}</span>',
                    esc(f"{self.show(r.asset, r.amount)} {r.asset}"),
                    '<span class="allow">signature ok</span>' if ok
                    else '<span class="deny">does not verify</span>',
                    "settled" if settled else '<span class="muted">unsettled</span>',
                )
            )  # fmt: skip
        channels = []
        for channel_id in await reports.channel_ids(self.ledger, payer):
            try:
                c = await self.payers.channel(payer, channel_id)
            except X402Error:
                continue
            channels.append(
                (f"<code>{esc(c.channel_id)}</code>", esc(c.asset), esc(c.deposit),
                 esc(c.cumulative), str(c.sequence), esc(c.status), esc(_when(c.expires_at)))
            )  # fmt: skip
        body = (
            notes
            + section(
                "Payer",
                f'<p><span class="key" id="payer-key">{esc(payer)}</span></p>'
                f'<p>Status: <b id="status">{esc(balance.status)}</b> {status_form}</p>' + assets,
            )
            + section("Credit", credit_form)
            + section(
                "Recent receipts (newest first)",
                table(
                    (
                        "Issued",
                        "Receipt",
                        "Route",
                        "Resource",
                        "Amount",
                        "Verification",
                        "Settlement",
                    ),
                    rows,
                    "receipts",
                ),
            )
            + section(
                "Open channels",
                table(
                    ("Channel", "Asset", "Deposit", "Spent", "Vouchers", "Status", "Expires"),
                    channels,
                    "channels",
                ),
            )
            + section(
                "Evidence",
                f'<p><a id="evidence" href="{link("/evidence", payer=payer)}">Download the '
                "evidence bundle of this payer's settled receipts</a> (check it offline with "
                "<code>x402 evidence verify</code>).</p>",
            )
        )
        return self._page(request, "Payer", body, status)

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
            body = section(
                "Confirm the credit",
                f'<p>Credit <b id="confirm-amount">{esc(fields["amount"])} '
                f'{esc(fields["asset"])}</b> to <span class="key">{esc(payer)}</span> '
                f"with idempotency key <code>{esc(fields['idempotency_key'])}</code>?</p>"
                f'<form method="post" action="/payers/{esc(_quote(payer))}/credit">'
                + hidden({**fields, "csrf": request.get("csrf", ""), "confirm": "yes"})
                + '<button id="confirm" type="submit">Confirm credit</button> '
                f'<a href="/payers/{esc(_quote(payer))}">cancel</a></form>',
            )
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

    # -- settlement ----------------------------------------------------------------------

    async def settlement(self, request: web.Request) -> web.StreamResponse:
        batches = await settlement.recent_batches(self.ledger, limit=100)
        committed: dict[str, int] = {}
        rows = []
        for m in batches:
            owner = str(m["payer"])
            if owner not in committed:
                committed[owner] = await settlement.committed_seq(self.ledger, owner)
            totals = ", ".join(  # the manifest's totals are atomic units
                f"{self.show(k, int(v))} {k}" for k, v in sorted(dict(m["totals"]).items())
            )
            rows.append(
                (
                    esc(_when(int(m["closed_at"]))),
                    f"<code>{esc(m['batch_id'])}</code>",
                    payer_link(owner),
                    str(int(m["seq"])),
                    str(int(m["count"])),
                    esc(totals),
                    f'<code class="root">{esc(m["merkle_root"])}</code>',
                    "committed" if int(m["seq"]) <= committed[owner] else "anchoring",
                )
            )
        among = await reports.payers(self.ledger)
        unsettled_rows = []
        for payer in among:
            cursor = await reports.settled_cursor(self.ledger, payer)
            pending = [
                r for r in await reports.receipts(self.ledger, payer)
                if reports.stream_after(r.stream_id, cursor)
            ]  # fmt: skip
            if pending:
                sums: dict[str, int] = defaultdict(int)
                for r in pending:
                    sums[r.asset] += r.amount
                unsettled_rows.append(
                    (
                        payer_link(payer),
                        str(len(pending)),
                        esc(", ".join(f"{self.show(a, n)} {a}" for a, n in sorted(sums.items()))),
                        esc(_when(min(r.issued_at for r in pending))),
                    )
                )
        lag = await settlement.settlement_lag(self.ledger)
        download = (
            '<form method="get" action="/evidence" id="evidence-form"><label>Payer '
            '<input name="payer" required size="50"></label> '
            '<button type="submit">Download evidence bundle</button></form>'
        )
        body = (
            section("Lag", f'<p>Oldest unsettled receipt at the last settle pass: '
                    f'<b id="lag">{esc(_lag(lag))}</b></p>' + download)
            + section("Unsettled receipts", table(
                ("Payer", "Receipts", "Amount", "Oldest"), unsettled_rows, "unsettled", 2))
            + section("Batches (newest first)", table(
                ("Closed", "Batch", "Payer", "Seq", "Receipts", "Totals", "Merkle root",
                 "State"), rows, "batches"))
        )  # fmt: skip
        return self._page(request, "Settlement", body)

    async def evidence(self, request: web.Request) -> web.StreamResponse:
        payer = request.query.get("payer", "")
        try:
            result = await evidence.export(
                self.ledger,
                self.gateway.keys,
                self.payers.assets,
                evidence.Query(payer=checked_key(payer)),
            )
        except X402Error as exc:
            return _plain(400, str(exc))
        name = f"evidence-{secrets.token_hex(4)}.json"
        return web.Response(
            body=json.dumps(result.bundle, indent=1, sort_keys=True).encode(),
            content_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    # -- JSON ----------------------------------------------------------------------------

    async def api_summary(self, request: web.Request) -> web.StreamResponse:
        s = await self._summary()
        revenue: reports.Revenue = s["revenue"]
        return web.json_response(
            {
                "revenue": [
                    {
                        "route": route,
                        "asset": asset,
                        "receipts": revenue.count[(route, asset)],
                        "last_hour": self.show(asset, revenue.hour[(route, asset)]),
                        "last_day": self.show(asset, revenue.day[(route, asset)]),
                        "total": self.show(asset, total),
                    }
                    for (route, asset), total in sorted(revenue.total.items())
                ],
                "decisions": [
                    {"decision": d, "reason": r, "count": n}
                    for (d, r), n in sorted(s["by_reason"].items())
                ],
                "top_payers": [
                    {"payer": p, "asset": a, "spent": self.show(a, n)}
                    for p, a, n in revenue.top_payers(10)
                ],
                "open_holds": s["open_holds"],
                "settlement_lag_seconds": s["lag"],
            }
        )

    async def api_decisions(self, request: web.Request) -> web.StreamResponse:
        chosen, _wanted = await self._decisions(request)
        return web.json_response({"decisions": chosen})


def _quote(value: str) -> str:
    return quote(value, safe="")


def _asset_options(payers: Payers) -> str:
    return "".join(
        f'<option value="{esc(code)}"{" selected" if code == payers.default_asset else ""}>'
        f"{esc(code)}</option>"
        for code in payers.assets
    )


def _when(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) if unix else ""


def _lag(lag: float | None) -> str:
    return "no settle pass yet" if lag is None else f"{lag:.0f} s"


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


async def start_dashboard(
    settings: Settings, ledger: Ledger, gateway: Gateway
) -> web.AppRunner | None:
    """The dashboard, started on listen_dashboard; None when off or without a token."""
    if not settings.dashboard_enabled:  # off, or no admin token to put it behind
        return None
    from sidecar.server.supervisor import split_host_port

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
