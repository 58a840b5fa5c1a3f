"""compressed-tensors checkpoints: moelm's int8/int4 models saved in that format load in transformers (with
compressed-tensors) with the same logits and reload in moelm bit for bit; checkpoints written by compressed-tensors
itself load in moelm; what moelm cannot represent exactly is an error naming the field; `moelm quantize`."""
import copy
import json

import pytest
import torch

from moelm import AutoModelForCausalLM, QuantizationConfig
from moelm.inference import cpu
from moelm.loading.compressed import CompressedTensorsError, from_packed, resolve_config, to_packed
from reference import reference_model

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            intermediate_size=96)
TINY_KW = {"ernie4_5": dict(TINY, head_dim=16),
           "ernie4_5_moe": dict(TINY, moe_num_experts=8, moe_k=2, moe_intermediate_size=64, moe_num_shared_experts=1),
           "phimoe": dict(TINY, hidden_size=128, intermediate_size=128, num_local_experts=4, attention_bias=True,
                          lm_head_bias=True)}
IDS = torch.tensor([[1, 5, 9, 2, 77, 3], [4, 4, 100, 8, 0, 12]])
# fp32 logits of the same dequantized weights, summed in another order (PhiMoE's experts: ~7e-7 seen)
BOUND = 1e-5


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch, tmp_path_factory):
    """PyTorch's ops for the quantized layers (dequantize + matmul), so logits are those of the dequantized weights:
    the gemv kernels round activations to int16 per group (1.5e-5 of the group's largest value)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOELM_KERNELS", "torch")
    cpu.reset()
    yield
    cpu.reset()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def source(tmp_path, family):
    ref = reference_model(family, **TINY_KW[family])
    ref.save_pretrained(tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("family,mode,group", [("ernie4_5", "int4", 32), ("ernie4_5", "int8", 0),
                                               ("ernie4_5_moe", "int4", 64), ("ernie4_5_moe", "int8", 0),
                                               ("phimoe", "int4", 128), ("phimoe", "int8", 0)])
def test_saved_quantized_loads_in_transformers_and_moelm(tmp_path, family, mode, group):
    model = AutoModelForCausalLM.from_pretrained(source(tmp_path, family), quantization=QuantizationConfig(
        mode, group or 64))
    model.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert config["tie_word_embeddings"] is False  # the LM head is its own quantized copy
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in qc["config_groups"].values()}
    assert (8, None) in schemes if mode == "int8" else (4, group) in schemes
    ours = logits(model)

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert "weight_packed" in "".join(n for n, _ in theirs.named_buffers()) + \
        "".join(n for n, _ in theirs.named_parameters())
    torch.testing.assert_close(logits(theirs), ours, atol=BOUND, rtol=0)

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(logits(again), ours)
    # asking for the stored mode is redundant; another is an error
    AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization=mode, fast=False)
    with pytest.raises(ValueError, match="stored quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization="int8" if mode == "int4" else "int4")


def test_int4_scales_kept_exactly(tmp_path):
    """moelm holds int4 scales in fp16 (and writes them widened to fp32); a weight whose stored scales are no fp16
    values (here made so: one attention weight, one expert's gate) makes its module's scales fp32, read exactly.
    transformers, dequantizing the same scales, gives the same logits; saved again, the scales come back equal."""
    from safetensors.torch import load_file, save_file

    model = AutoModelForCausalLM.from_pretrained(source(tmp_path, "ernie4_5_moe"), quantization=QuantizationConfig(
        "int4", 64))
    assert {m.scale.dtype for m in model.modules() if hasattr(m, "scale")} == {torch.float16}
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    odd = ("model.layers.0.self_attn.q_proj.weight_scale", "model.layers.1.mlp.experts.3.gate_proj.weight_scale")
    for key in odd:
        assert tensors[key].dtype == torch.float32
        tensors[key] = tensors[key] * (1 + 2 ** -20)
    save_file(tensors, path, metadata={"format": "pt"})
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    layer0, layer1 = ours.model.layers
    assert layer0.self_attn.q_proj.scale.dtype == torch.float32
    assert torch.equal(layer0.self_attn.q_proj.scale, tensors[odd[0]])
    experts = layer1.mlp.experts
    assert experts.gate_up.scale.dtype == torch.float32 and experts.down.scale.dtype == torch.float16
    assert torch.equal(experts.stacked("gate_up_proj")[1][3][:64], tensors[odd[1]])
    assert layer0.self_attn.o_proj.scale.dtype == torch.float16  # (k and v: fused with q, fp32 too)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=BOUND, rtol=0)
    ours.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    for key in tensors:
        if key.endswith("weight_scale"):
            assert torch.equal(again[key], tensors[key]), key


def test_mtp_tensors_written_back_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    src = source(tmp_path, "ernie4_5_moe")
    tensors = load_file(src / "model.safetensors")
    mtp = {"model.mtp_linear_proj.0.weight": torch.randn(64, 128), "model.mtp_hidden_norm.0.weight": torch.randn(64)}
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(src, quantization="int4")
    model.save_pretrained(tmp_path / "q")
    saved = load_file(tmp_path / "q" / "model.safetensors")
    for k, t in mtp.items():
        assert torch.equal(saved[k], t)
    assert r"re:^model\.mtp_" in json.loads((tmp_path / "q" / "config.json").read_text())[
        "quantization_config"]["ignore"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(torch.equal(again.kept_aside[k], t) for k, t in mtp.items())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_packing_is_compressed_tensors_own(group):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from moelm.inference.quantization import quantize

    w = torch.randn(24, 256)
    for mode, bits in (("int4", 4), ("int8", 8)):
        q, s = quantize(w, mode, group)
        out = to_packed(q, s, group if mode == "int4" else 0)
        codes = unpack_from_int32(out["weight_packed"], bits, torch.Size([24, 256]))
        if mode == "int4":
            n = q.reshape(24, -1, group // 2)
            expect = torch.cat([n & 15, n >> 4], dim=-1).reshape(24, 256).to(torch.int8) - 8
        else:
            expect = q
        assert torch.equal(codes, expect)
        assert torch.equal(pack_to_int32(expect, bits), out["weight_packed"])
        back = from_packed(out["weight_packed"], out["weight_scale"].bfloat16().float(), bits, group, 256)
        assert torch.equal(back[0], q)


def _compress_with_compressed_tensors(model, scheme: dict, path):
    """model quantized and saved by compressed-tensors' own API: power-of-two bf16 scales, so that the codes times
    the scale are exact in bf16 (transformers dequantizes in the scales' dtype, moelm in fp32)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    config = CTConfig(config_groups={"group_0": {"targets": ["Linear"], "weights": scheme}}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    bits, group = scheme["num_bits"], scheme.get("group_size")
    with torch.no_grad():
        for name, m in model.named_modules():
            if not hasattr(m, "weight_scale"):
                continue
            w = m.weight.float()
            amax = (w.reshape(w.shape[0], -1, group) if group else w[:, None]).abs().amax(-1)  # [O, groups]
            scale = torch.exp2(torch.round(torch.log2(amax / (2 ** (bits - 1) - 0.5))))
            m.weight_scale.data = scale.to(torch.bfloat16).reshape(m.weight_scale.shape)
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))


