"""The browser chat page (``/``, ``eoq.api.http.page``) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``.ci/ensure-tools.sh``), driven with selenium, against the in-process server
of this package (the real default model): a question's answer streams in; the stop button ends an answer
cancelled; a reload finds the conversation and picks up an answer still being written; regenerate and edit make
branches, and the switcher (‹ 1/2 ›) walks them; untrusted text (``<img src=x onerror=alert(1)>``) is shown as
text; a phone-sized window does not scroll sideways. Screenshots are saved as artifacts (``$EOQ_TEST_ARTIFACTS``,
else a ``test-artifacts`` folder in pytest's temporary directory; their paths are printed).

Selenium blocks, and the server runs on this package's event loop, so each test's browser part runs in a thread
(``asyncio.to_thread``) while the loop keeps serving. Answers are kept short with the page's
``?max_output_tokens=N`` (its settings panel's field), except where a test wants a long one to stop.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from eoq.api.auth import ApiKeys
from eoq.api.server import RunningServer
from tests.api.client import FRANCE, engine_idle, wait_for
from tests.api.http.conftest import base_url, raw_client

pytestmark = [pytest.mark.asyncio(loop_scope="package"), pytest.mark.e2e, pytest.mark.slow]

CHROMEDRIVER = "/usr/bin/chromedriver"
SHORT = "/?max_output_tokens=16"
XSS = "<img src=x onerror=alert(1)>"
SYSTEM = "You are a geography teacher. Answer briefly."
LONG_QUESTION = "Write a very long story about a dragon who learns to cook, in many chapters, with every detail."
WAIT = 180  # seconds: the CPU model answers slowly when the machine is busy


# --- the browser ---
def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium"


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    binary = _chromium()
    if not Path(binary).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium and chromium-driver not found: install them (apt-get install chromium chromium-driver, "
                    "as .ci/ensure-tools.sh does); these tests drive a real browser")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_script_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("EOQ_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest_asyncio.fixture(loop_scope="package")
async def idle(http_server: RunningServer) -> RunningServer:
    """The shared server, left with an idle engine after the test: an answer still being written (a test that
    failed half-way) is cancelled."""
    yield http_server
    async with raw_client(http_server) as c:
        for conv in (await c.get("/v1/conversations?limit=50")).json().get("data", []):
            items = (await c.get(f"/v1/conversations/{conv['id']}/items?order=asc&limit=1000")).json()
            for item in items.get("data", []):
                if item["status"] == "in_progress" and item.get("response_id"):
                    await c.post(f"/v1/responses/{item['response_id']}/cancel")
    await wait_for(lambda: engine_idle(http_server), 60, "the engine idle after the page test")


async def in_browser(fn: Callable, *args: object):
    """Run the blocking browser part in a thread: the server's event loop goes on serving meanwhile."""
    return await asyncio.to_thread(fn, *args)


