"""Edges of the quantized-checkpoint features: `moelm quantize` on checkpoints that do not fit the config,
--group-size 0, compressed-tensors configs it writes in other valid ways, modules_to_not_convert with a GGUF."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llamacpp_harness import tiny_checkpoint
from moelm import AutoModelForCausalLM, QuantizationConfig
from moelm.loading.compressed import CompressedTensorsError, resolve_config

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": W4}}}


def _cli(*args) -> int:
    from moelm.cli import main

    return main(list(map(str, args)))


def _edited(src, dst, **tensors):
    """A copy of checkpoint `src` with tensors replaced (a value) or dropped (None)."""
    import shutil

    shutil.copytree(src, dst)
    stored = load_file(dst / "model.safetensors")
    for key, value in tensors.items():
        if value is None:
            del stored[key.replace("__", ".")]
        else:
            stored[key.replace("__", ".")] = value
    save_file(stored, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint("ernie4_5", tmp_path_factory.mktemp("hub") / "ernie4_5")


def _one_error(capsys, *args) -> str:
    capsys.readouterr()
    assert _cli(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moelm: error:"), err
    return err


@pytest.mark.parametrize("key,value", [
    ("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 128)),  # was written, then failed to load
    ("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 48)),  # was a reshape error
    ("model.layers.0.self_attn.o_proj.weight", torch.zeros(64)),  # was "not enough values to unpack"
    ("model.norm.weight", torch.ones(65))])
def test_quantize_refuses_a_tensor_of_the_wrong_shape(tiny, tmp_path, capsys, key, value):
    src = _edited(tiny, tmp_path / "src", **{key.replace(".", "__"): value})
    err = _one_error(capsys, "quantize", src, tmp_path / "q", "--quantization", "int4")
    assert f"{key} {list(value.shape)} (expected" in err, err
    assert not (tmp_path / "q").exists()


def test_quantize_tied_checkpoint_without_its_embedding(tiny, tmp_path, capsys):
    """The tied head is made from the embedding: a checkpoint without it is a missing tensor, not a KeyError."""
    assert json.loads((tiny / "config.json").read_text())["tie_word_embeddings"]
    src = _edited(tiny, tmp_path / "src", model__embed_tokens__weight=None)
    err = _one_error(capsys, "quantize", src, tmp_path / "q", "--quantization", "int4")
    assert "missing tensor(s) ['model.embed_tokens.weight']" in err, err


@pytest.mark.parametrize("same", [True, False])
def test_quantize_tied_checkpoint_that_stores_its_head(tiny, tmp_path, same):
    """tie_word_embeddings with lm_head.weight stored too ("duplicate tensor names in the layout"): the files
    from_pretrained(quantization=...) + save_pretrained writes (a head of other values is the stored one)."""
    from moelm.io.weights import SafetensorsCheckpoint

    embed = load_file(tiny / "model.safetensors")["model.embed_tokens.weight"]
    src = _edited(tiny, tmp_path / "src", lm_head__weight=embed.clone() if same else torch.randn_like(embed))
    assert _cli("quantize", src, tmp_path / "cli", "--quantization", "int4") == 0
    AutoModelForCausalLM.from_pretrained(src, quantization="int4").save_pretrained(tmp_path / "saved")
    with SafetensorsCheckpoint(tmp_path / "saved") as a, SafetensorsCheckpoint(tmp_path / "cli") as b:
        assert a.keys() == b.keys()
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())  # noqa: SIM118
    assert (tmp_path / "cli" / "config.json").read_text() == (tmp_path / "saved" / "config.json").read_text()


def test_quantize_group_size_zero_is_refused(tiny, tmp_path, capsys):
    """--group-size 0 was read as "not given" (64)."""
    err = _one_error(capsys, "quantize", tiny, tmp_path / "q", "--quantization", "int4", "--group-size", "0")
    assert "group_size must be a multiple of 32, got 0" in err
    assert not any((tmp_path / "q").glob("*.safetensors"))


def test_quantize_reads_a_null_quantization_config_as_unquantized(tiny, tmp_path, capsys):
    """config.json's "quantization_config": null is no quantization (from_pretrained reads it so); a real one is
    named in the error."""
    import shutil

    src = shutil.copytree(tiny, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": None}))
    assert _cli("quantize", src, tmp_path / "q", "--quantization", "int4") == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    err = _one_error(capsys, "quantize", tmp_path / "q", tmp_path / "again", "--quantization", "int8")
    assert "has a compressed-tensors quantization_config" in err


def _meta_model():
    from moelm.config import named_config
    from moelm.models.auto import AutoModelForCausalLM as Auto

    with torch.device("meta"):
        return Auto.from_config(named_config("ernie4_5-tiny"), fast=False)


@pytest.mark.parametrize("group_size,strategy,mode", [(32, "group", ("int4", 32)), (-1, "channel", ("int4", 64)),
                                                      (None, "tensor", ("int4", 64))])
def test_strategy_inferred_from_group_size(group_size, strategy, mode):
    """compressed-tensors infers a missing strategy from group_size (None: tensor, -1: channel, > 0: group)."""
    model = _meta_model()
    given = copy.deepcopy(CONFIG)
    weights = given["config_groups"]["group_0"]["weights"]
    del weights["strategy"]
    weights.pop("group_size")
    if group_size is not None:
        weights["group_size"] = group_size
    explicit = copy.deepcopy(given)
    explicit["config_groups"]["group_0"]["weights"]["strategy"] = strategy
    got = resolve_config(given, model, {}).modules
    assert got == resolve_config(explicit, model, {}).modules
    assert got["model.layers.0.self_attn.q_proj"] == mode


def test_dense_sparsity_config_is_read():
    """A sparsity_config of format "dense" stores the weights as they are; other formats stay refused."""
    model = _meta_model()
    dense = {"format": "dense", "global_sparsity": 0.3, "sparsity_structure": "unstructured", "targets": [],
             "ignore": [], "registry_requires_subclass": False}
    assert resolve_config({**CONFIG, "sparsity_config": dense}, model, {}).modules == \
        resolve_config(CONFIG, model, {}).modules
    with pytest.raises(CompressedTensorsError, match="sparsity_config"):
        resolve_config({**CONFIG, "sparsity_config": {**dense, "format": "sparse-bitmask"}}, model, {})


@pytest.mark.parametrize("ftype,mode", [("q8_0", "int8"), ("q4_0", "int4")])
def test_gguf_modules_to_not_convert(tmp_path, ftype, mode):
    """quantization_config's modules_to_not_convert with gguf_file= was dropped: its modules stay floats, the
    stored blocks dequantized."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from moelm.bench.gguf import write_gguf

    path = write_gguf(tiny_checkpoint("ernie4_5_moe", tmp_path / "hub"), tmp_path / "m.gguf", ftype)
    qc = QuantizationConfig(mode, 32, modules_to_not_convert=("lm_head", "experts"))
    model = AutoModelForCausalLM.from_pretrained(None, gguf_file=path, quantization_config=qc, fast=False)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.1.mlp.experts"] == "Experts"
    assert kinds["model.layers.0.self_attn.q_proj"] == "QuantizedLinear"
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    assert torch.equal(model.lm_head.weight.detach(),
                       torch.from_numpy(np.ascontiguousarray(dequantize(np.asarray(head.data), head.tensor_type))))