@pytest.mark.parametrize("scheme", [
    {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
    {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}])
def test_loads_what_compressed_tensors_writes(tmp_path, scheme):
    ref = reference_model("ernie4_5", **TINY_KW["ernie4_5"], tie_word_embeddings=False)
    _compress_with_compressed_tensors(ref, scheme, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(ours.lm_head).__name__ != "QuantizedLinear"  # ignored: read as stored
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    torch.testing.assert_close(logits(ours), logits(theirs), atol=BOUND, rtol=0)


GOOD = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
            "actorder": None, "dynamic": False, "observer": "minmax"}}}}


@pytest.mark.parametrize("path,value,field", [
    ("weights.symmetric", False, "symmetric"),
    ("weights.actorder", "group", "actorder"),
    ("weights.num_bits", 2, "num_bits"),
    ("weights.type", "float", "type"),
    ("weights.group_size", 16, "group_size"),
    ("weights.strategy", "block", "strategy"),
    ("input_activations", {"num_bits": 8, "type": "int"}, "input_activations"),
    ("format", "float-quantized", "format"),
    ("format", "nvfp4-pack-quantized", "format"),
])
def test_unsupported_schemes_name_the_field(path, value, field):
    from moelm.config import named_config
    from moelm.models.auto import AutoModelForCausalLM as Auto

    with torch.device("meta"):
        model = Auto.from_config(named_config("ernie4_5-tiny"), fast=False)
    resolve_config(GOOD, model, {})
    bad = copy.deepcopy(GOOD)
    node = bad["config_groups"]["group_0"]
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(CompressedTensorsError, match=field):
        resolve_config(bad, model, {})
    int8_group = copy.deepcopy(GOOD)
    int8_group["config_groups"]["group_0"]["weights"]["num_bits"] = 8  # group-wise int8: moelm has row scales
    with pytest.raises(CompressedTensorsError, match="strategy"):
        resolve_config(int8_group, model, {})
    with pytest.raises(CompressedTensorsError, match="kv_cache_scheme"):
        resolve_config({**GOOD, "kv_cache_scheme": {"num_bits": 8}}, model, {})
    with pytest.raises(CompressedTensorsError, match="quant_method"):
        resolve_config({**GOOD, "quant_method": "gptq"}, model, {})


