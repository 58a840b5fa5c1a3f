"""A first run on a CPU (an empty kernel cache): the kernel paths are timed on probes of each weight, once per shape
class, so that measuring is bounded whatever the model's size; and what it chooses does not change the outputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import moelm
from moelm.inference import cpu, experts, kernels
from reference import randomise

PROBE = 1 << 18  # weight elements a candidate may be timed on (cpu.probe_elements, made small for the test)


@pytest.fixture
def small_probe(monkeypatch, tmp_path):
    """An empty MOELM_CACHE (the compiled kernels are reused; only the choices are new) and a probe of PROBE
    elements, so that a model of a few MB has weights far above it."""
    monkeypatch.setenv("MOELM_CACHE", str(tmp_path))
    monkeypatch.delenv("MOELM_KERNELS", raising=False)
    monkeypatch.setattr(cpu, "probe_elements", lambda: PROBE)
    cpu.probe_rows.cache_clear()
    cpu.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # light on a shared machine
    yield
    torch.set_num_threads(threads)
    cpu.probe_rows.cache_clear()
    cpu.reset()


def watch_weights(monkeypatch) -> list[tuple[str, str, int]]:
    """(choice measured, op, weight elements) of every kernel, matmul or dequantization called while a choice is
    being measured."""
    seen = []

    def wrap(name, fn, weight_of):
        def call(*args, **kwargs):
            if cpu.measuring():
                seen.append((cpu.measuring()[0], name, weight_of(*args, **kwargs)))
            return fn(*args, **kwargs)
        return call

    def gemv_elements(x, weight, *args, select=None, **kwargs):
        per = weight.shape[-2] * x.shape[-1]  # one matrix [O, I] (int4: two inputs a byte)
        return per * (len(select) if select is not None else 1)

    def dequant_elements(q, *args, **kwargs):
        return q.numel() * (2 if q.dtype == torch.uint8 else 1)

    def second(x, w, *args, **kwargs):
        return w.numel()

    monkeypatch.setattr(kernels, "gemv", wrap("gemv", kernels.gemv, gemv_elements))
    monkeypatch.setattr(kernels, "dequantize", wrap("dequantize", kernels.dequantize, dequant_elements))
    monkeypatch.setattr(kernels, "gemm", wrap("gemm", kernels.gemm, second))
    monkeypatch.setattr(kernels, "intgemm", wrap("intgemm", kernels.intgemm, lambda x, q, *a, **k: dequant_elements(q)))
    monkeypatch.setattr(kernels, "onednn_linear", wrap("onednn", kernels.onednn_linear, second))
    monkeypatch.setattr(F, "linear", wrap("linear", F.linear, second))
    monkeypatch.setattr(torch, "_weight_int8pack_mm", wrap("int8pack", torch._weight_int8pack_mm, second))
    for name in ("torch", "gemm"):  # held by the table itself
        monkeypatch.setitem(experts.PATHS, name, wrap(f"experts.{name}", experts.PATHS[name], second))
    return seen


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An ERNIE 4.5 MoE whose LM head (16384 x 256), dense MLP (1024 x 256) and experts (512 x 256 each) are
    bigger than the probe, every weight random."""
    config = moelm.named_config("ernie4_5_moe-tiny")
    config.hidden_size, config.vocab_size, config.intermediate_size = 256, 16384, 1024
    config.moe_intermediate_size, config.moe_num_experts, config.moe_k = 512, 8, 2
    config.tie_word_embeddings = False
    model = moelm.AutoModelForCausalLM.from_config(config, seed=0, fast=False)
    randomise(model, seed=0)
    path = tmp_path_factory.mktemp("first-run")
    model.save_pretrained(path)
    return path


