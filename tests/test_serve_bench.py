"""The serving benchmark script (benchmarks/serve.py): --help, its synthetic tokenizer, and (slow) a real run of
`moelm serve` on the tiny shape. Speed figures themselves are not checked."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"


def load_script():
    spec = importlib.util.spec_from_file_location("serve_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_help_exits_zero():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--clients" in out.stdout and "--peers" in out.stdout


def test_synthetic_tokenizer_decodes_every_id_and_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    from moelm.text.tokenizer import AutoTokenizer

    bench = load_script()
    vocab = 600
    bench.synthetic_tokenizer(vocab).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}')
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = bench.prompt_ids(0, 0, 0, 0, 64, vocab)
    assert len(set(ids)) > 1 and min(ids) >= len(bench.SPECIALS)
    text = "".join(bench.filler(i) for i in ids)
    assert tok(text)["input_ids"] == ids  # the prompt is exactly as many tokens as ids
    assert tok.decode(ids) == text
    for i in range(len(bench.SPECIALS), vocab):  # every non-special id the model can sample has text
        assert tok.decode([i]).strip()


@pytest.mark.slow
def test_serve_bench_tiny_moelm(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: run with -m slow")
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    md = tmp_path / "serve.md"
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", "ernie-tiny", "--clients", "1", "2", "--requests",
                          "2", "--prompt-tokens", "8", "--gen-tokens", "4", "--peers", "moelm", "--threads", "1",
                          "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| server | clients | requests | gen tok/s |" in out.stdout
    rows = re.findall(r"^\| moelm float32 \| (\d+) \| (\d+) \| ([\d.]+) \|", out.stdout, re.M)
    assert [(c, n) for c, n, _ in rows] == [("1", "2"), ("2", "4")]
    assert all(float(rate) > 0 for _, _, rate in rows)
    assert "moelm 2 clients / 1 client" in out.stdout
    text = md.read_text()
    assert "### Serving: ernie-tiny, float32" in text and "Machine:" in text and "| moelm float32 | 2 |" in text