class Page:
    """The chat page in the browser, with waits on what the page shows."""

    def __init__(self, driver: WebDriver, base: str) -> None:
        self.d = driver
        self.base = base

    # navigation
    def open(self, path: str = SHORT, wait: bool = True) -> None:
        self.d.get("about:blank")  # a page load, also where only the URL's hash differs from the page shown
        self.d.get(self.base + path)
        if wait:
                self.until(lambda: self.js("return document.getElementById('model').textContent !== ''"),
                       "the model listed")

    def reload(self) -> None:
        self.d.refresh()
        self.until(lambda: self.js("return document.getElementById('model').textContent !== ''"), "the model listed")

    def until(self, predicate: Callable[[], object], what: str, timeout: float = WAIT):
        def check(_):
            try:
                return predicate()
            except (StaleElementReferenceException, IndexError):  # redrawn meanwhile; not shown yet
                return False

        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(check, f"not within {timeout} s: {what}")

    def js(self, script: str, *args: object):
        return self.d.execute_script(script, *args)

    # what is shown
    def messages(self) -> list[dict]:
        return self.js("""
            return Array.from(document.querySelectorAll('#thread .msg')).map(m => ({
              role: m.dataset.role, id: m.dataset.id || '', status: m.dataset.status || '',
              finish: m.dataset.finish || '', streaming: m.classList.contains('streaming'),
              text: (m.querySelector('.content') || {}).textContent || '',
              branch: (m.querySelector('.branch-label') || {}).textContent || '',
              note: (m.querySelector('.status') || {}).textContent || ''}));""")

    def last(self, role: str = "assistant") -> dict:
        return [m for m in self.messages() if m["role"] == role][-1]

    def conv_id(self) -> str:
        match = re.search(r"#(conv_[\w-]+)$", self.d.current_url)
        assert match, f"no conversation in the URL {self.d.current_url}"
        return match.group(1)

    def listed(self) -> list[str]:
        return self.js("return Array.from(document.querySelectorAll('#conversations li')).map(li => li.dataset.id)")

    def error(self) -> str:
        return self.js("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")

    def streaming(self) -> bool:
        return self.js("return !document.getElementById('stop').hidden")

    # actions
    def ask(self, text: str, enter: bool = True) -> None:
        """Type a question and send it with Enter (else the Send button)."""
        box = self.d.find_element(By.ID, "input")
        box.clear()
        box.send_keys(text)
        if enter:
            box.send_keys(Keys.ENTER)
        else:
            self.click("#send")

    def click(self, css: str, index: int = -1) -> None:
        elements = self.d.find_elements(By.CSS_SELECTOR, css)
        assert elements, f"nothing matches {css}"
        elements[index].click()

    def wait_done(self, what: str = "the answer") -> dict:
        """The last answer, once it is over and the page has reloaded the stored branch (real ids)."""
        def over() -> bool:
            answers = [m for m in self.messages() if m["role"] == "assistant"]
            return (not self.streaming() and bool(answers) and bool(answers[-1]["id"])
                    and answers[-1]["status"] != "in_progress")

        self.until(over, what + " finished")
        assert not self.error(), self.error()
        return self.last()

    def no_alert(self) -> None:
        try:
            alert = self.d.switch_to.alert
        except NoAlertPresentException:
            return
        text = alert.text
        alert.dismiss()
        raise AssertionError(f"the page ran an alert: {text!r}")

    def screenshot(self, artifacts: Path, name: str) -> Path:
        path = artifacts / f"{name}.png"
        assert self.d.save_screenshot(str(path)), f"no screenshot saved to {path}"
        print(f"screenshot: {path}")
        return path

    def severe_logs(self) -> list[str]:
        """The console's errors, less the missing favicon."""
        return [e["message"] for e in self.d.get_log("browser")
                if e["level"] == "SEVERE" and "favicon" not in e["message"]]


@pytest.fixture
def page(driver: WebDriver, idle: RunningServer) -> Page:
    """The page's origin with what earlier tests left in its storage cleared (through the DevTools protocol: the
    fixture must not wait on the server, whose loop is not running until the test awaits)."""
    p = Page(driver, base_url(idle))
    driver.execute_cdp_cmd("Storage.clearDataForOrigin", {"origin": p.base, "storageTypes": "local_storage"})
    return p


# --- the page itself, over plain HTTP ---
async def test_page_is_served_with_a_strict_content_security_policy(raw) -> None:
    r = await raw.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in s for s in scripts), "an inline script"
    assert "<style" not in html and " style=" not in html and "http://" not in html and "https://" not in html
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = await raw.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    js = (await raw.get("/static/app.js")).text
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function", js)
    assert (await raw.get("/static/nothing.js")).status_code == 404


