"""The operator's dashboard on the admin side of a real stack (Redis, two sidecar workers,
Envoy): refused without the admin token, CSRF-proof, and in a real headless Chromium:
revenue equal to the ledger's sums after paid traffic, decisions filtered by reason, a
payer credited once per idempotency key, an evidence bundle downloaded and verified, and
attacker-chosen strings shown as text."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from sidecar.agent.auth import X402Auth
from sidecar.agent.wallet import Wallet
from sidecar.ledger import decisions
from sidecar.ledger.accounts import Ledger
from sidecar.server.config import Settings
from sidecar.server.dashboard import auth
from sidecar.server.dashboard.routes import start_dashboard
from sidecar.server.feed import DecisionFeed
from sidecar.tools.stack import Stack, free_port
from tests.support.browser import chromium, log_in, screenshot, table_rows, wait_for
from tests.support.cli import x402
from tests.support.dashboard import (
    GET_PAGES,
    POST_PAGES,
    base_url,
    csrf_of,
    ledger_revenue,
    session,
)
from tests.support.demos import read_until_up, serve_demo
from tests.support.payers import funded_payer, paid_requests, pay_direct
from tests.support.settlement import settle
from tests.support.stacks import ADMIN_TOKEN, ask_sidecar, over_http
from tests.support.streams import raw

MARKUP = '<script>document.title="owned"</script><img src=x id=injected>'
PATH = "/api/v1/market/" + MARKUP


@pytest.fixture(scope="module")
async def admin_ledger(admin_stack: Stack) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(admin_stack.redis_url)
    yield ledger
    await ledger.close()


@pytest.mark.parametrize(
    "credential",
    [
        {},
        {"Authorization": "Bearer wrong-token-0000000000000000"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Cookie": f"{auth.COOKIE}=made-up-session"},
    ],
    ids=["none", "wrong-bearer", "not-bearer", "made-up-cookie"],
)
async def test_every_page_and_api_is_401_without_the_token(
    admin_stack: Stack, admin_ledger: Ledger, credential: dict[str, str]
) -> None:
    wallet = await funded_payer(admin_ledger, 1_000_000)
    payer = quote(wallet.public_key, safe="")
    async with httpx.AsyncClient(base_url=base_url(admin_stack), timeout=10) as http:
        for path in GET_PAGES:
            answer = await http.get(path.format(payer=payer), headers=credential)
            assert answer.status_code == 401, path
            assert wallet.public_key not in answer.text  # nothing of the ledger shows
        for path in POST_PAGES:
            form = {"amount": "5", "asset": "USDF", "idempotency_key": "k1", "confirm": "yes",
                    "action": "suspend", "csrf": "x"}  # fmt: skip
            answer = await http.post(path.format(payer=payer), data=form, headers=credential)
            assert answer.status_code == 401, path
        refused = await http.post("/login", data={"token": "wrong-token-0000000000000000"})
        assert refused.status_code == 401 and "set-cookie" not in refused.headers
    account = await admin_ledger.account(wallet.public_key)
    assert (account.status, account.balances["USDF"]) == ("active", 1_000_000)


def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    sessions = auth.Sessions(ADMIN_TOKEN.encode())
    assert not sessions.token_matches("t0ken-" + "y" * 26)
    assert not sessions.token_matches("short")
    assert sessions.token_matches(ADMIN_TOKEN)
    assert [given for given, _expected in compared] == [
        b"t0ken-" + b"y" * 26,
        b"short",
        ADMIN_TOKEN.encode(),
    ]


async def test_cross_site_posts_are_refused(admin_stack: Stack, admin_ledger: Ledger) -> None:
    wallet = await funded_payer(admin_ledger, 1_000_000)
    payer = quote(wallet.public_key, safe="")
    base = base_url(admin_stack)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        # Logging in from another site is refused too (login CSRF).
        forged = await http.post(
            "/login", data={"token": ADMIN_TOKEN}, headers={"Origin": "https://evil.example"}
        )
        assert forged.status_code == 403 and "set-cookie" not in forged.headers
    async with session(admin_stack) as http:
        cookie = http.cookies.jar
        assert any(c.name == auth.COOKIE for c in cookie)
        page = await http.get(f"/payers/{payer}")
        token = csrf_of(page.text)
        form = {"amount": "5", "asset": "USDF", "idempotency_key": "csrf-1", "confirm": "yes"}
        for headers, fields in (
            ({"Origin": "https://evil.example"}, {**form, "csrf": token}),
            ({"Sec-Fetch-Site": "cross-site"}, {**form, "csrf": token}),
            ({"Origin": base}, form),  # no CSRF token
            ({"Origin": base}, {**form, "csrf": token[:-2] + "xx"}),
        ):
            refused = await http.post(f"/payers/{payer}/credit", data=fields, headers=headers)
            assert refused.status_code == 403, headers
        suspend = {"action": "suspend", "csrf": token}
        refused = await http.post(
            f"/payers/{payer}/status", data=suspend, headers={"Origin": "null"}
        )
        assert refused.status_code == 403
        assert (await admin_ledger.account(wallet.public_key)).balances["USDF"] == 1_000_000
        assert (await admin_ledger.account(wallet.public_key)).status == "active"
        # The same form from the dashboard's own origin goes through.
        done = await http.post(
            f"/payers/{payer}/credit", data={**form, "csrf": token}, headers={"Origin": base}
        )
        assert done.status_code == 200 and "Credited 5 USDF" in done.text
    assert (await admin_ledger.account(wallet.public_key)).balances["USDF"] == 6_000_000


async def test_the_session_cookie_is_httponly_and_samesite_strict(admin_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=base_url(admin_stack), timeout=10) as http:
        answer = await http.post("/login", data={"token": ADMIN_TOKEN})
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and cookie.startswith(f"{auth.COOKIE}=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite", "path"} <= attributes
    assert "samesite=strict" in cookie.lower() and ADMIN_TOKEN not in cookie
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script" not in policy


async def test_wrong_tokens_make_an_address_wait_logged_and_counted(admin_stack: Stack) -> None:
    """From one client address (127.0.0.2; the dashboard listens on 127.0.0.1), wrong
    tokens by form and bearer header: past the free ones a typed 429 with Retry-After, even
    for the right token; another address logs in; each failure one log line without the
    token, and counted."""
    wrong = "wrong-token-" + "w" * 20
    counted = _auth_failures(admin_stack)
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(
        base_url=base_url(admin_stack), transport=transport, timeout=10
    ) as other:
        for n in range(auth.FREE_FAILURES):
            if n % 2:
                refused = await other.post("/login", data={"token": wrong})
            else:
                refused = await other.get(
                    "/api/summary", headers={"Authorization": f"Bearer {wrong}"}
                )
            assert refused.status_code == 401, n
        refused = await other.post("/login", data={"token": wrong})  # the first that waits
        assert refused.status_code == 401
        waiting = await other.post("/login", data={"token": ADMIN_TOKEN})
        assert waiting.status_code == 429 and "set-cookie" not in waiting.headers
        assert int(waiting.headers["retry-after"]) >= 1
        assert waiting.json()["error"] == "rate_limited"
        api = await other.get("/api/summary", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert api.status_code == 429
    async with session(admin_stack) as http:  # per address: 127.0.0.1 is not held back
        assert (await http.get("/api/summary")).status_code == 200
    lines = [
        json.loads(line)
        for line in (admin_stack.dir / "sidecar.log").read_text().splitlines()
        if '"admin.auth_refused"' in line and '"127.0.0.2"' in line
    ]
    assert len(lines) == auth.FREE_FAILURES + 1
    assert {line["via"] for line in lines} == {"login", "bearer"}
    assert all(line["api"] == "dashboard" and line["level"] == "warning" for line in lines)
    assert wrong not in (admin_stack.dir / "sidecar.log").read_text()
    assert _auth_failures(admin_stack) - counted >= auth.FREE_FAILURES + 1


async def test_behind_a_tls_proxy_the_public_origin_posts_with_a_host_secure_cookie(
    admin_stack: Stack, admin_ledger: Ledger
) -> None:
    """The dashboard as worker 0 serves it, with dashboard_public_origin set, in process on
    the admin stack's ledger: the public Origin may POST, the cookie is __Host- and Secure."""
    public = "https://ops.example.com"
    settings = replace(
        Settings.load(admin_stack.config_path, env={}),
        dashboard_public_origin=public,
        listen_dashboard=f"127.0.0.1:{free_port()}",
    )
    runner = await start_dashboard(settings, admin_ledger, settings.gateway())
    assert runner is not None
    wallet = await funded_payer(admin_ledger, 1_000_000)
    payer = quote(wallet.public_key, safe="")
    try:
        base = f"http://{settings.listen_dashboard}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            forged = await http.post(
                "/login", data={"token": ADMIN_TOKEN}, headers={"Origin": "https://evil.example"}
            )
            assert forged.status_code == 403
            login = await http.post(
                "/login", data={"token": ADMIN_TOKEN}, headers={"Origin": public}
            )
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert cookie.startswith(f"{auth.SECURE_COOKIE}=")
            attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
            assert {"secure", "httponly", "path=/", "samesite=strict"} <= attributes
            assert not any(a.startswith("domain") for a in attributes)
            # What the browser sends back through the proxy (httpx keeps Secure cookies off
            # plain HTTP, as a browser would): the cookie, the public Origin, the form token.
            jar = {"Cookie": cookie.split(";")[0]}
            page = await http.get(f"/payers/{payer}", headers=jar)
            assert page.status_code == 200
            plain = {"Cookie": f"{auth.COOKIE}={cookie.split(';')[0].split('=', 1)[1]}"}
            assert (await http.get(f"/payers/{payer}", headers=plain)).status_code == 401
            done = await http.post(
                f"/payers/{payer}/status",
                data={"action": "suspend", "csrf": csrf_of(page.text)},
                headers={**jar, "Origin": public},
            )
            assert done.status_code == 200 and "Payer is now suspended" in done.text
    finally:
        await runner.cleanup()
    assert (await admin_ledger.account(wallet.public_key)).status == "suspended"


