"""The playground in a real browser: headless Chromium against a live `chargpt serve` on
127.0.0.1 (a free port). Skipped where Chromium, its driver or the serve extra is missing."""

from __future__ import annotations

import base64
import functools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

import browser_support  # noqa: E402
from browser_support import chromium, needs_chromium  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from serve_support import BLOCK, make_run, serve_subprocess  # noqa: E402

pytestmark = needs_chromium

N_LAYER, N_HEAD = 2, 2  # serve_support.make_run's model
LONG = 20_000  # characters of the generation that the stop button cuts short
WAIT = 30  # seconds any one step may take on a busy 2-core machine
wait = functools.partial(browser_support.wait, timeout=WAIT)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small GPT with decisive weights (the serve tests' run): its text is noise, but every
    view works on it."""
    return make_run(tmp_path_factory.mktemp("playground"))


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory) -> Iterator[str]:
    """`chargpt serve` as a user runs it, on a free port of 127.0.0.1."""
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with serve_subprocess(run_dir, log, "--max-tokens-limit", str(LONG)) as served:
        yield served.url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium(WAIT) as driver:
        yield driver


def by_id(browser, element_id: str):
    return browser.find_element(By.ID, element_id)


def fill(browser, element_id: str, value: str) -> None:
    field = by_id(browser, element_id)
    field.clear()
    field.send_keys(value)


def text_length(browser) -> int:
    return browser.execute_script("return document.getElementById('text').children.length")


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    wait(browser, lambda: "parameters" in by_id(browser, "facts").text)


def largest_weights(url: str, text: str, layer: int, head: int) -> list[tuple[str, int, float]]:
    """The three largest weights of the last row of a head's `wei`, as /v1/inspect answers them
    decoded by numpy: (character, its 1-based position, weight), largest first."""
    answer = httpx.post(url + "/v1/inspect", json={"text": text}, timeout=30).json()
    packed = base64.b64decode(answer["attention"][layer][head])
    t = len(text) - 1
    row = np.frombuffer(packed, dtype="<f2")[t * (t + 1) // 2 :].astype(float)  # t + 1 weights
    best = sorted(range(t + 1), key=lambda i: -row[i])[:3]
    return [(text[i], i + 1, row[i]) for i in best]


def test_page_shows_the_models_facts_and_links_the_api_docs(browser, server):
    open_page(browser, server)
    facts = by_id(browser, "facts").text
    assert f"context {BLOCK} characters" in facts and "val loss 2.500" in facts
    assert browser.find_element(By.LINK_TEXT, "API docs").get_attribute("href") == server + "/docs"
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => r.name)"
    )
    assert loaded and all(name.startswith(server) for name in loaded)  # nothing from elsewhere


def test_generate_then_inspect_a_character(browser, server):
    open_page(browser, server)
    fill(browser, "prompt", "ROMEO:")
    fill(browser, "max-tokens", "60")
    fill(browser, "seed", "1")
    by_id(browser, "generate").click()
    # when the text is in, the last character is inspected: one strip per layer and head
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "button.head")) > 0)
    assert text_length(browser) == len("ROMEO:") + 60
    assert by_id(browser, "status").text.startswith("Done: 60 characters")

    browser.find_elements(By.CSS_SELECTOR, "#text span")[3].click()  # the "E" of ROMEO
    wait(browser, lambda: by_id(browser, "position").text.startswith("After “ROME”"))
    assert "the text goes on with “O”" in by_id(browser, "position").text
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")
    assert len(bars) in (10, 11)  # the top 10, and the text's next character if not among them
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row.next")) == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "button.head")) == N_LAYER * N_HEAD

    # the arrow keys move through the text; the distribution follows
    by_id(browser, "text").send_keys(Keys.ARROW_RIGHT)
    wait(browser, lambda: by_id(browser, "position").text.startswith("After “ROMEO”"))

    # a head enlarges into its whole matrix, the lab's `wei`; Escape closes it
    browser.find_elements(By.CSS_SELECTOR, "button.head")[N_HEAD + 1].click()
    assert by_id(browser, "matrix-dialog").get_attribute("open") is not None
    title = by_id(browser, "matrix-title").text
    assert title == "Layer 1, head 1: wei, 5 \N{MULTIPLICATION SIGN} 5"  # the context up to "O"
    # the page decodes the packed weights as numpy does: the row's three largest, in order
    readout = by_id(browser, "matrix-readout").text
    found = re.findall(r"“(.)” \((\d+)\) (\d\.\d+)", readout)
    shown = [(char, int(at), float(weight)) for char, at, weight in found]
    expected = largest_weights(server, "ROMEO", 1, 1)
    assert [(c, at) for c, at, _ in shown] == [(c, at) for c, at, _ in expected], readout
    assert [w for *_, w in shown] == pytest.approx([w for *_, w in expected], abs=0.006)
    by_id(browser, "matrix-close").send_keys(Keys.ESCAPE)
    wait(browser, lambda: by_id(browser, "matrix-dialog").get_attribute("open") is None)


def test_temperature_slider_reshapes_the_bars(browser, server):
    open_page(browser, server)
    fill(browser, "max-tokens", "20")
    by_id(browser, "generate").click()
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar-row")) > 0)

    def widths() -> list[float]:
        script = "return [...document.querySelectorAll('#bars .bar')].map(b => b.style.width)"
        return [float(width.removesuffix("%")) for width in browser.execute_script(script)]

    slider = by_id(browser, "temperature")
    browser.execute_script(
        "arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'))", slider
    )
    greedy = widths()
    assert greedy[0] == pytest.approx(100) and sum(greedy[1:]) == pytest.approx(0)
    browser.execute_script(
        "arguments[0].value = 2; arguments[0].dispatchEvent(new Event('input'))", slider
    )
    assert 0 < widths()[0] < 100 and by_id(browser, "temperature-value").text == "2.00"


def test_text_streams_in_and_the_stop_button_stops_it(browser, server):
    open_page(browser, server)
    fill(browser, "max-tokens", str(LONG))
    by_id(browser, "generate").click()
    start = len("ROMEO:")
    wait(browser, lambda: text_length(browser) > start + 5)
    seen = text_length(browser)
    wait(browser, lambda: text_length(browser) > seen)  # still growing: it streams
    assert by_id(browser, "stop").is_enabled()
    by_id(browser, "stop").click()
    wait(browser, lambda: by_id(browser, "generate").is_enabled())
    stopped = text_length(browser)
    assert by_id(browser, "status").text.startswith("Stopped")
    time.sleep(0.5)
    assert text_length(browser) == stopped < start + LONG


def test_a_server_with_an_api_key_gets_one_from_the_page(browser, run_dir, tmp_path):
    with serve_subprocess(run_dir, tmp_path / "serve.log", "--api-key", "sesame") as served:
        browser.get(served.url + "/")
        wait(browser, lambda: by_id(browser, "key-row").is_displayed())
        assert "API key" in by_id(browser, "status").text
        assert "asks for an API key" in by_id(browser, "facts").text  # not "could not be loaded"
        fill(browser, "api-key", "sesame")
        by_id(browser, "api-key").send_keys(Keys.TAB)  # a change event: the page retries
        wait(browser, lambda: "parameters" in by_id(browser, "facts").text)
        fill(browser, "max-tokens", "10")
        by_id(browser, "generate").click()
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "button.head")) > 0)
        browser.execute_script("sessionStorage.clear()")  # the next test's server has no key


@pytest.mark.parametrize(
    ("field", "value", "says", "not_says"),
    [
        ("max-tokens", str(LONG + 1), "Max chars", "max_tokens"),
        ("prompt", "caf\u00e9", "'é'", "on_unknown"),
    ],
)
def test_errors_speak_the_pages_words(browser, server, field, value, says, not_says):
    open_page(browser, server)
    fill(browser, field, value)
    by_id(browser, "generate").click()
    wait(browser, lambda: "error" in by_id(browser, "status").get_attribute("class"))
    status = by_id(browser, "status").text
    assert says in status and not_says not in status and "--" not in status


def test_the_greyed_text_has_a_legend(browser, server):
    open_page(browser, server)
    fill(browser, "max-tokens", str(2 * BLOCK))
    by_id(browser, "generate").click()
    wait(browser, lambda: by_id(browser, "text-legend").is_displayed())
    assert f"before the {BLOCK} characters the model reads" in by_id(browser, "text-legend").text
    faded = browser.find_elements(By.CSS_SELECTOR, "#text span.outside")
    assert len(faded) == text_length(browser) - BLOCK  # the last character's context: BLOCK


def test_the_matrix_dialog_fits_a_phone(browser, server):
    phone = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", phone)
    try:
        open_page(browser, server)
        fill(browser, "max-tokens", str(BLOCK))
        by_id(browser, "generate").click()
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "button.head")) > 0)
        head = browser.find_elements(By.CSS_SELECTOR, "button.head")[0]
        browser.execute_script("arguments[0].click()", head)
        box = browser.execute_script(
            "const r = document.getElementById('matrix-dialog').getBoundingClientRect();"
            "return [r.left, r.right, document.documentElement.scrollWidth]"
        )
        assert 0 <= box[0] and box[1] <= 390 and box[2] <= 390, box
        by_id(browser, "matrix-close").click()
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
