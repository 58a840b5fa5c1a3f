"""Memory: the peak RSS of loading with quantization while loading and from a GGUF file, measured in a fresh
subprocess (VmHWM, reset before the load) against the size of the loaded weights: quantizing or dequantizing a
weight holds a few MB of fp32 temporaries at a time, never whole fp32 copies of a big LM head or embedding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moelm
from moelm.bench.gguf import write_gguf

VOCAB, HIDDEN = 131072, 64  # an embedding / LM head of 8M elements: 32 MB in fp32
MB = 1 << 20

STATUS = textwrap.dedent("""
    def status(key):  # bytes of /proc/self/status's VmRSS / VmHWM
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
""")

CHILD = STATUS + textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from moelm import AutoModelForCausalLM

    def load(path):
        gguf = path.endswith(".gguf")
        return AutoModelForCausalLM.from_pretrained(path.rpartition("/")[0] if gguf else path, fast=False,
                                                    gguf_file=path.rpartition("/")[2] if gguf else None, **kw)

    warm, path, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    load(warm)  # the modules a load imports: not counted
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM counts from here
    before = status("VmRSS")
    model = load(path)
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    print(json.dumps({"peak": status("VmHWM") - before, "weights": sum(tensors.values())}))
""")


def peak_of_load(warm, path, **kw) -> dict:
    """{"peak": VmHWM over the RSS before the load, "weights": bytes of the loaded parameters and buffers}."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(warm), str(path), json.dumps(kw)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint(directory, vocab: int):
    """ERNIE 4.5 tiny with `vocab` tokens, its LM head tied to the embedding, in fp32."""
    config = moelm.named_config("ernie4_5-tiny")
    config.vocab_size, config.tie_word_embeddings = vocab, True
    torch.manual_seed(0)
    moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    out = {"small": checkpoint(root / "small", 512), "big": checkpoint(root / "big", VOCAB)}
    for name in ("small", "big"):
        out[f"{name}.gguf"] = write_gguf(out[name], root / f"{name}.gguf", "q8_0")
    return out


def test_quantizing_while_loading_holds_no_fp32_copy_of_a_weight(dirs):
    """quantization="int8" on a checkpoint with a 32 MB fp32 embedding, the LM head tied to it: the peak is the model
    plus a few MB (+10 MB; quantize on the whole head held fp32 copies of it: +55 MB)."""
    got = peak_of_load(dirs["small"], dirs["big"], quantization="int8")
    assert got["peak"] < got["weights"] + 24 * MB, got


def test_gguf_q8_0_embedding_read_a_block_at_a_time(dirs):
    """A tied Q8_0 token_embd (the embedding, and the int8 LM head): dequantized a block of rows at a time: +26 MB,
    19 of them the header's 131072-token vocabulary (gguf's dequantize of the whole held the fp32 tensor and its
    temporaries: +150 MB)."""
    got = peak_of_load(dirs["small.gguf"], dirs["big.gguf"])
    assert got["peak"] < got["weights"] + 48 * MB, got


TILES = STATUS + textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from moelm.inference.matmul import _fp32_tiles

    x, w = torch.randn(4096, 64).bfloat16(), torch.randn(4096, 64).bfloat16()
    _fp32_tiles(x[:8], w, None)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    y = _fp32_tiles(x, w, None)
    print(status("VmHWM") - before)
""")


def test_bf16_weights_in_fp32_tiles_hold_one_fp32_tile():
    """A bf16 Linear computed in fp32 tiles (a long prompt on CPUs without fast bf16 matmuls): its [4096, 4096]
    output (32 MB in bf16) and one fp32 tile at a time (64 MB), not also the fp32 tiles concatenated and cast
    (+96 MB: a 2048-token prompt's dense MLP in ERNIE took 80 MB where 48 do)."""
    out = subprocess.run([sys.executable, "-c", TILES], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MOELM_KERNELS": "torch"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 112 * MB