def _auth_failures(stack: Stack) -> float:
    """x402_admin_auth_failures_total{api="dashboard"} from the sidecar's /metrics."""
    text = httpx.get(f"{stack.sideport_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('x402_admin_auth_failures_total{api="dashboard"}')
    )


async def test_the_dashboard_in_a_real_browser(
    admin_stack: Stack, admin_ledger: Ledger, tmp_path: Path
) -> None:
    wallet = await funded_payer(admin_ledger, 5_000_000)
    other = await funded_payer(admin_ledger, 1_000_000)
    atlas = "/api/v1/agent/pay-api/atlas"
    async with httpx.AsyncClient(base_url=admin_stack.url, timeout=10) as client:
        await paid_requests(client, admin_stack, wallet, 7)
        await paid_requests(client, admin_stack, other, 3)
        for _ in range(2):
            paid = await client.get(
                atlas, headers=pay_direct(admin_stack, wallet, f"GET {atlas}", "0.25")
            )
            assert paid.status_code == 200, paid.text
        refused = await client.get(atlas)  # no payment: 402 payment_required
        assert refused.status_code == 402
    expected = await ledger_revenue(admin_ledger)
    assert expected[("atlas", "USDF")] and expected[("verify", "USDF")]
    await asyncio.sleep(0.2)  # the decision log's batch reaches the stream (10 ms)

    base = base_url(admin_stack)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(downloads) as driver:
        log_in(driver, base, ADMIN_TOKEN)
        shown = {
            (row[0], row[1]): row[5] for row in table_rows(driver, "revenue") if row[0] != "total"
        }
        assert shown == {key: value for key, value in expected.items()}
        screenshot(driver, "dashboard.png")

        # Decisions filtered by a reason: only that reason, the refused request among them.
        driver.get(f"{base}/decisions")
        Select(driver.find_element(By.ID, "reason")).select_by_value("payment_required")
        driver.find_element(By.CSS_SELECTOR, "#filters button").click()
        wait_for(lambda: "reason=payment_required" in driver.current_url, "the filter")
        rows = table_rows(driver, "decisions")
        assert rows and {row[3] for row in rows} == {"payment_required"}
        assert atlas in {row[5] for row in rows}
        screenshot(driver, "dashboard-decisions.png")

        # A payer, from the top payers; credited twice with one idempotency key.
        driver.get(base)
        driver.find_element(By.LINK_TEXT, wallet.public_key).click()
        wait_for(lambda: driver.find_elements(By.ID, "payer-key"), "the payer page")
        assert driver.find_element(By.ID, "payer-key").text == wallet.public_key
        before = await admin_stack.balance(wallet.public_key)
        receipts = table_rows(driver, "receipts")
        assert len(receipts) == 9 and {row[5] for row in receipts} == {"signature ok"}
        for attempt in range(2):
            form = driver.find_element(By.ID, "credit")
            form.find_element(By.NAME, "amount").send_keys("2.5")
            key = form.find_element(By.NAME, "idempotency_key")
            key.clear()
            key.send_keys("dashboard-credit-1")
            form.find_element(By.CSS_SELECTOR, "button").click()
            wait_for(lambda: driver.find_elements(By.ID, "confirm"), "the confirmation")
            assert driver.find_element(By.ID, "confirm-amount").text == "2.5 USDF"
            driver.find_element(By.ID, "confirm").click()
            flash = wait_for(lambda: driver.find_elements(By.ID, "flash"), "the result")[0]
            if attempt == 0:
                assert flash.text.startswith("Credited 2.5 USDF")
            else:
                assert flash.text.startswith("Idempotency key seen before")
        assert await admin_stack.balance(wallet.public_key) == before + 2_500_000
        balances = {row[0]: row[1] for row in table_rows(driver, "balances")}
        assert balances["USDF"] == "6.93"  # 5 - 7 x 0.01 - 2 x 0.25 + 2.5

        # Settle, then download the payer's evidence bundle and verify it offline.
        assert (await settle(admin_stack)).code == 0
        driver.refresh()
        driver.find_element(By.ID, "evidence").click()
        bundle = wait_for(
            lambda: [p for p in downloads.glob("evidence-*.json") if p.stat().st_size],
            "the evidence download",
        )[0]
        document = json.loads(bundle.read_text())
        assert len(document["receipts"]) == 9
        verified = await x402(
            "evidence", "verify", str(bundle), "--key", admin_stack.gateway_identity.public_key
        )
        assert verified.code == 0 and verified.out.startswith("OK: 9 receipts"), verified.out

        driver.get(f"{base}/settlement")
        batches = table_rows(driver, "batches")
        assert any(row[2] == wallet.public_key and row[7] == "committed" for row in batches)


