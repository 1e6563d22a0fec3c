"""Screenshots of the playground for the docs, taken in headless Chromium from a live server.

    python docs/playground_screenshots.py --run RUN [--out docs]

Starts `chargpt serve --run RUN` on a free loopback port, generates from a fixed prompt and
seed, picks one character and writes playground.png (1280 x 800), playground_matrix.png (one
head enlarged) and playground_narrow.png (a 390-pixel-wide phone, the whole page). Needs the
`serve` extra, selenium, Chromium and ChromeDriver (Debian: apt install chromium-driver).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PROMPT = "ROMEO:\nBut soft, what light"
SEED = 7
MAX_CHARS = 100
SELECTED = 57  # the character on show: the "u" of "your" with the 400-step run
HEAD = (3, 3)  # the head enlarged: the line-start head of the 400-step run (docs/lab_answers.md)


@contextmanager
def served(run: Path) -> Iterator[str]:
    """`chargpt serve --run RUN` on a free port of 127.0.0.1, stopped on exit; yields its URL."""
    command = [sys.executable, "-m", "chargpt", "serve", "--run", str(run), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner = server.stdout.readline()
        if " at http://" not in banner:
            raise SystemExit(f"chargpt serve did not start: {banner!r}")
        yield banner.split(" at ")[1].split()[0].removesuffix("/v1")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="chargpt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """Exactly `width` x `height` CSS pixels of page, at one device pixel each."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def generate_and_select(driver: webdriver.Chrome, url: str) -> None:
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)
    driver.get(url + "/")
    wait.until(lambda d: "parameters" in d.find_element(By.ID, "facts").text)
    driver.find_element(By.ID, "prompt").clear()
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    for field, value in (("max-tokens", MAX_CHARS), ("seed", SEED)):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(str(value))
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.head"))
    driver.find_elements(By.CSS_SELECTOR, "#text span")[SELECTED].click()
    wait.until(lambda d: d.find_element(By.ID, "position").text.startswith("After"))
    time.sleep(0.3)  # the strips are drawn on the next animation frame


def screenshots(run: Path, out: Path) -> list[Path]:
    written = [out / "playground.png", out / "playground_matrix.png", out / "playground_narrow.png"]
    with served(run) as url, chromium() as driver:
        viewport(driver, 1280, 800)
        generate_and_select(driver, url)
        driver.save_screenshot(str(written[0]))
        layer, head = HEAD
        driver.find_element(
            By.CSS_SELECTOR, f"button.head[data-layer='{layer}'][data-head='{head}']"
        ).click()
        time.sleep(0.3)
        driver.save_screenshot(str(written[1]))
        viewport(driver, 390, 844)
        generate_and_select(driver, url)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        viewport(driver, 390, height)
        time.sleep(0.3)
        driver.save_screenshot(str(written[2]))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a trained GPT run directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="directory")
    args = parser.parse_args()
    for path in screenshots(args.run, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
