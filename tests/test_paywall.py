"""A person with a browser wallet pays too: the official x402 paywall page on an unpaid
browser request, through the real stack (anvil + Circle's USDC, the official
facilitator, Envoy, the sidecar, Redis), paid in Debian's headless Chromium by an EIP-1193
wallet injected into the page (tests/support/wallet_page.py) that signs with an anvil
account. Every other client keeps the JSON 402."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select
from x402.schemas import PaymentRequired

from sidecar.core.protocol import DISCOVERY_PATH
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import FacilitatorProcess, exact_settings, payers
from sidecar.tools.stack import Stack
from tests.support.browser import chromium, screenshot, wait_for
from tests.support.exact import b64json, balances
from tests.support.wallet_page import WALLET_NAME, wallet

PAID, QUIET, PREPAID, FREE = "/api/paid", "/api/quiet", "/api/prepaid", "/api/free"
HELD = "/api/held"
PRICE = 10_000  # 0.01 USDF = 0.01 USDC
APP = "Atlas Forecasts"
ROUTES: dict[str, dict[str, Any]] = {
    "paid": {"method": "GET", "path": PAID, "price": "0.01", "description": "A forecast"},
    "quiet": {"method": "GET", "path": QUIET, "price": "0.01", "paywall": False},
    # charged when the service has answered: exact settles at the response phase
    "held": {"method": "GET", "path": HELD, "price": "0.01", "charge": "on_success"},
    # CRED has no token on chain: only prepaid proofs pay it
    "prepaid": {"method": "GET", "path": PREPAID, "price": "0.05", "asset": "CRED"},
}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
BROWSER = {"Accept": BROWSER_ACCEPT, "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
GUIDES = Path(__file__).resolve().parents[1] / "docs" / "guides"


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    settings = exact_settings(
        chain, facilitator, assets={"USDF": 6, "CRED": 6}, paywall={"app_name": APP}
    )
    with Stack(ROUTES, settings=settings) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    with chromium(tmp_path_factory.mktemp("downloads")) as driver:
        driver.set_window_size(960, 720)  # the guide's pictures, small
        yield driver


def get(stack: Stack, path: str, **headers: str) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        return client.get(path, headers=headers)


def test_a_browser_pays_on_the_official_page_and_sees_the_resource(
    stack: Stack, chain: AnvilChain, browser: WebDriver
) -> None:
    payer = payers(chain)[1]
    before = balances(chain, payer.address)
    with wallet(browser, chain, payer):
        browser.get(stack.url + PAID + "?city=Lisbon")
        assert "Payment Required" in wait_for(lambda: _heading(browser), "the page")
        assert "A forecast" in browser.page_source and "0.01" in browser.page_source
        shown = _pay(browser, keep=True)
    assert payer.address in shown and f"{PAID}" in shown  # the service's answer
    after = balances(chain, payer.address)
    assert after == (before[0] - PRICE, before[1] + PRICE)  # on chain: the price, once
    [line] = stack.wait_decisions(
        lambda d: d.get("path") == PAID and d.get("decision") == "allow", timeout=10
    )
    assert (line["reason"], line["payer"], line["status"]) == ("exact", payer.address.lower(), 200)


def test_a_browser_pays_a_route_charged_when_the_service_answered(
    stack: Stack, chain: AnvilChain, browser: WebDriver
) -> None:
    """charge: on_success: the page's payment is verified at the check and settled by the
    response phase once the service answered (its decision line says what was captured)."""
    payer = payers(chain)[2]
    before = balances(chain, payer.address)
    with wallet(browser, chain, payer):
        browser.get(stack.url + HELD)
        wait_for(lambda: _heading(browser), "the page")
        assert payer.address in _pay(browser)
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    [held] = stack.wait_decisions(lambda d: d.get("path") == HELD and d.get("reason") == "held")
    assert held["payer"] == payer.address.lower()
    [captured] = stack.wait_decisions(lambda d: d.get("path") == HELD and "captured" in d)
    assert (captured["decision"], captured["captured"]) == ("capture", "0.01")


def _heading(browser: WebDriver) -> str:
    found = browser.find_elements(By.CSS_SELECTOR, "h1.title")
    return found[0].text if found else ""


def _pay(browser: WebDriver, keep: bool = False) -> str:
    """Connect the injected wallet, pay, and read what the page then shows."""
    connect = browser.find_elements(By.XPATH, "//button[text()='Connect wallet']")
    if connect:
        options = Select(browser.find_element(By.CSS_SELECTOR, "select.input"))
        wait_for(lambda: WALLET_NAME in [o.text for o in options.options], "the injected wallet")
        options.select_by_visible_text(WALLET_NAME)
        connect[0].click()
    pay = wait_for(lambda: browser.find_elements(By.XPATH, "//button[text()='Pay now']"), "Pay")
    wait_for(lambda: "$" in _balance(browser), "the wallet's balance on the page")
    if keep:
        _keep(screenshot(browser, "paywall-before.png"))
    pay[0].click()
    # The page retried its own URL with the payment and shows what the service answered.
    wait_for(lambda: browser.current_url.startswith("blob:"), "the resource", timeout=60)
    if keep:
        _keep(screenshot(browser, "paywall-after.png"))
    return str(browser.find_element(By.TAG_NAME, "body").text)


def _balance(browser: WebDriver) -> str:
    buttons = browser.find_elements(By.CSS_SELECTOR, "button.balance-button")
    if buttons and "$" not in buttons[0].text:
        buttons[0].click()  # the page hides the balance until asked
    return buttons[0].text if buttons else ""


def _keep(path: Path) -> None:
    """The guide's pictures (docs/guides/humans.md), where X402_PAYWALL_SCREENSHOTS asks."""
    if os.environ.get("X402_PAYWALL_SCREENSHOTS"):
        shutil.copy(path, GUIDES / path.name)


