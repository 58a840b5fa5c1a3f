"""device_map with disk offload: whole decoder layers on disk (by a dict, or by device_map="auto" with a tight
max_memory), loaded around their forward; the outputs equal the resident model's, and bad maps name the fault."""
from __future__ import annotations

import os

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


def test_a_second_load_into_the_same_folder_leaves_the_first_intact(checkpoint, tmp_path):
    """Each model reads its layers from the files it wrote: another load into the folder (here in another dtype)
    replaces them there without changing what the first one reads."""
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, fast=False)
    placed = {"": "cpu", "model.layers.1": "disk"}
    first = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=placed, offload_folder=tmp_path)
    second = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=placed, offload_folder=tmp_path,
                                                  dtype=torch.bfloat16)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(first(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
        assert second(ids).logits.dtype == torch.bfloat16


def in_a_map_of(tensor: torch.Tensor, file) -> bool:
    """Whether the tensor's bytes lie in a memory map of `file` (/proc/self/maps)."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps").read().splitlines():
        span, *rest = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end and len(rest) == 5 and rest[4] == str(file):
            return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_mmap_maps_the_resident_weights_of_an_offloaded_model(tmp_path):
    """mmap=True with layers on disk maps the resident weights used as stored (here the 1 MiB LM head) from the
    checkpoint, as it does without offload."""
    from moelm import named_config

    config = named_config("ernie4_5-tiny")
    config.vocab_size, config.tie_word_embeddings = 4096, False
    AutoModelForCausalLM.from_config(config, fast=False).save_pretrained(tmp_path / "ckpt")
    file = (tmp_path / "ckpt" / "model.safetensors").resolve()
    kw = dict(device_map={"": "cpu", "model.layers.1": "disk"}, offload_folder=tmp_path / "off", fast=False)
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", mmap=True, **kw)
    assert in_a_map_of(mapped.lm_head.weight, file)
    read = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", **kw)
    assert not in_a_map_of(read.lm_head.weight, file)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(mapped(ids).logits, read(ids).logits)


def test_maps_naming_no_module_or_splitting_a_disk_layer_are_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"\['model.layers.7'\] name no module or parameter"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"": "cpu", "model.layers.7": "disk"},
                                             offload_folder=tmp_path)
    with pytest.raises(ValueError, match=r"\['model.layers.1.self_attn'\] lie in a decoder layer it sends to disk"):
        AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"": "cpu", "model.layers.1": "disk",
                                                                     "model.layers.1.self_attn": "cpu"},
                                             offload_folder=tmp_path)


def test_max_memory_counts_a_tied_head_once_and_plans_base_models(tmp_path):
    """The budget holds the resident weights with a tied embedding bigger than a layer (counted once, not
    subtracted again), and the base model (layers.N) and a classifier are planned too."""
    from moelm import AutoModel, named_config

    config = named_config("ernie4_5-tiny")
    config.vocab_size, config.tie_word_embeddings = 4096, True
    AutoModelForCausalLM.from_config(config, fast=False).save_pretrained(tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", fast=False)
    ends = sum(p.numel() * p.element_size() for n, p in plain.named_parameters() if ".layers." not in n)
    budget = ends + layer_bytes(plain, 0) + 10
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", device_map="auto", max_memory={"cpu": budget},
                                                 offload_folder=tmp_path / "off")
    assert model.hf_device_map == {"": "cpu", "model.layers.1": "disk"}
    assert sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta) <= budget
    base = AutoModel.from_pretrained(tmp_path / "ckpt", device_map="auto", max_memory={"cpu": budget},
                                     offload_folder=tmp_path / "off2")
    assert base.hf_device_map == {"": "cpu", "layers.1": "disk"}
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, plain.model(ids).last_hidden_state)