async def test_attacker_chosen_strings_render_as_text(
    admin_stack: Stack, admin_ledger: Ledger, tmp_path: Path
) -> None:
    # A request path with markup, checked by worker 0 over its ext_authz port: its decision
    # line. (Envoy percent-encodes such a path; a check may come from elsewhere.)
    status, _ = await asyncio.to_thread(ask_sidecar, admin_stack, PATH, {})
    assert status == 200  # an unlisted path: free
    # A payer key and a route with markup, as a worker would write them (the stream is
    # data: whatever a future scheme puts in a payer field must still render as text).
    line = {"decision": "deny", "reason": "invalid_payment", "payer": MARKUP, "route": MARKUP,
            "path": "/x", "method": "GET", "status": 402}  # fmt: skip
    await decisions.append(admin_ledger, [json.dumps(line)])
    await asyncio.sleep(0.2)

    base = base_url(admin_stack)
    with chromium(tmp_path) as driver:
        log_in(driver, base, ADMIN_TOKEN)
        for page in (
            "/decisions",
            f"/decisions?payer={quote(MARKUP)}",
            f"/payers/{quote(MARKUP, safe='')}",
        ):
            driver.get(base + page)
            assert driver.title != "owned", page
            assert not driver.find_elements(By.CSS_SELECTOR, "main script, main img"), page
            text = driver.find_element(By.TAG_NAME, "main").text
            assert MARKUP in text, page
        driver.get(base + "/decisions")
        paths = [row[5] for row in table_rows(driver, "decisions")]
        # An HTTP request line cannot carry the markup's spaces: over the HTTP transport the
        # check saw (and the page shows, as text) its percent-encoded form.
        seen = httpx.URL("http://gw" + PATH).raw_path.decode() if over_http(admin_stack) else PATH
        assert seen in paths
        payers = [row[7] for row in table_rows(driver, "decisions")]
        assert MARKUP in payers
        # The filter's input shows the markup as its value, not as elements.
        driver.get(f"{base}/decisions?payer={quote(MARKUP)}")
        field = driver.find_element(By.CSS_SELECTOR, "#filters input[name=payer]")
        assert field.get_attribute("value") == MARKUP


