"""Weight-only int8 / int4 quantization, applied while a checkpoint loads (one tensor at a time).

int8: symmetric, one fp32 scale per output row: w ≈ q * scale, q in [-127, 127].
int4: symmetric, one fp16 scale per group of `group_size` inputs (as GGUF's Q4_0; fp32 where a checkpoint's stored
scales are no fp16 values): w ≈ (n - 8) * scale, n in [0, 15]; a group's group_size/2 bytes hold input j in the low
nibble and input j + group_size/2 in the high one (csrc/gemv.c).

Decoding (a few rows of activations) runs csrc/gemv.c on the packed weights; longer inputs (prefill) dequantize one
layer's weight (experts: one chosen expert at a time) to the activations' dtype and use PyTorch's matmul, or round
the activations to int8 and multiply int8 pairs on the packed weights (csrc/intgemm.c, "int8dot_*" paths), whichever
was measured faster on this CPU. Every Linear of the decoder, the stacked experts and the LM head are quantized;
embeddings, norms and routers stay as they are.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.moe import Experts, grouped_linear, needs_grad, sort_by_expert
from . import cpu, kernels
from .experts import each_expert
from .matmul import linear

MODES = ("int8", "int4")


@dataclass
class QuantizationConfig:
    """mode "int8" | "int4". backend "moelm" (its own packing and kernels) or "bitsandbytes" (see bnb.py: 4-bit
    `quant_type` nf4 / fp4 computed in `compute_dtype`, 8-bit LLM.int8 with `llm_int8_threshold`).

    moelm's only: `experts` gives the routed experts another mode than `mode`; with `hot_experts` and `report` (an
    expert report: the directory `moelm experts --out DIR` wrote, or its report.json), the ceil(hot_fraction x E)
    routed experts of each MoE layer that got the most tokens, and the shared experts, are in `hot_experts` instead
    (mixed.MixedExperts), e.g. mode "int8", experts "int4", hot_experts "int8", hot_fraction 0.2 (the default)."""

    mode: str = "int8"
    group_size: int = 64  # int4 only
    modules_to_not_convert: tuple[str, ...] = ()
    backend: str = "moelm"
    quant_type: str = "fp4"  # bitsandbytes 4-bit only
    compute_dtype: torch.dtype | None = None  # bitsandbytes 4-bit only; None: the activations' dtype
    llm_int8_threshold: float = 6.0  # bitsandbytes 8-bit only
    # module name -> (mode, group size), read from a compressed-tensors checkpoint: only these are quantized
    modules: dict[str, tuple[str, int]] | None = None
    experts: str | None = None  # the routed experts' mode; None: `mode`
    hot_experts: str | None = None  # the hot routed experts' and the shared experts' mode (needs `report`)
    report: str | os.PathLike | None = None
    hot_fraction: float | None = None  # with hot_experts; None: 0.2

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {self.mode!r}")
        for field in ("experts", "hot_experts"):
            if getattr(self, field) not in (None, *MODES):
                raise ValueError(f"quantization {field} must be one of {', '.join(MODES)}, got "
                                 f"{getattr(self, field)!r}")
        if self.hot_experts is None:
            given = [f for f in ("report", "hot_fraction") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"quantization {given[0]} is given without hot_experts (the mode of the hot experts)")
        else:
            if self.report is None:
                raise ValueError("quantization hot_experts needs report: the expert report (moelm experts --out DIR) "
                                 "that says which experts are hot")
            if self.hot_fraction is None:
                self.hot_fraction = 0.2
            if isinstance(self.hot_fraction, bool) or not isinstance(self.hot_fraction, (int, float)) \
                    or not 0 < self.hot_fraction <= 1:
                raise ValueError(f"quantization hot_fraction must be in (0, 1], got {self.hot_fraction!r}")
        if (self.experts or self.hot_experts) and (self.backend != "moelm" or self.modules is not None):
            raise ValueError("quantization experts / hot_experts are for moelm's own int8/int4 weights quantized "
                             "while loading, not bitsandbytes nor a checkpoint stored quantized")
        if "int4" in (self.mode, self.experts, self.hot_experts) and (self.group_size < 32 or self.group_size % 32):
            raise ValueError(f"int4 group_size must be a multiple of 32, got {self.group_size}")
        for pattern in self.modules_to_not_convert:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ValueError(f"modules_to_not_convert: {pattern!r} is not a module name or regular expression "
                                 f"({e})") from None
        if self.backend not in ("moelm", "bitsandbytes"):
            raise ValueError(f"quantization backend must be 'moelm' or 'bitsandbytes', got {self.backend!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = getattr(torch, self.compute_dtype.removeprefix("torch."))


def kept_as_float(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether modules_to_not_convert `patterns` keep the module `name` (its full name) unquantized, matched as
    transformers matches them: from the start up to a module boundary, also as a regular expression
    ("model.layers.1" keeps "model.layers.1.mlp", not "model.layers.11"; "model.layers.*.self_attn"), or as a suffix
    ("q_proj", "lm_head"). A parent's short name ("self_attn") keeps nothing below it, as in transformers."""
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(p) for p in patterns)


