"""Decoding steps in C over the StaticCache: a whole decoder layer (decode_layer_step) or its attention
(decode_attention_step) for one new token per row in one call, where it applies (else the callers take the op-by-op
path)."""
from __future__ import annotations

import ctypes
import operator
import weakref

import torch

from ..nn.layers import MLP, RMSNorm
from ..nn.rope import rotate_half_split, rotate_interleaved
from . import cpu, kernels
from .cache import StaticCache
from .experts import FastExperts
from .linear import FastLinear, fused_ready, global_hooks, hook_dicts, hooked
from .matmul import KERNEL_DTYPES
from .norms import FastLayerNorm
from .quantization import QuantizedExperts, QuantizedLinear
from .slots import SlotCache


def _step_inputs(attn, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache, bf16: bool = False,
                 several: bool = False):
    """(cos [B, D/2] fp32, sin, mask [B, pos + 1] or None, pos, table, positions, new) for a C decoding step of this
    attention, or None where it does not apply: one new token per row, fp32 on CPU (or with `bf16`, bf16: ERNIE's
    rotation in fp32, PhiMoE's in bf16 from cos/sin in bf16), a StaticCache of x's dtype, the fused q/k/v, no
    gradients, a rotation the kernel knows, a mask of the plain [B, 1, 1, K] form, not compiling; `new` positions
    are then claimed in the cache. A SlotCache step of one token per sequence (x [1, B, n]) applies too: its block
    tables (int64 [B, n]) and positions (int64 [B]) then say where each token's keys go, pos is the largest
    position. With `several`, a StaticCache step of up to kernels.MAX_ROWS tokens per row after the first
    (x [B, S, n], a speculative check) applies as B * S rows: token j of row b is row b at position past + j,
    attending causally (and through the mask [B, 1, S, past + S], if
    any). The contiguous cos/sin/mask are made once per step (the model passes the same objects to every layer) and
    kept on the cache."""
    b, s, _ = x.shape
    slots = isinstance(cache, SlotCache)
    static = isinstance(cache, StaticCache) and (s == 1 or several and s <= kernels.MAX_ROWS
                                                 and cache.get_seq_length(attn.layer_idx) > 0)
    dtype_ok = x.dtype == torch.float32 or (bf16 and x.dtype == torch.bfloat16)
    rope = x.dtype if attn.rotate is rotate_half_split else torch.float32  # the dtype of the model's cos/sin
    if kernels.plain_only(x) or not dtype_ok or x.device.type != "cpu" or global_hooks() \
            or not (slots and b == 1 and not cache.plan.chunks or static) \
            or attn.rotate not in (rotate_interleaved, rotate_half_split) \
            or not fused_ready(attn.fused_qkv, x) or cache.keys[attn.layer_idx].dtype != x.dtype \
            or not kernels.available():
        return None
    if slots:
        plan = cache.plan
        step = getattr(cache, "step", None)
        if step is None or step[0] is not cos_sin or step[1] is not plan:
            cos, sin = cos_sin
            half = attn.head_dim // 2
            if cos.shape[-1] != half or cos.dtype != rope:
                return None
            cos, sin = (t.reshape(s, half).float().contiguous() for t in (cos, sin))
            cache.step = step = (cos_sin, plan, (cos, sin, plan.step_mask, plan.max_position, plan.tables,
                                                 plan.positions, 0))
        return step[2]
    past = cache.get_seq_length(attn.layer_idx)
    pos = past + s - 1
    step = getattr(cache, "step", None)
    if step is None or step[0] is not cos_sin or step[1] is not mask or step[2] != pos:
        cos, sin = cos_sin
        half = attn.head_dim // 2
        if cos.shape[-1] != half or cos.dtype != rope or (
                mask is not None and tuple(mask.shape) != (b, 1, s, pos + 1)):
            return None
        cos, sin = (t.expand(b, s, half).reshape(b * s, half).float().contiguous() for t in (cos, sin))
        flat_mask = None if mask is None else mask.reshape(b * s, pos + 1).contiguous()
        rows = positions = None
        if s > 1:
            rows = torch.arange(b).repeat_interleave(s)[:, None]  # a block table: row b is block b
            positions = torch.arange(past, past + s).repeat(b)
        cache.step = step = (cos_sin, mask, pos, (cos, sin, flat_mask, pos, rows, positions, s))
    return step[3]