def test_gguf_revision_without_a_model_path(tmp_path):
    """revision= with gguf_file= and no model path: one error naming revision (AutoModelForCausalLM raised a
    TypeError from os.fspath(None); the family class ignored it)."""
    import moelm
    from moelm.bench.gguf import write_gguf

    path = write_gguf(tiny_checkpoint("ernie4_5", tmp_path / "hub"), tmp_path / "m.gguf", "f32")
    for cls in (AutoModelForCausalLM, moelm.Ernie4_5ForCausalLM):
        with pytest.raises(ValueError, match="revision='main' applies to hub ids"):
            cls.from_pretrained(None, gguf_file=path, revision="main")
    assert type(AutoModelForCausalLM.from_pretrained(None, gguf_file=path, fast=False)).__name__ == \
        "Ernie4_5ForCausalLM"


def test_modules_to_not_convert_of_a_stored_quantized_module_is_refused(tiny, tmp_path):
    """A checkpoint stored quantized loads as stored: modules_to_not_convert naming one of its quantized modules was
    dropped silently (the module stayed quantized); naming a module it stores as floats is fine."""
    AutoModelForCausalLM.from_pretrained(tiny, quantization="int4").save_pretrained(tmp_path / "all")
    AutoModelForCausalLM.from_pretrained(tiny, quantization=QuantizationConfig(
        "int4", modules_to_not_convert=("lm_head",))).save_pretrained(tmp_path / "float_head")
    head = QuantizationConfig("int4", modules_to_not_convert=("lm_head",))
    with pytest.raises(ValueError, match="modules_to_not_convert names lm_head, which the checkpoint stores quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "all", quantization_config=head)
    with pytest.raises(ValueError, match="names model.layers.0.mlp.down_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "all", quantization_config={
            "load_in_4bit": True, "llm_int8_skip_modules": ["down_proj"]})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float_head", quantization_config=head, fast=False)
    assert type(model.lm_head).__name__ == "Linear"


