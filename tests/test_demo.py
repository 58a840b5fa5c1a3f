"""The bundled demo model (demo/pydoc-moe, README's first command): it loads with moelm and transformers and writes
English words, not random tokens."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

DEMO = Path(__file__).parent.parent / "demo" / "pydoc-moe"


def test_demo_generates_words():
    out = subprocess.run([sys.executable, "-m", "moelm", "generate", "--model", str(DEMO), "--prompt", "The list",
                          "--max-new-tokens", "48", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    words = re.findall(r"[A-Za-z]+", out.stdout)
    assert len(words) >= 20, out.stdout
    common = {"the", "a", "of", "to", "is", "and", "in", "is", "for", "be", "an", "it", "if", "as", "with", "or"}
    assert sum(w.lower() in common for w in words) >= 4, out.stdout  # English function words, not token soup


def test_demo_loads_in_transformers_with_the_same_logits():
    import transformers

    from moelm import AutoModelForCausalLM

    ids = torch.tensor([[5, 300, 301, 302, 303, 304]])
    ours = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)(ids).logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_demo_mtp_drafts_from_the_command_line():
    """The demo's MTP head drafting up to 3 tokens a step (--num-assistant-tokens): greedy gives plain greedy's text,
    and -v says how many drafts were kept."""
    base = [sys.executable, "-m", "moelm", "generate", "--model", str(DEMO), "--prompt", "The list data type has",
            "--max-new-tokens", "32", "--temperature", "0"]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    mtp = subprocess.run([*base, "--speculative", "mtp", "--num-assistant-tokens", "3", "-v"], capture_output=True,
                         text=True, timeout=300)
    assert plain.returncode == 0 and mtp.returncode == 0, (plain.stderr, mtp.stderr)
    assert mtp.stdout == plain.stdout and "drafted tokens kept" in mtp.stderr, mtp.stderr
