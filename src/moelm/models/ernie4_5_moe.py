"""ERNIE 4.5 MoE (21B-A3B, 300B-A47B): ERNIE 4.5 attention, dense and MoE layers (routed + shared experts), and
the multi-token-prediction (MTP) head the -PT checkpoints carry."""
from __future__ import annotations

import re
import sys

import torch
from torch import nn

from ..config import Ernie4_5_MoeConfig
from ..nn.layers import MLP, DecoderLayer, RMSNorm, attention_mask_4d
from ..nn.moe import Experts, ernie_choose
from ..nn.rope import rotate_interleaved
from .ernie4_5 import Ernie4_5Model, no_attention_dropout
from .modeling import CausalLM, Router, boolean_mask

MTP_KEY = re.compile(r"^model\.(mtp_emb_norm|mtp_hidden_norm|mtp_linear_proj|mtp_block)\.(\d+)\.(.+)$")


class MoeStatics(nn.Module):
    def __init__(self, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts, dtype=torch.float32),
                                                    requires_grad=False)


class Ernie4_5_MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Ernie4_5_MoeConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config.moe_num_experts, config.hidden_size, dtype=torch.float32, fp32=True)
        self.moe_statics = MoeStatics(config.moe_num_experts)
        self.experts = Experts(config.moe_num_experts, config.hidden_size, config.moe_intermediate_size)
        shared = config.moe_num_shared_experts
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * shared,
                                  bias=config.use_bias) if shared else None

    def routing_spec(self) -> tuple[str, int, float, float]:
        """(routing kind, top-k, norm_min, jitter) for kernels that run the block whole (moelm.inference)."""
        return "ernie", self.config.moe_k, self.config.moe_norm_min, 0.0

    def routed(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing forward does, from its router logits [T, E]: weights [T, K] fp32, index [T, K]."""
        return ernie_choose(logits, self.moe_statics.e_score_correction_bias, self.config.moe_k,
                            self.config.moe_norm_min)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h = x.shape
        flat = x.reshape(-1, h)  # [T, H]
        # the shared experts first, as transformers: a bf16 backward sums the input's gradients in its order
        shared = self.shared_experts(flat) if self.shared_experts is not None else None
        logits = self.gate(flat)  # fp32, as ernie_route computes them
        with torch.autocast(device_type=flat.device.type, enabled=False):
            weights, index = self.routed(logits)
        weights = weights.to(x.dtype)
        out = self.experts(flat, index, weights)
        if shared is not None:
            out = out + shared
        return out.reshape(b, s, h).to(x.dtype), logits


class Ernie4_5_MoeModel(Ernie4_5Model):
    config_class = Ernie4_5_MoeConfig
    keep_in_fp32 = ("gate.weight", "e_score_correction_bias")

    @staticmethod
    def make_mlp(config, layer_idx: int):
        if config.is_moe_layer(layer_idx):
            return Ernie4_5_MoeSparseMoeBlock(config)
        return MLP(config.hidden_size, config.intermediate_size, bias=config.use_bias)


class Ernie4_5_MoeForCausalLM(CausalLM):
    config_class = Ernie4_5_MoeConfig
    base_class = Ernie4_5_MoeModel
    keep_in_fp32 = Ernie4_5_MoeModel.keep_in_fp32

    def __init__(self, config: Ernie4_5_MoeConfig):
        self.lm_head_bias = config.use_bias
        super().__init__(config)

    @property
    def mtp(self) -> "ErnieMtp | None":
        """The multi-token-prediction head when the checkpoint has one (add_mtp / take_mtp), else None. A head
        loading left in the checkpoint (build_mtp, see from_pretrained) is built at the first use."""
        build = self.__dict__.pop("build_mtp", None)
        if build is not None:
            build(self)
        return ErnieMtp(self) if hasattr(self.model, "mtp_block") else None

    def add_mtp(self, layers: int = 1, bias: bool | None = None, device=None):
        """The MTP head's modules on `model`, under the hub's names (model.mtp_emb_norm.0, model.mtp_hidden_norm.0,
        model.mtp_linear_proj.0 [H, 2H], model.mtp_block.0: a decoder layer with a dense MLP), in this model's
        dtype and device (or `device`), weights to be loaded or initialised by the caller."""
        cfg, base = self.config, self.model
        h, bias = cfg.hidden_size, cfg.use_bias if bias is None else bias
        like = base.embed_tokens.weight
        device = like.device if device is None else device

        def norm():
            return RMSNorm(h, cfg.rms_norm_eps)

        def block():
            mlp = MLP(h, cfg.intermediate_size, bias=cfg.use_bias)
            return no_attention_dropout(DecoderLayer(cfg, 0, norm, mlp, "mlp", cfg.use_bias,
                                                     rotate_interleaved))  # its own cache

        with torch.device(device):
            base.mtp_emb_norm = nn.ModuleList(norm() for _ in range(layers))
            base.mtp_hidden_norm = nn.ModuleList(norm() for _ in range(layers))
            base.mtp_linear_proj = nn.ModuleList(nn.Linear(2 * h, h, bias=bias) for _ in range(layers))
            base.mtp_block = nn.ModuleList(block() for _ in range(layers))
        for name in ("mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block"):
            getattr(base, name).to(like.dtype)

    def mtp_in(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a checkpoint's model.mtp_* tensors (the ones loading keeps aside) make a whole MTP head (checked
        on the meta device: names and shapes). A config asking for MTP (num_nextn_predict_layers) without them, or
        an incomplete or misshapen set, is said once on stderr: then MTP is off and they are kept as they are."""
        found = self._mtp_tensors(tensors)
        if not found:
            wanted = int(getattr(self.config, "num_nextn_predict_layers", 0) or 0)
            if wanted:
                print(f"moelm: config.json has num_nextn_predict_layers={wanted} but the checkpoint has no MTP "
                      "tensors (model.mtp_*): the MTP head is off", file=sys.stderr)
            return False
        self._add_mtp_for(found, "meta")
        try:
            params = {n: p for n, p in self.model.named_parameters() if n.startswith("mtp_")}
        finally:
            for name in ("mtp_emb_norm", "mtp_hidden_norm", "mtp_linear_proj", "mtp_block"):
                delattr(self.model, name)
        missing, extra = sorted(params.keys() - found.keys()), sorted(found.keys() - params.keys())
        if missing or extra:
            print(f"moelm: the checkpoint's MTP tensors do not make a head (missing: {missing[:4]}, unexpected: "
                  f"{extra[:4]}): they are kept as they are and the MTP head is off", file=sys.stderr)
            return False
        wrong = [f"model.{n}: checkpoint {list(t.shape)} vs model {list(params[n].shape)}"
                 for n, t in found.items() if tuple(t.shape) != tuple(params[n].shape)]
        wrong += [f"model.{n} is {t.dtype}, not a float tensor" for n, t in found.items() if not t.is_floating_point()]
        if wrong:
            raise ValueError(f"MTP tensor {wrong[0]}")
        return True

    def take_mtp(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The MTP head built from a checkpoint's model.mtp_* tensors when they make one (mtp_in); returns the
        tensors still kept aside."""
        if not self.mtp_in(tensors):
            return tensors
        found = self._mtp_tensors(tensors)
        self._add_mtp_for(found)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in found.items():
                params[name].copy_(t)
        return {k: t for k, t in tensors.items() if not MTP_KEY.match(k)}

    def _mtp_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The MTP tensors under the model's names (mtp_...). A linear_proj stored [2H, H] (as the 300B-A47B-PT
        checkpoint is reported to) is transposed."""
        h, found = self.config.hidden_size, {}
        for key, t in tensors.items():
            if MTP_KEY.match(key):
                name = key.removeprefix("model.")
                if name.startswith("mtp_linear_proj.") and name.endswith(".weight") and tuple(t.shape) == (2 * h, h):
                    t = t.t()
                found[name] = t
        return found

    def _add_mtp_for(self, found: dict[str, torch.Tensor], device=None):
        layers = 1 + max(int(MTP_KEY.match("model." + n)[2]) for n in found)
        self.add_mtp(layers, any(n.startswith("mtp_linear_proj.") and n.endswith(".bias") for n in found), device)


class ErnieMtp:
    """ERNIE's multi-token prediction, as its training code computes it: the next token's embedding (zero at
    position 0, as vLLM and SGLang) and the main model's last hidden state, each RMS-normed, concatenated,
    projected (2H -> H), through one decoder layer with its own KV cache; then the shared final norm and LM head
    predict the token after the next. vLLM and SGLang feed the final-normed hidden state and skip the final norm on
    the way out; ERNIE's training code (PaddleFormers) feeds the last layer's output before the final norm and norms
    the MTP output, which is what is computed here."""

    def __init__(self, model: Ernie4_5_MoeForCausalLM):
        self.model = model

    def __call__(self, next_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, cache=None,
                 attention_mask: torch.Tensor | None = None, depth: int = 0,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        """next_ids [B, S] (the tokens at positions p + 1), hidden [B, S, H] (the last decoder layer's output at
        positions p, before the final norm), position_ids [B, S] (p); cache: the head's own (one layer);
        attention_mask [B, past + S] over the head's positions (or a 4-D boolean mask) -> logits [B, S, V] for the
        tokens at p + 2 (keep [K]: only those positions', [B, K, V])."""
        x = self.states(next_ids, hidden, position_ids, cache, attention_mask, depth)
        return self.logits(x if keep is None else x[:, keep])

    def states(self, next_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor, cache=None,
               attention_mask: torch.Tensor | None = None, depth: int = 0) -> torch.Tensor:
        """The head's layer output [B, S, H] before the final norm (arguments as __call__). Drafting more than one
        token, vLLM's MTP proposer feeds it back as the hidden state of the next position, with the drafted token."""
        base = self.model.model
        emb = base.embed_tokens(next_ids).masked_fill((position_ids == 0)[..., None], 0)
        x = torch.cat([base.mtp_emb_norm[depth](emb), base.mtp_hidden_norm[depth](hidden.to(emb.dtype))], dim=-1)
        x = base.mtp_linear_proj[depth](x)
        past = cache.get_seq_length() if cache is not None else 0
        mask = attention_mask_4d(boolean_mask(attention_mask), x.shape[0], x.shape[1], past, None, x.device)
        x, _, _ = base.mtp_block[depth](x, base.rotary(x, position_ids), mask, cache)
        return x

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """The shared final norm and LM head over the head's states [B, S, H] -> [B, S, V]."""
        return self.model.lm_head(self.model.model.norm(states))

    def sequence_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training: the head over a whole sequence, no cache. input_ids [B, L], hidden [B, L, H] (the last decoder
        layer's output before the final norm) -> logits [B, L - 1, V], row p for the token at p + 2 (its loss:
        causal_lm_loss(logits, labels[:, 1:]), ERNIE's multi-token-prediction loss of depth 1)."""
        mask = None if attention_mask is None else attention_mask[:, :-1]
        if mask is None:
            positions = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)[None].expand(
                input_ids.shape[0], -1)
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self(input_ids[:, 1:], hidden[:, :-1], positions, None, mask)


ModelClass = Ernie4_5_MoeForCausalLM  # the name NeMo AutoModel's model registry reads from a model file
