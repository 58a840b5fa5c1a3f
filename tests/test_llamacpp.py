"""llama.cpp as a benchmark peer (moelm.bench.gguf, moelm.bench.llamacpp; the harness: llamacpp_harness.py).

(a) The GGUF export of the tiny random models, read back with the gguf package's own GGUFReader: tensor names,
    ggml shapes, types, data and metadata, for every family and ftype. Runs whenever `gguf` is installed.
(b) llama.cpp's logits against moelm's on the same tiny models (skipped without llama-cpp-python).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import moelm  # noqa: E402
from llamacpp_harness import TINY, parity, tiny_checkpoint  # noqa: E402
from moelm.bench import llamacpp  # noqa: E402
from moelm.bench.gguf import ARCH, FTYPES, write_gguf  # noqa: E402

FAMILIES = ("ernie4_5", "ernie4_5_moe", "phimoe")
QTYPE = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPE = {"f32": 0, "bf16": 32, "q8_0": 7, "q4_0": 2}  # LlamaFileType
needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (llama_cpp) is not importable")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {f: tiny_checkpoint(f, root / f) for f in FAMILIES}


def expected(family: str, hub: dict) -> dict[str, tuple[list[str], str]]:
    """GGUF name -> (hub keys, how): written out by hand from llama.cpp's loaders (models/ernie4-5.cpp, phimoe.cpp)."""
    config = moelm.named_config(TINY[family])
    out = {"token_embd.weight": (["model.embed_tokens.weight"], "one"),
           "output_norm.weight": (["model.norm.weight"], "one")}
    if family == "phimoe":
        out.update({"output.weight": (["lm_head.weight"], "one"), "output_norm.bias": (["model.norm.bias"], "one"),
                    "output.bias": ([], "zeros")})
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out.update({b + "attn_norm.weight": ([p + "input_layernorm.weight"], "one"),
                    b + "ffn_norm.weight": ([p + "post_attention_layernorm.weight"], "one")})
        for proj, name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
            out[f"{b}{name}.weight"] = ([f"{p}self_attn.{proj}_proj.weight"], "one")
        if family == "ernie4_5" or (family == "ernie4_5_moe" and i == 0):
            for g in ("gate", "up", "down"):
                out[f"{b}ffn_{g}.weight"] = ([f"{p}mlp.{g}_proj.weight"], "one")
        elif family == "ernie4_5_moe":
            out[b + "ffn_gate_inp.weight"] = ([p + "mlp.gate.weight"], "one")
            out[b + "exp_probs_b.bias"] = ([p + "mlp.moe_statics.e_score_correction_bias"], "flat")
            for g in ("gate", "up", "down"):
                out[f"{b}ffn_{g}_exps.weight"] = ([f"{p}mlp.experts.{e}.{g}_proj.weight" for e in range(8)], "stack")
                out[f"{b}ffn_{g}_shexp.weight"] = ([f"{p}mlp.shared_experts.{g}_proj.weight"], "one")
        else:
            out.update({b + "attn_norm.bias": ([p + "input_layernorm.bias"], "one"),
                        b + "ffn_norm.bias": ([p + "post_attention_layernorm.bias"], "one"),
                        b + "attn_output.bias": ([], "zeros"),
                        b + "ffn_gate_inp.weight": ([p + "block_sparse_moe.gate.weight"], "one")})
            for g, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                out[f"{b}ffn_{g}_exps.weight"] = ([f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(4)],
                                                  "stack")
    return out


def source(keys: list[str], how: str, hub: dict, name: str, config) -> np.ndarray:
    if how == "zeros":
        return np.zeros(config.vocab_size if name.startswith("output") else config.hidden_size, np.float32)
    if how == "stack":
        return np.stack([hub[k] for k in keys])
    return hub[keys[0]].reshape(-1) if how == "flat" else hub[keys[0]]


# ---------------------------------------------------------------- (a) GGUF export, read back with GGUFReader