def test_the_page_is_a_402_with_the_challenge_header_and_no_store(stack: Stack) -> None:
    page = get(stack, PAID, **BROWSER)
    assert page.status_code == 402
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"
    required = PaymentRequired.model_validate(b64json(page.headers["payment-required"]))
    assert [offer.scheme for offer in required.accepts] == ["prepaid-ed25519", "exact"]
    assert required.resource is not None and required.resource.url == stack.url + PAID
    assert "window.x402" in page.text and APP in page.text
    assert '"currentUrl": ""' in page.text  # the page requests its own URL again
    assert stack.url + PAID in page.text  # this request's URL, in the pieces of the kept page
    line = stack.wait_decisions(lambda d: d.get("paywall") is True and d.get("path") == PAID)[-1]
    assert (line["status"], line["reason"]) == (402, "payment_required")


@pytest.mark.parametrize(
    "headers",
    [
        {},  # httpx, like the official clients
        {"Accept": "*/*", "User-Agent": "curl/8.5.0"},
        {"Accept": "application/json, text/html"},  # prefers JSON
    ],
)
def test_other_clients_keep_the_json_402(stack: Stack, headers: dict[str, str]) -> None:
    answer = get(stack, PAID, **headers)
    assert answer.status_code == 402
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == "payment_required"


def test_a_route_with_the_paywall_off_answers_browsers_with_json(stack: Stack) -> None:
    answer = get(stack, QUIET, **BROWSER)
    assert answer.status_code == 402
    assert answer.headers["content-type"] == "application/json"
    assert "payment-required" in answer.headers


@pytest.mark.parametrize("path", [FREE, DISCOVERY_PATH])
def test_free_routes_and_discovery_get_no_paywall(stack: Stack, path: str) -> None:
    answer = get(stack, path, **BROWSER)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")


def test_a_prepaid_only_route_tells_a_browser_how_to_pay_with_an_agent_wallet(
    stack: Stack, browser: WebDriver
) -> None:
    page = get(stack, PREPAID, **BROWSER)
    assert page.status_code == 402 and page.headers["content-type"].startswith("text/html")
    required = PaymentRequired.model_validate(b64json(page.headers["payment-required"]))
    assert [offer.scheme for offer in required.accepts] == ["prepaid-ed25519"]
    browser.get(stack.url + PREPAID)
    text = browser.find_element(By.ID, "x402-prepaid").text
    assert "agent wallet" in text and "0.05 CRED" in text and "x402 pay" in text
    assert not browser.find_elements(By.TAG_NAME, "button")  # no wallet to connect
    assert not browser.find_elements(By.TAG_NAME, "script")