def decode_attention_step(attn, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache) -> torch.Tensor | None:
    """Attention for one new token per row in one C call (kernels.attend: rotary, cache write, softmax attention)
    instead of ~40 small PyTorch ops, or None where it does not apply (see _step_inputs)."""
    inputs = _step_inputs(attn, x, cos_sin, mask, cache)
    if inputs is None:
        return None
    cos, sin, flat_mask, pos, rows, positions, new = inputs
    b = cos.shape[0]
    qkv = attn.fused_qkv.module(x).reshape(b, -1)
    if new:
        cache.reserve(attn.layer_idx, new)
    out = kernels.attend(qkv, attn.num_heads, attn.num_kv_heads, cos, sin, attn.rotate is rotate_interleaved,
                         cache.keys[attn.layer_idx], cache.values[attn.layer_idx], pos, flat_mask, attn.scaling,
                         rows, positions)
    return attn.o_proj(out.view(x.shape[0], x.shape[1], -1))


def decode_layer_step(layer, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache):
    """A decoder layer for one new token per row in one C call (kernels.decode_layer), or None where it does not
    apply (see layer_step). Returns (y, h, router logits): y the layer's output for a dense SwiGLU MLP or an MoE
    block the kernels run (h None; the block's router logits [B, E], else None), else y after attention and h the
    normed input of its MoE block."""
    run = layer_step(layer, x, cos_sin, mask, cache)
    return None if run is None else run()


def layer_step(layer, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache):
    """A function computing decode_layer_step's (y, h) in one C call, or None where it does not apply: not the
    eager attention, the conditions of _step_inputs, RMSNorms, projections that are FastLinear or QuantizedLinear
    with contiguous CPU weights, at most kernels.MAX_ROWS rows."""
    attn = layer.self_attn
    if (attn.training and attn.dropout) or attn.config.attn_implementation == "eager":  # eager: as Attention does
        return None
    inputs = _step_inputs(attn, x, cos_sin, mask, cache, bf16=True, several=True)
    plan = None if inputs is None else _layer_plan(layer, x)
    if plan is None or any(plan.watched):  # a hook on a part of the layer: its modules are called op by op
        return None
    cos, sin, flat_mask, pos, rows, positions, new = inputs
    b = cos.shape[0]
    if b > kernels.MAX_ROWS:
        return None

    def run():
        if new:
            cache.reserve(attn.layer_idx, new)
        y, h, logits = kernels.decode_layer(plan.spec, x.reshape(b, -1).contiguous(), cos, sin,
                                            cache.keys[attn.layer_idx], cache.values[attn.layer_idx], pos, flat_mask,
                                            rows, positions)
        if logits is not None:
            logits = logits.to(plan.moe.logits_dtype)
        return y.view_as(x), None if plan.whole else h.view_as(x), logits

    run.key = (str(x.dtype), cpu.rows_bucket(b), plan.work, plan.dense, plan.experts, torch.get_num_threads())
    run.whole = plan.whole  # the MLP or MoE block is part of the call
    return run


def moe_step(block, x: torch.Tensor, normed: torch.Tensor):
    """A function computing x + the MoE block of `normed` (x, normed [B, S, H] fp32: each token routed on its own,
    so a decoding step's rows or a few tokens of a sequence, as speculative decoding checks them) and its router
    logits [B * S, E] in one C call (kernels.moe_block), or None where it does not apply (see _moe_plan; at most
    kernels.MAX_ROWS tokens; not while compiling)."""
    b = normed.numel() // normed.shape[-1]
    if kernels.plain_only(x) or not 0 < b <= kernels.MAX_ROWS or normed.dim() != 3 or global_hooks() \
            or normed.dtype != torch.float32 or x.dtype != torch.float32 or not kernels.usable(normed):
        return None
    plan = _moe_plan(block, normed)
    if plan is None:
        return None

    def run():
        y = x.reshape(b, -1).float().contiguous().clone()
        logits, _, _ = kernels.moe_block(plan.spec, normed.reshape(b, -1).contiguous(), y)
        return y.view_as(x), logits

    run.key = (str(x.dtype), cpu.rows_bucket(b), plan.work, torch.get_num_threads())
    return run