async def test_the_decision_stream_is_capped_and_a_dead_redis_costs_nothing(
    admin_ledger: Ledger,
) -> None:
    lines = [json.dumps({"decision": "allow", "reason": "free", "n": n}) for n in range(3000)]
    for start in range(0, 3000, 256):
        await decisions.append(admin_ledger, lines[start : start + 256], keep=1000)
    kept = await decisions.kept(admin_ledger)
    assert 1000 <= kept < 1200  # MAXLEN ~: whole nodes trimmed
    newest = await decisions.recent(admin_ledger, 3)
    assert [line["n"] for line in newest] == [2999, 2998, 2997]
    # Capped in bytes too, whatever the lines: 2,000 lines of 2 KB under a 256 KiB cap.
    cap = 256 * 1024
    wide = [json.dumps({"reason": "free", "n": n, "path": "/" + "p" * 2000}) for n in range(2000)]
    for start in range(0, 2000, 256):
        await decisions.append(admin_ledger, wide[start : start + 256], max_bytes=cap)
    used = await raw(admin_ledger).memory_usage("x402:decisions", samples=0)
    assert used is not None and cap // 2 < used <= cap * 1.05
    assert [line["n"] for line in await decisions.recent(admin_ledger, 1)] == [1999]

    dead = Ledger.from_url("redis://127.0.0.1:1/0", timeout=0.2)
    feed = DecisionFeed(dead)
    feed(lines[:10])  # returns at once; the batch is sent in the background
    await feed.close()
    assert feed.dropped == 10
    await dead.close()


