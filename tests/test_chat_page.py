"""The chat page that `tierkv serve` ships at GET /, driven in a real headless browser (Debian's
chromium through chromium-driver and selenium) against the real server and the bundled demo model.

Why this exists: the page is JavaScript nobody else exercises; only a browser shows that it lists the
model, streams a reply as it arrives, stops a generation (the server sees the disconnect and cancels
it), asks for the API key and shows the server's errors. Skips, saying why, without the browser.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL = "install them with: apt-get install chromium chromium-driver (.ci/run does)"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium browser ({CHROMIUM} is missing); {INSTALL}", allow_module_level=True)
if not Path(CHROMEDRIVER).is_file():
    pytest.skip(f"no chromedriver ({CHROMEDRIVER} is missing); {INSTALL}", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="the server needs uvicorn: pip install -e '.[serve]'")

import httpx  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import tierkv  # noqa: E402
from serving import running_server  # noqa: E402

# Records the streaming reply's text length at every change the page makes, so the test sees
# whether text arrived in several updates before the reply ended (selenium polling could miss them),
# and the JSON body of every request the page sends.
WATCH_STREAM = """
window.seenLengths = [];
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, init) => {
  if (init && init.body) window.sentBodies.push(JSON.parse(init.body));
  return realFetch(url, init);
};
new MutationObserver(() => {
  const live = document.querySelector('.msg.assistant.streaming .text');
  if (live) window.seenLengths.push(live.textContent.length);
}).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    eng = tierkv.load("demo", device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver: Any, what: Callable[[Any], Any], seconds: float = 15) -> Any:
    return WebDriverWait(driver, seconds, poll_frequency=0.05).until(what)


def element(driver: Any, element_id: str) -> Any:
    return driver.find_element(By.ID, element_id)


def set_field(driver: Any, element_id: str, value: str) -> None:
    field = element(driver, element_id)
    field.clear()
    field.send_keys(value)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    driver.execute_script("sessionStorage.clear()")
    driver.get(url)


def send(driver: Any, text: str) -> None:
    set_field(driver, "prompt", text)
    element(driver, "send").click()
    wait(driver, lambda d: d.execute_script("return document.body.dataset.busy") == "true")


def idle(driver: Any) -> None:
    wait(driver, lambda d: d.execute_script("return document.body.dataset.busy") == "false")


def replies(driver: Any) -> list[str]:
    return [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def test_page_streams_a_reply_and_stop_cancels_the_generation(engine, browser, tmp_path):
    with running_server(engine, model_name="demo-chat") as url:
        open_page(browser, url)
        wait(browser, lambda d: element(d, "model").get_attribute("data-ready"))
        assert element(browser, "model").text == "demo-chat"
        element(browser, "settings-toggle").click()
        set_field(browser, "temperature", "0")
        set_field(browser, "max-tokens", "8")
        browser.execute_script(WATCH_STREAM)

        send(browser, "Tell me about a <b>cat</b>.")
        idle(browser)
        assert browser.find_elements(By.CSS_SELECTOR, ".msg.user .text")[0].text == "Tell me about a <b>cat</b>."
        assert not browser.find_elements(By.CSS_SELECTOR, "#conversation b"), "a message was put on the page as HTML"
        seen = browser.execute_script("return window.seenLengths")
        reply = replies(browser)[-1]
        assert reply, "the reply stayed empty"
        growing = sorted({n for n in seen if n > 0})
        assert len(growing) >= 2 and growing[-1] <= len(reply), f"text did not arrive in several updates: {seen}"
        assert "tok/s" in element(browser, "rate").text and element(browser, "rate").get_attribute("data-tokens")
        assert health(url)["completed"] == 1

        # a long reply: stop it after a few updates; the server must cancel the generation
        set_field(browser, "max-tokens", "400")
        browser.execute_script("window.seenLengths = []")
        send(browser, "And about a dog?")
        wait(browser, lambda d: len({n for n in d.execute_script("return window.seenLengths") if n > 0}) >= 2)
        element(browser, "stop").click()
        idle(browser)
        stopped = replies(browser)[-1]
        assert stopped and browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.stopped")
        assert element(browser, "rate").text.startswith("stopped")
        deadline = time.monotonic() + 10
        while health(url)["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = health(url)
        assert after["cancelled"] == 1 and after["active"] == 0, after
        time.sleep(0.3)
        assert replies(browser)[-1] == stopped, "text kept arriving after stop"
        assert len(replies(browser)) == 2 and not element(browser, "error").is_displayed()
        first, second = browser.execute_script("return window.sentBodies")
        assert first["stream"] and first["stream_options"] == {"include_usage": True}
        assert (first["model"], first["temperature"], first["max_tokens"]) == ("demo-chat", 0, 8)
        assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
        assert second["messages"][1]["content"].strip() == reply.strip() and second["max_tokens"] == 400

        shot = tmp_path / "chat_page.png"
        assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_asks_for_the_key_and_shows_server_errors(engine, browser):
    with running_server(engine, api_key="s3cret", model_name="demo-chat") as url:
        open_page(browser, url)
        wait(browser, lambda d: element(d, "error").is_displayed())
        assert "401" in element(browser, "error").text and "API key" in element(browser, "error").text
        assert element(browser, "settings").is_displayed()

        set_field(browser, "api-key", "s3cret")
        element(browser, "save-key").click()
        wait(browser, lambda d: element(d, "model").get_attribute("data-ready"))
        assert element(browser, "model").text == "demo-chat" and not element(browser, "error").is_displayed()

        # the server refuses a negative temperature: its error message shows and the text comes back
        set_field(browser, "temperature", "-1")
        set_field(browser, "prompt", "Hello")
        element(browser, "send").click()
        wait(browser, lambda d: element(d, "error").is_displayed())
        assert "400" in element(browser, "error").text and "temperature" in element(browser, "error").text
        assert element(browser, "prompt").get_attribute("value") == "Hello" and replies(browser) == []