@pytest.mark.parametrize("field,value", [("config_groups", "group_0"), ("config_groups", {"group_0": "Linear"}),
                                         ("targets", "Linear"), ("ignore", "lm_head"), ("ignore", [1])])
def test_malformed_config_is_a_clear_error(field, value):
    """Wrong JSON types: an error naming the field, never an AttributeError nor a string read letter by letter."""
    from moelm.config import named_config
    from moelm.models.auto import AutoModelForCausalLM as Auto

    with torch.device("meta"):
        model = Auto.from_config(named_config("ernie4_5-tiny"), fast=False)
    bad = copy.deepcopy(GOOD)
    if field == "targets":
        bad["config_groups"]["group_0"]["targets"] = value
    else:
        bad[field] = value
    with pytest.raises(CompressedTensorsError, match=rf"{field}.*(not an object|expected a list of strings)"):
        resolve_config(bad, model, {})


@pytest.mark.parametrize("value", [torch.tensor([64.5, 64.0]), torch.tensor([[64, 64]])])
def test_bad_weight_shape_tensor_is_named(tmp_path, value):
    """X.weight_shape must be 1-D integers: a float one is not truncated, a 2-D one is no TypeError."""
    from safetensors.torch import load_file, save_file

    from moelm.io.weights import CheckpointError

    model = AutoModelForCausalLM.from_pretrained(source(tmp_path, "ernie4_5"), quantization="int8")
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.weight_shape"
    tensors[key] = value
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}: .*expected 1-D integers"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


# ---------------------------------------------------------------- moelm quantize


def _cli(*args) -> int:
    from moelm.cli import main

    return main(list(map(str, args)))


@pytest.mark.parametrize("family,mode,group,dtype", [("ernie4_5", "int4", 32, torch.bfloat16),
                                                     ("ernie4_5_moe", "int8", 0, torch.float32),
                                                     ("phimoe", "int4", 64, torch.bfloat16)])
def test_quantize_cli_writes_what_save_pretrained_writes(tmp_path, family, mode, group, dtype):
    from moelm.io.weights import SafetensorsCheckpoint

    src = tmp_path / "src"
    reference_model(family, **TINY_KW[family]).to(dtype).save_pretrained(src)
    (src / "tokenizer.model").write_bytes(b"\x00\x01 not text")
    model = AutoModelForCausalLM.from_pretrained(src, quantization=QuantizationConfig(mode, group or 64))
    model.save_pretrained(tmp_path / "saved")
    assert _cli("quantize", src, tmp_path / "cli", "--quantization", mode, *(["--group-size", group] if group else []),
                "--max-shard-size", "30KB") == 0
    assert len(list((tmp_path / "cli").glob("model-*.safetensors"))) > 1
    with SafetensorsCheckpoint(tmp_path / "saved") as a, SafetensorsCheckpoint(tmp_path / "cli") as b:
        assert a.keys() == b.keys()
        for k in a.keys():  # noqa: SIM118
            assert a.dtype(k) == b.dtype(k) and torch.equal(a.get(k), b.get(k)), k
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "cli" / name).read_text() == (tmp_path / "saved" / name).read_text()
    assert (tmp_path / "cli" / "tokenizer.model").read_bytes() == b"\x00\x01 not text"
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "cli")), logits(model))


def test_quantize_cli_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    reference_model("ernie4_5", **TINY_KW["ernie4_5"]).save_pretrained(src)
    cases = [(("quantize", tmp_path / "nowhere", tmp_path / "a", "--quantization", "int4"), "nowhere"),
             (("quantize", src, src, "--quantization", "int4"), "not an empty directory")]
    assert _cli("quantize", src, tmp_path / "q", "--quantization", "int4") == 0
    cases.append((("quantize", tmp_path / "q", tmp_path / "b", "--quantization", "int8"), "already quantized"))
    cases.append((("quantize", src, tmp_path / "c", "--quantization", "int4", "--group-size", "48"), "group_size"))
    for args, message in cases:
        capsys.readouterr()
        assert _cli(*args) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moelm: error:") and message in err, err
    with pytest.raises(SystemExit) as e:
        _cli("quantize", src, tmp_path / "d", "--quantization", "int3")
    assert e.value.code == 2 and "int3" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not any((tmp_path / "c").glob("*.safetensors"))


