"""The llama.cpp parity harness of tests/test_llamacpp.py: tiny random checkpoints, their GGUF weights read back
into a hub checkpoint, and llama.cpp's logits against moelm's.

    parity("ernie4_5_moe", "f32")          # llama.cpp vs moelm on a tiny random model

Where llama.cpp differs from the reference (moelm / transformers), beyond what moelm.bench.gguf refuses to write:
phimoe normalises with RMSNorm + bias (the reference: LayerNorm with bias) and routes by softmax top-2 renormalised
(the reference: sparsemixer), so its logits differ; parity() checks PhiMoE against moelm with those two pieces
swapped for llama.cpp's (`llamacpp_semantics`).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import moelm
from moelm.bench import gguf as gguf_writer
from moelm.bench.llamacpp import LlamaCppModel
from reference import randomise

TINY = {"ernie4_5": "ernie4_5-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "phimoe": "phimoe-tiny"}


def tiny_checkpoint(model_type: str, directory: str | Path, seed: int = 0, **overrides) -> Path:
    """moelm's tiny named config of the family with random weights (reference.randomise: norms around 1, biases and
    the correction bias non-zero, so 0/1 defaults hide nothing), saved in hub format (float32)."""
    config = moelm.named_config(TINY[model_type])
    for k, v in overrides.items():
        setattr(config, k, v)
    model = moelm.AutoModelForCausalLM.from_config(config, seed=seed, fast=False)
    randomise(model, seed)
    model.save_pretrained(directory)
    return Path(directory)


def write_tensors(w, reader, tensors: dict | None = None) -> None:
    """The tensors of a GGUFReader (or replacements by name: numpy arrays) and the header into GGUFWriter `w`, which
    has its metadata: a copy of the file with other keys."""
    for t in reader.tensors:
        x = (tensors or {}).get(t.name)
        w.add_tensor(t.name, np.asarray(t.data) if x is None else x, raw_dtype=t.tensor_type if x is None else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def roundtrip_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, ftype: str) -> Path:
    """A copy of the hub checkpoint whose weights are what the GGUF of `ftype` stores, dequantized to float32.

    Blocks run along rows, so quantizing each expert alone gives the rows of the stacked tensor. A moelm float32
    model of this copy computes with llama.cpp's exact weights: what is left is llama.cpp's rounding of activations.
    """
    from gguf.quants import dequantize
    from safetensors.numpy import load_file, save_file

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    qtypes = gguf_writer.stored_types(checkpoint_dir, ftype)
    out = {}
    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        for k, x in load_file(path).items():
            x = x.astype(np.float32)
            if k in qtypes:
                x = np.ascontiguousarray(dequantize(gguf_writer.quantize(x, qtypes[k]), qtypes[k]).reshape(x.shape),
                                         dtype=np.float32)
            out[k] = x
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(checkpoint_dir / "config.json", out_dir / "config.json")
    return out_dir


def llamacpp_semantics(model) -> None:
    """Turn a moelm PhiMoE into what llama.cpp's phimoe computes: RMSNorm + bias instead of LayerNorm, softmax
    top-2 renormalised instead of sparsemixer, no sliding window (it attends to the whole context). (ERNIE needs
    nothing: llama.cpp computes the reference.)"""

    class RMSNormBias(nn.Module):
        def __init__(self, ln: nn.LayerNorm):
            super().__init__()
            self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return normed.to(x.dtype) * self.weight + self.bias

    def softmax_top2(block):
        def forward(x):  # x [B, S, H] -> ([B, S, H], router logits [T, E])
            b, s, h = x.shape
            flat = x.reshape(-1, h)
            logits = nn.functional.linear(flat, block.gate.weight)
            weights, index = logits.float().softmax(-1).topk(2, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(flat.dtype)
            return block.experts(flat, index, weights).reshape(b, s, h), logits
        return forward

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, RMSNormBias(child))
        if hasattr(parent, "gate") and hasattr(parent, "experts"):
            parent.forward = softmax_top2(parent)
    if getattr(model.model, "sliding_window", None) is not None:
        model.model.sliding_window = None


def _record_margins(model, margins: list) -> None:
    """On every MoE block, append per token [T] the margin by which the top-k choice holds: the k-th minus the
    (k+1)-th selection score (softmax probability, + the correction bias for ERNIE)."""

    def hook(block, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        scores = (x @ block.gate.weight.float().T).softmax(-1)
        if hasattr(block, "moe_statics"):
            scores = scores + block.moe_statics.e_score_correction_bias.reshape(-1).float()
        k = getattr(block.config, "moe_k", None) or block.config.num_experts_per_tok
        top = scores.topk(k + 1, dim=-1).values
        margins.append((top[:, k - 1] - top[:, k]).numpy())

    for m in model.modules():
        if hasattr(m, "gate") and hasattr(m, "experts"):
            m.register_forward_pre_hook(hook)


def reference_logits(checkpoint_dir: str | Path, ids: list[int], as_llamacpp: bool = False,
                     margins: list | None = None) -> np.ndarray:
    """moelm float32 logits [len(ids), vocab] (plain PyTorch path). as_llamacpp: with llamacpp_semantics();
    margins: a list that receives one [len(ids)] array of router margins per MoE layer."""
    model = moelm.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32, fast=False).eval()
    if as_llamacpp:
        llamacpp_semantics(model)
    if margins is not None:
        _record_margins(model, margins)
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


# A q8_0/q4_0/bf16 run perturbs router scores by about 1/E * (a few % of |router logit| ~ 1) ~ 2.5e-3 (tiny models,
# E = 4..8): tokens whose top-k choice holds by less than twice that may legitimately pick another expert.
ROUTER_MARGIN = 5e-3


def parity(model_type: str, ftype: str = "f32", threads: int = 2, length: int = 32, seed: int = 0,
           workdir: str | Path | None = None, **overrides) -> dict:
    """llama.cpp vs moelm float32 on a tiny random model of the family, every position of a random prompt.

    f32: against the checkpoint itself. bf16/q8_0/q4_0: against the checkpoint with the GGUF's weights
    (roundtrip_checkpoint), so the difference left is llama.cpp rounding its activations (to bf16 for bf16 weights,
    to q8_0 blocks for q8_0/q4_0). PhiMoE: against moelm with llamacpp_semantics().

    Returns scale (RMS of the reference logits); max_abs, rel = max_abs / scale and rms_rel (RMS difference / scale)
    over the positions kept; kept: for ftypes other than f32, the positions whose router choice holds by at least
    ROUTER_MARGIN in every MoE layer (all positions for f32 and dense models); for PhiMoE also rel_to_reference,
    the max difference from unmodified moelm / scale (what llama.cpp's different norm and routing cost)."""
    with tempfile.TemporaryDirectory(prefix="moelm-llamacpp-") as tmp:
        work = Path(workdir or tmp)
        ckpt = tiny_checkpoint(model_type, work / "hub", seed, **overrides)
        path = gguf_writer.write_gguf(ckpt, work / f"tiny-{ftype}.gguf", ftype)
        m = LlamaCppModel(path, threads, n_ctx=max(64, length), n_batch=max(32, length), logits_all=True,
                          kv_type="f32")
        ids = np.random.default_rng(seed).integers(0, m.n_vocab, length).tolist()
        got = m.logits(ids)
        m.close()
        ref_dir = ckpt if ftype == "f32" else roundtrip_checkpoint(ckpt, work / f"hub-{ftype}", ftype)
        phi = model_type == "phimoe"
        margins: list = []
        ref = reference_logits(ref_dir, ids, as_llamacpp=phi, margins=margins)
        keep = np.ones(length, dtype=bool)
        if margins and ftype != "f32":
            keep = np.min(margins, axis=0) >= ROUTER_MARGIN
        scale = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        diff = np.abs(got - ref)[keep]
        out = {"scale": scale, "max_abs": float(diff.max()), "rel": float(diff.max()) / scale,
               "rms_rel": float(np.sqrt(np.mean(diff.astype(np.float64) ** 2))) / scale, "kept": int(keep.sum()),
               "positions": length}
        if phi:
            out["rel_to_reference"] = float(np.abs(got - reference_logits(ref_dir, ids)).max()) / scale
    return out
