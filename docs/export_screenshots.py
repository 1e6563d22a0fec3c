"""Screenshots of the exported web page for the docs, and its speed in headless Chromium.

    python docs/export_screenshots.py --run RUN [--out docs]

Exports RUN with `chargpt export --format web` into a temporary folder, serves it with Python's
http.server on a free loopback port, generates from a fixed prompt and seed, and writes
export_page.png (1280 x 800) and export_page_narrow.png (a 390-pixel-wide phone, the whole
page). Then prints what the page measured, smoke-level: the model's load time, the time to the
first character (after load; the prompt's prefill included) and characters per second for a
greedy text of MAX_CHARS. Needs the export extra, selenium, Chromium and ChromeDriver (Debian:
apt install chromium-driver), and npm or a cached onnxruntime-web.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from chargpt.export.web import export_site

PROMPT = "ROMEO:\nBut soft, what light"
SEED = 7
MAX_CHARS = 200


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def chromium(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--hide-scrollbars",
                 f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_script_timeout(300)
    return driver


def generate_on_the_page(driver: webdriver.Chrome, url: str) -> None:
    """Fill the form as a user would and press Generate; wait for the text to finish."""
    driver.get(url)
    wait = WebDriverWait(driver, 120, poll_frequency=0.1)
    wait.until(lambda d: "parameters" in d.find_element(By.ID, "facts").text)
    driver.execute_script(
        "const set = (id, v) => { const e = document.getElementById(id); e.value = v;"
        " e.dispatchEvent(new Event('input')); };"
        "set('prompt', arguments[0]); set('seed', arguments[1]); set('max-tokens', 120);",
        PROMPT,
        SEED,
    )
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: "chars/s" in d.find_element(By.ID, "status").text)


def measure(driver: webdriver.Chrome, url: str) -> dict:
    """A fresh load, then one greedy generation of MAX_CHARS: the page's own timings."""
    driver.get(url)
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return window.chargpt.stats.loadMs") is not None
    )
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.chargpt.generate(arguments[0], {maxTokens: arguments[1], temperature: 0})"
        ".then(done);",
        PROMPT,
        MAX_CHARS,
    )
    return driver.execute_script("return window.chargpt.stats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)  # else Chromium's save_screenshot fails silently
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        started = time.perf_counter()
        export_site(args.run, site)
        print(f"exported in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        handler = functools.partial(QuietHandler, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        try:
            for name, (width, height) in {
                "export_page.png": (1280, 800),
                "export_page_narrow.png": (390, 844),
            }.items():
                driver = chromium(width, height)
                try:
                    generate_on_the_page(driver, url)
                    if width < 600:  # the whole page, as tall as it is
                        full = driver.execute_script("return document.body.scrollHeight")
                        driver.set_window_size(width, full + 200)
                    driver.save_screenshot(str(args.out / name))
                    if width >= 600:
                        stats = measure(driver, url)
                finally:
                    driver.quit()
                print(f"wrote {args.out / name}", file=sys.stderr)
        finally:
            server.shutdown()
    print(
        f"load {stats['loadMs']:.0f} ms, first character {stats['firstCharMs']:.0f} ms after "
        f"load, {stats['charsPerSecond']:.0f} chars/s ({MAX_CHARS} greedy characters)"
    )


if __name__ == "__main__":
    main()
