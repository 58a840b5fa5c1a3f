"""from_pretrained against transformers on checkpoint layouts users meet: an index beside a model.safetensors, an
index whose weight_map leaves out a tensor of its shards, old rotary inv_freq buffers, and the dtype the loaded
config reports."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelm
from moelm.models.scaffold import new_checkpoint
from reference import randomise

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("fuzz"), seed=0)
    randomise(moelm.AutoModelForCausalLM.from_pretrained(path, fast=False), seed=1).save_pretrained(path)
    return path


def layout(tiny, where, tensors: dict, index: dict | None = None, single: dict | None = None):
    """A copy of `tiny` whose weights are `tensors` in two shards (weight_map: `index`, by default all of them),
    with `single` as a model.safetensors beside them."""
    shutil.copytree(tiny, where)
    (where / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, where / file, metadata={"format": "pt"})
    weight_map = index if index is not None else {k: f for f, keys in shards.items() for k in keys}
    (where / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if single is not None:
        save_file(single, where / "model.safetensors", metadata={"format": "pt"})
    return where


def test_layouts_load_as_transformers(tiny, tmp_path):
    """Each layout gives transformers' weights, logits and loading info: model.safetensors is read before an
    index beside it, every tensor of an index's shards is read (the weight_map only names the files), and
    rotary_emb.inv_freq buffers of older checkpoints are skipped."""
    import transformers

    stored = load_file(tiny / "model.safetensors")
    weight_map = {k: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, k in enumerate(sorted(stored))}
    del weight_map["model.embed_tokens.weight"]
    rotary = {"model.rotary_emb.inv_freq": torch.ones(8), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    cases = {
        "stale_index": layout(tiny, tmp_path / "a", {k: v * 0 for k, v in stored.items()}, single=stored),
        "partial_index": layout(tiny, tmp_path / "b", stored, index=weight_map),
        "inv_freq": layout(tiny, tmp_path / "c", {**stored, **rotary}),
    }
    for name, path in cases.items():
        ours, info = moelm.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        theirs, expected = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert info == expected, name
        assert torch.equal(ours.get_input_embeddings().weight, stored["model.embed_tokens.weight"]), name
        with torch.no_grad():
            torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-4, rtol=1e-4)


def test_config_reports_the_loaded_dtype(tiny):
    """The loaded model's config.dtype is the dtype it was loaded in, as transformers'."""
    import transformers

    for dtype in (torch.bfloat16, "float16"):
        ours = moelm.AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype)
        assert ours.config.dtype == str(theirs.config.dtype).removeprefix("torch.") == str(dtype).removeprefix(
            "torch.")
        assert ours.dtype == theirs.dtype

