"""compressed-tensors checkpoints beyond moelm's own: schemes, targets and ignore as compressed-tensors matches them
(the tensors compressed by its own compressors), a moelm save with unquantized experts, malformed tensor groups."""
import json

import pytest
import torch

from moelm import AutoModelForCausalLM, QuantizationConfig
from moelm.io.weights import CheckpointError
from moelm.loading.compressed import CompressedTensorsError, resolve_config
from reference import reference_model
from test_compressed import BOUND, TINY_KW, _torch_paths, logits, source  # noqa: F401 (_torch_paths: autouse)

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
W8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}


def _write(path, family, groups: dict, ignore: list[str]):
    """The transformers twin's checkpoint with every projection compressed-tensors' matching targets (exact name,
    then regexes in alphabetical order, then class) compressed by its compressor for the scheme, power-of-two fp32
    scales (exact; with bf16 ones transformers was seen to keep PhiMoE's dequantized experts in bf16); config.json
    gets this quantization_config as written."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    from compressed_tensors.utils.match import is_match, match_targets
    from safetensors.torch import load_file, save_file

    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": groups, "ignore": ignore}
    reference_model(family, **TINY_KW[family], tie_word_embeddings=False).save_pretrained(path)
    config = CTConfig.model_validate(qc)
    schemes = {t: s for s in config.config_groups.values() for t in s.targets}
    tensors, out = load_file(path / "model.safetensors"), {}
    for key, t in tensors.items():
        name, linear = key.removesuffix(".weight"), torch.nn.Linear(t.shape[-1], t.shape[0], bias=False)
        found = match_targets(name, linear, list(schemes))
        if not key.endswith(".weight") or t.dim() != 2 or "embed" in key or not found or \
                is_match(name, linear, config.ignore):
            out[key] = t
            continue
        scheme = schemes[found[0]]
        linear.weight.data, linear.quantization_scheme = t, scheme
        initialize_module_for_quantization(linear, force_zero_point=False)
        w, bits, group = t.float(), scheme.weights.num_bits, scheme.weights.group_size
        amax = {"group": lambda: w.reshape(w.shape[0], -1, group), "channel": lambda: w,
                "tensor": lambda: w.reshape(1, -1)}[scheme.weights.strategy]().abs().amax(-1)
        scale = torch.exp2(torch.round(torch.log2(amax / (2 ** (bits - 1) - 0.5))))
        linear.weight_scale.data = scale.reshape(linear.weight_scale.shape)
        state = {n: p.data for n, p in linear.named_parameters()}
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qc["format"])
        for n, v in compressor.compress(state, scheme).items():
            out[f"{name}.{n}"] = v.contiguous()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "quantization_config": qc}))


def _same_as_transformers(path):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=BOUND, rtol=0)
    return ours


@pytest.mark.parametrize("family,weights,fmt", [
    ("ernie4_5", dict(W4, actorder="weight"), "pack-quantized"),  # GPTQ's order in calibration only: no g_idx
    ("ernie4_5", dict(W8, strategy="tensor"), "pack-quantized"),  # one scale: repeated for every row / group
    ("phimoe", dict(W8, num_bits=4, strategy="tensor"), "pack-quantized"),
    ("ernie4_5", W4, "naive-quantized")])  # int4 codes one per int8
def test_schemes_read_exactly(tmp_path, family, weights, fmt):
    experts = r"re:.*\.experts\.\d+\.w[123]$"
    _write(tmp_path, family, {"group_0": {"targets": ["Linear"] + [experts] * (family == "phimoe"),
                                          "weights": weights, "format": fmt}}, ["lm_head", r"re:.*\.(gate|router)$"])
    ours = _same_as_transformers(tmp_path)
    assert type(ours.model.layers[0].self_attn.o_proj).__name__ == "QuantizedLinear"


@pytest.mark.parametrize("groups", [
    # both regexes name the attention: compressed-tensors takes the first in alphabetical order (.*proj$: int8)
    {"group_0": {"targets": [r"re:.*self_attn.*"], "weights": W4}, "group_1": {"targets": [r"re:.*proj$"],
                                                                               "weights": W8}},
    # a target named by two groups is the later group's
    {"group_0": {"targets": ["Linear"], "weights": W4}, "group_1": {"targets": ["Linear"], "weights": W8}}])
def test_targets_matched_as_compressed_tensors_does(tmp_path, groups):
    _write(tmp_path, "ernie4_5", groups, ["lm_head"])
    ours = _same_as_transformers(tmp_path)
    assert ours.model.layers[0].self_attn.o_proj.mode == "int8"


def _tiny_tied():
    from moelm.config import named_config
    from moelm.models.auto import AutoModelForCausalLM as Auto

    with torch.device("meta"):
        model = Auto.from_config(named_config("ernie4_5-tiny"), fast=False)
    assert model.config.tie_word_embeddings
    return model


def test_class_names_in_targets_and_ignore():
    """A Linear matches its class and base class names ("Linear", "Module") in ignore too, not only as a target."""
    model = _tiny_tied()
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Module"], "weights": W8}}}
    assert len(resolve_config(config, model, {}).modules) == 7 * model.config.num_hidden_layers
    with pytest.raises(CompressedTensorsError, match="targets none"):
        resolve_config({**config, "ignore": ["Linear"]}, model, {})


def test_quantized_head_of_a_tied_model_is_refused():
    """compressed-tensors writes lm_head's codes even where tie_word_embeddings is true; moelm would make the head
    from the embedding instead of reading them."""
    model = _tiny_tied()
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": W4}}}
    with pytest.raises(CompressedTensorsError, match="quantizes lm_head, but tie_word_embeddings is true"):
        resolve_config(config, model, {})
    assert "lm_head" not in resolve_config({**config, "ignore": ["lm_head"]}, model, {}).modules


def test_saved_with_unquantized_experts_reloads_as_saved(tmp_path):
    """Experts left out (modules_to_not_convert) are saved unquantized and ignored in quantization_config, so that
    its "Linear" target does not quantize them again when the checkpoint is loaded."""
    model = AutoModelForCausalLM.from_pretrained(source(tmp_path, "phimoe"), quantization=QuantizationConfig(
        "int4", 32, modules_to_not_convert=("experts",)))
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b["model.layers.0.block_sparse_moe.experts.gate_up_proj"].dtype == torch.float32


@pytest.mark.parametrize("drop,add", [("weight_scale", None), ("weight_packed", None), (None, "weight")])
def test_incomplete_tensor_group_is_named(tmp_path, drop, add):
    from safetensors.torch import load_file, save_file

    AutoModelForCausalLM.from_pretrained(source(tmp_path, "ernie4_5_moe"), quantization="int4").save_pretrained(
        tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    prefix = "model.layers.1.mlp.experts.3.up_proj"
    if drop:
        del tensors[f"{prefix}.{drop}"]
    if add:
        tensors[f"{prefix}.{add}"] = torch.zeros(64, 64)
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{prefix}: stored .*weight_packed or weight \(unpacked codes\), "
                                              "with weight_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("field", ["ignore", "targets"])
def test_bad_regex_is_named(field):
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": W8}}}
    if field == "ignore":
        config["ignore"] = ["lm_head", "re:[bad"]
    else:
        config["config_groups"]["group_0"]["targets"] = ["re:(x"]
    with pytest.raises(CompressedTensorsError, match=rf"{field} 're:.*': not a regular expression"):
        resolve_config(config, _tiny_tied(), {})


def test_projections_stored_differently_are_not_fused(tmp_path):
    """q int4 g32, k/v int8, gate int8 and up as floats (a checkpoint may quantize each projection its own way):
    moelm fuses q/k/v and gate/up only when they are stored alike (it raised an AttributeError or a size mismatch
    while concatenating them); the logits are transformers'. moelm's own save with q_proj left out reloads so too."""
    _write(tmp_path, "ernie4_5", {"group_0": {"targets": [r"re:.*q_proj$"], "weights": W4},
                                  "group_1": {"targets": [r"re:.*(k_proj|v_proj|gate_proj)$"], "weights": W8}},
           ["lm_head"])
    ours = _same_as_transformers(tmp_path)
    attn, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert attn.q_proj.mode == "int4" and attn.k_proj.mode == "int8" and type(mlp.up_proj).__name__ != \
        "QuantizedLinear" and getattr(attn, "fused_qkv", None) is None and getattr(mlp, "fused_gate_up", None) is None
    model = AutoModelForCausalLM.from_pretrained(source(tmp_path, "ernie4_5"), quantization=QuantizationConfig(
        "int4", 32, modules_to_not_convert=("q_proj",)))
    model.save_pretrained(tmp_path / "q")
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(model),
                               atol=0, rtol=0)


def test_targeted_but_stored_as_float_is_named(tmp_path):
    """A config that targets a projection the file stores as floats (llm-compressor leaves transformers 5's fused
    experts so): an error naming it, not quantized silently at load time."""
    _write(tmp_path, "ernie4_5", {"group_0": {"targets": [r"re:.*q_proj$"], "weights": W4}}, ["lm_head"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["targets"] = [r"re:.*(q|k)_proj$"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"k_proj.weight: stored unquantized, but the quantization_config"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
