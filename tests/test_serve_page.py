"""The chat page at GET / in a real browser (Debian's Chromium, headless, driven by playwright) against a server on
a tiny random checkpoint: it streams a reply into the page, sends the settings and the whole conversation, shows
the server's 401 message and works once given the key, and Stop ends the generation on the server."""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request

import pytest

CHROMIUM = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
if not CHROMIUM:
    pytest.skip("no chromium browser (/usr/bin/chromium, the Debian package chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the python package playwright is not installed")
expect = sync_api.expect

from moelm.models.scaffold import new_checkpoint  # noqa: E402
from serve_fixtures import running_server  # noqa: E402

TIMEOUT_MS = 15_000
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server"]
CHAT = "/v1/chat/completions"
HTML = "<b>Go on</b> & <img src=x onerror=alert(1)>"


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
    page.finished = []  # the requests whose response body has ended
    page.on("requestfinished", lambda request: page.finished.append(request))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def is_chat(r) -> bool:
    """A chat request (or its response)."""
    request = getattr(r, "request", r)
    return request.url.endswith(CHAT) and request.method == "POST"


def streamed_text(page, response) -> str:
    """The concatenated delta.content of the SSE chat stream the page received; checks it ends with [DONE]."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not any(r is response.request for r in page.finished):  # response.body() would wait unbounded
        assert time.monotonic() < deadline, "the response body did not end"
        page.wait_for_timeout(50)
    events = [e for e in response.body().decode("utf-8").split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]", events[-3:]
    text = ""
    for event in events[:-1]:
        chunk = json.loads(event.removeprefix("data: "))
        assert "error" not in chunk, chunk
        text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    return text


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return json.loads(response.read())


def send(page, text: str | None, enter: bool = False):
    """Type a message (None: it is typed already) and send it (Enter or the button); returns the chat request
    and its response (the response's head, its body may still be streaming)."""
    with page.expect_response(is_chat) as response:
        request = send_only(page, text, enter)
    return request, response.value


def send_only(page, text: str | None, enter: bool = False):
    """send() for a request that gets no response; returns the request."""
    if text is not None:
        page.fill("#input", text)
    with page.expect_request(is_chat) as request:
        if enter:
            page.press("#input", "Enter")
        else:
            page.click("#send")
    return request.value


def wait_done(page):
    """Until the stream ended: Send is enabled again, Stop disabled."""
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
    page.fill("#input", "Hello")
    page.press("#input", "Shift+Enter")  # a new line, not a send
    page.type("#input", "there")
    assert page.input_value("#input") == "Hello\nthere" and bubbles(page, "user") == []
    request, response = send(page, None, enter=True)
    wait_done(page)
    sent = json.loads(request.post_data)
    assert sent == {"model": "tiny", "stream": True, "temperature": 0, "max_tokens": 12, "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello\nthere"}]}
    assert "authorization" not in request.headers
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")

    shown = bubbles(page, "assistant")
    assert len(shown) == 1 and shown[0]
    assert shown[0] == streamed_text(page, response)
    greedy = post_json(url + CHAT, {"messages": sent["messages"], "temperature": 0, "max_tokens": 12})
    assert shown[0] == greedy["choices"][0]["message"]["content"]
    assert bubbles(page, "user") == ["Hello\nthere"]
    assert page.input_value("#input") == ""
    expect(page.locator("#error")).to_be_hidden()

    # A second turn (Send button, sampled) carries the whole conversation; what is shown is what streamed; text
    # is shown as text, never as markup.
    page.fill("#temperature", "0.7")
    request, response = send(page, HTML)
    wait_done(page)
    sent = json.loads(request.post_data)
    assert sent["temperature"] == 0.7 and sent["max_tokens"] == 12 and sent["stream"] is True
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello\nthere"},
        {"role": "assistant", "content": shown[0]}, {"role": "user", "content": HTML}]
    shown = bubbles(page, "assistant")
    assert len(shown) == 2 and shown[1] == streamed_text(page, response)
    assert bubbles(page, "user") == ["Hello\nthere", HTML]
    assert page.locator("#messages b, #messages img").count() == 0

    # New chat empties the conversation: the next request has only the system prompt and the new turn.
    page.click("#new-chat")
    assert bubbles(page, "assistant") == [] and bubbles(page, "user") == []
    request, response = send(page, "Again")
    wait_done(page)
    assert [m["role"] for m in json.loads(request.post_data)["messages"]] == ["system", "user"]
    assert engine.num_running() == 0


