"""Usage-aware mixed-bit experts (QuantizationConfig.hot_experts): the routed experts of each MoE layer that an
expert report (`moelm experts --out DIR`) shows most used are stored in one mode, the others in another."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..nn.moe import Experts
from .quantization import QuantizedExperts

SCHEMA = "moelm.experts/1"
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_report(path) -> tuple[Path, dict]:
    """An expert report (`moelm experts`' report.json, or its directory) -> (its path, its JSON), checked to be
    one of SCHEMA."""
    path = Path(path)
    path = path / "report.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"expert report {path}: no such file (moelm experts --out DIR writes DIR/report.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"expert report {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("layers"), list):
        raise ValueError(f"{path} is not an expert report of schema {SCHEMA}")
    return path, data


def read_report(path) -> dict:
    """An expert report (its directory or report.json) -> {"path", "model_type", "tokens": {decoder layer index:
    [E] tokens routed to each expert}}. Only layers[*].layer, num_experts and tokens are read."""
    path, data = load_report(path)
    tokens = {}
    for entry in data["layers"]:
        layer, e, counts = (entry.get(k) if isinstance(entry, dict) else None for k in ("layer", "num_experts",
                                                                                         "tokens"))
        if not isinstance(layer, int) or not isinstance(e, int) or not isinstance(counts, list) \
                or len(counts) != e or not all(isinstance(c, int) and c >= 0 for c in counts):
            raise ValueError(f"expert report {path}: a layers entry without an int layer, num_experts and "
                             f"num_experts token counts: {str(entry)[:120]}")
        if layer in tokens:
            raise ValueError(f"expert report {path}: layer {layer} is listed twice")
        tokens[layer] = counts
    return {"path": str(path), "model_type": data.get("model_type"), "tokens": tokens}


def hot_experts(model: nn.Module, config) -> dict[str, list[int]]:
    """Name of each Experts module of the model -> its hot experts (ascending ids): the ceil(hot_fraction x E) of
    its decoder layer that got the most tokens in config.report (ties: the lower id). The report must be of this
    model: its model type, MoE layers and expert counts."""
    report = read_report(config.report)
    where = report["path"]
    model_type = model.config.model_type
    if report["model_type"] is not None and report["model_type"] != model_type:
        raise ValueError(f"expert report {where} is of a {report['model_type']} model, not {model_type}")
    blocks = {}  # decoder layer -> (module name, E)
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            match = LAYER.search(name)
            if match is None:
                raise ValueError(f"{name}: experts outside the decoder layers cannot be matched to an expert report")
            blocks[int(match[1])] = (name, module.num_experts)
    ours, theirs = sorted(blocks), sorted(report["tokens"])
    if ours != theirs:
        raise ValueError(f"expert report {where} covers MoE layers {theirs}, but this model's MoE layers are {ours}")
    out = {}
    for layer, (name, e) in blocks.items():
        tokens = report["tokens"][layer]
        if len(tokens) != e:
            raise ValueError(f"expert report {where}: layer {layer} has {len(tokens)} experts, this model's has {e}")
        n = max(1, math.ceil(config.hot_fraction * e - 1e-9))
        out[name] = sorted(sorted(range(e), key=lambda i: -tokens[i])[:n])
    return out


class MixedExperts(nn.Module):
    """Stacked experts (gate_up [E, 2I, H], down [E, H, I]) in two modes: the experts `hot_ids` in the
    QuantizedExperts `hot` (in that order), the others in `cold` (ascending). Each computes the (token, choice)
    pairs of its experts its own way (QuantizedExperts.forward); the C MoE block (decode._moe_plan) needs one mode
    per block and leaves this one to PyTorch."""

    def __init__(self, experts: nn.Module, hot: list[int], hot_mode: str, hot_group: int, cold_mode: str,
                 cold_group: int):
        super().__init__()
        e = self.num_experts = experts.num_experts
        cold = sorted(set(range(e)) - set(hot))
        if not hot or not cold or len(set(hot)) != len(hot) or not set(hot) <= set(range(e)):
            raise ValueError(f"hot experts {hot} of {e}: want some but not all of them, each once")
        self.hot_ids = tuple(hot)
        self.hot = QuantizedExperts(experts, hot_mode, hot_group, num_experts=len(hot))
        self.cold = QuantizedExperts(experts, cold_mode, cold_group, num_experts=len(cold))
        self.which = torch.zeros(e, dtype=torch.long, device="cpu")  # expert -> 0: hot, 1: cold
        self.which[cold] = 1
        self.slot = torch.zeros(e, dtype=torch.long, device="cpu")  # expert -> its row in its stack
        self.slot[list(hot)] = torch.arange(len(hot), device="cpu")
        self.slot[cold] = torch.arange(len(cold), device="cpu")
        self.shapes = {name: (e, *shape[1:]) for name, shape in self.hot.shapes.items()}

    def stack(self, expert: int) -> tuple[QuantizedExperts, int]:
        """(the stack holding expert `expert`, its index there)."""
        return (self.hot, self.cold)[int(self.which[expert])], int(self.slot[expert])

    def rows(self, name: str, expert: int, rows: slice):
        """The module of the stacked `name` and the rows of expert `expert`'s `rows` in it (QuantizedExperts.rows)."""
        stack, i = self.stack(expert)
        return stack.rows(name, i, rows)

    def load_weight(self, name: str, w: torch.Tensor, expert: int, rows: slice):
        m, rows = self.rows(name, expert, rows)
        m.load_weight(w, rows)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], index/weights [T, K] -> [T, H]: the pairs of each stack's experts as rows of one choice each."""
        k = index.shape[1]
        flat = index.reshape(-1)
        which = self.which.to(flat.device)[flat]
        order = which.argsort(stable=True)  # the pairs, the hot stack's first
        hot = int((which == 0).sum())
        token, rows = order // k, self.slot.to(flat.device)[flat[order]][:, None]
        xs, ws = x[token], weights.reshape(-1)[order][:, None]
        ys = []
        if hot:
            ys.append(self.hot(xs[:hot], rows[:hot], ws[:hot]))
        if hot < len(order):
            ys.append(self.cold(xs[hot:], rows[hot:], ws[hot:]))
        out = torch.zeros_like(x)
        return out.index_add_(0, token, torch.cat(ys) if len(ys) > 1 else ys[0]) if ys else out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise NotImplementedError(f"{prefix.rstrip('.')} holds experts of two modes ({self.extra_repr()}), which "
                                  "moelm cannot save: its compressed-tensors checkpoints have one scheme per MoE "
                                  "block; save the unquantized checkpoint and load it with the same quantization")

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts: {list(self.hot_ids)} {self.hot.mode}, the others {self.cold.mode}"