# --- in the browser ---
async def test_an_answer_streams_in_and_a_reload_finds_the_conversation(page: Page, artifacts: Path) -> None:
    def scenario() -> dict:
        page.open()
        # The answer's text as it grows, recorded in the page at every change of the thread: polling it from
        # here could miss a short answer's whole stream on a busy machine.
        page.js("""window.__seen = [];
            new MutationObserver(() => {
              const c = document.querySelector('#thread .msg.streaming .content'), seen = window.__seen;
              if (c && c.textContent && seen[seen.length - 1] !== c.textContent) seen.push(c.textContent);
            }).observe(document.getElementById('thread'),
                       {subtree: true, childList: true, characterData: true, attributes: true});""")
        page.ask(FRANCE)

        def ended():
            a = page.last()
            return not page.streaming() and a["id"] and a["status"] != "in_progress"

        page.until(ended, "the answer streamed")
        answer = page.wait_done()
        seen = page.js("return window.__seen")
        conv = page.conv_id()
        assert "Paris" in answer["text"], answer
        assert seen and all(answer["text"].startswith(s.rstrip()) for s in seen), seen  # it came in pieces
        assert [m["role"] for m in page.messages()] == ["user", "assistant"]
        assert page.last("user")["text"] == FRANCE
        page.until(lambda: page.listed() and page.listed()[0] == conv, "the new conversation first in the list")
        page.screenshot(artifacts, "desktop-answer")

        page.reload()
        page.until(lambda: len(page.messages()) == 2 and page.last()["id"], "the conversation shown again")
        assert [m["text"] for m in page.messages()] == [FRANCE, answer["text"]]
        assert conv in page.listed()
        assert page.js("return document.querySelector('#conversations li.active').dataset.id") == conv

        page.click("#new-chat")
        page.until(lambda: not page.messages() and "#" not in page.d.current_url, "a new chat")
        page.click(f"#conversations li[data-id='{conv}'] .open")
        page.until(lambda: [m["text"] for m in page.messages()] == [FRANCE, answer["text"]], "opened from the list")
        assert page.severe_logs() == []
        return {"conv": conv, "answer": answer}

    result = await in_browser(scenario)
    assert result["answer"]["finish"] in ("stop", "length")


