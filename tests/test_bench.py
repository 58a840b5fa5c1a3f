"""Smoke test of the benchmark script on a tiny config (speed figures themselves are not checked)."""
import pytest

import moelm
from moelm.bench import report, runner
from moelm.bench.machine import cpu_model

pytest.importorskip("transformers")


def test_bench_tiny_runs_and_reports():
    result = runner.run(model="ernie4_5_moe-tiny", dtype="float32", prompt_lens=(16,), decode_tokens=2, batches=(1,),
                       repeats=1, threads=1, decode_context=8, bandwidth_bytes=2**22, log=None)
    for key in ("machine", "model", "dtype", "threads", "bandwidth", "weights", "rss", "rows"):
        assert key in result
    names = {r["name"] for r in result["rows"]}
    assert {"prefill 16 tok", "decode b1", "decode b1 / bandwidth", "peak RSS after load"} <= names
    for r in result["rows"]:  # RSS added by a load can be 0: the allocator may hand back pages freed earlier
        low = 0 if r["name"] == "RSS added by load" else 1e-9
        assert r["moelm"] >= low and r["transformers"] >= low, r
    assert result["weights"]["bytes_per_token"] > 0
    assert "| metric | moelm | transformers |" in report.table(result)


def test_bench_quantized_compares_with_own_fp32_and_reports_kl():
    result = runner.run(model="ernie4_5_moe-tiny", dtype="int8", prompt_lens=(16,), decode_tokens=2, batches=(1,),
                       repeats=1, threads=1, decode_context=8, bandwidth_bytes=2**22, log=None)
    assert result["labels"] == ["moelm int8", "moelm float32"]
    assert 0 <= result["kl"] < 1e-3
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["decode b1"]["moelm int8"] > 0 and rows["decode b1"]["moelm float32"] > 0
    assert "| metric | moelm int8 | moelm float32 |" in report.table(result)
    assert "Mean KL divergence" in report.markdown_section(result)


def test_bytes_per_token_counts_quantized_weights_and_active_experts(tmp_path):
    import moelm

    config = runner.bench_config("ernie4_5_moe-tiny")
    runner.write_checkpoint(config, str(tmp_path))
    fp32 = runner.bytes_per_token(moelm.AutoModelForCausalLM.from_pretrained(tmp_path), config)
    int8 = runner.bytes_per_token(moelm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="int8"), config)
    int4 = runner.bytes_per_token(moelm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="int4"), config)
    assert fp32["bytes_per_token"] < fp32["bytes_total"]  # only top-k experts and no embedding gather
    assert 0.25 < int8["bytes_per_token"] / fp32["bytes_per_token"] < 0.32  # int8 + scales + fp32 norms
    assert 0.12 < int4["bytes_per_token"] / fp32["bytes_per_token"] < 0.22


def test_bytes_per_token_leaves_out_the_mtp_head(tmp_path):
    import moelm

    config = runner.bench_config("ernie4_5_moe-tiny")
    runner.write_checkpoint(config, str(tmp_path))
    model = moelm.AutoModelForCausalLM.from_pretrained(tmp_path)
    before = runner.bytes_per_token(model, config)
    model.add_mtp()  # loaded with the model, read only when drafting
    after = runner.bytes_per_token(model, config)
    assert after["bytes_total"] > before["bytes_total"] and after["bytes_per_token"] == before["bytes_per_token"]


def test_bench_reports_the_cpu_and_the_paths_chosen():
    result = runner.run(model="ernie-tiny", dtype="float32", prompt_lens=(16,), decode_tokens=2, batches=(1,),
                       repeats=1, threads=1, decode_context=8, bandwidth_bytes=2**22, transformers=False, log=None)
    assert result["cpu"].startswith(cpu_model()) and "PyTorch capability" in result["cpu"]
    assert result["paths"] and all(path in ("torch", "gemv", "gemm", "onednn", "onednn_swap", "fp32_tiles")
                                   for key, path in result["paths"].items() if key.startswith("linear|"))
    section = report.markdown_section(result)
    assert "CPU: " in section and "Paths chosen on this CPU" in section


def test_bench_peer_errors(monkeypatch):
    from moelm.bench import llamacpp

    with pytest.raises(ValueError, match="no matching llama.cpp format for float16"):
        runner.run(model="ernie-tiny", dtype="float16", prompt_lens=(8,), decode_tokens=1, batches=(1,), repeats=1,
                  threads=1, decode_context=4, bandwidth_bytes=2**20, transformers=False, peer="llama.cpp", log=None)
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'moelm\[bench\]'"):
        runner.run(model="ernie-tiny", dtype="float32", prompt_lens=(8,), decode_tokens=1, batches=(1,), repeats=1,
                  threads=1, decode_context=4, bandwidth_bytes=2**20, transformers=False, peer="llama.cpp", log=None)
    with pytest.raises(ValueError, match="unknown peer"):
        runner.run(model="ernie-tiny", peer="vllm", log=None)


