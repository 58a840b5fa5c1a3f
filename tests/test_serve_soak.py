"""A bounded soak of `moelm serve`: four clients for ~25 s sending streaming and plain requests of random sizes,
a third of them abandoned mid-way; afterwards every slot is free and the process's memory stayed flat."""
from __future__ import annotations

import random
import threading
import time

import pytest

from serve_fixtures import running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from moelm.models.scaffold import new_checkpoint  # noqa: E402

SOAK_SECONDS = 25


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_soak_leaves_no_slot_and_no_memory_behind(tmp_path):
    path = new_checkpoint("phimoe-tiny", tmp_path / "m", seed=0)
    with running_server(path, max_num_seqs=4, max_model_len=512, max_num_batched_tokens=32) as (url, engine, _):
        counts = {"done": 0, "abandoned": 0, "failed": 0}
        lock = threading.Lock()
        stop_at = time.time() + SOAK_SECONDS
        samples = []

        def client(seed: int):
            rng = random.Random(seed)
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
            while time.time() < stop_at:
                kind = rng.choice(["stream", "stream-abandon", "plain", "plain-timeout", "chat"])
                body = dict(model="tiny", max_tokens=rng.randint(1, 64), temperature=rng.choice([0, 0.7, 1.2]),
                            seed=rng.randint(0, 99), extra_body={"ignore_eos": rng.random() < 0.5})
                prompt = " ".join(rng.choice(["hello", "world", "fox", "你好", "😀", "expert"])
                                  for _ in range(rng.randint(1, 40)))
                try:
                    if kind.startswith("stream"):
                        stream = c.completions.create(prompt=prompt, stream=True, **body)
                        for i, _ in enumerate(stream):
                            if kind == "stream-abandon" and i == 3:
                                stream.close()
                                break
                        outcome = "abandoned" if kind == "stream-abandon" else "done"
                    elif kind == "plain-timeout":
                        c.with_options(timeout=0.05).completions.create(prompt=prompt, **body)
                        outcome = "done"
                    elif kind == "chat":
                        c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **body)
                        outcome = "done"
                    else:
                        c.completions.create(prompt=prompt, **body)
                        outcome = "done"
                except openai.APITimeoutError:
                    outcome = "abandoned"
                except openai.APIError:
                    outcome = "failed"
                with lock:
                    counts[outcome] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            samples.append((time.time(), rss()))
            time.sleep(1)
        for t in threads:
            t.join()
        deadline = time.time() + 10
        while engine.num_running() or engine.num_waiting():
            assert time.time() < deadline, "sequences still in slots after the soak"
            time.sleep(0.05)
        metrics = httpx.get(url + "/metrics").text
        assert "moelm:kv_cache_usage_perc{model_name=\"tiny\"} 0.0" in metrics
        assert 'moelm:num_requests_running{model_name="tiny"} 0.0' in metrics
        assert sorted(engine.free_rows) == [0, 1, 2, 3] and engine.cache.used() == 0
        assert counts["failed"] == 0 and counts["done"] > 20 and counts["abandoned"] > 5, counts
        assert httpx.get(url + "/health").status_code == 200
        # memory: the second half of the soak holds what the first half reached (allocator noise aside)
        first, second = samples[:len(samples) // 2], samples[len(samples) // 2:]
        reached = max(r for _, r in first)
        assert max(r for _, r in second) - reached < 16 * 2**20, [r // 2**20 for _, r in samples]
