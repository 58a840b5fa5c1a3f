"""`moelm serve` over its lifetime: shutdown with requests in flight, and an engine thread that dies under them."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from serve_fixtures import running_server, wait_healthy
from test_serve_cli import free_port, serve

httpx = pytest.importorskip("httpx")

from moelm.models.scaffold import new_checkpoint  # noqa: E402

LONG = {"model": "tiny", "prompt": "hello world", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("life"), seed=0)


def in_flight(url: str, results: dict) -> list[threading.Thread]:
    """Two streams and two plain requests of 2000 tokens (one slot: the others wait), their outcomes in results."""
    def stream(i):
        with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=20) as r:
            results[i] = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]

    def plain(i):
        r = httpx.post(url + "/v1/completions", json=LONG, timeout=20)
        results[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=f, args=(i,)) for i, f in enumerate([stream, stream, plain, plain])]
    for t in threads:
        t.start()
    return threads


def wait_running(url: str, deadline: float):
    while 'moelm:num_requests_waiting{model_name="tiny"} 3.0' not in httpx.get(url + "/metrics", timeout=5).text:
        assert time.time() < deadline, "the requests did not arrive"
        time.sleep(0.05)


def test_shutdown_ends_the_requests_in_flight(tiny):
    """SIGTERM lets the requests in flight run on (up to --shutdown-timeout), a Ctrl-C then forces the exit: each
    stream ends with finish_reason "abort" and [DONE], each plain request answers, the process exits 0 at once
    without a traceback (vLLM's --shutdown-timeout aborts them likewise when it expires)."""
    port = free_port()
    proc = serve(str(tiny), "--port", str(port), "--served-model-name", "tiny", "--max-num-seqs", "1",
                 "--max-model-len", "2048", "--shutdown-timeout", "30", "--uvicorn-log-level", "warning")
    url, results = f"http://127.0.0.1:{port}", {}
    try:
        wait_healthy(proc, url)
        threads = in_flight(url, results)
        wait_running(url, time.time() + 20)
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the server did not wait for its requests"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    for t in threads:
        t.join(20)
    assert proc.returncode == 0 and "Traceback" not in err and time.time() - started < 5, err
    for i in (0, 1):
        events = results[i]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort", events[-2:]
    for i in (2, 3):
        status, body = results[i]
        assert status == 200 and body["choices"][0]["finish_reason"] == "abort", body


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requests_in_flight_fail_when_the_engine_thread_dies(tiny, monkeypatch):
    """A bug that ends the engine thread (here: in cancelling): the requests waiting on it get a 500 naming it
    rather than hanging, /health says 503, a new request is refused."""
    with running_server(tiny, max_num_seqs=1, max_model_len=2048) as (url, engine, _):
        results = {}
        threads = in_flight(url, results)
        wait_running(url, time.time() + 20)

        def broken(ids):
            raise RuntimeError("a bug in cancelling")

        monkeypatch.setattr(engine, "_cancel", broken)
        engine.abort()
        engine.thread.join(5)
        assert not engine.alive()
        for t in threads:
            t.join(10)
        for i in (0, 1):
            error = json.loads(results[i][-2])["error"]
            assert results[i][-1] == "[DONE]" and "engine" in error["message"], results[i][-2:]
        for i in (2, 3):
            status, body = results[i]
            assert status == 500 and "the engine thread stopped" in body["error"]["message"], body
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        r = httpx.post(url + "/v1/completions", json={**LONG, "max_tokens": 1}, timeout=5)
        assert r.status_code >= 500 and "engine" in r.json()["error"]["message"], r.text


def test_a_negative_shutdown_timeout_is_one_line(tiny, capsys):
    from moelm.cli import main

    assert main(["serve", str(tiny), "--shutdown-timeout", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "moelm: error: --shutdown-timeout must be >= 0 seconds, got -1.0", err


def test_a_signal_after_the_shutdown_ends_the_process(tiny, monkeypatch):
    """Once uvicorn has shut down, a further SIGTERM or Ctrl-C (a supervisor's second) ends the process at once
    rather than raising in the teardown (engine.stop(), atexit hooks) with a traceback."""
    import uvicorn

    from moelm.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: setattr(self, "started", True))
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert main(["serve", str(tiny), "--port", str(free_port()), "--max-model-len", "64"]) == 0
        after = {s: signal.getsignal(s) for s in saved}
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert after == {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.SIG_DFL}
