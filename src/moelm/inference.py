"""Inference fast paths, applied to a loaded model without changing its parameters or checkpoint format.

- StaticCache: keys/values preallocated for the whole generation [B, Hkv, max_length, D], written by position.
- FastLinear: nn.Linear (same parameters) whose forward reads the weight once with csrc/gemv.c for a few rows of
  activations, and on CPU computes bf16/fp16 weights in fp32 one tile at a time for long inputs (CPUs without fast
  bf16 matmul are ~5x slower in bf16), never holding an fp32 copy of the model.
- fuse_projections: q/k/v and gate/up concatenated into one weight per layer (the original parameters become views
  of it, so memory is not doubled and state_dict / save_pretrained are unchanged); used when no gradients are needed.
- decode_layer_step / decode_attention_step: a decoding step of a whole decoder layer (or of its attention) in one
  C call over the StaticCache, used by DecoderLayer / Attention where it applies, else the op-by-op path.

`optimize(model)` applies FastLinear and the fusion; from_pretrained / from_config call it unless fast=False.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .rope import rotate_half_split, rotate_interleaved

TILE_ROWS = 8192  # weight rows converted to fp32 at a time for a long bf16 input


class StaticCache:
    """Per-layer keys/values [B, Hkv, max_length, D] allocated once; `update` writes the new positions and returns
    views of the filled part, so attention sees exactly what a DynamicCache would."""

    def __init__(self, config, batch_size: int, max_length: int, dtype: torch.dtype, device=None):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_size)
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.lengths = [0] * n
        self.max_length = max_length

    def reserve(self, layer_idx: int, new: int) -> int:
        """Claim the next `new` positions of a layer; returns the first."""
        start = self.lengths[layer_idx]
        if start + new > self.max_length:
            raise ValueError(f"the static KV cache holds {self.max_length} positions; {start + new} were asked for")
        self.lengths[layer_idx] = start + new
        return start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.reserve(layer_idx, k.shape[-2])
        end = self.lengths[layer_idx]
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def __len__(self) -> int:
        return sum(1 for n in self.lengths if n)

    def reorder_cache(self, beam_idx: torch.Tensor):
        for t in self.keys + self.values:
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def crop(self, length: int):
        """Keep the first `length` positions (a negative length drops that many from the end, as DynamicCache)."""
        self.lengths = [min(n, length) if length >= 0 else max(n + length, 0) for n in self.lengths]


class FastLinear(nn.Linear):
    """nn.Linear with the decode kernel and tiled fp32 compute for half-precision weights on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


