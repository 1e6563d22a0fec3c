"""The exported web page in a real browser: `chargpt export --format web`, served by Python's
http.server on 127.0.0.1, opened in headless Chromium, where onnxruntime-web runs the model.
Skipped where Chromium, its driver, the export extra or onnxruntime-web (npm) is missing.

onnxruntime-web comes from npm once into a cache under the temporary directory
($TMPDIR/chargpt-test-cache, kept between runs: ~35 MB the first time, nothing after)."""

from __future__ import annotations

import functools
import http.server
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
webdriver = pytest.importorskip("selenium.webdriver")

import browser_support  # noqa: E402
from browser_support import chromium, needs_chromium  # noqa: E402
from export_support import decisive_run  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from chargpt.cli.main import main  # noqa: E402
from chargpt.export import web  # noqa: E402

pytestmark = needs_chromium
CACHE = Path(tempfile.gettempdir()) / "chargpt-test-cache"
PROMPT = "abc de"
LONG = 40  # characters: past the run's block_size of 16, so the window rule restarts the cache
WAIT = 60  # seconds any one step may take on a busy 2-core machine
wait = functools.partial(browser_support.wait, timeout=WAIT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return decisive_run(tmp_path_factory.mktemp("export-web") / "run", mlp="relu2")


@pytest.fixture(scope="module")
def site(run_dir, tmp_path_factory) -> Path:
    """The exported site; onnxruntime-web from the test cache, filled by npm if empty."""
    cached = CACHE / f"onnxruntime-web-{web.ORT_WEB_VERSION}"
    if not cached.is_dir() and shutil.which("npm") is None:
        pytest.skip("needs npm (or a filled test cache) for onnxruntime-web")
    out = tmp_path_factory.mktemp("site") / "site"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHARGPT_CACHE_DIR", str(CACHE))
        web.export_site(run_dir, out)
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def url(site) -> Iterator[str]:
    """`python -m http.server` as a user runs it, in a thread, on a free port of 127.0.0.1."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium(WAIT) as driver:
        yield driver


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    wait(browser, lambda: "parameters" in browser.find_element(By.ID, "facts").text)


def page_generate(browser, prompt: str, options: dict) -> str:
    """`await window.chargpt.generate(prompt, options)` in the page."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.chargpt.generate(arguments[0], arguments[1]).then(done, e => done('ERROR ' + e));",
        prompt,
        options,
    )


def cli_greedy_text(run_dir: Path, prompt: str, length: int, capsys) -> str:
    capsys.readouterr()
    argv = ["sample", "--run", str(run_dir), "--prompt", prompt, "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", str(length)]) == 0
    return capsys.readouterr().out.removeprefix(prompt or "\n").removesuffix("\n")


def test_the_page_loads_everything_from_its_own_folder(browser, url):
    open_page(browser, url)
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => r.name)"
    )
    assert any(name.endswith("model.onnx") for name in loaded)
    assert any(name.endswith(".wasm") for name in loaded)
    assert all(name.startswith(url + "/") for name in loaded)  # nothing from elsewhere


def test_greedy_text_in_the_browser_is_chargpt_samples(browser, url, run_dir, capsys):
    open_page(browser, url)
    for prompt in (PROMPT, ""):  # "" starts from a newline, as the CLI does
        expected = cli_greedy_text(run_dir, prompt, LONG, capsys)
        text = page_generate(browser, prompt, {"maxTokens": LONG, "temperature": 0})
        assert text == expected
    stats = browser.execute_script("return window.chargpt.stats")
    print(f"\nChromium: {stats}")  # smoke-level figures (pytest -s shows them)


def test_sampling_controls_in_the_browser(browser, url):
    open_page(browser, url)
    options = {"maxTokens": 30, "temperature": 0.9, "topK": 3, "seed": 5}
    first = page_generate(browser, PROMPT, options)
    assert len(first) == 30 and page_generate(browser, PROMPT, options) == first  # seeded
    assert page_generate(browser, PROMPT, {**options, "seed": 6}) != first
    # top-k 1 leaves one candidate: the greedy text whatever the temperature
    greedy = page_generate(browser, PROMPT, {"maxTokens": 30, "temperature": 0})
    assert page_generate(browser, PROMPT, {**options, "topK": 1}) == greedy
    error = page_generate(browser, "abc\N{SNOWMAN}", {"maxTokens": 3})
    assert error.startswith("ERROR") and "never saw" in error


def test_the_page_streams_text_and_draws_the_next_character_bars(browser, url, run_dir, capsys):
    expected = cli_greedy_text(run_dir, PROMPT, LONG, capsys)
    open_page(browser, url)
    browser.execute_script(
        "document.getElementById('prompt').value = arguments[0];"
        "document.getElementById('temperature').value = 0;"
        "document.getElementById('max-tokens').value = arguments[1];",
        PROMPT,
        LONG,
    )
    browser.find_element(By.ID, "generate").click()
    wait(browser, lambda: "chars/s" in browser.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "text").text.replace("\n", "") == (
        PROMPT + expected
    ).replace("\n", "")
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert len(bars) == 10
    drawn = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row.next")
    assert len(drawn) == 1 and drawn[0].text.endswith("100% ← drawn")  # greedy: all on one