def test_bench_with_llama_cpp_peer():
    from moelm.bench import llamacpp

    if not llamacpp.available():
        pytest.skip("llama-cpp-python is not installed (pip install 'moelm[bench]')")
    result = runner.run(model="ernie4_5_moe-tiny", dtype="int4", prompt_lens=(16,), decode_tokens=2, batches=(1, 2),
                       repeats=1, threads=1, decode_context=8, bandwidth_bytes=2**22, peer="llama.cpp", log=None)
    assert result["labels"] == ["moelm int4", "moelm float32", "llama.cpp q4_0"]
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["prefill 16 tok"]["llama.cpp q4_0"] > 0 and rows["decode b1"]["llama.cpp q4_0"] > 0
    assert "llama.cpp q4_0" not in rows["decode b2"]  # batch-1 decode only
    assert "| moelm int4 ÷ llama.cpp q4_0 |" in report.table(result)


def test_full_size_bench_runs_fresh_processes_and_reports(tmp_path):
    """bench.fullsize on a tiny named config without the peer: the quantized checkpoint written once (no GGUF), a
    moelm process per round (the first with an empty kernel cache), a markdown table with every measurement."""
    import json
    import subprocess
    import sys

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "moelm.bench.fullsize", "run", "--model", "ernie4_5_moe-tiny", "--dtype", "int4",
           "--workdir", str(tmp_path / "w"), "--rounds", "2", "--no-peer", "--threads", "1", "--prompt-lens", "20",
           "40", "--batches", "1", "2", "--decode-tokens", "3", "--reload", "--json", str(out), "--markdown",
           str(tmp_path / "b.md")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    first, later = result["results"]["moelm"]
    for r in (first, later):
        assert r["load_s"] > 0 and r["load_warm_s"] > 0 and r["rss_gb"] > 0 and r["bytes_per_token"] > 0
        assert all(r[k] > 0 for k in ("prefill_20_tok_s", "prefill_40_tok_s", "decode_b1_tok_s", "decode_b2_tok_s"))
    assert (tmp_path / "w" / "ernie4_5_moe-tiny-int4" / "config.json").is_file()
    assert not list((tmp_path / "w").glob("*.gguf")), "a GGUF written without the peer"
    table = (tmp_path / "b.md").read_text()
    assert "| prefill 40 (tok/s) |" in table and "| decode b2 (tok/s) |" in table and "moelm, later" in table


def test_full_size_bench_arguments():
    from moelm.bench import cli

    p = __import__("argparse").ArgumentParser()
    cli.add_arguments(p)
    with pytest.raises(ValueError, match="--full-size takes --model"):
        cli.main_from_args(p.parse_args(["--model", "ernie-0.3b", "--full-size"]))
    with pytest.raises(ValueError, match="needs --full-size"):
        cli.main_from_args(p.parse_args(["--model", "ernie-4.5-21b-a3b"]))
    with pytest.raises(ValueError, match="--workdir"):
        cli.main_from_args(p.parse_args(["--model", "ernie-4.5-21b-a3b", "--full-size", "--dtype", "int4"]))
    with pytest.raises(ValueError, match="--layers is for --full-size"):
        cli.main_from_args(p.parse_args(["--model", "ernie-0.3b", "--layers", "2"]))


def test_full_size_checkpoint_of_the_first_layers(tmp_path):
    """--layers N (bench.fullsize.prepare): a quantized checkpoint of the named config's first N layers at full width
    (ERNIE's MoE layer range cut to them), named for it, that loads; N out of range is an error naming it."""
    from moelm.bench import fullsize
    from moelm.config import named_config

    full = named_config("ernie4_5_moe-tiny")
    ckpt, gguf = fullsize.prepare("ernie4_5_moe-tiny", "int4", tmp_path, log=lambda *a: None, peer=False, layers=2)
    assert ckpt.name == "ernie4_5_moe-tiny-int4-2l" and gguf is None
    model = moelm.AutoModelForCausalLM.from_pretrained(ckpt)
    config = model.config
    assert config.num_hidden_layers == 2 and len(model.model.layers) == 2 < full.num_hidden_layers
    assert config.moe_layer_end_index == 1 and config.hidden_size == full.hidden_size
    assert hasattr(model.model.layers[1].mlp, "experts")
    for bad in (0, full.num_hidden_layers + 1):
        with pytest.raises(ValueError, match=f"layers must be 1 to {full.num_hidden_layers}.*not {bad}"):
            fullsize.prepare("ernie4_5_moe-tiny", "int4", tmp_path, peer=False, layers=bad)


def test_speculative_bench_reports_each_method(capsys):
    """python -m moelm.bench.speculative on the bundled demo: a table row per method, with its drafts and whether
    its tokens are plain greedy's (fp32: they are); --repetition-penalty is generate's only."""
    from pathlib import Path

    from moelm.bench import speculative

    demo = str(Path(__file__).resolve().parents[1] / "demo" / "pydoc-moe")
    args = ["--model", demo, "--methods", "plain", "lookup:3", "mtp@always", "--prompt", "The list data type has",
            "--new-tokens", "12", "--repeats", "1", "--threads", "1", "--repetition-penalty", "1.0"]
    assert speculative.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| plain", "| lookup:3", "| mtp@always"]
    assert all(r.rstrip(" |").endswith("yes") for r in rows[1:]), rows
    checks, drafted = (int(c) for c in rows[3].split(" | ")[3:5])
    assert 0 < checks - 1 <= drafted <= checks  # mtp@always: a draft at every check but the first
    with pytest.raises(SystemExit) as exit_:
        speculative.main(["--model", demo, "--prompt", "x", "--serve-streams", "2", "--repetition-penalty", "1.1"])
    assert exit_.value.code == 2