@dataclass
class BitsAndBytesConfig:
    """transformers' BitsAndBytesConfig fields. On CUDA with bitsandbytes installed they select bitsandbytes'
    4-bit (bnb_4bit_quant_type, bnb_4bit_compute_dtype) or LLM.int8 (llm_int8_threshold) weights; otherwise moelm's
    int4 (group size 64) or int8 (see resolve)."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    bnb_4bit_compute_dtype: object = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: object = None

    def __post_init__(self):
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_4bit and load_in_8bit are both True, but only one can be used")




# ---------------------------------------------------------------- packing

FP16_TINY, FP16_MAX = 2.0 ** -14, 65504.0  # the smallest normal and the largest fp16 value


def quantize(w: torch.Tensor, mode: str, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> (q, scale). int8: q int8 [..., O, I], scale fp32 [..., O]. int4: q uint8 [..., O, I/2],
    scale fp16 [..., O, I/group_size]: max|w| / 7.5 of the group (0 for a group of zeros, else at least fp16's
    smallest normal number, 6.1e-5) rounded up to fp16, the codes rounded against the rounded scale."""
    w = w.float()
    if mode == "int8":
        scale = w.abs().amax(-1) / 127
        q = torch.where(scale[..., None] > 0, w / scale[..., None], 0.0)  # rounded against the scale it stores
        q = torch.round(q).clamp(-127, 127).to(torch.int8)
        return q, scale
    *lead, o, i = w.shape
    g = w.reshape(*lead, o, i // group_size, group_size)
    big = g.abs().amax(-1)
    if not bool((big <= FP16_MAX * 7.5).all()):  # also catches inf and nan
        raise ValueError(f"cannot quantize a weight with |w| up to {big.max().item():g} to int4: its scales "
                         f"would pass fp16's {FP16_MAX:g}")
    exact = torch.where(big > 0, (big / 7.5).clamp(min=FP16_TINY), 0.0)  # a group of zeros: scale 0
    scale = exact.half()
    low = scale.float() < exact  # rounded up instead: every code within [-7.5, 7.5] steps, as with exact scales
    scale = torch.where(low, torch.nextafter(scale, torch.tensor(torch.inf, dtype=torch.float16)), scale)
    n = (torch.round(g / scale.float().clamp(min=FP16_TINY)[..., None]) + 8).clamp(0, 15).to(torch.uint8)
    half = group_size // 2
    packed = n[..., :half] | (n[..., half:] << 4)
    return packed.reshape(*lead, o, i // 2), scale


def fits_fp16(scale: torch.Tensor) -> bool:
    """Whether every value of these (float) scales is an fp16 value: stored as fp16 without change."""
    return scale.dtype == torch.float16 or bool((scale.to(torch.float16).float() == scale.float()).all())


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize: [..., O, I] in dtype."""
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and kernels.available() \
            and scale.dtype in KERNEL_SCALES[q.dtype]:
        return kernels.dequantize(q, scale, group_size).to(dtype)
    if q.dtype == torch.int8:
        return (q.to(dtype) * scale[..., None].to(dtype))
    *lead, o, half_i = q.shape
    g = q.reshape(*lead, o, half_i * 2 // group_size, group_size // 2)
    n = torch.cat([g & 15, g >> 4], dim=-1).to(dtype) - 8  # [..., O, groups, group_size]
    return (n * scale[..., None].to(dtype)).reshape(*lead, o, half_i * 2)


class Dequantized(torch.autograd.Function):
    """x [N, in] times a quantized weight (q, scale) dequantized to x's dtype and viewed as `shape`: [O, in]
    (F.linear), or [E, O, in] with counts [E] (grouped_linear of rows sorted by expert; `hit` [E'] picks the
    experts of a stack [E', ...] that are dequantized). The weight is made again in the backward rather than kept,
    and q and scale are kept as the module's own (no copy), so a forward that tracks gradients holds no weight of its
    own (for ERNIE-4.5-21B in int4 the dequantized copies were 12 GB on top of the model's 12). Differentiable
    w.r.t. x."""

    @staticmethod
    def forward(ctx, x, q, scale, group_size, shape, counts=None, hit=None):
        ctx.save_for_backward(q, scale, counts, hit)
        ctx.group_size, ctx.shape = group_size, shape
        return Dequantized.apply_to(x, Dequantized.weight(q, scale, hit, group_size, x.dtype, shape), counts)

    @staticmethod
    def backward(ctx, grad):
        q, scale, counts, hit = ctx.saved_tensors
        w = Dequantized.weight(q, scale, hit, ctx.group_size, grad.dtype, ctx.shape)
        return Dequantized.apply_to(grad, w.transpose(-1, -2), counts), *[None] * 6

    @staticmethod
    def weight(q, scale, hit, group_size, dtype, shape):
        if hit is not None:
            q, scale = q[hit], scale[hit]
        return dequantize(q, scale, group_size, dtype).view(shape)

    @staticmethod
    def apply_to(x, w, counts):
        return F.linear(x, w) if counts is None else grouped_linear(x, w, counts)


KERNEL_SCALES = {torch.int8: (torch.float32,), torch.uint8: (torch.float32, torch.float16)}
LOAD_ELEMENTS = 1 << 18  # weight elements quantized at a time while loading (1 MB in fp32)
TILE_ROWS = 512  # weight rows dequantized at a time by the "tiles" path: a few MB, reused, kept in the caches
_scratch = threading.local()


def scratch(name: str, shape) -> torch.Tensor:
    """A reused fp32 buffer of this thread (one per name, grown as needed): dequantized weights land in memory that
    is already mapped and warm, instead of fresh pages each layer."""
    n = math.prod(shape)
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        setattr(_scratch, name, buf)
    return buf[:n].view(*shape)


def dequantized(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype, name: str):
    """dequantize() into the scratch buffer `name` (fp32), or a new tensor of another dtype or without kernels.
    The result is valid until the next call with the same name."""
    if dtype != torch.float32 or q.device.type != "cpu" or not kernels.available() or \
            scale.dtype not in KERNEL_SCALES[q.dtype]:
        return dequantize(q, scale, group_size, dtype)
    features = q.shape[-1] * (2 if q.dtype == torch.uint8 else 1)
    return kernels.dequantize(q, scale, group_size, out=scratch(name, (*q.shape[:-1], features)))


def group_for(name: str, in_features: int, config: "QuantizationConfig", mode: str | None = None) -> int:
    """The int4 group size for a weight with in_features inputs quantized in `mode` (default config.mode): the
    configured one, or 32 when it does not divide."""
    if in_features % 32:
        raise ValueError(f"cannot quantize {name}: its {in_features} input features are not a multiple of 32")
    if (mode or config.mode) == "int4" and in_features % config.group_size:
        return 32
    return config.group_size


def experts_group_for(name: str, hidden: int, inter: int, config: "QuantizationConfig", mode: str | None = None
                      ) -> int:
    """One int4 group size for both stacked expert products (inputs `hidden` and `inter`)."""
    return min(group_for(name, hidden, config, mode), group_for(name, inter, config, mode))


# ---------------------------------------------------------------- modules

def _path(op: str, x: torch.Tensor, rows: int, shape, candidates) -> str:
    """The path chosen among candidates() (name -> a call on x and a probe of the weight) for this CPU, quantized
    op and shape class (x's `rows` rows against packed weights of `shape`, their output rows a cpu.probe_rows
    class)."""
    key = (str(x.dtype), cpu.rows_bucket(rows), *shape, torch.get_num_threads())
    return cpu.pick(f"quantized.{op}", key, candidates)


# the integer prefill paths (csrc/intgemm.c), one per instruction set: activations rounded to int8 per block of 32
INT_PATHS = {f"int8dot_{v}": v for v in kernels.INT_VARIANTS}
cpu.register("quantized", ("gemv", "torch", "tiles", "int8pack", *INT_PATHS))


_ROWS = threading.local()


class independent_rows:
    """Within this context (a serving engine's steps), the rows of a call are other sequences, not one sequence's
    tokens that must round as each would alone: the quantized Linears then also time the integer path (the
    activations rounded to int8 per row) for 2..kernels.MAX_ROWS rows, where it can be the faster one (8 rows on
    a Zen 4 with VNNI: half the time of gemv). `generate` never enters it, so a speculative check keeps one row's
    rounding."""

    def __enter__(self):
        self.before = getattr(_ROWS, "on", False)
        _ROWS.on = True

    def __exit__(self, *exc):
        _ROWS.on = self.before


def int_paths(x: torch.Tensor, *weights: torch.Tensor | None) -> dict[str, str]:
    """{path: variant} of the integer paths that can take x [..., K] (CPU, no gradients; K a multiple of 32 as every
    quantized weight's is): those compiled for this CPU."""
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights))
    if x.device.type != "cpu" or type(x) is not torch.Tensor or grads or x.shape[-1] % 32:
        return {}
    have = kernels.int_variants()
    return {name: v for name, v in INT_PATHS.items() if v in have}


class PackedLinear(nn.Module):
    """What the quantized Linears share: in/out features, a bias kept in its dtype, no casting."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def _apply(self, fn, recurse=True):
        """Moving to another device is fine; casting is not (the packed weights and their scales have no other
        dtype), as transformers refuses `.to(dtype)` on bitsandbytes models."""
        if fn(torch.zeros(1)).dtype != torch.float32:
            raise ValueError("a model with int8/int4 weights cannot be cast to another dtype; load it with "
                             "from_pretrained(..., dtype=..., quantization=...) instead")
        return super()._apply(fn, recurse)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.mode}, bias={self.bias is not None}"


class QuantizedLinear(PackedLinear):
    """A Linear whose weight [O, I] is stored quantized (buffers qweight, scale); bias kept in its dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: int,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, mode, dtype, device)
        self.group_size = group_size if mode == "int4" else 0
        cols = in_features if mode == "int8" else in_features // 2
        qdtype = torch.int8 if mode == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=qdtype, device=device))
        scale_shape = (out_features,) if mode == "int8" else (out_features, in_features // group_size)
        scale_dtype = torch.float32 if mode == "int8" else torch.float16
        self.register_buffer("scale", torch.zeros(scale_shape, dtype=scale_dtype, device=device))

    def load_weight(self, w: torch.Tensor, rows: slice = slice(None)):
        """w [O', I] quantized into rows `rows`, LOAD_ELEMENTS at a time: quantize's fp32 temporaries stay a few MB
        (whole, an fp32 copy of a 400 MB LM head and its quotients, 4x the int8 model's size at the peak)."""
        start = rows.indices(self.out_features)[0]
        step = max(1, LOAD_ELEMENTS // max(w.shape[-1], 1))
        for r in range(0, w.shape[0], step):
            part = w[r:r + step]
            self.load_packed(*quantize(part, self.mode, self.group_size), slice(start + r, start + r + len(part)))

    def load_packed(self, q: torch.Tensor, scale: torch.Tensor, rows: slice = slice(None)):
        """Rows already in this module's packing (quantize's output layout), copied as they are."""
        self.qweight[rows] = q
        self.load_scales(scale, rows)

    def load_scales(self, scale: torch.Tensor, rows: slice = slice(None)):
        """These rows' scales, exactly: int4 ones stay fp16 while every one given is an fp16 value; otherwise
        (a checkpoint's fp32 or bf16 scales) the module's become fp32 from then on."""
        if self.scale.dtype == torch.float16 and not fits_fp16(scale):
            self.scale = self.scale.float()
        self.scale[rows] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whichever was measured faster for this CPU and shape: for few rows the gemv kernel on the packed weight
        or the weight dequantized to x's dtype and F.linear ("torch"); for more, the weight dequantized a tile at
        a time into a reused buffer ("tiles"), or x rounded to int8 and multiplied in integers on the packed weight
        ("int8dot_<instruction set>", csrc/intgemm.c); or for int8, where PyTorch dispatches to its AVX-512 kernels, its
        int8-weight matmul (torch._weight_int8pack_mm, the same products; PyTorch has a blocked kernel for it only
        there, its fallback ran 36x slower than dequantizing on the AVX2 EPYC)."""
        if kernels.plain_only(x):  # compiling or autocast: the dequantized weight and F.linear, no measured choice
            return self._dense(x)
        rows = x.numel() // x.shape[-1]
        paths = {"torch": self._dense}
        if kernels.usable(x, self.bias):
            paths["gemv"] = self._gemv
            if rows > 1 and getattr(_ROWS, "on", False):
                paths.update({name: functools.partial(self._integer, variant=v)
                              for name, v in int_paths(x, self.bias).items()})
        elif x.device.type == "cpu" and kernels.available() and not torch.is_grad_enabled():
            # many rows: never the whole weight dequantized per call. Timed alone it can look as fast (the same big
            # block comes back from the allocator), but in a forward pass each layer pays fresh pages for it:
            # ERNIE-0.3B int8 prefill 165 tok/s with it chosen for three of five shapes, 184 with the tiles
            paths = {"tiles": self._tiles}
            paths.update({name: functools.partial(self._integer, variant=v)
                          for name, v in int_paths(x).items()})
        if self.mode == "int8" and x.device.type == "cpu" and cpu.info().capability.startswith("AVX512") and \
                x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled():
            paths["int8pack"] = self._int8pack
        if len(paths) == 1:
            return next(iter(paths.values()))(x)
        # the candidates differ with the rows and grad mode within one rows bucket: they are part of the key
        n = cpu.probe_rows(self.out_features, self.in_features, rows)
        path = _path(f"{self.mode}.{'+'.join(sorted(paths))}", x, rows, (n, self.qweight.shape[1]),
                     lambda: cpu.probes(paths, self.out_features, n,
                                        lambda name, r: self._on(self.probe(r), paths[name], x)))
        return paths[path](x)

    @staticmethod
    def _on(view: QuantizedLinear, path, x: torch.Tensor) -> torch.Tensor:
        """The path (a bound method of this module, or a functools.partial of one) run on `view` instead."""
        if isinstance(path, functools.partial):
            return getattr(view, path.func.__name__)(x, *path.args, **path.keywords)
        return getattr(view, path.__name__)(x)

    def probe(self, rows: slice) -> QuantizedLinear:
        """These output rows of this module (views of its tensors: every parameter and buffer whose first
        dimension is the output rows), to time its paths on."""
        start, stop, _ = rows.indices(self.out_features)
        if (start, stop) == (0, self.out_features):
            return self
        view = copy.copy(self)
        view._parameters, view._buffers = dict(self._parameters), dict(self._buffers)
        for store in (view._parameters, view._buffers):
            for name, t in store.items():
                if t is not None and t.dim() and t.shape[0] == self.out_features:
                    store[name] = t[start:stop]
        view.out_features = stop - start
        return view

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float().contiguous()
        return kernels.gemv(x, self.qweight, self.scale, self.group_size, bias).to(x.dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x):
            y = Dequantized.apply(x, self.qweight, self.scale, self.group_size, (self.out_features, self.in_features))
            return y if self.bias is None else y + self.bias
        return F.linear(x, dequantize(self.qweight, self.scale, self.group_size, x.dtype), self.bias)

    def _tiles(self, x: torch.Tensor) -> torch.Tensor:
        """TILE_ROWS weight rows at a time dequantized into a reused buffer and multiplied in fp32 (by the path
        chosen for the tile's shape)."""
        xf = x.float()
        outs = []
        for r in range(0, self.out_features, TILE_ROWS):
            w = dequantized(self.qweight[r:r + TILE_ROWS], self.scale[r:r + TILE_ROWS], self.group_size,
                            torch.float32, "tile")
            outs.append(linear(xf, w, None))
        y = torch.cat(outs, dim=-1)
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    def _integer(self, x: torch.Tensor, variant: str) -> torch.Tensor:
        """x rounded to int8 per row per block of 32 and multiplied with the packed weight in integers
        (kernels.intgemm); the error against the fp32 activations is bounded in tests/test_intgemm.py."""
        y = kernels.intgemm(x, self.qweight, self.scale, self.group_size, variant)
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    def _int8pack(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantizedExperts(nn.Module):
    """Stacked experts (gate_up [E, 2I, H], down [E, H, I]) stored quantized; num_experts: E when it is not that of
    `experts` (a share of its experts: mixed.MixedExperts)."""

    def __init__(self, experts: nn.Module, mode: str, group_size: int, num_experts: int | None = None):
        super().__init__()
        self.num_experts = experts.num_experts if num_experts is None else num_experts
        e, (two_i, h) = self.num_experts, experts.gate_up_proj.shape[1:]
        self.mode, self.group_size = mode, group_size if mode == "int4" else 0
        self.gate_up = self.packed(h, e * two_i, experts.gate_up_proj.device)
        self.down = self.packed(two_i // 2, e * h, experts.down_proj.device)
        self.shapes = {"gate_up_proj": (e, two_i, h), "down_proj": (e, h, two_i // 2)}

    def packed(self, in_features: int, out_features: int, device) -> PackedLinear:
        """The module holding one stacked projection, experts one after another along its output rows."""
        return QuantizedLinear(in_features, out_features, False, self.mode, self.group_size, device=device)

    def stacked(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [E, O, I'], scale [E, O(, groups)]) views of one stacked projection."""
        m = self.gate_up if name == "gate_up_proj" else self.down
        e, o, _ = self.shapes[name]
        return m.qweight.view(e, o, -1), m.scale.view(e, o, *m.scale.shape[1:])

    def load_weight(self, name: str, w: torch.Tensor, expert: int, rows: slice):
        """w: rows `rows` of expert `expert`'s [O, I] matrix of the stacked `name`."""
        m, rows = self.rows(name, expert, rows)
        m.load_weight(w, rows)

    def load_packed(self, name: str, q: torch.Tensor, scale: torch.Tensor, expert: int, rows: slice):
        """load_weight of rows already packed (quantize's output layout)."""
        m, rows = self.rows(name, expert, rows)
        m.load_packed(q, scale, rows)

    def rows(self, name: str, expert: int, rows: slice) -> tuple[PackedLinear, slice]:
        """The module of the stacked `name` and the rows of expert `expert`'s `rows` in it."""
        m = self.gate_up if name == "gate_up_proj" else self.down
        o = self.shapes[name][1]
        start, stop, _ = rows.indices(o)
        return m, slice(expert * o + start, expert * o + stop)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], index/weights [T, K] -> [T, H]: every (token, choice) pair through the gemv kernel or the chosen
        experts dequantized one at a time, whichever was measured faster for few pairs; for a prefill, also each
        chosen expert's rows in integers (csrc/intgemm.c)."""
        if needs_grad(x, weights) or kernels.plain_only(x):  # the grouped form, the chosen experts dequantized
            return Experts.forward(self, x, index, weights)
        t, k = index.shape
        if t == 0:  # no tokens (a forward whose kept positions are none)
            return x.new_zeros(x.shape)
        if t > kernels.MAX_ROWS and (ints := int_paths(x)):  # prefill: the integer paths too
            path = self.prefill_path(x, index, weights, ints)
            return self.dense(x, index, weights) if path == "torch" else self.integer(x, index, weights, ints[path])
        if t * k <= 64 and kernels.usable(x[:1]) and self.path(x, index, weights) == "gemv":
            return self.selected(x, index, weights)
        return self.dense(x, index, weights)

    def project(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Experts.forward's projection (rows x [N, in] sorted by expert, counts [E]) when gradients are needed: the
        chosen experts' weights dequantized, made again in the backward (Dequantized)."""
        q, scale = self.stacked(name)
        hit = counts.nonzero().squeeze(1)
        return Dequantized.apply(x, q, scale, self.group_size, (len(hit), *self.shapes[name][1:]), counts[hit], hit)

    def path(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> str:
        """"gemv" (selected) or "torch" (dense) for x's (token, choice) pairs, timed on the first pairs whose experts'
        weights fill cpu.probe_elements() (at least one: each pair reads its expert's weights, whichever the path),
        their experts shifted by one at each call (other weights than the last call's, as in a real step)."""
        t, k = index.shape
        each = sum(p.in_features * p.out_features for p in (self.gate_up, self.down)) // self.num_experts
        n = cpu.probe_rows(t * k, each)  # pairs
        m = min(t * k, n)

        def candidates():  # the first m pairs as m tokens of one choice each
            pairs = (x, index, weights) if m == t * k else \
                (x.repeat_interleave(k, dim=0)[:m], index.reshape(-1, 1)[:m], weights.reshape(-1, 1)[:m])
            paths = {"gemv": self.selected, "torch": self.dense}
            return cpu.probes(paths, self.num_experts, 1, lambda name, r: paths[name](
                pairs[0], (pairs[1] + r.start) % self.num_experts, pairs[2]))
        return _path(f"{self.mode}.experts", x, n, self.stacked("gate_up_proj")[0].shape, candidates)

    def selected(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every (token, choice) pair through the gemv kernel, the weights picked per row."""
        t, k = index.shape
        gq, gs = self.stacked("gate_up_proj")
        dq, ds = self.stacked("down_proj")
        pairs = x.repeat_interleave(k, dim=0)  # [T*K, H]
        h = kernels.gemv(pairs, gq, gs, self.group_size, select=index.reshape(-1))  # [T*K, 2I]
        gate, up = h.chunk(2, dim=-1)
        h = kernels.gemv(F.silu(gate) * up, dq, ds, self.group_size, select=index.reshape(-1))  # [T*K, H]
        return (h.view(t, k, -1) * weights[..., None].float()).sum(1).to(x.dtype)

    def dense(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The chosen experts one at a time, each dequantized into a reused buffer (experts.each_expert)."""
        gq, gs = self.stacked("gate_up_proj")
        dq, ds = self.stacked("down_proj")

        def expert(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (dequantized(gq[e], gs[e], self.group_size, x.dtype, "gate_up"),
                    dequantized(dq[e], ds[e], self.group_size, x.dtype, "down"))

        return each_expert(x, *sort_by_expert(index, weights, self.num_experts), expert)

    def integer(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, variant: str) -> torch.Tensor:
        """Each chosen expert's rows times its packed weights in integers (kernels.intgemm: x rounded to int8 per
        row per block of 32), no dequantized copy: all experts in one call (kernels.intgemm_experts, the threads
        taking whole experts) where enough are chosen to share out, else one expert after another."""
        gq, gs = self.stacked("gate_up_proj")
        dq, ds = self.stacked("down_proj")

        token, w, counts = sort_by_expert(index, weights, self.num_experts)
        if int((counts > 0).sum()) >= 4 * torch.get_num_threads():  # enough experts to share out whole
            return kernels.intgemm_experts(x, token, w, counts, (gq, gs), (dq, ds), self.group_size,
                                           variant).to(x.dtype)

        def mm(rows: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return kernels.intgemm(rows, *w, self.group_size, variant)
        return each_expert(x, token, w, counts, lambda e: ((gq[e], gs[e]), (dq[e], ds[e])), linear=mm)

    def prefill_path(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, ints: dict[str, str]
                     ) -> str:
        """"torch" (dense) or an integer path (int_paths) for a prefill of x's tokens, timed on the pairs of as
        many experts as fill cpu.probe_elements(), of those chosen the ones with the median numbers of tokens (how
        many tokens an expert gets decides the winner). Every call runs the same pairs, their experts moved along
        by the window at each call (other weights than the last call's, as in a real prefill): each candidate gets
        the same work."""
        t, k = index.shape
        e = self.num_experts
        each = sum(p.in_features * p.out_features for p in (self.gate_up, self.down)) // e
        window = max(1, min(e, cpu.probe_elements() // each))
        paths = {"torch": self.dense, **{name: functools.partial(self.integer, variant=v) for name, v in ints.items()}}

        def candidates():
            flat = index.reshape(-1)
            counts = torch.bincount(flat, minlength=e)
            hit = counts.nonzero().squeeze(1)
            hit = hit[counts[hit].argsort(stable=True)]  # the experts chosen, by their numbers of tokens
            median = hit[max(len(hit) - window, 0) // 2:][:window]
            slot = torch.full((e,), -1, dtype=torch.long)
            slot[median] = torch.arange(len(median))
            pick = (slot[flat] >= 0).nonzero().squeeze(1)
            rows, at, w = x[pick // k], slot[flat[pick]][:, None], weights.reshape(-1)[pick, None]

            def run(name: str, experts: slice) -> torch.Tensor:
                return paths[name](rows, (at + experts.start) % e, w)
            return cpu.probes(paths, e, window, run)
        op = f"{self.mode}.experts.{'+'.join(sorted(paths))}"
        return _path(op, x, t * k, (window, *self.stacked("gate_up_proj")[0].shape[1:]), candidates)