GEMV_ROWS = 8  # fp32 weights: the kernel up to this many rows, oneDNN (w @ x.T) from 9 to kernels.MAX_ROWS
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
ONEDNN_ROWS = 512  # fp32 on CPU up to this many rows: oneDNN (5-18% over MKL here); more: F.linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), choosing the fastest exact-up-to-rounding way for the shapes and device."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows == 0 or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return F.linear(x, weight, bias)
    half = weight.dtype in (torch.bfloat16, torch.float16)
    if (rows <= GEMV_ROWS or (half and rows <= kernels.MAX_ROWS)) and weight.dtype in KERNEL_DTYPES \
            and x.shape[-1] % 32 == 0 and kernels.available():
        out = kernels.gemv(x, weight, bias=None if bias is None else bias.float())
        return out if x.dtype == torch.float32 else out.to(x.dtype)
    if half:  # fp32 compute one tile of weight rows at a time
        xf = x.float()
        tiles = [_linear_fp32(xf, weight[r:r + TILE_ROWS].float(), None if bias is None else bias[r:r + TILE_ROWS])
                 for r in range(0, weight.shape[0], TILE_ROWS)]
        return torch.cat(tiles, dim=-1).to(x.dtype)
    if weight.dtype == torch.float32 and x.dtype == torch.float32 and rows <= ONEDNN_ROWS and weight.is_contiguous():
        return _linear_fp32(x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 x [..., I] @ weight [O, I].T (+ bias) through oneDNN where it works, else F.linear."""
    rows = x.numel() // x.shape[-1]
    if rows > ONEDNN_ROWS or not kernels.onednn_works(weight, x):
        return F.linear(x, weight, None if bias is None else bias.float())
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    out = kernels.onednn_linear(flat, weight, swap=rows <= kernels.MAX_ROWS)
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out + bias.float() if bias is not None else out


class Fused:
    """Several projections of the same input as one: `weight` [sum O, I] (or a quantized module's buffers),
    `splits` the output sizes."""

    def __init__(self, modules: list[nn.Module]):
        self.splits = [m.out_features for m in modules]
        self.quantized = not isinstance(modules[0], nn.Linear)
        self.first = modules[0]
        self.module = _fuse(modules)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.module(x).split(self.splits, dim=-1))


def _fuse(modules: list[nn.Module]) -> nn.Module:
    """One module computing all of `modules`; their tensors are re-pointed to views of the fused ones."""
    first = modules[0]
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            fused = FastLinear(first.in_features, sum(m.out_features for m in modules), bias=first.bias is not None,
                               device="meta")
            fused.weight = nn.Parameter(torch.cat([m.weight for m in modules]), requires_grad=False)
            if first.bias is not None:
                fused.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
            names = ["weight"] + (["bias"] if first.bias is not None else [])
        else:  # QuantizedLinear: one over the concatenated packed rows and scales
            fused = type(first)(first.in_features, sum(m.out_features for m in modules), first.bias is not None,
                                first.mode, first.group_size, device="meta")
            fused.qweight = torch.cat([m.qweight for m in modules])
            fused.scale = torch.cat([m.scale for m in modules])
            if first.bias is not None:
                fused.bias = nn.Parameter(torch.cat([m.bias for m in modules]), requires_grad=False)
            names = ["qweight", "scale"] + (["bias"] if first.bias is not None else [])
        start = 0
        for m in modules:
            rows = slice(start, start + m.out_features)
            for name in names:
                view = getattr(fused, name)[rows]
                old = getattr(m, name)
                if isinstance(old, nn.Parameter):
                    setattr(m, name, nn.Parameter(view, requires_grad=old.requires_grad))
                else:
                    setattr(m, name, view)
            start += m.out_features
    return fused


def fuse_projections(model: nn.Module) -> nn.Module:
    """Attention q/k/v and SwiGLU gate/up as one matmul each (inference only: see Attention / MLP forward)."""
    from .layers import MLP, Attention
    from .quantization import QuantizedLinear

    def fusable(m: nn.Module) -> bool:  # bitsandbytes' packing has no concatenation of rows
        return isinstance(m, nn.Linear) or type(m) is QuantizedLinear

    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "fused_qkv", None) is None and fusable(module.q_proj):
            module.fused_qkv = Fused([module.q_proj, module.k_proj, module.v_proj])
        elif isinstance(module, MLP) and getattr(module, "fused_gate_up", None) is None and \
                fusable(module.gate_proj):
            module.fused_gate_up = Fused([module.gate_proj, module.up_proj])
    return model


def optimize(model: nn.Module, fuse: bool = True) -> nn.Module:
    """FastLinear for every nn.Linear (same parameters), then the fused projections."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                child.__class__ = FastLinear
    if fuse:
        fuse_projections(model)
    return model


def fused_ready(fused: Fused | None, x: torch.Tensor) -> bool:
    """Use the fused projection: it exists, no gradients are needed, and the projections still view its tensor
    (moving or casting the model afterwards replaces them, and the separate projections are used)."""
    if fused is None or torch.is_grad_enabled():
        return False
    name = "qweight" if fused.quantized else "weight"
    return getattr(fused.first, name).data_ptr() == getattr(fused.module, name).data_ptr()


def _step_inputs(attn, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache, bf16: bool = False):
    """(cos [B, D/2], sin, mask [B, pos + 1] or None, pos) for a C decoding step of this attention, or None where
    it does not apply: one new token per row, fp32 on CPU (or with `bf16`, bf16 and ERNIE's fp32 rotation), a
    StaticCache of x's dtype, the fused q/k/v, no gradients, a rotation the kernel knows, a mask of the plain
    [B, 1, 1, K] form, not compiling. The contiguous cos/sin/mask are made once per step (the model passes the same
    objects to every layer) and kept on the cache."""
    b, s, _ = x.shape
    dtype_ok = x.dtype == torch.float32 or (bf16 and x.dtype == torch.bfloat16 and attn.rotate is rotate_interleaved)
    if torch.compiler.is_compiling() or s != 1 or not isinstance(cache, StaticCache) or not dtype_ok \
            or x.device.type != "cpu" or attn.rotate not in (rotate_interleaved, rotate_half_split) \
            or not fused_ready(attn.fused_qkv, x) or cache.keys[attn.layer_idx].dtype != x.dtype \
            or not kernels.available():
        return None
    pos = cache.get_seq_length(attn.layer_idx)
    step = getattr(cache, "step", None)
    if step is None or step[0] is not cos_sin or step[1] is not mask or step[2] != pos:
        cos, sin = cos_sin
        half = attn.head_dim // 2
        if cos.shape[-1] != half or cos.dtype != torch.float32 or (
                mask is not None and tuple(mask.shape) != (b, 1, 1, pos + 1)):
            return None
        cos, sin = (t.expand(b, 1, half).reshape(b, half).contiguous() for t in (cos, sin))
        flat_mask = None if mask is None else mask.reshape(b, pos + 1).contiguous()
        cache.step = step = (cos_sin, mask, pos, (cos, sin, flat_mask, pos))
    return step[3]


def decode_attention_step(attn, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache) -> torch.Tensor | None:
    """Attention for one new token per row in one C call (kernels.attend: rotary, cache write, softmax attention)
    instead of ~40 small PyTorch ops, or None where it does not apply (see _step_inputs)."""
    inputs = _step_inputs(attn, x, cos_sin, mask, cache)
    if inputs is None:
        return None
    cos, sin, flat_mask, pos = inputs
    b = x.shape[0]
    qkv = attn.fused_qkv.module(x).reshape(b, -1)
    cache.reserve(attn.layer_idx, 1)
    out = kernels.attend(qkv, attn.num_heads, attn.num_kv_heads, cos, sin, attn.rotate is rotate_interleaved,
                         cache.keys[attn.layer_idx], cache.values[attn.layer_idx], pos, flat_mask, attn.scaling)
    return attn.o_proj(out.view(b, 1, -1))


def decode_layer_step(layer, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache):
    """A decoder layer for one new token per row in one C call (kernels.decode_layer), or None where it does not
    apply: not the eager attention, the conditions of _step_inputs, RMSNorms, projections that are FastLinear or
    QuantizedLinear with contiguous CPU weights, few enough rows for the gemv kernels. Returns (y, h): y the
    layer's output for a dense SwiGLU MLP (h None), else y after attention and h the normed input of its MoE
    block."""
    attn = layer.self_attn
    if (attn.training and attn.dropout) or attn.config.attn_implementation == "eager":  # eager: as Attention does
        return None
    inputs = _step_inputs(attn, x, cos_sin, mask, cache, bf16=True)
    plan = None if inputs is None else _layer_plan(layer, x)
    b = x.shape[0]
    if plan is None or b > plan.rows:
        return None
    cos, sin, flat_mask, pos = inputs
    cache.reserve(attn.layer_idx, 1)
    y, h = kernels.decode_layer(plan.spec, x.reshape(b, -1).contiguous(), cos, sin, cache.keys[attn.layer_idx],
                                cache.values[attn.layer_idx], pos, flat_mask)
    return y.view_as(x), None if plan.dense else h.view_as(x)


class _LayerPlan:
    """What decode_layer_step hands to C for one layer, and what it was made from: `links` (container, key,
    object) and `ptrs` (tensor, data pointer) that must still hold for it to be valid."""

    def __init__(self, layer, projections: list, found: list, dense: bool, dtype: torch.dtype):
        attn = layer.self_attn
        self.dtype = dtype
        # biases handed over as fp32 copies: valid while not changed in place (views share the version counter)
        self.copied = [(p.bias, p.bias._version) for p, ts in zip(projections, found) if ts[3] is not p.bias]
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        self.mats = [kernels.mat(*ts) for ts in found] + ([None, None] if not dense else [])
        self.spec = kernels.layer((n1.weight, n1.variance_epsilon, n2.weight, n2.variance_epsilon), *self.mats,
                                  attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.rotate is rotate_interleaved,
                                  attn.scaling)
        fp32 = any(m is not None and m.fmt == kernels.MAT_FORMATS[torch.float32] for m in self.mats)
        self.rows = GEMV_ROWS if fp32 else kernels.MAX_ROWS
        self.dense = dense
        paths = [("input_layernorm",), ("post_attention_layernorm",), ("self_attn", "o_proj"), (layer.mlp_name,)]
        self.links = [(attn.__dict__, "fused_qkv", attn.fused_qkv)]
        if dense:
            paths.append((layer.mlp_name, "down_proj"))
            mlp = getattr(layer, layer.mlp_name)
            self.links.append((mlp.__dict__, "fused_gate_up", mlp.fused_gate_up))
        for path in paths:
            parent = layer
            for name in path:
                child = parent._modules[name]
                self.links.append((parent._modules, name, child))
                parent = child
            if path[-1] != layer.mlp_name:
                stores = (parent._parameters, parent._buffers)
                self.links += [(store, k, t) for store in stores for k, t in store.items()]
        tensors = [t for _, _, t in self.links if isinstance(t, torch.Tensor)]
        tensors += [t for ts in found for t in ts if isinstance(t, torch.Tensor)]
        self.ptrs = [(t, t.data_ptr()) for t in tensors]

    def valid(self) -> bool:
        return all(d.get(k) is obj for d, k, obj in self.links) and all(t.data_ptr() == p for t, p in self.ptrs) \
            and all(t._version == v for t, v in self.copied)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _LayerPlan (not on the module: copies
# and pickles of a model must not carry raw pointers)


def _layer_plan(layer, x: torch.Tensor) -> _LayerPlan | None:
    """The layer's _LayerPlan, rebuilt when a module or tensor it was made from has been replaced, or None for a
    layer decode_layer cannot run."""
    plan = _PLANS.get(layer)
    if plan is not None and plan.valid() and plan.dtype == x.dtype:
        return plan
    from .layers import MLP, RMSNorm

    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(type(n) is not RMSNorm or n.weight.dtype != x.dtype or not n.weight.is_contiguous()
           or n.weight.shape[0] % 8 for n in norms):
        return None
    attn, mlp = layer.self_attn, getattr(layer, layer.mlp_name)
    dense = type(mlp) is MLP and fused_ready(mlp.fused_gate_up, x)
    projections = [attn.fused_qkv.module, attn.o_proj] + ([mlp.fused_gate_up.module, mlp.down_proj] if dense else [])
    found = [_mat_tensors(p) for p in projections]
    weights = (torch.bfloat16,) if x.dtype == torch.bfloat16 else (torch.float32, torch.int8, torch.uint8)
    if any(t is None or t[0].dtype not in weights for t in found) or any(p.in_features % 32 for p in projections):
        return None
    _PLANS[layer] = plan = _LayerPlan(layer, projections, found, dense, x.dtype)
    return plan


def _mat_tensors(module):
    """(weight, scale, group size, fp32 bias) of a FastLinear / QuantizedLinear the decode kernels can read, else
    None. A bf16 bias comes as an fp32 copy (the kernels add it in fp32, as FastLinear does)."""
    from .quantization import QuantizedLinear

    bias = module.bias
    if bias is not None and bias.dtype == torch.bfloat16 and bias.is_contiguous():
        bias = bias.float()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    if type(module) is FastLinear and module.weight.dtype in KERNEL_DTYPES and module.weight.is_contiguous() \
            and module.weight.device.type == "cpu":
        return module.weight, None, 0, bias
    if type(module) is QuantizedLinear and module.qweight.is_contiguous() and module.qweight.device.type == "cpu":
        return module.qweight, module.scale, module.group_size, bias
    return None