class _LayerPlan:
    """What decode_layer_step hands to C for one layer, and what it was made from: `links` (container, key,
    object) and `ptrs` (tensor, data pointer) that must still hold for it to be valid."""

    _objects = None  # valid()'s columns of links and ptrs, made at its first call

    def __init__(self, layer, projections: list, found: list, dense: bool, dtype: torch.dtype, moe=None):
        attn = layer.self_attn
        self.dtype = dtype
        self.moe = moe
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        self.mats = [kernels.mat(*ts) for ts in found] + ([None, None] if not dense else [])
        norms = (n1.weight, n1.variance_epsilon, n2.weight, n2.variance_epsilon) if isinstance(n1, RMSNorm) else \
            (n1.weight, n1.eps, n2.weight, n2.eps, n1.bias, n2.bias)
        # rotation: 1 ERNIE's pairs, 0 halves (PhiMoE), 2 halves in bf16 arithmetic (a bf16 PhiMoE)
        rotation = 1 if attn.rotate is rotate_interleaved else 2 if dtype == torch.bfloat16 else 0
        self.spec = kernels.layer(norms, *self.mats,
                                  attn.num_heads, attn.num_kv_heads, attn.head_dim, rotation, attn.scaling,
                                  min(p.in_features * p.out_features for p in projections),
                                  None if moe is None else moe.spec)
        self.work = self.spec.work
        self.dense, self.whole, self.experts = dense, dense or moe is not None, None if moe is None else moe.work
        mlp = getattr(layer, layer.mlp_name)
        self.watched = hook_dicts(m for part in (attn, n1, n2, *([mlp] if dense else [])) for m in part.modules())
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
        """Asked at every decoding step, for every layer: the loops run in C (map), not in Python."""
        if self._objects is None:
            self._stores, self._keys, self._objects = (list(c) for c in zip(*self.links)) if self.links else ([],) * 3
            self._tensors, self._pointers = [t for t, _ in self.ptrs], [p for _, p in self.ptrs]
        return all(map(operator.is_, map(dict.get, self._stores, self._keys), self._objects)) \
            and list(map(torch.Tensor.data_ptr, self._tensors)) == self._pointers \
            and (self.moe is None or self.moe.valid())


class _MoePlan(_LayerPlan):
    """What moe_step (or decode_layer, folded into a layer's plan) hands to C for an MoE block (see _moe_plan)."""

    def __init__(self, block, router: tuple, experts: list, shared: list, projections: list, bias, dtype):
        self.routing = kind, top_k, norm_min, jitter = block.routing_spec()
        # the op-by-op block's router logits: ERNIE's fp32, PhiMoE's of its Linear (x's dtype)
        self.logits_dtype = torch.float32 if kind == "ernie" else dtype
        self.mats = [kernels.mat(*ts) for ts in (router, *experts, *shared)]
        self.spec = kernels.moe(kind, self.mats[0], bias, top_k, norm_min, jitter, *self.mats[1:3],
                                tuple(self.mats[3:]) or None)
        self.work, self.moe = self.spec.work, None
        self.links, self.modules = [], list(block.modules())
        for module in self.modules:
            self.links += [(store, k, t) for store in (module._modules, module._parameters, module._buffers)
                           for k, t in store.items()]
            if "fused_gate_up" in module.__dict__:
                self.links.append((module.__dict__, "fused_gate_up", module.fused_gate_up))
        tensors = [t for _, _, t in self.links if isinstance(t, torch.Tensor)]
        tensors += [t for ts in (router, *experts, *shared) for t in ts if isinstance(t, torch.Tensor)]
        self.ptrs = [(t, t.data_ptr()) for t in tensors]
        self.dtype = dtype


_MOE_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # MoE block -> _MoePlan


