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


def test_bench_quantized_compares_with_own_fp32_and_reports_kl():
    result = bench.run(model="ernie4_5_moe-tiny", dtype="int8", prompt_lens=(16,), decode_tokens=2, batches=(1,),
                       repeats=1, threads=1, decode_context=8, bandwidth_bytes=2**22, log=None)
    assert result["labels"] == ["moelm int8", "moelm float32"]
    assert 0 <= result["kl"] < 1e-3
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["decode b1"]["moelm int8"] > 0 and rows["decode b1"]["moelm float32"] > 0
    assert "| metric | moelm int8 | moelm float32 |" in bench.table(result)
    assert "Mean KL divergence" in bench.markdown_section(result)


def test_bytes_per_token_counts_quantized_weights_and_active_experts(tmp_path):
    import moelm

    config = bench.bench_config("ernie4_5_moe-tiny")
    bench.write_checkpoint(config, str(tmp_path))
    fp32 = bench.bytes_per_token(moelm.AutoModelForCausalLM.from_pretrained(tmp_path), config)
    int8 = bench.bytes_per_token(moelm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="int8"), config)
    int4 = bench.bytes_per_token(moelm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="int4"), config)
    assert fp32["bytes_per_token"] < fp32["bytes_total"]  # only top-k experts and no embedding gather
    assert 0.25 < int8["bytes_per_token"] / fp32["bytes_per_token"] < 0.32  # int8 + scales + fp32 norms
    assert 0.12 < int4["bytes_per_token"] / fp32["bytes_per_token"] < 0.22
