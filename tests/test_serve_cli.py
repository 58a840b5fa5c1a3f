"""`moelm serve` as a user starts it: a subprocess on loopback answered by curl, stopped with Ctrl-C; its startup
errors as one line; and the message when the serve extra is missing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from moelm.models.scaffold import new_checkpoint

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return new_checkpoint("ernie4_5-tiny", tmp_path_factory.mktemp("cli"), seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "moelm.cli", "serve", *args], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def curl(*args) -> str:
    return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_answers_curl_and_stops_on_ctrl_c(tiny, stop):
    port = free_port()
    key = ["--api-key", "k"] if stop == signal.SIGINT else []  # SIGTERM's run takes the key from MOELM_API_KEY
    # and drafts by n-gram lookup
    spec = [] if key else ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    kv = ["--kv-cache-memory-bytes", "1MiB"] if key else ["--no-enable-prefix-caching", "--block-size", "8"]
    trust = ["--trust-request-chat-template"] if key else []
    proc = serve(str(tiny), "--port", str(port), "--served-model-name", "tiny", "--max-num-seqs", "2",
                 "--max-model-len", "128", "--uvicorn-log-level", "warning", *key, *spec, *kv, *trust,
                 env=ENV if key else dict(ENV, MOELM_API_KEY="k"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "the server did not come up"
            try:
                if curl("-o", "/dev/null", "-w", "%{http_code}", url + "/health") == "200":
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.2)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                           "temperature": 0, "stream": True})
        out = curl("-N", url + "/v1/chat/completions", "-H", "Authorization: Bearer k", "-H",
                   "Content-Type: application/json", "-d", body)
        events = [line[len("data: "):] for line in out.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        assert sum(json.loads(e)["choices"][0]["finish_reason"] is not None for e in events[:-1]) == 1
        own = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                          "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"})
        answer = json.loads(curl(url + "/v1/chat/completions", "-H", "Authorization: Bearer k", "-H",
                                 "Content-Type: application/json", "-d", own))  # taken with the flag only
        assert answer["usage"]["prompt_tokens"] == 2 if trust else answer["error"]["param"] == "chat_template"
        denied = curl("-w", "\n%{http_code}", url + "/v1/models")
        assert denied.endswith("\n401") and json.loads(denied.rsplit("\n", 1)[0])["error"]["code"] == "invalid_api_key"
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and f"on http://127.0.0.1:{port}" in err and "moelm serve: stopped" in err
    assert ("speculative: ngram" in err) == bool(spec)
    assert ("blocks of 16 positions, prefix caching on" if key else "blocks of 8 positions, prefix caching off") \
        in err, err


STARTUP_ERRORS = [
    (["--max-model-len", "100000"], "max_model_len 100000 is more than the model's context of 2048"),
    (["--chat-template", "missing.jinja"], "--chat-template missing.jinja: no such file"),
    (["--max-num-seqs", "0"], "max_num_seqs must be a positive integer, got 0"),
    (["--block-size", "0"], "block_size must be a positive integer, got 0"),
    (["--num-gpu-blocks-override", "3"], "3 KV blocks of 16 positions cannot hold one sequence of 2048 positions"),
    (["--kv-cache-memory-bytes", "1k"], "kv_cache_memory 1000 bytes is less than one KV block"),
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--speculative-config", "{nope"], "--speculative-config is not JSON"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "acceptance": 1}'],
     "--speculative-config: moelm does not support acceptance"),
    (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}'], "needs ERNIE's MTP head"),
    (["--speculative-config", '{"model": "no-such-draft", "num_speculative_tokens": 2}'],
     "model no-such-draft: no such checkpoint"),
    (["--chat-template", "{% for m in messages %}{{ m.content "],
     "--chat-template does not compile: unexpected end of template, expected 'end of print statement' (line 1)"),
]


def test_a_startup_error_is_one_line_from_the_command(tiny):
    proc = serve(str(tiny), *STARTUP_ERRORS[0][0])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and STARTUP_ERRORS[0][1] in err and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err


@pytest.mark.parametrize("case", range(len(STARTUP_ERRORS)), ids=[m for _, m in STARTUP_ERRORS])
def test_startup_errors_are_one_line(tiny, case, capsys, monkeypatch):
    """Each in this process (the command's own path: main() prints the line and returns the exit code)."""
    import uvicorn

    from moelm.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the server started"))
    args, message = STARTUP_ERRORS[case]
    assert main(["serve", str(tiny), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err


def test_chat_templates_that_do_not_compile_refuse_to_start(tiny, tmp_path, capsys, monkeypatch):
    """--chat-template FILE, and without it the checkpoint's own template: one line naming the template, exit 1."""
    import uvicorn

    from moelm.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the server started"))
    broken = "{% for m in messages %}{{ m.content "
    (tmp_path / "t.jinja").write_text(broken)
    own = tmp_path / "own"
    shutil.copytree(tiny, own)
    config = json.loads((own / "tokenizer_config.json").read_text())
    (own / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": broken}))
    for args, message in (([str(tiny), "--chat-template", str(tmp_path / "t.jinja")],
                           f"--chat-template {tmp_path / 't.jinja'} does not compile: unexpected end of template"),
                          ([str(own)], f"the chat template in {own / 'tokenizer_config.json'} does not compile")):
        assert main(["serve", *args, "--port", str(free_port())]) == 1
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err


def test_port_in_use_is_one_line(tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = serve(str(tiny), "--port", str(s.getsockname()[1]), "--uvicorn-log-level", "critical")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "could not listen on 127.0.0.1" in err and "Traceback" not in err, err


def test_serve_without_the_extra_names_it(tiny):
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
            "from moelm.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "serve", str(tiny)], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("moelm: error: moelm serve needs the serve extra: pip install 'moelm[serve]' "
                                "(missing: fastapi, uvicorn)")