@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_round_trip(family, ftype, checkpoints, tmp_path):
    path = write_gguf(checkpoints[family], tmp_path / "m.gguf", ftype)
    reader = GGUFReader(path)
    config = moelm.named_config(TINY[family])
    hub = load_file(checkpoints[family] / "model.safetensors")
    want = expected(family, hub)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(want)
    for name, (keys, how) in want.items():
        x = source(keys, how, hub, name, config)
        t = tensors[name]
        assert [int(n) for n in t.shape] == list(reversed(x.shape)), name  # ggml ne: innermost first
        big = x.ndim >= 2 and name.endswith(".weight") and not name.endswith(("_norm.weight", "gate_inp.weight"))
        qtype = QTYPE[ftype] if big else Q.F32
        assert t.tensor_type == qtype, name
        got = dequantize(t.data, qtype).reshape(x.shape)
        want_data = x if qtype == Q.F32 else dequantize(quantize(x, qtype), qtype).reshape(x.shape)
        np.testing.assert_array_equal(got, want_data, err_msg=name)
        if qtype != Q.F32:  # and the quantization is the right one, not merely self-consistent
            tol = {Q.BF16: 2**-8, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7}[qtype]
            assert np.abs(got - x).max() <= tol * np.abs(x).max(), name

    arch = ARCH[family]
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == arch
    assert f["general.file_type"] == FILE_TYPE[ftype]
    for key, value in {"block_count": config.num_hidden_layers, "embedding_length": 64,
                       "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 16,
                       "attention.value_length": 16, "rope.dimension_count": 16,
                       "feed_forward_length": config.intermediate_size, "context_length": 2048}.items():
        assert f[f"{arch}.{key}"] == value, key
    assert f[f"{arch}.rope.freq_base"] == config.rope_parameters["rope_theta"]
    assert math.isclose(f[f"{arch}.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    if family == "ernie4_5_moe":
        assert (f[f"{arch}.expert_count"], f[f"{arch}.expert_used_count"]) == (8, 2)
        assert f[f"{arch}.expert_feed_forward_length"] == 32
        assert (f[f"{arch}.leading_dense_block_count"], f[f"{arch}.interleave_moe_layer_step"]) == (1, 1)
        assert (f[f"{arch}.expert_shared_count"], f[f"{arch}.expert_shared_feed_forward_length"]) == (1, 32)
    if family == "phimoe":
        assert (f[f"{arch}.expert_count"], f[f"{arch}.expert_used_count"]) == (4, 2)
    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "llama" and len(tokens) == 512 == len(set(tokens))
    assert tokens[f["tokenizer.ggml.bos_token_id"]] == "<s>" and tokens[f["tokenizer.ggml.eos_token_id"]] == "</s>"
    assert sum(t.startswith("<0x") for t in tokens) == 256


def test_gguf_longrope_factors(tmp_path):
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 5 for i in range(8)],
                long_factor=[2.0 + i for i in range(8)], short_mscale=1.15, long_mscale=1.45,
                original_max_position_embeddings=1024)
    ckpt = tiny_checkpoint("phimoe", tmp_path / "hub", rope_parameters=rope)
    reader = GGUFReader(write_gguf(ckpt, tmp_path / "m.gguf", "q8_0"))
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_allclose(tensors["rope_factors_short.weight"].data, rope["short_factor"])
    np.testing.assert_allclose(tensors["rope_factors_long.weight"].data, rope["long_factor"])
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["phimoe.rope.scaling.type"] == "longrope"
    assert f["phimoe.rope.scaling.original_context_length"] == 1024
    assert math.isclose(f["phimoe.rope.scaling.attn_factor"], 1.15, rel_tol=1e-6)


@pytest.mark.parametrize("family, overrides, match", [
    ("ernie4_5", dict(use_bias=True), "use_bias"),
    ("ernie4_5_moe", dict(moe_layer_interval=2), "every layer from the first MoE layer"),
    ("ernie4_5_moe", dict(moe_layer_end_index=1), "every layer from the first MoE layer"),
])
def test_gguf_refuses_what_llamacpp_cannot_run(family, overrides, match, tmp_path):
    ckpt = tiny_checkpoint(family, tmp_path / "hub", **overrides)
    with pytest.raises(ValueError, match=match):
        write_gguf(ckpt, tmp_path / "m.gguf", "f32")


# ---------------------------------------------------------------- (b) llama.cpp against moelm