async def test_the_stop_button_ends_an_answer_cancelled(page: Page, raw, artifacts: Path) -> None:
    def scenario() -> dict:
        page.open("/")
        page.click("#settings summary")  # the settings panel: a long answer this time
        field = page.d.find_element(By.ID, "max-tokens")
        field.clear()
        field.send_keys("600")
        page.ask(LONG_QUESTION)
        page.until(lambda: len(page.last()["text"]) > 15, "the answer started")
        assert page.streaming()
        page.screenshot(artifacts, "desktop-streaming")
        page.click("#stop")
        answer = page.wait_done("the stopped answer")
        assert answer["finish"] == "cancelled" and answer["note"] == "stopped", answer
        assert answer["text"], answer
        assert page.js("return document.getElementById('send').hidden") is False
        return answer

    answer = await in_browser(scenario)
    r = await raw.get(f"/v1/responses/resp_{answer['id'].removeprefix('msg_')}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text


async def test_a_reload_resumes_an_answer_still_being_written(page: Page) -> None:
    def scenario() -> None:
        page.open("/?max_output_tokens=600")
        page.ask(LONG_QUESTION)
        page.until(lambda: len(page.last()["text"]) > 10, "the answer started")
        before = page.last()["text"]
        page.reload()  # the answer goes on on the server (background); the page picks it up again
        page.until(lambda: page.last()["streaming"] and len(page.last()["text"]) > len(before) + 5,
                   "the answer resumed and growing after the reload")
        resumed = page.last()["text"]
        assert resumed.startswith(before), (before, resumed)  # the same answer, replayed from its start
        page.click("#stop")
        answer = page.wait_done("the resumed answer stopped")
        assert answer["finish"] == "cancelled" and answer["text"].startswith(resumed.rstrip()), (resumed, answer)

    await in_browser(scenario)


# Injected by the test (DevTools, not the page): the answer's stream breaks after a few chunks, as a dropped
# connection would, and every text the answer shows is recorded.
BREAK_THE_STREAM = """
window.__urls = [];
window.__texts = [];
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  const method = (options && options.method) || "GET";
  window.__urls.push(method + " " + url);
  const resp = await realFetch(url, options);
  if (method !== "POST" || url !== "/v1/responses") return resp;
  // The stream breaks after its 6th event (the preamble and a delta or two), however the network chunks them:
  // a loaded machine may deliver the whole answer in a few reads.
  const reader = resp.body.getReader();
  let events = 0, broken = false;
  const body = new ReadableStream({
    async pull(controller) {
      if (broken) {
        reader.cancel();
        controller.error(new TypeError("network error (made by the test)"));
        return;
      }
      const r = await reader.read();
      if (r.done) { controller.close(); return; }
      const bytes = r.value;
      for (let i = 0; i + 1 < bytes.length; i++) {
        if (bytes[i] === 10 && bytes[i + 1] === 10 && ++events === 6) {
          controller.enqueue(bytes.slice(0, i + 2));
          broken = true;
          return;
        }
      }
      controller.enqueue(bytes);
    },
  });
  return new Response(body, { status: resp.status, headers: resp.headers });
};
new MutationObserver(() => {
  const answers = document.querySelectorAll("#thread .msg.assistant .content");
  if (answers.length) window.__texts.push(answers[answers.length - 1].textContent);
}).observe(document.getElementById("thread"), { childList: true, subtree: true, characterData: true });
"""


async def test_a_dropped_stream_is_picked_up_from_its_last_event(page: Page) -> None:
    def scenario() -> None:
        page.open("/?max_output_tokens=40")
        page.js(BREAK_THE_STREAM)
        page.ask(FRANCE)
        answer = page.wait_done("the answer, through a broken stream")
        urls = page.js("return window.__urls")
        resumed = [u for u in urls if re.fullmatch(r"GET /v1/responses/resp_[\w-]+\?stream=true&starting_after=\d+", u)]
        assert resumed, urls
        assert int(resumed[0].rsplit("=", 1)[1]) >= 3, resumed  # after the events it had (the preamble is 0..3)
        texts = [t for t in page.js("return window.__texts") if t]
        assert texts and all(answer["text"].startswith(t) for t in texts), (texts, answer)  # each event once
        assert "Paris" in answer["text"]

    await in_browser(scenario)


async def test_regenerate_makes_a_second_answer_and_the_switcher_walks_them(page: Page, artifacts: Path) -> None:
    def scenario() -> None:
        page.open()
        page.ask(FRANCE)
        first = page.wait_done()["text"]
        assert first and page.last()["branch"] == ""
        page.click(".msg.assistant .regenerate")
        second = page.wait_done("the regenerated answer")
        assert second["branch"] == "2/2", second
        assert len(page.messages()) == 2
        switcher = page.js("return document.querySelector('.msg.assistant .branch-switcher').textContent")
        assert switcher == "\u20392/2\u203a", switcher
        page.click(".msg.assistant .branch-switcher .prev")
        page.until(lambda: page.last()["branch"] == "1/2", "the first answer's branch")
        assert page.last()["text"] == first
        page.click(".msg.assistant .branch-switcher .next")
        page.until(lambda: page.last()["branch"] == "2/2", "the second answer's branch")
        assert page.last()["text"] == second["text"]
        page.reload()  # the chosen branch is the conversation's (the server's), not the page's
        page.until(lambda: page.messages() and page.last()["branch"] == "2/2", "the branch kept over a reload")
        page.screenshot(artifacts, "desktop-branches")

    await in_browser(scenario)


async def test_editing_a_question_makes_a_new_branch(page: Page, raw) -> None:
    italy = "What is the capital of Italy?"

    def scenario() -> str:
        page.open()
        page.click("#system-box summary")  # a new chat's system prompt
        page.d.find_element(By.ID, "system-prompt").send_keys(SYSTEM)
        page.ask(FRANCE)
        france = page.wait_done()["text"]
        assert page.js("return document.getElementById('system-text').textContent") == SYSTEM
        assert not page.d.find_element(By.ID, "system-box").is_displayed()  # only for a new chat
        page.click(".msg.user .edit")
        area = page.d.find_element(By.CSS_SELECTOR, ".edit-box textarea")
        assert area.get_attribute("value") == FRANCE
        area.clear()
        area.send_keys(italy)
        page.click(".edit-box .primary")
        answer = page.wait_done("the edited question's answer")
        question = page.last("user")
        assert question["text"] == italy and question["branch"] == "2/2", question
        assert answer["text"] and answer["text"] != france, (france, answer)  # an answer to the new question
        assert len(page.messages()) == 2
        page.click(".msg.user .branch-switcher .prev")
        page.until(lambda: page.last("user")["branch"] == "1/2", "the first question's branch")
        assert [m["text"] for m in page.messages()] == [FRANCE, france]
        return page.conv_id()

    conv = await in_browser(scenario)
    r = await raw.get(f"/v1/conversations/{conv}")
    assert r.status_code == 200 and r.json()["system_prompt"] == SYSTEM, r.text


async def test_untrusted_text_is_shown_as_text(page: Page, raw, artifacts: Path) -> None:
    # An answer holding markup (stored as the conversation's history: what any model could have said).
    said = (f"Here it is: {XSS} and <b>bold</b>\nline two\n```html\n{XSS}\n<script>alert(2)</script>\n```\n"
            "Use `<i>x</i>` inline. " + "averyveryverylongwordwithoutanyspaces" * 4)
    r = await raw.post("/v1/conversations", json={"items": [
        {"role": "system", "content": f"Be brief. {XSS}"},
        {"role": "user", "content": f"Show me {XSS}"},
        {"role": "assistant", "content": said}]})
    assert r.status_code == 200, r.text
    conv = r.json()["id"]

    def scenario() -> None:
        page.open(f"{SHORT}#{conv}")
        page.until(lambda: len(page.messages()) == 2, "the stored conversation")
        page.no_alert()
        # the list's title of a conversation this browser did not start: its first question, as text
        title = f"#conversations li[data-id='{conv}'] .conv-title"
        page.until(lambda: page.js(f"return (document.querySelector(\"{title}\") || {{}}).textContent") == f"Show me {XSS}",
                   "the conversation's title in the list")
        texts = [m["text"] for m in page.messages()]
        assert texts[0] == f"Show me {XSS}"
        assert XSS in texts[1] and "<script>alert(2)</script>" in texts[1] and "<b>bold</b>" in texts[1]
        assert page.js("return document.getElementById('system-text').textContent") == f"Be brief. {XSS}"
        code = page.js("return Array.from(document.querySelectorAll('#thread pre code')).map(c => c.textContent)")
        assert code == [f"{XSS}\n<script>alert(2)</script>"], code
        assert page.js("return document.querySelector('#thread pre code').dataset.lang") == "html"
        assert page.js("return Array.from(document.querySelectorAll('#thread .content > code'))"
                       ".map(c => c.textContent)") == ["<i>x</i>"]
        # the line breaks are kept (pre-wrap): "line two" on a line of its own
        assert page.js("return getComputedStyle(document.querySelector('#thread .content')).whiteSpace") == "pre-wrap"
        # and a question typed in the page
        page.ask(f"Repeat exactly: {XSS}")
        page.wait_done()
        page.no_alert()
        assert page.messages()[2]["text"] == f"Repeat exactly: {XSS}"
        markup = page.js("return document.querySelectorAll('#messages img, #messages script, #messages b, "
                         "#messages i, #messages [onerror]').length")
        assert markup == 0
        assert page.js("return document.querySelectorAll('#conversations img, #title img').length") == 0
        page.screenshot(artifacts, "desktop-untrusted")
        # the copy button copies the text as it is
        page.click(".msg.assistant .meta .copy", 0)
        page.until(lambda: page.js("return document.querySelector('.msg.assistant .meta .copy').textContent")
                   in ("Copied", "Copy failed"), "the copy button answered")

    await in_browser(scenario)


async def test_a_phone_sized_window_has_no_horizontal_scroll(page: Page, raw, artifacts: Path) -> None:
    long_code = "x = [" + ", ".join(str(i) for i in range(80)) + "]"
    r = await raw.post("/v1/conversations", json={"items": [
        {"role": "user", "content": "Show me some code " + "supercalifragilistic" * 5},
        {"role": "assistant", "content": f"Here:\n```python\n{long_code}\nprint(x)\n```\nThat is a list.\n\n"
                                         "Second paragraph after an empty line."}]})
    assert r.status_code == 200, r.text
    conv = r.json()["id"]

    def scenario() -> None:
        page.d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        try:
            page.open(f"{SHORT}#{conv}")
            page.until(lambda: len(page.messages()) == 2, "the conversation")
            page.ask("What is 2 + 2?", enter=False)
            page.wait_done()
            width = page.js("return window.innerWidth")
            assert width == 390
            scroll = page.js("return [document.documentElement.scrollWidth, document.body.scrollWidth, "
                             "document.getElementById('messages').scrollWidth]")
            assert max(scroll) <= width, scroll
            right = page.js("return Math.max(...Array.from(document.querySelectorAll('#app *'))"
                            ".filter(e => e.offsetParent !== null && !e.closest('.sidebar') && !e.closest('pre'))"
                            ".map(e => e.getBoundingClientRect().right))")
            assert right <= width + 0.5, right
            # the code scrolls inside its own box instead
            pre = page.js("const p = document.querySelector('#thread pre'); return [p.scrollWidth, p.clientWidth]")
            assert pre[0] > pre[1], pre
            # the list is behind the ☰ button, over the chat
            assert not page.d.find_element(By.ID, "conversations").is_displayed()
            page.screenshot(artifacts, "phone-chat")
            page.click("#open-sidebar")
            page.until(lambda: page.d.find_element(By.ID, "conversations").is_displayed(), "the list shown")
            time.sleep(0.3)  # its slide
            page.screenshot(artifacts, "phone-list")
            page.click(f"#conversations li[data-id='{conv}'] .open")
            page.until(lambda: not page.d.find_element(By.ID, "conversations").is_displayed(), "the list hidden")
            assert page.d.find_element(By.ID, "send").is_displayed()
        finally:
            page.d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    await in_browser(scenario)


async def test_an_api_error_is_shown_to_the_user(page: Page) -> None:
    def scenario() -> None:
        page.open("/#conv_doesnotexist")
        page.until(lambda: page.error(), "an error shown")
        assert "not found" in page.error().lower(), page.error()
        page.open("/?max_output_tokens=999999999")  # over the server's limit: refused, said in the page
        page.ask(FRANCE)
        page.until(lambda: page.error(), "the refusal shown")
        assert "max_output_tokens" in page.error() or "max_tokens" in page.error(), page.error()
        assert not page.streaming()
        assert page.d.find_element(By.ID, "input").get_attribute("value") == FRANCE  # kept to send again
        assert "#" not in page.d.current_url  # the empty conversation made for it was removed again
        assert page.messages() == []

    await in_browser(scenario)


async def test_the_api_key_is_kept_in_the_browser_and_sent(page: Page, http_server: RunningServer) -> None:
    # The shared server with API keys for this test (the same check a server started with --api-keys runs).
    api = http_server.http.api
    saved = api.auth
    api.auth = ApiKeys.load(None, "page-key:page-tenant")

    def scenario() -> None:
        page.open(SHORT, wait=False)
        page.until(lambda: page.error(), "the missing key reported")
        assert "API key" in page.error(), page.error()
        assert page.js("return document.getElementById('settings').open") is True
        key = page.d.find_element(By.ID, "api-key")
        key.send_keys("page-key")
        key.send_keys(Keys.TAB)  # the change: models and conversations asked for again, with the key
        page.until(lambda: page.js("return document.getElementById('model').textContent") and not page.error(),
                   "the model listed with the key")
        assert page.listed() == []  # the key's tenant has no conversation yet
        page.ask(FRANCE)
        assert "Paris" in page.wait_done()["text"]
        conv = page.conv_id()
        page.reload()  # the key is kept in this browser
        page.until(lambda: len(page.messages()) == 2 and page.listed() == [conv], "the tenant's conversation")
        assert page.d.find_element(By.ID, "api-key").get_attribute("value") == "page-key"
        assert page.js("return JSON.parse(localStorage.getItem('eoq.apiKey'))") == "page-key"

    try:
        await in_browser(scenario)
    finally:
        api.auth = saved
