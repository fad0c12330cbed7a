"""The chat page (GET / of `tinygpt serve`) in a real headless browser: Playwright driving Debian's chromium
against the real server, so the page's fetch + SSE parsing meets the server's actual streams."""

import json
import os
import re
import shutil
import urllib.request

import pytest

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright (python) drives the chat page in a browser")

from conftest import serve  # noqa: E402  (after the skip: without playwright there is nothing to serve for)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="no chromium or chromium-browser on PATH to open the chat page")

READY = "document.body.dataset.state === 'ready'"
# The send handler sets state "streaming" and adds the bubbles before its first await, so right after the
# click
# this is false, and it turns true once the reply (or an error) is complete.
REPLIED = READY + " && document.querySelector('#conversation .assistant, #conversation .error') !== null"
TOKENS_PER_S = re.compile(r"\d+(\.\d+)? tok/s")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # the tests run as root
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own localStorage) that fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def model_name(base_url, key=None):
    req = urllib.request.Request(base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key
                                 else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["data"][0]["id"]


def screenshot(pg, tmp_path, name):
    """A full-page screenshot in the test's tmp dir, copied to $TINYGPT_ARTIFACTS when set (to look at, not
    commit)."""
    path = tmp_path / name
    pg.screenshot(path=str(path), full_page=True)
    if os.environ.get("TINYGPT_ARTIFACTS"):
        keep = os.path.join(os.environ["TINYGPT_ARTIFACTS"], name)
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        shutil.copyfile(path, keep)
        print(f"screenshot: {path} (kept as {keep})")
    else:
        print(f"screenshot: {path}")


def send(pg, text):
    """Sends one chat message; returns the JSON body the page posted."""
    pg.fill("#message", text)
    with pg.expect_request("**/v1/chat/completions") as request:
        pg.click("#send")
    pg.wait_for_function(REPLIED)
    errors = pg.locator("#conversation .error").all_text_contents()
    assert not errors, f"the page shows an error: {errors}"
    return request.value.post_data_json


def test_chat_page_streams_a_reply_and_shows_tokens_per_second(chat_run, page, tmp_path):
    with serve(chat_run) as base_url:
        name = model_name(base_url)
        page.goto(base_url + "/")
        page.wait_for_function(READY)
        assert page.text_content("#model-name") == name
        assert page.is_visible("#message") and not page.is_visible("#prompt")

        body = send(page, "hello")
        assert (body["model"] == name and body["stream"] is True
                and body["stream_options"] == {"include_usage": True})
        assert body["messages"] == [{"role": "user", "content": "hello"}]
        assert body["max_tokens"] == 128 and body["temperature"] == 0
        first = page.locator("#conversation .assistant").last.text_content()
        assert first.strip(), "the streamed reply is empty"
        sync_api.expect(page.locator("#stats")).to_have_text(TOKENS_PER_S)

        # The second request carries the whole conversation so far, the system message first.
        page.click("details:has(#system) summary")  # the system field starts collapsed
        page.fill("#system", "be brief")
        body = send(page, "what is 2 plus 3?")
        assert body["messages"] == [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hello"},
                                    {"role": "assistant", "content": first},
                                    {"role": "user", "content": "what is 2 plus 3?"}]
        assert page.locator("#conversation .assistant").count() == 2
        screenshot(page, tmp_path, "chat-page.png")

        page.click("#new-chat")
        assert page.locator("#conversation .user, #conversation .assistant").count() == 0


def test_plain_text_run_gets_the_completion_page(text_run, page, tmp_path):
    with serve(text_run) as base_url:
        page.goto(base_url + "/")
        page.wait_for_function(READY)
        assert page.is_visible("#prompt") and not page.is_visible("#message")
        page.fill("#prompt", "The red")
        page.fill("#max-tokens", "24")
        with page.expect_request("**/v1/completions") as request:
            page.click("#generate")
        page.wait_for_function(READY + " && document.querySelector('#completion-output .generated') !== null")
        assert request.value.post_data_json["prompt"] == "The red"
        assert request.value.post_data_json["max_tokens"] == 24
        assert not page.locator("#completion-output .error").count(), page.text_content("#completion-output")
        out = page.text_content("#completion-output")
        assert out.startswith("The red") and len(out) > len("The red"), out
        sync_api.expect(page.locator("#stats")).to_have_text(TOKENS_PER_S)
        screenshot(page, tmp_path, "completion-page.png")


def test_api_key_is_asked_for_and_then_sent(chat_run, page):
    with serve(chat_run, "--api-key", "secret") as base_url:
        page.goto(base_url + "/")
        page.wait_for_selector("#api-key", state="visible")
        assert page.evaluate("document.body.dataset.state") == "auth"
        page.fill("#api-key", "secret")
        page.press("#api-key", "Enter")
        page.wait_for_function(READY)
        assert page.text_content("#model-name") == model_name(base_url, "secret")
        assert not page.is_visible("#api-key")
        assert page.evaluate("localStorage.getItem('tinygpt-api-key')") == "secret"
        with page.expect_request("**/v1/chat/completions") as request:
            page.fill("#message", "hello")
            page.press("#message", "Enter")
        page.wait_for_function(REPLIED)
        assert request.value.all_headers()["authorization"] == "Bearer secret"
        assert not page.locator("#conversation .error").count(), (
            page.locator("#conversation .error").all_text_contents())