def generate(model, ids):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.skipif(not kernels.available(), reason="csrc kernels not available")
@pytest.mark.parametrize("quantization", ("int4", "int8", None))
def test_first_run_times_probes_and_changes_no_output(quantization, checkpoint, small_probe, monkeypatch):
    """With an empty kernel cache, the first greedy generate (prefill of 20 tokens: the integer prefill paths are
    candidates too; then decoding) measures its
    choices with no candidate ever handed more than a probe's weight elements (the whole 4M-element LM head, or a
    stack of experts, would be), says so once on stderr, and gives exactly what the next run with the remembered
    choices gives."""
    torch.manual_seed(0)
    monkeypatch.setattr(kernels, "_USED", set())  # the formats of the Mats made: this model's only
    model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint, quantization=quantization)
    ids = torch.randint(3, 16384, (1, 20), generator=torch.Generator().manual_seed(1))
    seen = watch_weights(monkeypatch)
    before = len(cpu.MEASURED)
    cold = generate(model, ids)
    measured = cpu.MEASURED[before:]
    assert measured and cpu.cache_file().is_file()
    assert seen, "no candidate ran while measuring"
    if quantization and kernels.int_variants():
        assert any(name == "intgemm" for _, name, _ in seen), "the integer prefill paths were not timed"
    # one probe, or one expert pair (each pair reads a whole expert: 2 x 512 x 256 + 256 x 512 elements); the one-call
    # decoder layer and the one-call MoE block (the prefill's last layer on its kept position) are timed on a real
    # step (the largest matrix they are handed: the dense MLP's gate_up, 2 x 1024 x 256, or the stacked experts, of
    # which a step reads its top-k)
    real = ("decode_layer|", "moe_block|")
    trials = [s for s in seen if s[0].startswith(real)]
    probes = [s for s in seen if not s[0].startswith(real)]
    assert max(n for *_, n in probes) <= max(PROBE, 3 * 512 * 256), sorted(probes, key=lambda s: -s[2])[:5]
    assert max((n for *_, n in trials), default=0) <= 2 * 1024 * 256, sorted(trials, key=lambda s: -s[2])[:5]
    # the decode kernels' widths of this model's format only (an int4 or fp32 model never times the int8 kernels);
    # without AVX-512BW each has one path, taken without timing
    lib = kernels.library()
    wide = {"int4": lib.gemv_wide(-1) >= 0, "int8": lib.gemv_wide_i8(-1) >= 0, None: False}[quantization]
    widths = {key.split("|")[0] for key, _, _ in measured} & {"int4_g64", "int8_width"}
    assert widths == ({"int4": {"int4_g64"}, "int8": {"int8_width"}}[quantization] if wide else set()), widths
    lm_head = [key for key, _, _ in measured if not key.startswith("decode_layer|") and ", 16384, " in key]
    assert not lm_head, f"the LM head's own rows in a key: {lm_head}"
    cpu.reset()  # a new process: the choices come from the file
    seen.clear()
    warm = generate(model, ids)
    assert not seen and len(cpu.MEASURED) == before + len(measured), "the second run measured again"
    assert torch.equal(cold[0], warm[0])
    assert torch.equal(cold[1], warm[1])


def test_probe_rows_classes():
    """Weights up to the probe keep their rows (rounded up to a power of two); bigger ones share the class of the
    probe's rows; the probes of a weight cover it one after another."""
    most = cpu.probe_elements()
    assert cpu.probe_rows(40, 64) == 64
    assert cpu.probe_rows(10**6, 2560) == cpu.probe_rows(4 * 10**6, 2560) <= most // 2560
    assert cpu.probe_rows(10**6, 2560) * 2560 > most // 2
    # many tokens: a probe call does at most PROBE_MACS multiply-adds, on 256 weight rows at least
    assert cpu.probe_rows(10**6, 12288, 1) == cpu.probe_rows(10**6, 12288)
    n = cpu.probe_rows(10**6, 2560, 2048)
    assert n * 2048 * 2560 <= cpu.PROBE_MACS < 2 * n * 2048 * 2560
    assert cpu.probe_rows(10**6, 12288, 8192) == 256 and cpu.probe_rows(100, 12288, 8192) == 128
    start = cpu.probe_starts(10, 4)
    assert [start() for _ in range(5)] == [0, 4, 6, 0, 4]
    start = cpu.probe_starts(3, 4)
    assert [start() for _ in range(2)] == [0, 0]


def test_probe_elements_bounded_whatever_the_cache(monkeypatch):
    """Twice the largest cache in fp32, within 64..128 MiB: a virtual machine may report its host's whole L3
    (480 MiB on an Intel Xeon with 2 cores), and probes of twice that made a first prefill measure for half a
    minute."""
    def with_l3(mib):
        monkeypatch.setattr(cpu, "info", lambda: dataclasses.replace(real, caches={"L3": mib << 20}))
        return cpu.probe_elements() * 4 >> 20

    real = cpu.info()
    assert (with_l3(480), with_l3(48), with_l3(8)) == (128, 96, 64)
