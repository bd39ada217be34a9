"""A real headless Chromium for the dashboard tests: Debian's `chromium` and
`chromium-driver` (the Makefile's `browser` step installs them), driven with selenium.
No browser is downloaded: the driver and the binary are the system's."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

T = TypeVar("T")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1360,1400",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def system_binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(f"none of {names} on PATH: run `make browser` (apt-get install)")


@contextmanager
def chromium(downloads: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium (its own --user-data-dir) saving downloads to `downloads`."""
    with tempfile.TemporaryDirectory(prefix="x402-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = system_binary("chromium", "chromium-browser")
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(downloads),
                "download.prompt_for_download": False,
                "safebrowsing.enabled": False,
            },
        )
        service = Service(executable_path=system_binary("chromedriver"))
        driver = webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def log_in(driver: WebDriver, base: str, token: str) -> None:
    driver.get(f"{base}/login")
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    wait_for(lambda: driver.find_elements(By.ID, "revenue"), "the overview after login")


def table_rows(driver: WebDriver, table_id: str) -> list[list[str]]:
    """A table's body cells as the browser shows them (the DOM's text)."""
    rows = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path
