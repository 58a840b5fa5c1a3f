"""A moelm server in a background thread on loopback, for the serve tests: `running_server(path, ...)` yields its
base URL, its Engine and its tokenizer; everything stops on exit."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from moelm import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from moelm.serve.app import create_app  # noqa: E402
from moelm.serve.engine import Engine  # noqa: E402
from moelm.serve.lora import Adapters  # noqa: E402


@contextlib.contextmanager
def running_server(path, names=None, api_key=None, chat_template=None, defaults=None, fast=True, dtype="auto",
                   lora_modules=None, trust_request_chat_template=False, **engine_kwargs):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, fast=fast, dtype=dtype)
    adapters = Adapters.load(model, lora_modules) if lora_modules else None
    engine = Engine(model, tokenizer, adapters=adapters, **engine_kwargs).start()
    app = create_app(engine, tokenizer, names or ["tiny"], api_key=api_key, chat_template=chat_template,
                     defaults=defaults, trust_request_chat_template=trust_request_chat_template)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine, tokenizer
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()


def wait_healthy(proc, url: str, timeout: float = 60):
    """Until the server process `proc` answers GET url/health with 200; fails with its stderr if it exits first."""
    import httpx

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the server did not come up"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
