"""The dashboard's pages as HTML bodies, drawn from what data.py read; the building
blocks (escaping, tables, sections, charts, the page frame) are in html.py.

Every function returns the body of one page (or one section of it); routes.py wraps it
in the page frame with the response's nonce and CSRF token.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from sidecar.ledger import reports
from sidecar.ledger.payers import Balance, Payers
from sidecar.server.dashboard.data import Decisions, PayerDetail, SettlementState, Summary
from sidecar.server.dashboard.html import (
    bar_chart,
    esc,
    hbar_chart,
    hidden,
    link,
    payer_link,
    section,
    table,
)

# Decisions: allow and deny at the check; capture and release in the response phase.
COLOURS = {"allow": "#2f9e57", "capture": "#1f7a8c", "deny": "#d0473c", "release": "#d08a2c"}
Show = Callable[[str, int], str]  # an asset's atomic amount as decimal text (Payers.show)


def login(message: str) -> str:
    note = f'<p class="deny">{esc(message)}</p>' if message else ""
    return section(
        "Sign in",
        f'{note}<form method="post" action="/login"><label>Admin token '
        '<input type="password" name="token" autocomplete="current-password" '
        'autofocus required></label> <button type="submit">Sign in</button></form>'
        '<p class="muted">The admin token of this sidecar (admin_token_file).</p>',
    )


# -- the overview -------------------------------------------------------------------------


def overview(s: Summary, show: Show) -> str:
    by_reason = sorted(s.by_reason.items(), key=lambda item: (-item[1], item[0]))
    top = [(payer_link(p), esc(a), esc(show(a, n))) for p, a, n in s.revenue.top_payers(10)]
    return (
        section("Revenue per route (ledger receipts)", _revenue(s.revenue, show), "revenue-sec")
        + '<div class="grid">'
        + section("Paid vs refused by reason (metrics)", _reasons(by_reason))
        + section("Top payers by spend", table(("Payer", "Asset", "Spent"), top, "top", 1))
        + section("Holds", table(("Holds", "Count"), _holds(s), "holds", 1))
        + section("Settlement", f'<p>Lag: <b id="lag">{esc(lag_text(s.lag))}</b> · '
                  f'{len(s.payers)} payers · <a href="/settlement">batches</a></p>')
        + "</div>"
        + section("Credits and top-ups", table(
            ("Payer", "Asset", "Amount", "Source", "Transaction", "At"),
            _topups(s.credits, show), "topups", 0))
    )  # fmt: skip


def _revenue(revenue: reports.Revenue, show: Show) -> str:
    rows = [
        (
            f'<a href="{link("/decisions", route=route)}">{esc(route or "-")}</a>',
            esc(asset),
            str(revenue.count[(route, asset)]),
            esc(show(asset, revenue.hour[(route, asset)])),
            esc(show(asset, revenue.day[(route, asset)])),
            esc(show(asset, total)),
        )
        for (route, asset), total in sorted(revenue.total.items())
    ]
    totals: dict[str, int] = defaultdict(int)
    for (_route, asset), total in revenue.total.items():
        totals[asset] += total
    rows += [
        ("<b>total</b>", esc(asset), "", "", "", f"<b>{esc(show(asset, t))}</b>")
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
        shown = [f"{show(asset, v)} {asset}" for v in hourly]
        charts += f"<p>{esc(asset)} per hour, last 24 hours</p>" + bar_chart(
            f"revenue per hour in {asset}", hourly, captions, shown
        )
    return revenue_table + charts


def _reasons(by_reason: list[tuple[tuple[str, str], int]]) -> str:
    chart = hbar_chart(
        "decisions by reason",
        [(f"{d}: {r}", n, COLOURS.get(d, "#8a94a6")) for (d, r), n in by_reason],
    )
    rows = [
        (
            f'<span class="{esc(d)}">{esc(d)}</span>',
            f'<a href="{link("/decisions", reason=r)}">{esc(r)}</a>',
            str(n),
        )
        for (d, r), n in by_reason
    ]
    return chart + table(("Decision", "Reason", "Count"), rows, "reasons", 1)


def _holds(s: Summary) -> list[tuple[str, str]]:
    phases: dict[str, int] = defaultdict(int)  # the response phase's decisions
    for (decision, reason), n in s.by_reason.items():
        phases["held" if reason == "held" else decision] += n
    return [
        ("open now (ledger)", str(s.open_holds)),
        ("placed (metrics)", str(phases["held"])),
        ("captured (metrics)", str(phases["capture"])),
        ("released: the service failed (metrics)", str(phases["release"])),
    ]


def _topups(credits: list[reports.CreditRecord], show: Show) -> list[tuple[str, ...]]:
    return [
        (
            payer_link(t.payer),
            esc(t.asset),
            esc(show(t.asset, t.amount)),
            esc(t.source or "operator credit"),
            f"<code>{esc(t.transaction)}</code>",
            esc(when(t.at)),
        )
        for t in credits[:20]
    ]


# -- decisions and payers -----------------------------------------------------------------


def decisions(found: Decisions) -> str:
    wanted = found.wanted
    options = "".join(
        f'<option value="{esc(r)}"{" selected" if r == wanted["reason"] else ""}>'
        f"{esc(r or 'any reason')}</option>"
        for r in ["", *[r for r in found.reasons if r]]
    )
    filters = (
        '<form method="get" action="/decisions" id="filters">'
        f'<label>Route <input name="route" value="{esc(wanted["route"])}"></label> '
        f'<label>Payer <input name="payer" value="{esc(wanted["payer"])}"></label> '
        f'<label>Reason <select name="reason" id="reason">{options}</select></label> '
        '<button type="submit">Filter</button> <a href="/decisions">clear</a></form>'
    )
    headers = ("Time (UTC)", "Decision", "Status", "Reason", "Method", "Path", "Route",
               "Payer", "Price", "ms")  # fmt: skip
    rows = [_decision_row(d) for d in found.chosen]
    return section(
        "Live decisions, newest first", filters + table(headers, rows, "decisions", numeric=1)
    )


def _decision_row(d: dict[str, Any]) -> tuple[str, ...]:
    return (
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


def payer_list(balances: list[Balance]) -> str:
    rows = [
        (
            payer_link(b.payer),
            esc(b.status),
            esc(", ".join(f"{a.balance} {a.asset}" for a in b.assets)),
        )
        for b in balances
    ]
    return section("Payers", table(("Payer", "Status", "Balance"), rows, "payers"))


def payer_missing(payer: str, error: Exception) -> str:
    return section("Not found", f"<p>{esc(payer)}: {esc(error)}</p>", kind="error")


def payer(detail: PayerDetail, payers: Payers, csrf: str, flash: str, error: str) -> str:
    notes = ""
    if flash:
        notes += section("Done", f'<p id="flash">{esc(flash)}</p>', kind="flash")
    if error:
        notes += section("Refused", f'<p id="error">{esc(error)}</p>', kind="error")
    payer, balance = detail.payer, detail.balance
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
    return (
        notes
        + section(
            "Payer",
            f'<p><span class="key" id="payer-key">{esc(payer)}</span></p>'
            f'<p>Status: <b id="status">{esc(balance.status)}</b> '
            f"{_status_form(payer, balance.status, csrf)}</p>" + assets,
        )
        + section("Credit", _credit_form(payer, payers, csrf))
        + _receipts_and_channels(detail, payers.show)
        + section(
            "Evidence",
            f'<p><a id="evidence" href="{link("/evidence", payer=payer)}">Download the '
            "evidence bundle of this payer's settled receipts</a> (check it offline with "
            "<code>x402 evidence verify</code>).</p>",
        )
    )


def _status_form(payer: str, status: str, csrf: str) -> str:
    action = "activate" if status == "suspended" else "suspend"
    return (
        f'<form method="post" action="/payers/{esc(quoted(payer))}/status" class="inline">'
        f'{hidden({"csrf": csrf, "action": action})}<button id="{action}">'
        f"{esc(action.capitalize())}</button></form>"
    )


def _credit_form(payer: str, payers: Payers, csrf: str) -> str:
    return (
        f'<form method="post" action="/payers/{esc(quoted(payer))}/credit" id="credit">'
        f"{hidden({'csrf': csrf})}"
        '<label>Amount <input name="amount" required placeholder="1.50"></label> '
        f'<label>Asset <select name="asset">{_asset_options(payers)}</select></label> '
        '<label>Idempotency key <input name="idempotency_key" required '
        f'value="{esc("dash-" + secrets.token_hex(8))}"></label> '
        '<button type="submit">Credit…</button></form>'
        '<p class="muted">A credit is applied once per idempotency key; you confirm it '
        "on the next page.</p>"
    )


def _receipts_and_channels(detail: PayerDetail, show: Show) -> str:
    receipts = [
        (
            esc(when(s.receipt.issued_at)),
            f"<code>{esc(s.receipt.fields.get('receipt_id', ''))}</code>",
            esc(s.receipt.route or "-"),
            f'<span class="path">{esc(s.receipt.fields.get("resource", ""))}</span>',
            esc(f"{show(s.receipt.asset, s.receipt.amount)} {s.receipt.asset}"),
            '<span class="allow">signature ok</span>' if s.verifies
            else '<span class="deny">does not verify</span>',
            "settled" if s.settled else '<span class="muted">unsettled</span>',
        )
        for s in detail.receipts
    ]  # fmt: skip
    channels = [
        (f"<code>{esc(c.channel_id)}</code>", esc(c.asset), esc(c.deposit),
         esc(c.cumulative), str(c.sequence), esc(c.status), esc(when(c.expires_at)))
        for c in detail.channels
    ]  # fmt: skip
    return section(
        "Recent receipts (newest first)",
        table(("Issued", "Receipt", "Route", "Resource", "Amount", "Verification",
               "Settlement"), receipts, "receipts"),
    ) + section(
        "Open channels",
        table(("Channel", "Asset", "Deposit", "Spent", "Vouchers", "Status", "Expires"),
              channels, "channels"),
    )  # fmt: skip


def confirm_credit(payer: str, fields: dict[str, str], csrf: str) -> str:
    return section(
        "Confirm the credit",
        f'<p>Credit <b id="confirm-amount">{esc(fields["amount"])} '
        f'{esc(fields["asset"])}</b> to <span class="key">{esc(payer)}</span> '
        f"with idempotency key <code>{esc(fields['idempotency_key'])}</code>?</p>"
        f'<form method="post" action="/payers/{esc(quoted(payer))}/credit">'
        + hidden({**fields, "csrf": csrf, "confirm": "yes"})
        + '<button id="confirm" type="submit">Confirm credit</button> '
        f'<a href="/payers/{esc(quoted(payer))}">cancel</a></form>',
    )


# -- settlement ---------------------------------------------------------------------------


def settlement(state: SettlementState, show: Show) -> str:
    rows = []
    for batch in state.batches:
        m = batch.manifest
        totals = ", ".join(  # the manifest's totals are atomic units
            f"{show(k, int(v))} {k}" for k, v in sorted(dict(m["totals"]).items())
        )
        rows.append(
            (
                esc(when(int(m["closed_at"]))),
                f"<code>{esc(m['batch_id'])}</code>",
                payer_link(str(m["payer"])),
                str(int(m["seq"])),
                str(int(m["count"])),
                esc(totals),
                f'<code class="root">{esc(m["merkle_root"])}</code>',
                "committed" if batch.committed else "anchoring",
            )
        )
    unsettled_rows = [
        (
            payer_link(u.payer),
            str(len(u.receipts)),
            esc(", ".join(f"{show(a, n)} {a}" for a, n in sorted(u.sums.items()))),
            esc(when(min(r.issued_at for r in u.receipts))),
        )
        for u in state.unsettled
    ]
    download = (
        '<form method="get" action="/evidence" id="evidence-form"><label>Payer '
        '<input name="payer" required size="50"></label> '
        '<button type="submit">Download evidence bundle</button></form>'
    )
    return (
        section("Lag", f'<p>Oldest unsettled receipt at the last settle pass: '
                f'<b id="lag">{esc(lag_text(state.lag))}</b></p>' + download)
        + section("Unsettled receipts", table(
            ("Payer", "Receipts", "Amount", "Oldest"), unsettled_rows, "unsettled", 2))
        + section("Batches (newest first)", table(
            ("Closed", "Batch", "Payer", "Seq", "Receipts", "Totals", "Merkle root",
             "State"), rows, "batches"))
    )  # fmt: skip


# -- small helpers ------------------------------------------------------------------------


def quoted(value: str) -> str:
    """A path segment: the value percent-encoded, nothing left as a separator."""
    return quote(value, safe="")


def _asset_options(payers: Payers) -> str:
    return "".join(
        f'<option value="{esc(code)}"{" selected" if code == payers.default_asset else ""}>'
        f"{esc(code)}</option>"
        for code in payers.assets
    )


def when(unix: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix)) if unix else ""


def lag_text(lag: float | None) -> str:
    return "no settle pass yet" if lag is None else f"{lag:.0f} s"