# Bounds for bf16/q8_0/q4_0. The reference runs llama.cpp's exact (dequantized) weights in float32, so what is left
# is llama.cpp rounding each matmul input: to bf16 for bf16 weights (RMS relative error 2^-8/sqrt(3)), to q8_0 blocks
# of 32 for q8_0/q4_0 (step amax/127, RMS error step/sqrt(12); amax ~ 4x the RMS for the heavy-tailed SwiGLU
# products). Each rounding adds that relative error to a matmul output; n of them lie on the path to the logits
# (per layer: attention input, o_proj input, FFN input, down_proj input; plus lm_head), adding in quadrature:
# RMS bound sqrt(n) * eps; the max over the ~16k logits a heavy-tailed 6x that. Routing near-ties are left out
# (llamacpp_harness.ROUTER_MARGIN): a token whose top-k choice holds by a hair may legitimately pick another expert.
EPS = {"bf16": 2**-8 / math.sqrt(3), "q8_0": 4 / (127 * math.sqrt(12)), "q4_0": 4 / (127 * math.sqrt(12))}
ROUNDINGS = {"ernie4_5": 4 * 2 + 1, "ernie4_5_moe": 4 * 3 + 1, "phimoe": 4 * 2 + 1}


@needs_llamacpp
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_f32_matches_moelm(family, tmp_path):
    r = parity(family, "f32", workdir=tmp_path)
    assert r["kept"] == r["positions"]
    assert r["rel"] < 1e-3, r
    if family == "phimoe":  # against llama.cpp's semantics; the real reference differs (RMSNorm, softmax top-2)
        assert r["rel_to_reference"] > 0.05, r


@needs_llamacpp
@pytest.mark.parametrize("ftype", ["bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_quantized_matches_moelm_on_the_same_weights(family, ftype, tmp_path):
    r = parity(family, ftype, workdir=tmp_path)
    rms_bound = math.sqrt(ROUNDINGS[family]) * EPS[ftype]
    assert r["kept"] >= r["positions"] // 2, r
    assert r["rms_rel"] < rms_bound, (r, rms_bound)
    assert r["rel"] < 6 * rms_bound, (r, rms_bound)


@needs_llamacpp
def test_llamacpp_phimoe_longrope_short_factors(tmp_path):
    """n_ctx below original_max_position_embeddings: llama.cpp uses the short factors and the short mscale."""
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 5 for i in range(8)],
                long_factor=[2.0 + i for i in range(8)], short_mscale=1.15, long_mscale=1.45,
                original_max_position_embeddings=1024)
    r = parity("phimoe", "f32", workdir=tmp_path, rope_parameters=rope)
    assert r["rel"] < 1e-3, r


@needs_llamacpp
def test_llamacpp_model_timing_api(checkpoints, tmp_path):
    path = write_gguf(checkpoints["ernie4_5_moe"], tmp_path / "m.gguf", "q8_0")
    ids = list(range(3, 40))
    m = llamacpp.LlamaCppModel(path, threads=1, n_ctx=128, n_batch=64)
    assert m.prefill(ids) > 0 and m.prefill(ids) > 0
    assert m.decode(ids[:16], steps=4) > 0
    # batched decoding: each row's greedy tokens are what that row decodes alone
    contexts = [ids[:16], ids[5:30], ids[2:9]]
    grown = [list(c) for c in contexts]
    assert m.decode_batch(grown, steps=3) > 0
    for context, row in zip(contexts, grown):
        assert row[len(context):] == m.greedy(context, len(row) - len(context))
    m.close()
    with pytest.raises(RuntimeError, match="closed"):
        m.prefill(ids)
    full = llamacpp.LlamaCppModel(path, threads=1, n_ctx=128, n_batch=64, logits_all=True)
    a, b = full.logits(ids), full.logits(ids)  # a fresh KV cache each call
    full.close()
    assert a.shape == (len(ids), 512) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert "llama-cpp-python" in llamacpp.build_info()


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_moelm_quantized_weights_as_gguf_blocks_exactly(mode):
    """q4_0 / q8_0 bytes made from moelm's int4 (group 32) / int8 codes dequantize to moelm's weights bit for bit;
    a scale that fp16 cannot hold is refused (None), not rounded."""
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_dequantize

    from moelm.bench.gguf import q4_0_blocks, q8_0_blocks
    from moelm.inference.quantization import dequantize, quantize

    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(w, mode, 32)
    blocks, qtype = (q4_0_blocks, Q.Q4_0) if mode == "int4" else (q8_0_blocks, Q.Q8_0)
    assert blocks(q.numpy(), (scale.float() * (1 + 2 ** -13)).numpy()) is None  # no fp16 values: refused
    if mode == "int4":
        assert scale.dtype == torch.float16  # quantize rounds int4 scales to fp16, as Q4_0 holds them
    scale = scale.half().float()
    got = gguf_dequantize(blocks(q.numpy(), scale.numpy()), qtype)
    np.testing.assert_array_equal(got, dequantize(q, scale, 32 if mode == "int4" else 0).numpy())
