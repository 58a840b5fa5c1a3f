"""bitsandbytes weights, for BitsAndBytesConfig on CUDA with bitsandbytes installed (or backend="bitsandbytes").

4-bit: bnb's nf4 / fp4 codes in blocks of 64 over each weight's flattened [O, I] (as bnb's Linear4bit, without the
double quantization of the block maxima), multiplied by bnb.matmul_4bit in the compute dtype. 8-bit: LLM.int8 as
bnb's Linear8bitLt: int8 rows with one scale each, fp16 activations whose outlier columns (above the threshold) are
multiplied in fp16, by bnb.matmul. Stacked experts keep one packed tensor per projection; each chosen expert reads
its own rows. Quantized one checkpoint tensor at a time while loading, like moelm's int8 / int4.

On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight at inference for its bf16 CPU kernel
(activations and block maxima in bf16, a bf16 result): BnbLinear does the same, so it gives what bitsandbytes
gives on every CPU (see BnbLinear.matmul).
"""
from __future__ import annotations

import functools
import importlib.util
from functools import partial

import torch
from torch import nn

from ..nn.moe import sort_by_expert
from .experts import each_expert
from .quantization import PackedLinear, QuantizationConfig, QuantizedExperts

BLOCK = 64  # 4-bit block size (bnb's default)


def installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    return require().functional.get_4bit_type(quant_type, device=device)


@functools.cache
def cpu_bf16_route() -> bool:
    """Whether bitsandbytes' Linear4bit computes on this CPU with its repacked bf16 kernel (AVX512-BF16)."""
    return bool(require().functional.has_avx512bf16())