def test_api_key(checkpoint, page):
    with running_server(checkpoint, api_key="k") as (url, _, _):
        page.goto(url + "/")
        expect(page.locator("#error")).to_contain_text("no API key", timeout=TIMEOUT_MS)

        request, response = send(page, "Hello")
        wait_done(page)
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
        page.fill("#temperature", "0")  # greedy: a sampled reply can end at once (an end token first), showing nothing
        request, response = send(page, "Hello")
        wait_done(page)
        assert response.status == 200 and request.headers["authorization"] == "Bearer k"
        shown = bubbles(page, "assistant")
        assert len(shown) == 1 and shown[0] and shown[0] == streamed_text(page, response)
        expect(page.locator("#error")).to_be_hidden()

        # The key is kept in localStorage across a reload.
        page.reload()
        expect(page.locator("#api-key")).to_have_value("k")
        expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
        expect(page.locator("#error")).to_be_hidden()


def aborted(url: str) -> float:
    """The server's count of sequences that ended by cancellation (finish reason "abort")."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("moelm:request_success_total{") and 'finished_reason="abort"' in line)


def test_stop_ends_the_generation(server, page, monkeypatch):
    url, engine, _ = server
    # the tiny model now decodes 1900 tokens in about a second: each engine step is made 5 ms slower, so that the
    # reply is still streaming when Stop is clicked (the stream and the abort are the server's own)
    step = engine._step

    def slow_step():
        time.sleep(0.005)
        return step()
    monkeypatch.setattr(engine, "_step", slow_step)
    before = aborted(url)
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
    # Greedy on this checkpoint never samples the end of text: 1900 tokens would take the server many seconds.
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "1900")
    request, _ = send(page, "Write a long story")
    assert json.loads(request.post_data)["max_tokens"] == 1900
    page.wait_for_function("() => document.querySelector('#messages .msg.assistant')?.textContent.length > 0",
                           timeout=TIMEOUT_MS)
    assert engine.num_running() == 1  # still generating
    expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    wait_done(page)
    deadline = time.monotonic() + 3
    while engine.num_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running() == 0, "the server kept generating after Stop"
    assert aborted(url) == before + 1
    expect(page.locator("#error")).to_be_hidden()
    partial = bubbles(page, "assistant")
    assert len(partial) == 1 and 0 < len(partial[0]) < 1900
    time.sleep(0.3)  # nothing more arrives
    assert bubbles(page, "assistant") == partial

    # The partial reply stays in the conversation.
    page.fill("#max-tokens", "4")
    request, _ = send(page, "Shorter, please")
    wait_done(page)
    assert json.loads(request.post_data)["messages"] == [
        {"role": "user", "content": "Write a long story"}, {"role": "assistant", "content": partial[0]},
        {"role": "user", "content": "Shorter, please"}]


def test_stream_errors_are_shown(server, page):
    """An error event mid-stream and a network failure (the responses faked in the browser) land in #error."""
    url, _, _ = server
    page.goto(url + "/")
    expect(page.locator("#model")).to_have_value("tiny", timeout=TIMEOUT_MS)
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    body = (f"data: {json.dumps(chunk)}\n\n" 'data: {"error": {"message": "generation failed: boom"}}\n\n'
            "data: [DONE]\n\n")
    page.route("**" + CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    send(page, "Hello")
    wait_done(page)
    expect(page.locator("#error")).to_have_text("generation failed: boom")
    assert bubbles(page, "assistant") == ["Hi"]

    page.unroute("**" + CHAT)
    page.route("**" + CHAT, lambda route: route.abort("connectionrefused"))
    send_only(page, "Again")
    wait_done(page)
    expect(page.locator("#error")).not_to_be_empty()
    expect(page.locator("#error")).to_be_visible()
    assert bubbles(page, "user") == ["Hello"] and page.input_value("#input") == "Again"
