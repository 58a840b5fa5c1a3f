"""The fast modules: subclasses of the model's layers with the same parameters, swapped in by optimize(model)
(their class changes, nothing else: state_dict, checkpoints and training see the same modules)."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.layers import MLP, Attention, DecoderLayer, RMSNorm
from ..nn.moe import Experts
from . import cpu, kernels
from .attention import decode_attention
from .cache import StaticCache
from .decode import decode_attention_step, layer_step, layers_step, moe_step
from .experts import FastExperts
from .linear import FastLinear, Fused, fuse_projections, fused_ready
from .norms import FastLayerNorm, FastRMSNorm
from .slots import SlotCache, ragged_attention


class FastMLP(MLP):
    fused_gate_up = None  # fuse_projections sets it

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if fused_ready(self.fused_gate_up, x):
            return tuple(self.fused_gate_up(x))
        return super().gate_up(x)


class FastAttention(Attention):
    fused_qkv = None  # fuse_projections sets it

    def forward(self, x, cos_sin, mask, cache, output_attentions: bool = False):
        eager = output_attentions or self.config.attn_implementation == "eager"
        if not eager and not (self.training and self.dropout):
            out = decode_attention_step(self, x, cos_sin, mask, cache)  # None unless a one-token CPU step
            if out is not None:
                return out, None
        if isinstance(cache, SlotCache) and not output_attentions and not (self.training and self.dropout):
            return ragged_attention(self, x, cos_sin, cache), None  # a serving step: each sequence in its row
        return super().forward(x, cos_sin, mask, cache, output_attentions)

    def qkv(self, x: torch.Tensor):
        if fused_ready(self.fused_qkv, x):
            return tuple(self.fused_qkv(x))
        return super().qkv(x)

    def attend(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        if q.shape[2] == 1 and q.device.type == "cpu" and not dropout and not kernels.plain_only(q):
            return decode_attention(q, k, v, mask, self.scaling)
        # SDPA's flash kernel needs each row of D in order; a projection computed with the roles swapped gives
        # [D, S] (oneDNN's w @ x.T), which would send it to the math path (3x slower at 1024 tokens, S x S scores)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return super().attend(q, k, v, mask, dropout)


class FastDecoderLayer(DecoderLayer):
    def forward(self, x, cos_sin, mask, cache, output_attentions=False, keep=None):
        """A decoding step in one C call (decode.layer_step) where it applies and measured faster than the layer
        op by op for this CPU and shape; else the layer op by op."""
        if keep is not None:
            return super().forward(x, cos_sin, mask, cache, output_attentions, keep)
        run = None if output_attentions else layer_step(self, x, cos_sin, mask, cache)
        if run is None:
            return super().forward(x, cos_sin, mask, cache, output_attentions)
        path = cpu.chosen("decode_layer", run.key)
        if path is None:
            layer = self.self_attn.layer_idx
            n = cache.lengths[layer] if isinstance(cache, StaticCache) else None  # a SlotCache commits after

            def trial(fn):  # a step, then the cache as it was: the chosen one runs for real below
                def go():
                    try:
                        return fn()
                    finally:
                        if n is not None:
                            cache.lengths[layer] = n
                return go

            def attention_half():  # what the C call computes of a MoE layer: its MoE block is the same either way
                h, _ = self.self_attn(self.input_layernorm(x), cos_sin, mask, cache)
                return self.post_attention_layernorm(x + h)

            def per_op():  # the layer op by op, its MoE block (when the call has it) in PyTorch
                h, _ = self.self_attn(self.input_layernorm(x), cos_sin, mask, cache)
                return DecoderLayer.feed_forward(self, x + h, self.post_attention_layernorm(x + h))

            # measured on what differs: an MoE block the call does not run stays out of the trials (a sharded one
            # holds collectives, which every rank must run the same number of times, whatever its measurements do)
            path = cpu.choose("decode_layer", run.key, {
                "gemv": trial(run if not run.whole else lambda: self._finish(run())),
                "torch": trial(attention_half if not run.whole else per_op)})
        if path == "gemv":
            return self._finish(run())
        return super().forward(x, cos_sin, mask, cache, output_attentions)

    def _finish(self, step):
        x, normed, router_logits = step
        if normed is None:  # the dense MLP or the MoE block was part of the call
            return x, None, router_logits
        x, router_logits = self.feed_forward(x, normed)
        return x, None, router_logits

    def feed_forward(self, x: torch.Tensor, normed: torch.Tensor):
        """An MoE block for one token per row in one C call (decode.moe_step) where it applies and was measured
        faster than the block op by op for this CPU and shape; else the block op by op."""
        run = moe_step(getattr(self, self.mlp_name), x, normed)
        if run is not None and cpu.pick("moe_block", run.key, lambda: {
                "gemv": run, "torch": lambda: super(FastDecoderLayer, self).feed_forward(x, normed)}) == "gemv":
            return run()
        return super().feed_forward(x, normed)


class FastDecoderModel:
    """Mixed by optimize into a family's DecoderModel (what has run_layers), as FastErnie4_5_MoeModel, ...: a
    decoding step runs all its layers in one C call where decode.layers_step applies (each layer by itself would
    run in one call), else the layers one by one."""

    def run_layers(self, h, cos_sin, mask, cache, output_attentions=False, output_hidden_states=False, keep=None):
        if not (output_attentions or output_hidden_states) and keep is None:
            step = layers_step(self.layers, h, cos_sin, mask, cache)
            if step is not None:
                return step[0], [], [], step[1]
        return super().run_layers(h, cos_sin, mask, cache, output_attentions, output_hidden_states, keep)


_MODELS: dict[type, type] = {}


def fast_model_class(base: type) -> type:
    """FastDecoderModel mixed into `base`, made once and kept in this module under Fast<name> (its __qualname__, so
    that models with it pickle); its __name__ is the base's (type(model).__name__ and the repr are the family's,
    as transformers' AutoModel gives)."""
    if base not in _MODELS:
        name = f"Fast{base.__name__}"
        while name in globals():
            name += "_"
        globals()[name] = _MODELS[base] = type(base.__name__, (FastDecoderModel, base),
                                               {"__module__": __name__, "__qualname__": name})
    return _MODELS[base]


cpu.register("decode_layer", ("gemv", "torch"))
cpu.register("decode_step", ("gemv", "layers"))  # forced only: "layers" runs each layer's call by itself
cpu.register("moe_block", ("gemv", "torch"))


FAST = {nn.Linear: FastLinear, RMSNorm: FastRMSNorm, nn.LayerNorm: FastLayerNorm, MLP: FastMLP,
        Attention: FastAttention, DecoderLayer: FastDecoderLayer, Experts: FastExperts}


def optimize(model: nn.Module, fuse: bool = True, keep=lambda module: False, make=Fused) -> nn.Module:
    """The fast modules in place of the model's (same parameters), but those `keep` picks, then the projections
    fused by `make` (a sharded model fuses its shards: moelm.parallel)."""
    for module in model.modules():
        fast = FAST.get(type(module))
        if hasattr(module, "run_layers") and not isinstance(module, FastDecoderModel):  # a DecoderModel
            fast = fast_model_class(type(module))
        if fast is not None and not keep(module):
            module.__class__ = fast
    if fuse:
        fuse_projections(model, make)
    return model
