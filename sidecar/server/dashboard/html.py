"""The dashboard's HTML, drawn server-side: pages, tables and inline SVG charts.

Every value that reaches a page goes through `esc` (html.escape with quotes): routes,
paths, payer keys, reasons and asset codes are attacker-chosen strings. Pages carry no
script at all (the Content-Security-Policy forbids it); the one stylesheet is inline,
allowed by a per-response nonce. Chart geometry is computed from integer amounts; floats
are used for pixel positions only, never for money.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote, urlencode

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f4f6fa}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header b{margin-right:20px}
header form{margin-left:auto}main{padding:16px 20px;max-width:1280px}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:12px 16px;
margin:0 0 16px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:0 0 8px}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 8px;
border-bottom:1px solid #edf0f5;vertical-align:top}th{color:#5b6475;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.key{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}.grid section{margin:0}
.allow{color:#17803d}.deny{color:#b42318}.capture{color:#1f7a8c}.release{color:#b26b00}.muted{color:#6b7385}
.flash{background:#eef6ee;border-color:#b7dcb9}.error{background:#fdeeee;border-color:#f0b9b9}
form.inline{display:inline}input,select,button{font:inherit;padding:3px 6px}
button{cursor:pointer}
"""


def esc(value: object) -> str:
    """Text for HTML (element content or a quoted attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def link(path: str, **query: str) -> str:
    """An escaped href: a fixed path plus query parameters encoded."""
    shown = {k: v for k, v in query.items() if v}
    return esc(path + ("?" + urlencode(shown) if shown else ""))


def payer_link(payer: str) -> str:
    """A link to the payer's page; the key is percent-encoded in the path, escaped as text."""
    if not payer:
        return '<span class="muted">-</span>'
    return f'<a class="key" href="/payers/{esc(quote(payer, safe=""))}">{esc(payer)}</a>'


def page(title: str, body: str, nonce: str, csrf: str = "", user: bool = True) -> str:
    nav = ""
    if user:
        nav = (
            '<a href="/">Overview</a><a href="/decisions">Decisions</a>'
            '<a href="/payers">Payers</a><a href="/settlement">Settlement</a>'
            f'<form method="post" action="/logout"><input type="hidden" name="csrf" '
            f'value="{esc(csrf)}"><button>Log out</button></form>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · x402 sidecar</title>"
        f'<style nonce="{esc(nonce)}">{STYLE}</style></head><body>'
        f"<header><b>x402 sidecar</b>{nav}</header><main><h1>{esc(title)}</h1>{body}</main>"
        "</body></html>"
    )


def section(title: str, content: str, ident: str = "", kind: str = "") -> str:
    attrs = (f' id="{esc(ident)}"' if ident else "") + (f' class="{esc(kind)}"' if kind else "")
    return f"<section{attrs}><h2>{esc(title)}</h2>{content}</section>"


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], ident: str = "", numeric: int = 0
) -> str:
    """`rows` hold HTML already escaped by the caller (cells built with esc/links); the
    last `numeric` columns align right."""
    n = len(headers)

    def cls(i: int) -> str:
        return ' class="num"' if i >= n - numeric else ""

    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    if not body:
        body = f'<tr><td colspan="{n}" class="muted">nothing yet</td></tr>'
    attr = f' id="{esc(ident)}"' if ident else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def hidden(fields: Mapping[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items()
    )


# -- charts (inline SVG) ------------------------------------------------------------------


def bar_chart(
    label: str, values: Sequence[int], caption: Sequence[str], shown: Sequence[str]
) -> str:
    """Vertical bars, one per value (atomic amounts); `shown` is each bar's decimal text
    (its tooltip), `caption` the x labels. Heights scale to the largest value."""
    width, height, pad = 1040, 140, 24
    top = max(values, default=0) or 1
    step = (width - 2 * pad) / max(len(values), 1)
    svg = [
        f'<svg role="img" aria-label="{esc(label)}" viewBox="0 0 {width} {height + 20}" '
        f'width="100%" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="{pad}" y1="{height}" x2="{width - pad}" y2="{height}" stroke="#c5ccd8"/>',
    ]
    for i, (value, text) in enumerate(zip(values, shown, strict=True)):
        h = (height - pad) * value / top  # pixels only
        x = pad + i * step
        svg.append(
            f'<rect x="{x + 2:.1f}" y="{height - h:.1f}" width="{max(step - 4, 1):.1f}" '
            f'height="{h:.1f}" fill="#3b6fd8"><title>{esc(text)}</title></rect>'
        )
        if caption[i]:
            svg.append(
                f'<text x="{x + step / 2:.1f}" y="{height + 14}" font-size="10" '
                f'text-anchor="middle" fill="#5b6475">{esc(caption[i])}</text>'
            )
    peak = shown[values.index(max(values))] if values else "0"
    svg.append(f'<text x="{pad}" y="12" font-size="11" fill="#5b6475">max {esc(peak)}</text>')
    svg.append("</svg>")
    return "".join(svg)


def hbar_chart(label: str, items: Sequence[tuple[str, int, str]]) -> str:
    """Horizontal bars: (name, count, css colour) each, longest first as given."""
    width, row = 500, 22
    height = row * max(len(items), 1) + 4
    top = max((count for _n, count, _c in items), default=0) or 1
    svg = [
        f'<svg role="img" aria-label="{esc(label)}" viewBox="0 0 {width} {height}" '
        f'width="100%" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (name, count, colour) in enumerate(items):
        w = 240 * count / top  # pixels only
        y = i * row + 2
        svg.append(
            f'<text x="200" y="{y + 15}" font-size="12" text-anchor="end" fill="#1d2330">'
            f"{esc(name)}</text>"
            f'<rect x="210" y="{y + 3}" width="{max(w, 1):.1f}" height="{row - 6}" '
            f'fill="{esc(colour)}"/>'
            f'<text x="{216 + w:.1f}" y="{y + 15}" font-size="12" fill="#1d2330">'
            f"{count}</text>"
        )
    svg.append("</svg>")
    return "".join(svg)