def _moe_plan(block, x: torch.Tensor) -> _MoePlan | None:
    """The block's _MoePlan (rebuilt when something it was made from was replaced), or None for a block the
    kernels cannot run: a block that names its routing (routing_spec: ERNIE's or PhiMoE's, not training); fp32
    activations, the router weight fp32 or bf16, the experts FastExperts (fp32/bf16) or QuantizedExperts
    (int8/int4); or bf16 activations (decode_layer_bf16 only), ERNIE's fp32 router or PhiMoE's bf16 one, bf16
    FastExperts and shared experts; all contiguous on CPU (a sharded MoE has other classes: moelm.parallel);
    shared experts, if any, a fused SwiGLU MLP of FastLinear / QuantizedLinear; no hooks on any of its modules;
    sizes multiples of 32."""
    spec = getattr(block, "routing_spec", None)
    routing = None if spec is None else spec()
    bf16 = x.dtype == torch.bfloat16
    if x.dtype not in (torch.float32, torch.bfloat16) or routing is None or torch.is_grad_enabled():
        return None
    plan = _MOE_PLANS.get(block)
    if plan is not None and plan.valid() and plan.routing == routing and plan.dtype == x.dtype:
        return None if hooked(plan.modules) else plan  # the modules are the block's while the plan is valid
    if hooked(block.modules()):
        return None
    router, experts, shared = block.gate.weight, block.experts, getattr(block, "shared_experts", None)
    routers = ((torch.float32,) if routing[0] == "ernie" else (torch.bfloat16,)) if bf16 else \
        (torch.float32, torch.bfloat16)
    if router.dtype not in routers or not router.is_contiguous() \
            or type(router) not in (torch.Tensor, torch.nn.Parameter) or router.device.type != "cpu":
        return None
    if type(experts) is FastExperts:
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.dtype not in ((torch.bfloat16,) if bf16 else (torch.float32, torch.bfloat16)) \
                or down.dtype != gate_up.dtype:
            return None
        found = [(gate_up[0], None, 0, None), (down[0], None, 0, None)]
    elif type(experts) is QuantizedExperts and not bf16:
        (gq, gs), (dq, ds) = experts.stacked("gate_up_proj"), experts.stacked("down_proj")
        found = [(gq[0], gs[0], experts.group_size, None), (dq[0], ds[0], experts.group_size, None)]
        gate_up, down = gq, dq
    else:
        return None
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) or not t.is_contiguous() or t.device.type != "cpu"
           for t in (gate_up, down)) or router.shape[1] % 32 or gate_up.shape[1] // 2 % 32:
        return None
    projections, mats = [], []
    if shared is not None:
        if not isinstance(shared, MLP) or not fused_ready(getattr(shared, "fused_gate_up", None), x):
            return None
        projections = [shared.fused_gate_up.module, shared.down_proj]
        mats = [_mat_tensors(p) for p in projections]
        kinds = (torch.bfloat16,) if bf16 else (torch.float32, torch.bfloat16, torch.int8, torch.uint8)
        if any(t is None or t[0].dtype not in kinds for t in mats) or any(p.in_features % 32 for p in projections):
            return None
    bias = getattr(getattr(block, "moe_statics", None), "e_score_correction_bias", None)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    _MOE_PLANS[block] = plan = _MoePlan(block, (router, None, 0, None), found, mats, projections, bias, x.dtype)
    return plan


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> _LayerPlan (not on the module: copies
# and pickles of a model must not carry raw pointers)


def _layer_plan(layer, x: torch.Tensor) -> _LayerPlan | None:
    """The layer's _LayerPlan, rebuilt when a module or tensor it was made from has been replaced, or None for a
    layer decode_layer cannot run. An MoE block is part of it while _moe_plan says the kernels can run it (asked
    on every step: a hook, training or gradients take it out again)."""
    mlp = getattr(layer, layer.mlp_name)
    moe = None if isinstance(mlp, MLP) else _moe_plan(mlp, x)
    plan = _PLANS.get(layer)
    if plan is not None and plan.valid() and plan.dtype == x.dtype and plan.moe is moe:
        return plan
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not all(_rms_norm(n, x) for n in norms) and not all(_layer_norm(n, x) for n in norms):
        return None
    attn = layer.self_attn
    dense = isinstance(mlp, MLP) and fused_ready(mlp.fused_gate_up, x)
    projections = [attn.fused_qkv.module, attn.o_proj] + ([mlp.fused_gate_up.module, mlp.down_proj] if dense else [])
    found = [_mat_tensors(p) for p in projections]
    weights = (torch.bfloat16,) if x.dtype == torch.bfloat16 else (torch.float32, torch.int8, torch.uint8)
    if any(t is None or t[0].dtype not in weights for t in found) or any(p.in_features % 32 for p in projections):
        return None
    _PLANS[layer] = plan = _LayerPlan(layer, projections, found, dense, x.dtype, moe)
    return plan


def _rms_norm(norm, x: torch.Tensor) -> bool:
    return isinstance(norm, RMSNorm) and norm.weight.dtype == x.dtype and norm.weight.is_contiguous() \
        and norm.weight.shape[0] % 8 == 0


def _layer_norm(norm, x: torch.Tensor) -> bool:
    """A LayerNorm with a bias that decode_layer computes as the layer op by op does (FastLayerNorm's C pass)."""
    return type(norm) is FastLayerNorm and norm.bias is not None and norm.usable(x)


def _mat_tensors(module):
    """(weight, scale, group size, bias) of a FastLinear / QuantizedLinear the decode kernels can read, else None.
    The bias is the module's own, fp32 or bf16 (kernels.mat reads either where it is, adding it in fp32 as
    FastLinear does)."""
    bias = module.bias
    if bias is not None and (bias.dtype not in (torch.float32, torch.bfloat16) or not bias.is_contiguous()):
        return None
    if type(module) is FastLinear and module.weight.dtype in KERNEL_DTYPES and module.weight.is_contiguous() \
            and module.weight.device.type == "cpu":
        return module.weight, None, 0, bias
    if type(module) is QuantizedLinear and module.qweight.is_contiguous() and module.qweight.device.type == "cpu":
        return module.qweight, module.scale, module.group_size, bias
    return None


def forget_plans():
    """Drop every layer's and MoE block's plan: modules changed in place (a class swapped, as per-request LoRA does)
    are planned again, or found unfit, at their next step."""
    _PLANS.clear()
    _MOE_PLANS.clear()


class _StepPlan:
    """What layers_step hands to C for a model's decoder layers: every layer's _LayerPlan with its MLP or MoE block
    (kernels.Layers, made for one cache), and what they were made from, checked together at each step."""

    _objects = None

    def __init__(self, layers, plans: list[_LayerPlan], cache):
        self.plans, self.cache, self.threads, self.dtype = plans, weakref.ref(cache), None, plans[0].dtype
        self.fused = [layer.self_attn.fused_qkv for layer in layers] + [
            getattr(layer, layer.mlp_name).fused_gate_up for layer, p in zip(layers, plans) if p.dense]
        self.layers = kernels.Layers([p.spec for p in plans], cache.keys, cache.values)
        self.kinds = sorted({(p.work, p.dense, p.experts) for p in plans}, key=repr)
        self.blocks = [(getattr(layer, layer.mlp_name), p.moe.routing) for layer, p in zip(layers, plans)
                       if p.moe is not None]
        self.hooked = hook_dicts([*layers, *(m for p in plans if p.moe is not None for m in p.moe.modules)]) + [
            d for p in plans for d in p.watched]
        parts = [p for plan in plans for p in (plan, plan.moe) if p is not None]
        self.links = [(layers._modules, str(i), layer) for i, layer in enumerate(layers)] + [
            link for p in parts for link in p.links]
        self.ptrs = [ptr for p in parts for ptr in p.ptrs]
        self.moe = None
        self.logits_dtype = next((p.moe.logits_dtype for p in plans if p.moe is not None), None)
        self.cached = self.cache_pointers(cache)  # the cache is not kept alive by the plan

    def cache_pointers(self, cache) -> list[int]:
        return list(map(torch.Tensor.data_ptr, cache.keys)) + list(map(torch.Tensor.data_ptr, cache.values))

    def valid_for(self, cache) -> bool:
        return self.cache() is cache and self.valid() and self.cache_pointers(cache) == self.cached

    valid = _LayerPlan.valid

    def chosen(self, dtype: torch.dtype, rows: int) -> bool:
        """Whether the layers' one-call path is the one chosen for their shapes (not yet measured: the layers by
        themselves measure it first)."""
        threads = torch.get_num_threads()
        return all(cpu.chosen("decode_layer", (str(dtype), cpu.rows_bucket(rows), *kind, threads)) == "gemv"
                   for kind in self.kinds)

    def run_threads(self, rows: int):
        """The threads each layer's call would take (kernels.threads of its work), a C int array."""
        key = (rows, torch.get_num_threads())
        if self.threads is None or self.threads[0] != key:
            counts = [kernels.threads(rows * p.work) for p in self.plans]
            self.threads = key, (ctypes.c_int * len(counts))(*counts)
        return self.threads[1]


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model's layers (ModuleList) -> _StepPlan


def layers_step(layers, x: torch.Tensor, cos_sin, mask: torch.Tensor | None, cache):
    """A decoding step through all of a model's decoder layers (`layers`, its ModuleList) in one C call
    (kernels.decode_layers) -> (y, router logits of its MoE layers [B * S, E] each), or None where it does not
    apply: every layer must run whole in one call by layer_step (its MLP or MoE block included), that call measured
    the faster path for its shape on this CPU (the layers by themselves measure it first), and no hooks, training,
    or gradients (MOELM_KERNELS=decode_step=layers: never). The same results as the layers one by one; only the
    Python between them is gone (on ERNIE-4.5-21B-A3B about 0.1 ms a layer of a ~60 ms step)."""
    if not layers or torch.is_grad_enabled() or global_hooks() or not isinstance(cache, (StaticCache, SlotCache)) \
            or cpu.forced().get("decode_step") == "layers":
        return None
    first = layers[0].self_attn
    if first.config.attn_implementation == "eager" or any(layer.training for layer in layers):
        return None
    inputs = _step_inputs(first, x, cos_sin, mask, cache, bf16=True, several=True)
    if inputs is None or isinstance(cache, StaticCache) and cache.lengths.count(cache.lengths[0]) != len(cache.lengths):
        return None
    cos, sin, flat_mask, pos, rows, positions, new = inputs
    b = cos.shape[0]
    if b > kernels.MAX_ROWS:
        return None
    plan = _STEPS.get(layers)
    if isinstance(plan, _StepPlan) and not plan.chosen(x.dtype, b):
        return None  # asked first: a layer path measured slower than op by op leaves every step here
    if plan is None or not plan.valid_for(cache) or plan.dtype != x.dtype or any(plan.hooked) \
            or any(block.routing_spec() != routing for block, routing in plan.blocks) \
            or not all(fused_ready(f, x) for f in plan.fused):
        plan = _step_plan(layers, x, cos_sin, mask, cache)
        if plan is None or not plan.chosen(x.dtype, b):
            return None
    if new:
        for i in range(len(layers)):
            cache.reserve(i, new)
    y, logits = kernels.decode_layers(plan.layers, plan.run_threads(b), x.reshape(b, -1).contiguous(), cos, sin, pos,
                                      flat_mask, rows, positions)
    return y.view_as(x), [] if logits is None else list(logits.to(plan.logits_dtype).unbind(0))


def _step_plan(layers, x, cos_sin, mask, cache) -> _StepPlan | None:
    """A new _StepPlan for these layers and cache (kept in _STEPS), or None where a layer does not run whole in one
    call or its cache is not x's dtype; then the last layer found so is tried first at the next step."""
    plan = _STEPS.pop(layers, None)
    failed = getattr(plan, "failed", None) if plan is not None and plan.cache() is cache else None
    order = ([failed] if failed is not None else []) + [i for i in range(len(layers)) if i != failed]
    plans = {}
    for i in order:
        layer = layers[i]
        run = layer_step(layer, x, cos_sin, mask, cache)
        if run is None or not run.whole or hooked([layer]) or cache.keys[i].dtype != x.dtype:
            _STEPS[layers] = _Failed(cache, i)
            return None
        plans[i] = _PLANS[layer]
    if len({p.experts for p in plans.values() if p.experts is not None}) > 1:  # router logits of one width
        _STEPS[layers] = _Failed(cache, 0)
        return None
    _STEPS[layers] = plan = _StepPlan(layers, [plans[i] for i in range(len(layers))], cache)
    return plan


class _Failed:
    """_STEPS' note that layer `failed` of these layers did not run whole with this cache."""

    def __init__(self, cache, failed: int):
        self.cache, self.failed = weakref.ref(cache), failed

    def valid_for(self, cache) -> bool:
        return False
