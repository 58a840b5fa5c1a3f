"""device_map with disk offload: whole decoder layers on disk (by a dict, or by device_map="auto" with a tight
max_memory), loaded around their forward; the outputs equal the resident model's, and bad maps name the fault."""
from __future__ import annotations

import pytest
import torch

from moelm import AutoModelForCausalLM
from moelm.models.scaffold import new_checkpoint
from reference import randomise


@pytest.fixture(scope="module", params=["ernie4_5_moe-tiny", "phimoe-tiny"])
def checkpoint(request, tmp_path_factory):
    path = new_checkpoint(request.param, tmp_path_factory.mktemp("offload"), seed=0)
    model = randomise(AutoModelForCausalLM.from_pretrained(path, fast=False), seed=1)
    model.save_pretrained(path)
    return path


def layer_bytes(model, i: int) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[i].parameters())


def test_layers_on_disk_by_dict(checkpoint, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, fast=False)
    placed = {"": "cpu", "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=placed, offload_folder=tmp_path)
    assert model.hf_device_map == placed
    assert all(p.is_meta for p in model.model.layers[1].parameters())  # not resident between forwards
    assert (tmp_path / "model.layers.1.safetensors").is_file()
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
    assert all(p.is_meta for p in model.model.layers[1].parameters())
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       plain.generate(ids, max_new_tokens=6, do_sample=False))


def test_auto_with_a_tight_max_memory_offloads_the_last_layers(checkpoint, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, fast=False)
    ends = sum(p.numel() * p.element_size() for n, p in plain.named_parameters() if ".layers." not in n)
    budget = ends + layer_bytes(plain, 0) + 10  # the ends and layer 0 fit, layer 1 does not
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": budget},
                                                 offload_folder=tmp_path)
    n = plain.config.num_hidden_layers
    assert model.hf_device_map == {"": "cpu", **{f"model.layers.{i}": "disk" for i in range(1, n)}}
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    assert resident <= budget
    ids = torch.randint(0, 500, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_maps_name_the_fault(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="pass offload_folder="):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"": "cpu", "model.layers.1": "disk"})
    with pytest.raises(ValueError, match=r"only whole decoder layers \(model.layers.N\) go to disk, not "
                                         r"\['model.norm'\]"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"": "cpu", "model.norm": "disk"},
                                             offload_folder=tmp_path)
    with pytest.raises(ValueError, match="does not place 1 parameter.*: model.embed_tokens.weight"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"model.layers": "cpu", "model.norm": "cpu",
                                                                     "lm_head": "cpu", "model.layers.1": "disk"},
                                             offload_folder=tmp_path)
    with pytest.raises(ValueError, match="need disk offload: pass offload_folder="):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": "300KB"})
    with pytest.raises(ValueError, match="cannot hold the embeddings, final norm and head"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={"cpu": 100},
                                             offload_folder=tmp_path)
    with pytest.raises(ValueError, match="no budget for the compute device cpu"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", max_memory={0: "1GB"},
                                             offload_folder=tmp_path)
