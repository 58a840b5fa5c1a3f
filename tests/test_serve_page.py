"""The chat page at GET / in a real browser (Debian's Chromium, headless, driven by playwright) against a server on
a tiny random checkpoint: it streams a reply into the page, sends the settings and the whole conversation, shows
the server's 401 message and works once given the key, and Stop ends the generation on the server."""
from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the python package playwright is not installed")
expect = sync_api.expect

from serve_fixtures import running_server  # noqa: E402

from moelm.scaffold import new_checkpoint  # noqa: E402

TIMEOUT_MS = 15_000
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server"]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("page-ckpt"), seed=0)


@pytest.fixture(scope="module")
def server(checkpoint):
    with running_server(checkpoint) as served:
        yield served


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 390, "height": 800})  # a phone's width
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def is_chat(r) -> bool:
    """A chat request (or its response)."""
    request = getattr(r, "request", r)
    return request.url.endswith(CHAT) and request.method == "POST"


def streamed_text(body: bytes) -> str:
    """The concatenated delta.content of an SSE chat stream; checks it ends with [DONE]."""
    events = [e for e in body.decode("utf-8").split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]", events[-3:]
    text = ""
    for event in events[:-1]:
        chunk = json.loads(event.removeprefix("data: "))
        assert "error" not in chunk, chunk
        text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    return text


def post_json(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return json.loads(response.read())


def send(page, text: str, enter: bool = False):
    """Type a message and send it (Enter or the button); returns the chat request and its response."""
    page.fill("#input", text)
    with page.expect_request(is_chat) as request, page.expect_response(is_chat) as response:
        if enter:
            page.press("#input", "Enter")
        else:
            page.click("#send")
    return request.value, response.value


def wait_done(page, response=None):
    """Until the stream ended: the response body is complete and Send is enabled again."""
    if response is not None:
        assert response.finished() is None  # waits for the body's end; None: no network error
    expect(page.locator("#send")).to_be_enabled(timeout=TIMEOUT_MS)
    expect(page.locator("#stop")).to_be_disabled(timeout=TIMEOUT_MS)


def bubbles(page, role: str) -> list[str]:
    return page.eval_on_selector_all(f"#messages .msg.{role}", "els => els.map(e => e.textContent)")


def test_chat_streams_the_reply(server, page):
    url, engine, _ = server
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
    expect(page.locator("#temperature")).to_have_value("0.7")
    expect(page.locator("#max-tokens")).to_have_value("256")
    expect(page.locator("#error")).to_be_hidden()

    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    request, response = send(page, "Hello there", enter=True)
    wait_done(page, response)
    sent = json.loads(request.post_data)
    assert sent == {"model": "tiny", "stream": True, "temperature": 0, "max_tokens": 12, "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]}
    assert "authorization" not in request.headers
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")

    shown = bubbles(page, "assistant")
    assert len(shown) == 1 and shown[0]
    assert shown[0] == streamed_text(response.body())
    greedy = post_json(url + CHAT, {"messages": sent["messages"], "temperature": 0, "max_tokens": 12})
    assert shown[0] == greedy["choices"][0]["message"]["content"]
    assert bubbles(page, "user") == ["Hello there"]
    assert page.input_value("#input") == ""
    expect(page.locator("#error")).to_be_hidden()

    # A second turn (Send button, sampled) carries the whole conversation; what is shown is what streamed.
    page.fill("#temperature", "0.7")
    request, response = send(page, "Go on")
    wait_done(page, response)
    sent = json.loads(request.post_data)
    assert sent["temperature"] == 0.7 and sent["max_tokens"] == 12 and sent["stream"] is True
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": shown[0]}, {"role": "user", "content": "Go on"}]
    shown = bubbles(page, "assistant")
    assert len(shown) == 2 and shown[1] == streamed_text(response.body())
    assert bubbles(page, "user") == ["Hello there", "Go on"]

    # New chat empties the conversation: the next request has only the system prompt and the new turn.
    page.click("#new-chat")
    assert bubbles(page, "assistant") == [] and bubbles(page, "user") == []
    request, response = send(page, "Again")
    wait_done(page, response)
    assert [m["role"] for m in json.loads(request.post_data)["messages"]] == ["system", "user"]
    assert engine.num_running() == 0


def test_api_key(checkpoint, page):
    with running_server(checkpoint, api_key="k") as (url, _, _):
        page.goto(url + "/")
        expect(page.locator("#error")).to_contain_text("no API key", timeout=TIMEOUT_MS)

        request, response = send(page, "Hello")
        wait_done(page, response)
        assert response.status == 401 and "authorization" not in request.headers
        message = response.json()["error"]["message"]
        expect(page.locator("#error")).to_have_text(message)
        assert bubbles(page, "assistant") == [] and bubbles(page, "user") == []
        assert page.input_value("#input") == "Hello"  # given back, to send again

        page.fill("#api-key", "k")
        page.press("#api-key", "Tab")  # change: the models are listed again, the error line clears
        expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
        expect(page.locator("#error")).to_be_hidden()
        page.fill("#max-tokens", "8")
        request, response = send(page, "Hello")
        wait_done(page, response)
        assert response.status == 200 and request.headers["authorization"] == "Bearer k"
        shown = bubbles(page, "assistant")
        assert len(shown) == 1 and shown[0] and shown[0] == streamed_text(response.body())
        expect(page.locator("#error")).to_be_hidden()

        # The key is kept in localStorage across a reload.
        page.reload()
        expect(page.locator("#api-key")).to_have_value("k")
        expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
        expect(page.locator("#error")).to_be_hidden()


def test_stop_ends_the_generation(server, page):
    url, engine, _ = server
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
    page.fill("#max-tokens", "1900")
    request, _ = send(page, "Write a long story")
    assert json.loads(request.post_data)["max_tokens"] == 1900
    page.wait_for_function("() => document.querySelector('#messages .msg.assistant')?.textContent.length > 0",
                           timeout=TIMEOUT_MS)
    assert engine.num_running() == 1  # still generating
    page.click("#stop")
    wait_done(page)
    deadline = time.monotonic() + 5
    while engine.num_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running() == 0, "the server kept generating after Stop"
    expect(page.locator("#error")).to_be_hidden()
    partial = bubbles(page, "assistant")
    assert len(partial) == 1 and partial[0]
    time.sleep(0.3)  # nothing more arrives
    assert bubbles(page, "assistant") == partial
