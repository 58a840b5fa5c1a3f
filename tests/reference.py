"""Helpers to build reference (transformers) models with every weight randomised and compare with moelm."""
from __future__ import annotations

import torch

import moelm

REF_CLASSES = {"ernie4_5": "Ernie4_5ForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
               "phimoe": "PhimoeForCausalLM"}


def reference_config(model_type: str, **kwargs):
    import transformers

    cls = {"ernie4_5": transformers.Ernie4_5Config, "ernie4_5_moe": transformers.Ernie4_5_MoeConfig,
           "phimoe": transformers.PhimoeConfig}[model_type]
    return cls(**kwargs)


@torch.no_grad()
def randomise(model, seed: int = 0):
    """Every parameter away from its init: norms around 1, biases and the correction bias non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)
        elif "e_score_correction_bias" in name:
            p.copy_(0.05 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(0.08 * noise)
    return model


def reference_model(model_type: str, seed: int = 0, cls_name: str | None = None, attn: str = "eager", **kwargs):
    import transformers

    config = reference_config(model_type, **kwargs)
    config._attn_implementation = attn
    cls = getattr(transformers, cls_name or REF_CLASSES[model_type])
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    return randomise(model, seed)


def save_reference(model, path) -> None:
    model.save_pretrained(path)


def assert_close(a, b, atol=1e-4, rtol=1e-4, msg=""):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