# The peak RSS of this process (VmHWM): ru_maxrss of a child carries the parent's peak over fork and exec, and
# pytest's process is bigger than the child ever gets.
RSS_SCRIPT = """
import re, sys
from moelm.cli import main


def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024


base = peak()
assert main(["quantize", sys.argv[1], sys.argv[2], "--quantization", "int8", "--max-shard-size", "40MB"]) == 0
print(base, peak())
"""


def _random_checkpoint(path, layers: int) -> tuple[int, int]:
    """An ERNIE MoE fp32 checkpoint of random values (one pool, sliced) -> (bytes on disk, largest tensor bytes)."""
    from moelm.config import Ernie4_5_MoeConfig
    from moelm.io.weights import save_sharded
    from moelm.loading.checkpoint import ours_to_hub
    from moelm.models.auto import AutoModelForCausalLM as Auto

    config = Ernie4_5_MoeConfig(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=2048, intermediate_size=512, moe_num_experts=32,
                                moe_k=2, moe_intermediate_size=256, moe_num_shared_experts=1)
    with torch.device("meta"):
        model = Auto.class_for(config)(config)
    shapes = [(hub, tuple(t.shape)) for key, t in model.state_dict().items() if key != "lm_head.weight"
              for hub, t in ours_to_hub(config.model_type, key, t)]
    pool = torch.randn(2**20, generator=torch.Generator().manual_seed(0)) * 0.02
    files = save_sharded(((n, pool[:torch.Size(s).numel()].reshape(s)) for n, s in shapes), path,
                         max_shard_size="40MB", extra_files={"config.json": config.to_json_string()})
    return sum(f.stat().st_size for f in files), max(torch.Size(s).numel() * 4 for _, s in shapes)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")
def test_quantize_cli_memory_is_about_the_largest_tensor(tmp_path):
    import os
    import subprocess
    import sys

    def grown(src) -> int:
        """How much `moelm quantize` raised the peak RSS of a fresh process (past its imports)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, src, f"{src}-q"], capture_output=True, text=True,
                           timeout=300, env=env, check=False)
        assert r.returncode == 0, r.stderr
        base, peak = map(int, r.stdout.strip().splitlines()[-1].split())
        return peak - base

    small, largest = _random_checkpoint(tmp_path / "small", 1)
    size, same = _random_checkpoint(tmp_path / "big", 4)
    assert same == largest and size > 15 * small and size > 30 * largest
    # the same fixed cost (lazy imports, thread pools, ~60 MB) in both; beyond it, the 20x bigger checkpoint raised
    # the peak by ~1x its largest tensor. Holding its fp32 input or its 20 MB of int8 output would not fit.
    extra = grown(tmp_path / "big") - grown(tmp_path / "small")
    assert extra < 3 * largest + 4 * 2**20, (extra, largest, size)


def test_reads_int8_stored_unpacked(tmp_path):
    """naive-quantized / int-quantized: the int8 codes as `weight` [O, I] beside `weight_scale` [O, 1]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file, save_file

    model = AutoModelForCausalLM.from_pretrained(source(tmp_path, "ernie4_5_moe"), quantization="int8")
    model.save_pretrained(tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        prefix = key.removesuffix("_packed")
        shape = tensors.pop(f"{prefix}_shape")
        tensors[prefix] = unpack_from_int32(tensors.pop(key), 8, torch.Size(shape.tolist()))
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    for fmt in ("naive-quantized", "int-quantized"):
        config["quantization_config"]["format"] = fmt
        for group in config["quantization_config"]["config_groups"].values():
            group["format"] = fmt
        (tmp_path / "q" / "config.json").write_text(json.dumps(config))
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
        a, b = model.state_dict(), again.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- moelm new --quantization


@pytest.mark.parametrize("name,mode", [("ernie4_5_moe-tiny", "int4"), ("phimoe-tiny", "int8")])
def test_new_writes_a_random_quantized_checkpoint(tmp_path, name, mode):
    assert _cli("new", name, tmp_path / "q", "--quantization", mode, "--seed", "3") == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.quantization.mode == mode and (tmp_path / "q" / "tokenizer.json").is_file()
    std = model.config.initializer_range
    for n, p in model.named_parameters():  # drawn as init_weights draws them
        if "norm" in n and n.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), n
        elif n.endswith("bias"):
            assert not p.any(), n
        elif p.numel() > 1000:
            assert abs(p.float().std().item() - std) < 0.1 * std, n
    assert model.lm_head.scale.mean() > 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(theirs), logits(model), atol=BOUND, rtol=0)
    assert _cli("new", name, tmp_path / "again", "--quantization", mode, "--seed", "3") == 0
    a = (tmp_path / "q" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "model.safetensors").read_bytes()
