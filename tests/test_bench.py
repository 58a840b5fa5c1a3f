"""Smoke test of the benchmark script on a tiny config (speed figures themselves are not checked)."""
import pytest

from moelm import bench

pytest.importorskip("transformers")


def test_bench_tiny_runs_and_reports():
    result = bench.run(model="ernie4_5_moe-tiny", dtype="float32", prompt_lens=(16,), decode_tokens=2, batches=(1,),
                       repeats=1, threads=1, decode_context=8, bandwidth_bytes=2**22, log=None)
    for key in ("machine", "model", "dtype", "threads", "bandwidth", "weights", "rss", "rows"):
        assert key in result
    names = {r["name"] for r in result["rows"]}
    assert {"prefill 16 tok", "decode b1", "decode b1 / bandwidth", "peak RSS after load"} <= names
    for r in result["rows"]:
        assert r["moelm"] > 0 and r["transformers"] > 0
    assert result["weights"]["bytes_per_token"] > 0
    assert "| metric | moelm | transformers |" in bench.table(result)
