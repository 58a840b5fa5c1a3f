"""`MOELM_NO_KERNELS=1 moelm serve` (no C kernels: PyTorch's ops everywhere, as `moelm generate` with the same
variable) starts and answers, greedy, what the server with the kernels answers: ERNIE-MoE in fp32, and int8 weights
(whose matmuls are the kernels' otherwise)."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from moelm.models.scaffold import new_checkpoint
from serve_fixtures import wait_healthy
from test_serve_cli import free_port

PROMPTS = ["hello world", "the list of", "a b c d e f g"]


def answers(path, port: int, env: dict, *args) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-m", "moelm.cli", "serve", str(path), "--port", str(port),
                             "--max-num-seqs", "2", "--max-model-len", "64", "--uvicorn-log-level", "warning", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout=90)
        r = httpx.post(url + "/v1/completions", json={"model": str(path), "prompt": PROMPTS, "max_tokens": 8,
                                                       "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("quantization", [[], ["--quantization", "int8"]])
def test_no_kernels_serves_as_the_kernels_do(tmp_path, quantization):
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path / "m", seed=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with ThreadPoolExecutor(max_workers=2) as pool:  # two servers at once: each is mostly one core's start
        plain, fast = pool.map(lambda e: answers(path, free_port(), e, *quantization),
                               [dict(env, MOELM_NO_KERNELS="1"), env])
    assert plain == fast and all(plain)
