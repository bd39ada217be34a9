"""The operator's dashboard in the tests: its address on a stack, a logged-in HTTP client,
and the ledger's revenue per route summed independently of the dashboard's code."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import httpx

from sidecar.core.money import to_decimal
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.stacks import ADMIN_TOKEN
from tests.support.streams import raw

GET_PAGES = (
    "/",
    "/decisions",
    "/decisions?reason=paid",
    "/payers",
    "/payers/{payer}",
    "/settlement",
    "/evidence?payer={payer}",
    "/api/summary",
    "/api/decisions",
)
POST_PAGES = ("/payers/{payer}/status", "/payers/{payer}/credit", "/logout")


def base_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.ports['dashboard']}"


@asynccontextmanager
async def session(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client logged in through the form (its session cookie set)."""
    async with httpx.AsyncClient(base_url=base_url(stack), timeout=20) as http:
        answer = await http.post("/login", data={"token": ADMIN_TOKEN})
        assert answer.status_code == 303, answer.text
        yield http


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


async def ledger_revenue(ledger: Ledger, decimals: int = 6) -> dict[tuple[str, str], str]:
    """(route, asset) → total, from every payer's receipts read page by page (the admin
    API's read path), summed here in integers."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    members = cast(set[str], await raw(ledger).smembers("x402:payers"))
    for payer in members:
        after = ""
        while True:
            page = await ledger.receipt_page(payer, after, 500)
            for _id, fields in page:
                route = fields.get("route") or "(channel close)"
                totals[(route, fields["asset"])] += int(fields["amount"])
            if len(page) < 500:
                break
            after = page[-1][0]
    return {key: to_decimal(amount, decimals) for key, amount in totals.items()}