def test_demo_serve_prints_the_dashboard_and_its_traffic_shows_up() -> None:
    process = serve_demo()
    try:
        text = read_until_up(process)
        dashboard = re.search(r"dashboard\s+(http://\S+)", text)
        token = re.search(r"admin token\s+(\S+)", text)
        gateway = re.search(r"X402_GATEWAY=(\S+)", text)
        key_file = re.search(r"X402_WALLET_FILE=(\S+)", text)
        assert dashboard and token and gateway and key_file, text

        wallet = Wallet.from_file(key_file.group(1))
        atlas = f"{gateway.group(1)}/api/v1/agent/pay-api/atlas"
        with httpx.Client(auth=X402Auth(wallet, strict=True)) as client:
            assert client.get(atlas).status_code == 200
        time.sleep(0.2)
        with httpx.Client(base_url=dashboard.group(1), timeout=10) as http:
            assert http.get("/api/summary").status_code == 401
            assert http.post("/login", data={"token": token.group(1)}).status_code == 303
            summary = http.get("/api/summary").json()
            recent = http.get("/api/decisions", params={"reason": "paid"}).json()
        assert {"route": "atlas", "asset": "USDF", "receipts": 1, "last_hour": "0.25",
                "last_day": "0.25", "total": "0.25"} in summary["revenue"]  # fmt: skip
        assert [d["payer"] for d in recent["decisions"]] == [wallet.public_key]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
