"""moelm leaves the process's floating-point state alone: after importing it, loading a model (fp32, bf16, int4) and
generating with the C kernels, subnormal numbers survive in Python, numpy and torch (no flush-to-zero or
denormals-are-zero switched on, as linking a -ffast-math shared library with GCC 12 would do)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from moelm.inference import kernels

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    import numpy, torch
    import moelm
    from moelm.inference import kernels

    def subnormals():
        return {"python": 5e-324 > 0, "numpy": bool(numpy.float64(1e-310) > 0),
                "torch": bool((torch.tensor([1e-40]) * 1).item() > 0),
                "torch threads": bool((torch.full((1 << 20,), 1e-40) * 1).min().item() > 0)}

    torch.set_num_threads(2)
    assert all(subnormals().values()), subnormals()
    assert kernels.library() is not None
    model = moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5_moe-tiny"), seed=0)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        for kwargs in ({}, {"torch_dtype": torch.bfloat16}, {"quantization": "int4"}):
            model = moelm.AutoModelForCausalLM.from_pretrained(path, **kwargs)
            out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False)
            assert out.shape == (1, 10)
            after = subnormals()
            assert all(after.values()), (kwargs, after)
    print("subnormals kept")
""")


@pytest.mark.skipif(not kernels.available(), reason="the C kernels are not available (no compiler or MOELM_NO_KERNELS)")
def test_generation_keeps_subnormals():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "subnormals kept" in result.stdout