def require():
    """The bitsandbytes module, or an ImportError saying how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise ImportError("quantization backend 'bitsandbytes' needs the bitsandbytes package "
                          f"(pip install bitsandbytes): {e}") from e
    return bitsandbytes


class BnbLinear(PackedLinear):
    """A Linear [O, I] with bitsandbytes weights: int4 -> qweight uint8 [O*I/2, 1] and absmax fp32 [O*I/64];
    int8 -> qweight int8 [O, I] and scale fp32 [O]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features, bias, config.mode, dtype, device)
        self.quant_type, self.threshold = config.quant_type, config.llm_int8_threshold
        self.compute_dtype = config.compute_dtype
        if self.mode == "int4":
            n = out_features * in_features
            self.register_buffer("qweight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
            self.register_buffer("absmax", torch.zeros(-(-n // BLOCK), dtype=torch.float32, device=device))
            self.cpu_packed: dict[tuple[int, int], object] = {}  # rows -> the QuantState of bnb's CPU packing
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))

    def load_weight(self, w: torch.Tensor, rows: slice = slice(None)):
        functional = require().functional
        start, stop, _ = rows.indices(self.out_features)
        w = w.to(self.qweight.device)
        if self.mode == "int8":
            q, scale, _ = functional.int8_vectorwise_quant(w.half().contiguous())
            self.qweight[start:stop], self.scale[start:stop] = q, scale
            return
        self._unpack_all()
        first = start * self.in_features
        if first % BLOCK:
            raise ValueError(f"bitsandbytes 4-bit: rows from {start} of a {self.in_features}-input weight do not "
                             f"start a block of {BLOCK}")
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            w = w.float()
        q, state = functional.quantize_4bit(w.contiguous(), blocksize=BLOCK, quant_type=self.quant_type)
        self.qweight[first // 2:first // 2 + q.numel()] = q.view(-1, 1)
        self.absmax[first // BLOCK:first // BLOCK + state.absmax.numel()] = state.absmax

    def matmul(self, x: torch.Tensor, rows: slice = slice(None), bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., I] @ W[rows].T (+ bias) -> [..., len(rows)] in x's dtype."""
        bnb = require()
        start, stop, _ = rows.indices(self.out_features)
        if self.mode == "int8":
            state = bnb.MatmulLtState()
            state.CB, state.SCB = self.qweight[start:stop], self.scale[start:stop]
            state.has_fp16_weights, state.is_training, state.threshold = False, False, self.threshold
            half = None if bias is None else bias.half()
            return bnb.matmul(x.half(), state.CB, bias=half, state=state).to(x.dtype)
        dtype = self.compute_dtype or x.dtype
        if x.device.type == "cpu" and not self.training and not x.requires_grad and cpu_bf16_route() \
                and (stop - start) % 32 == 0 and self.in_features % BLOCK == 0:  # where Linear4bit repacks (other
            # shapes it cannot repack: it fails on them there, moelm keeps the standard route)
            q, state = self._packed(start, stop)
        else:
            q, state = self._unpacked(start, stop, dtype, x.device)
        return bnb.matmul_4bit(x.to(dtype), q, quant_state=state,
                               bias=None if bias is None else bias.to(dtype)).to(x.dtype)

    def _region(self, start: int, stop: int) -> torch.Tensor:
        return self.qweight[start * self.in_features // 2:stop * self.in_features // 2]

    def _unpacked(self, start: int, stop: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, object]:
        """(packed codes [(rows * I) / 2, 1], QuantState) of rows start:stop in bitsandbytes' standard layout."""
        if self._overlaps(start, stop):
            self._unpack_all()
        first, last = start * self.in_features, stop * self.in_features
        state = require().functional.QuantState(
            absmax=self.absmax[first // BLOCK:-(-last // BLOCK)], shape=torch.Size([stop - start, self.in_features]),
            code=_code(self.quant_type, device), blocksize=BLOCK, quant_type=self.quant_type, dtype=dtype)
        return self._region(start, stop).t(), state

    def _packed(self, start: int, stop: int) -> tuple[torch.Tensor, object]:
        """Rows start:stop repacked in place as Linear4bit repacks for its CPU kernel ([rows, I/2] codes; the
        QuantState holds bf16 block maxima, kept in `cpu_packed`); the fp32 `absmax` stays as it is."""
        region = self._region(start, stop)
        state = self.cpu_packed.get((start, stop))
        if state is None:
            codes, plain = self._unpacked(start, stop, torch.float32, region.device)
            packed, state = require().functional._convert_weight_packed_for_cpu(codes.t().contiguous(), plain)
            region.view(-1).copy_(packed.view(-1))
            self.cpu_packed[(start, stop)] = state
        return region.view(stop - start, self.in_features // 2), state

    def _overlaps(self, start: int, stop: int) -> bool:
        return any(a < stop and start < b for a, b in getattr(self, "cpu_packed", ()))

    def _unpack(self, start: int, stop: int):
        region = self._region(start, stop)
        state = self.cpu_packed.pop((start, stop))
        codes, _ = require().functional._convert_weight_packed_for_cpu_inverse(
            region.view(stop - start, self.in_features // 2), state)
        region.view(-1).copy_(codes.reshape(-1))

    def _unpack_all(self):
        """Every repacked region back to the standard layout (before loading, or a product that needs gradients)."""
        for rows in list(getattr(self, "cpu_packed", ())):
            self._unpack(*rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, bias=self.bias)

    def extra_repr(self) -> str:
        kind = self.quant_type if self.mode == "int4" else f"LLM.int8 threshold={self.threshold}"
        return f"{super().extra_repr()}, bitsandbytes {kind}"


class BnbExperts(QuantizedExperts):
    """Stacked experts with bitsandbytes weights: gate_up [E*2I, H] and down [E*H, I] as two BnbLinear; the chosen
    experts one after another."""

    def __init__(self, experts: nn.Module, config: QuantizationConfig):
        self.config = config
        super().__init__(experts, config.mode, 0)

    def packed(self, in_features: int, out_features: int, device) -> BnbLinear:
        return BnbLinear(in_features, out_features, False, self.config, device=device)

    def stacked(self, name: str):
        raise TypeError("bitsandbytes experts keep bitsandbytes' packing, not moelm's [E, O, I] int8/int4 tensors")

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], index/weights [T, K] -> [T, H]."""
        two_i, h = self.shapes["gate_up_proj"][1], self.shapes["down_proj"][1]

        def expert(e: int):  # the two products of expert e, over its rows of the stacked weights
            return (partial(self.gate_up.matmul, rows=slice(e * two_i, (e + 1) * two_i)),
                    partial(self.down.matmul, rows=slice(e * h, (e + 1) * h)))

        return each_expert(x, *sort_by_expert(index, weights, self.num_experts), expert, linear=lambda x, f: f(x))
