"""Debian's headless Chromium for the browser tests (the playground's, the exported page's):
where it is, how it starts, and waiting on a page. Import it after
`pytest.importorskip("selenium.webdriver")`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Chromium and ChromeDriver (apt: chromium-driver)"
)
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",  # nothing but loopback, ever
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,800",
)


@contextmanager
def chromium(timeout: float) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium in a profile of its own; page loads and scripts may take up to
    `timeout` seconds."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chargpt-chromium-")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(timeout)
    driver.set_script_timeout(timeout)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(browser: webdriver.Chrome, condition: Callable[[], Any], timeout: float) -> Any:
    """`condition()`'s first truthy value, polled every 50 ms for up to `timeout` seconds."""
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda _: condition())
