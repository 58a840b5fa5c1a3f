"""from_pretrained(..., mmap=True): weights used as stored are mapped from the checkpoint, not copied: RSS counts
their pages only once touched, and writing to them never reaches the file."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelm
from moelm.io.weights import SafetensorsCheckpoint
from reference import randomise


def test_mapped_tensor_is_copy_on_write(tmp_path):
    """mapped(): the stored values; in-place changes stay in the process; small, unaligned or unlike tensors are
    not mapped (None); a view outlives the tensor it came from."""
    g = torch.Generator().manual_seed(0)
    big, small = torch.randn(512, 1024, generator=g), torch.randn(3, generator=g)
    save_file({"big": big, "small": small, "half": big.bfloat16()}, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    t = ckpt.mapped("big")
    assert torch.equal(t, big) and torch.equal(ckpt.mapped("half"), big.bfloat16())
    assert ckpt.mapped("small") is None and ckpt.mapped("big", like=torch.empty(512, 1024, dtype=torch.bfloat16)) \
        is None and ckpt.mapped("big", like=torch.empty(1024, 512)) is None
    t.mul_(2)
    assert torch.equal(t, 2 * big)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["big"], big), "the file was written"
    row = t[7]
    del t
    assert torch.equal(row, 2 * big[7])


def checkpoint(path, dtype, tied: bool = True):
    """An ERNIE 4.5 whose tied embedding (32768 x 512) is most of its weights (untied: the embedding and the LM head),
    every weight random, in dtype."""
    config = moelm.named_config("ernie4_5-tiny")
    config.tie_word_embeddings = tied
    config.hidden_size, config.vocab_size, config.intermediate_size, config.head_dim = 512, 32768, 1024, 64
    config.num_attention_heads, config.num_key_value_heads = 8, 2
    model = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False)
    randomise(model, seed=0)
    model.to(dtype).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_mapped_weights_are_the_stored_ones_and_nothing_is_lost(dtype, tmp_path):
    """A model loaded in its checkpoint's dtype has the stored values (logits equal to the fp32 reference's), trains
    in place without touching the file, and saves over its own checkpoint while mapped."""
    path = checkpoint(tmp_path / "ckpt", dtype)
    stored = load_file(str(path / "model.safetensors"))
    stored["model.mtp_linear_proj.0.weight"] = torch.randn(512, 1024).to(dtype)  # kept aside (mapped), saved back
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = moelm.AutoModelForCausalLM.from_pretrained(path, mmap=True)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == dtype and torch.equal(embed, stored["model.embed_tokens.weight"])
    plain = moelm.AutoModelForCausalLM.from_pretrained(path, fast=False)
    ids = torch.randint(3, 32768, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        # bf16: every op rounds to bf16 and the fast and plain paths (and the kernels a CPU's measurement picks)
        # sum in different orders: up to one bf16 step of the largest logit apart (0.03-0.04 of 8.4 seen; both
        # are 0.17 from an fp32 computation of the same weights)
        unmapped = moelm.AutoModelForCausalLM.from_pretrained(path)  # the same kernels, the weights copied
        assert torch.equal(model(ids).logits, unmapped(ids).logits), "mapping changed a weight"
        expected = plain(ids).logits.float()
        atol = 1e-4 if dtype == torch.float32 else 2 ** -7 * float(expected.abs().max())
        torch.testing.assert_close(model(ids).logits.float(), expected, rtol=0, atol=atol)
        embed.add_(1.0)  # as an optimizer step would
    assert torch.equal(load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"],
                       stored["model.embed_tokens.weight"]), "an in-place change reached the file"
    model.save_pretrained(path)  # over the mapped file
    again = load_file(str(path / "model.safetensors"))
    assert torch.equal(again["model.embed_tokens.weight"], stored["model.embed_tokens.weight"] + 1.0)
    assert torch.equal(again["model.mtp_linear_proj.0.weight"], stored["model.mtp_linear_proj.0.weight"])
    assert torch.equal(embed, again["model.embed_tokens.weight"])


PEAK = """
import json, sys, torch, moelm
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
moelm.AutoModelForCausalLM.from_pretrained(sys.argv[2])  # the imports and first-use set-up, not measured
before = kib("VmRSS")
model = moelm.AutoModelForCausalLM.from_pretrained(sys.argv[1], **({"mmap": True} if sys.argv[3] == "mmap" else {}))
print(json.dumps({"peak": (kib("VmHWM") - before) * 1024, "after": (kib("VmRSS") - before) * 1024}))
"""


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_loading_in_the_stored_dtype_maps_instead_of_copying(dtype, tmp_path):
    """from_pretrained(mmap=True)'s peak RSS (a fresh process) is well under the checkpoint's size when most of it
    is one tensor used as stored (the tied embedding); reading it into memory (the default) costs the whole size."""
    path = checkpoint(tmp_path / "ckpt", dtype)
    tiny = tmp_path / "tiny"
    moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5-tiny"), fast=False).save_pretrained(tiny)
    size = (path / "model.safetensors").stat().st_size
    peaks = {}
    for how in ("mmap", "read"):
        out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(tiny), how], capture_output=True, text=True,
                             check=False, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[how] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert peaks["mmap"] < 0.4 * size, (peaks, size)  # the layers: 0.2 of it
    assert peaks["read"] > 0.9 * size, (peaks, size)  # read into memory (the default): all of it


def test_an_untied_embedding_is_mapped_by_default(tmp_path):
    """Untied, the input embedding is only gathered from: mapped without mmap=True (a fresh process's peak RSS is
    about the LM head and the layers, not the embedding too), with the stored values and logits as read."""
    path = checkpoint(tmp_path / "ckpt", torch.float32, tied=False)
    size = (path / "model.safetensors").stat().st_size
    tiny = tmp_path / "tiny"
    moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5-tiny"), fast=False).save_pretrained(tiny)
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(tiny), "default"], capture_output=True, text=True,
                         check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert 0.45 * size < peak < 0.75 * size, (peak, size)  # the LM head 0.45, the layers 0.1, not the embedding 0.45
    model = moelm.AutoModelForCausalLM.from_pretrained(path, fast=False)
    stored = load_file(str(path / "model.safetensors"))
    assert torch.equal(model.get_input_embeddings().weight, stored["model.embed_tokens.weight"])
    assert not model.get_input_embeddings().weight.untyped_storage().resizable()  # a map of the file, not memory


def test_info_load_measures_after_the_plan(tmp_path, capsys):
    """`moelm info --load` prints the plan (before loading), then the RSS measured after loading and its peak; a
    named config cannot be loaded (one line, exit 1)."""
    path = tmp_path / "tiny"
    moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5-tiny"), fast=False).save_pretrained(path)
    cli = [sys.executable, "-m", "moelm.cli", "info"]
    out = subprocess.run([*cli, "--model", str(path), "--load", "--quantization", "int8"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    plan = next(i for i, line in enumerate(lines) if "memory: plan:" in line)
    measured = next(i for i, line in enumerate(lines) if "loaded: measured: RSS" in line)
    assert plan < measured and "peak RSS" in lines[measured] and "int8" in lines[measured]
    from moelm.cli import main

    assert main(["info", "--model", "ernie-4.5-0.3b", "--load"]) == 1  # in this process: the same main()
    err = capsys.readouterr().err
    assert "named config" in err and "Traceback" not in err