@pytest.mark.parametrize("patterns", [("lm_head",), ("q_proj", "experts"), ("model.layers.1",), ("model.layers.1.mlp",),
                                      (r"model\.layers\.\d+\.self_attn",), ("model.layers.*.mlp.shared_experts",),
                                      ("proj",), ("self_attn",), ("model.layers.1.self",)])
def test_modules_to_not_convert_matches_as_transformers(patterns):
    """modules_to_not_convert keeps exactly the modules transformers' own matcher keeps: from the start up to a module
    boundary, as a regular expression, or as a suffix (a parent's short name keeps nothing below it, as there)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    from moelm import AutoConfig
    from moelm.inference.quantization import QuantizedExperts, QuantizedLinear
    from moelm.inference.quantize import quantize_modules
    from moelm.nn.moe import Experts

    config = AutoConfig.for_model("ernie4_5_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=256,
                                  moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1)
    plain = AutoModelForCausalLM.from_config(config, seed=0)
    quantized = quantize_modules(copy.deepcopy(plain), QuantizationConfig("int8", modules_to_not_convert=patterns))
    names = [n for n, m in plain.named_modules() if isinstance(m, (torch.nn.Linear, Experts))]
    kept = {n for n, m in quantized.named_modules() if n in names and not isinstance(m, (QuantizedLinear,
                                                                                          QuantizedExperts))}
    assert kept == {n for n in names if not should_convert_module(n, list(patterns))}


def test_modules_to_not_convert_with_a_bad_pattern():
    with pytest.raises(ValueError, match=r"modules_to_not_convert: 'experts\[' is not a module name or regular"):
        QuantizationConfig("int8", modules_to_not_convert=("experts[",))


def test_info_plans_a_stored_quantized_checkpoint(tiny, tmp_path, capsys):
    """moelm info plans a checkpoint stored quantized at its stored size (it planned fp32: 3x the int4 bytes) and
    refuses what loading refuses: another --quantization, --tp."""
    from moelm.models.info import info

    assert _cli("quantize", tiny, tmp_path / "q", "--quantization", "int4") == 0
    on_disk = (tmp_path / "q" / "model.safetensors").stat().st_size
    plan = dict(info(str(tmp_path / "q")))["memory"]
    assert "stored int4" in plan and "compressed-tensors" in plan, plan
    weights = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    size = sum(t.numel() * t.element_size() for t in (*weights.parameters(), *weights.buffers()))
    value, unit = plan.removeprefix("plan: ").split(" of weights")[0][:-2], plan.split(" of weights")[0][-2]
    assert abs(float(value) * {"K": 1e3, "M": 1e6}[unit] - size) <= 0.001 * size and size < 1.2 * on_disk
    assert dict(info(str(tmp_path / "q"), quantization="int4"))["memory"] == plan  # the stored mode: redundant
    assert "stored quantized (int4" in _one_error(capsys, "info", "--model", tmp_path / "q", "--quantization", "int8")
    assert "parallelism" in _one_error(capsys, "info", "--model", tmp_path / "q", "--tp", "2")
