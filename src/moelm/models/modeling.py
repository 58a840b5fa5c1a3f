"""What every family shares: output dataclasses, the decoder stack, the causal-LM and classification heads,
and from_config / from_pretrained / save_pretrained."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import PretrainedConfig
from ..generation import GENERATION_CONFIG_NAME, GenerationConfig, GenerationMixin
from ..nn.layers import DynamicCache, attention_mask_4d
from ..nn.moe import Experts, load_balancing_loss


@dataclass
class ModelOutput:
    """Fields by attribute or by name; integer indexing and to_tuple skip None fields, like transformers."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


BaseModelOutputWithPast = MoeModelOutputWithPast


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


CausalLMOutputWithPast = MoeCausalLMOutputWithPast


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: DynamicCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def checkpointed(forward, kwargs: dict, offload: bool = False):
    """A decoder layer's forward(h, cos_sin, mask, cache, ...) run under torch.utils.checkpoint when its module
    trains with gradients on, without the cache (the recompute would write it twice), as transformers' checkpointed
    layers; the forward as is otherwise. Set as the layer's instance forward, so its module hooks run once."""
    layer = forward.__self__

    @functools.wraps(forward)
    def run(h, cos_sin, mask, cache=None, *args, **more):
        if not (layer.training and torch.is_grad_enabled()):
            return forward(h, cos_sin, mask, cache, *args, **more)
        if offload and h.device.type != "cpu":
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return checkpoint(forward, h, cos_sin, mask, None, *args, **more, **kwargs)
        return checkpoint(forward, h, cos_sin, mask, None, *args, **more, **kwargs)
    run.checkpointed = True
    return run


def is_checkpointed(layer: nn.Module) -> bool:
    """Whether activation_checkpointing_enable wrapped this layer's forward."""
    return getattr(layer.__dict__.get("forward"), "checkpointed", False)


class Unset:
    """A forward argument not given (as transformers 5 tells `f(x=None)` from `f()`): the config's value."""

    def __repr__(self):
        return "<the config's>"


UNSET = Unset()


def configured(config, **flags) -> tuple:
    """forward's output flags as transformers 5 takes them: one not given (UNSET) is the config's; None is off
    (return_dict None: the config's, on by default)."""
    def value(name, given):
        if given is UNSET or given is None and name == "return_dict":
            return getattr(config, name, name == "return_dict")
        return given
    return tuple(value(name, given) for name, given in flags.items())


def select_hidden(states: list, flag) -> tuple | None:
    """hidden_states as output_hidden_states asks: all (True), or, for an int or a list of them (indices as into the
    whole tuple, negative ones too, out-of-range ones ignored), a whole-length tuple with None at the others."""
    if not flag:
        return None
    if isinstance(flag, bool):
        return tuple(states)
    n = len(states)
    chosen = {i % n for i in ([flag] if isinstance(flag, int) else flag) if -n <= i < n}
    return tuple(h if i in chosen else None for i, h in enumerate(states))


class Router(nn.Module):
    """A router's weight [E, H]; called on hidden states [T, H], the router logits [T, E] (in fp32 with `fp32`, as
    ERNIE's, else in x's dtype), so that hooks on it see them; the routing itself is a function of the family."""

    def __init__(self, num_experts: int, hidden_size: int, dtype: torch.dtype | None = None, fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype))
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                return F.linear(x.float(), self.weight.float())
        return F.linear(x, self.weight)


class PreTrainedModel(nn.Module):
    config_class: type[PretrainedConfig] = PretrainedConfig
    base_model_prefix = "model"
    keep_in_fp32: tuple[str, ...] = ()  # parameter name suffixes kept in fp32 whatever the dtype

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.kept_aside: dict[str, torch.Tensor] = {}

    # --- properties ---
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for n, p in self.named_parameters() if not n.endswith(self.keep_in_fp32 or ("\0",))).dtype

    @property
    def base_model(self) -> nn.Module:
        """The decoder under a head (self for the base model itself), as transformers."""
        return getattr(self, self.base_model_prefix, self)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the parameters (and buffers), as transformers counts them."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    # --- activation checkpointing and input gradients, as transformers' (HF Trainer, TRL and peft call these) ---
    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False):
        """Each decoder layer (every every_n_layers-th) recomputed in the backward when training: its forward under
        torch.utils.checkpoint with activation_checkpointing_kwargs (default use_reentrant=False, RNG states kept, so
        PhiMoE's jitter draws the same numbers again), writing no KV cache; offload=True keeps what it saves in host
        memory (save_on_cpu). Input gradients are enabled, as transformers does (enable_input_require_grads)."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False} if activation_checkpointing_kwargs is None else \
            dict(activation_checkpointing_kwargs)
        for i, layer in enumerate(self.base_model.layers):
            layer.__dict__.pop("forward", None)
            if i % every_n_layers == 0:
                layer.forward = checkpointed(layer.forward, kwargs, offload)
        self.enable_input_require_grads()

    def activation_checkpointing_disable(self):
        for layer in self.base_model.layers:
            layer.__dict__.pop("forward", None)
        self.disable_input_require_grads()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(map(is_checkpointed, self.base_model.layers))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """transformers' older name of activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def enable_input_require_grads(self):
        """The input embedding's output requires grad (so that checkpointed layers and adapters on a frozen model
        pass gradients back), through a forward hook, as transformers."""
        self.disable_input_require_grads()
        self.input_grads_hook = self.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.requires_grad_(True))

    def disable_input_require_grads(self):
        hook = self.__dict__.pop("input_grads_hook", None)
        if hook is not None:
            hook.remove()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for n, p in self.named_parameters() if not (exclude_embeddings and "embed" in n)}
        return sum(p.numel() for p in params.values())

    def num_active_parameters(self) -> int:
        """The parameters one token runs through: num_parameters less the experts it is not routed to."""
        inactive = 0
        for module in self.modules():
            if isinstance(module, Experts):
                per_expert = sum(p.numel() for p in module.parameters()) // module.num_experts
                inactive += per_expert * (module.num_experts - self.config.num_experts_per_tok)
        return self.num_parameters() - inactive

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module):
        self.base_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head (None for a model without one), as transformers."""
        return getattr(self, "lm_head", None)

    def tie_weights(self):
        if getattr(self.config, "tie_word_embeddings", False) and isinstance(getattr(self, "lm_head", None),
                                                                              nn.Linear):
            self.lm_head.weight = self.get_input_embeddings().weight

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' resize_token_embeddings: the embedding and an untied LM head grown or cut at the end to
        new_num_tokens (rounded up to a multiple of pad_to_multiple_of); added rows drawn around the old rows'
        mean with 1e-9 times their covariance (mean_resizing), else normal(0, initializer_range); config.vocab_size
        follows. Returns the input embedding."""
        embed = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embed
        for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        new = embed.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            new = -(-new // pad_to_multiple_of) * pad_to_multiple_of
        head = self.get_output_embeddings()
        for part, module, kind in (("input embedding", embed, nn.Embedding), ("LM head", head, nn.Linear)):
            weight = getattr(module, "weight", None)
            if module is not None and (not isinstance(module, kind) or type(weight.data) is not torch.Tensor):
                what = type(module).__name__ + ("" if weight is None else f" with a {type(weight.data).__name__}")
                raise TypeError(f"resize_token_embeddings needs a plain {kind.__name__} as the {part}, not {what}: "
                                "resize before quantizing or parallelizing the model")
        embed.weight.data = resized_rows(embed.weight, new, mean_resizing, self.config.initializer_range)
        embed.num_embeddings = new
        if embed.padding_idx is not None and embed.padding_idx >= new:
            embed.padding_idx = None
        if head is not None and head.weight is not embed.weight:
            weight = resized_rows(head.weight, new, mean_resizing, self.config.initializer_range)
            bias = None if head.bias is None else resized_bias(head.bias, new, mean_resizing)
            resized = type(head)(head.in_features, new, bias=bias is not None, device="meta")
            resized.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
            if bias is not None:
                resized.bias = nn.Parameter(bias, requires_grad=head.bias.requires_grad)
            self.set_output_embeddings(resized)
        elif head is not None:
            head.out_features = new
        self.config.vocab_size = new
        self.tie_weights()
        return embed

    # --- construction ---
    @torch.no_grad()
    def init_weights(self, prefix: str = "", modules: set[str] | None = None):
        """normal(0, initializer_range) weights, zero biases, unit norms, as the reference; prefix: only the modules
        whose names start with it (a head added after the rest was initialised, e.g. "model.mtp_"); modules: only
        those named."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if not name.startswith(prefix) or modules is not None and name not in modules:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (Experts, Router)):
                for p in module.parameters():
                    p.normal_(0.0, std)
            elif isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        for name, p in self.named_parameters():
            owner = name.rpartition(".")[0]
            if name.startswith(prefix) and name.endswith("e_score_correction_bias") and \
                    (modules is None or owner in modules):
                p.zero_()
        self.tie_weights()

    def _cast(self, dtype: torch.dtype):
        for name, p in self.named_parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.float32 if name.endswith(self.keep_in_fp32 or ("\0",)) else dtype)
        return self

    @classmethod
    def from_config(cls, config: PretrainedConfig, *nemo, dtype=None, device=None, seed: int | None = None,
                    fast: bool = True, **options):
        """A randomly initialised model (normal(0, initializer_range) like the reference). fast=False leaves out
        the inference fast paths (moelm.inference.optimize); NeMo's backend / moe_config / moe_overrides: see
        moelm.loading.pretrained.from_config. Arguments after config by position are NeMo AutoModel's: (moe_config,
        backend) for a MoE family, (backend,) for dense ERNIE; the others are keywords, as in transformers."""
        from ..loading.pretrained import from_config

        names = ("moe_config", "backend") if getattr(config, "num_experts", None) else ("backend",)
        if len(nemo) > len(names):
            raise TypeError(f"{cls.__name__}.from_config takes config, {', '.join(names)} by position (NeMo "
                            f"AutoModel's order), got {len(nemo) + 1}: pass dtype=, device=, seed= by keyword")
        for name, value in zip(names, nemo):
            if name in options:
                raise TypeError(f"{cls.__name__}.from_config got {name} by position and by keyword")
            options[name] = value
        return from_config(cls, config, dtype=dtype, device=device, seed=seed, fast=fast, **options)

    @classmethod
    def get_capabilities(cls, config: PretrainedConfig | None = None):
        """NeMo's ModelCapabilities for a config (this class's default config if none): see moelm.loading.backend."""
        from ..loading.backend import get_capabilities

        return get_capabilities(config if config is not None else cls.config_class())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype="auto", device=None, progress: bool | None = None,
                        config: PretrainedConfig | None = None, attn_implementation: str | None = None,
                        torch_dtype=None, quantization=None, quantization_config=None, fast: bool = True,
                        **config_overrides):
        """Load a hub-format checkpoint directory (or a hub id in the local cache): see moelm.loading."""
        from ..loading.pretrained import from_pretrained

        return from_pretrained(cls, path, dtype=dtype, device=device, progress=progress, config=config,
                               attn_implementation=attn_implementation, torch_dtype=torch_dtype,
                               quantization=quantization, quantization_config=quantization_config, fast=fast,
                               **config_overrides)

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size="5GB", safe_serialization: bool = True):
        """Write config.json (and generation_config.json) and hub-layout safetensors (per-expert keys), atomically.
        int8 / int4 weights are written in the compressed-tensors format (moelm.loading.compressed)."""
        from ..loading.checkpoint import save_checkpoint

        if not safe_serialization:
            raise ValueError("moelm only writes safetensors (safe_serialization=True)")
        return save_checkpoint(self, Path(directory), max_shard_size=max_shard_size, extra_files=self.saved_files())

    def saved_files(self) -> dict[str, str]:
        """config.json (int8 / int4 weights: with their compressed-tensors quantization_config) and
        generation_config.json, as save_pretrained writes them (a model on the meta device will do)."""
        quantization = getattr(self, "quantization", None)
        if quantization is not None and quantization.backend != "moelm":
            raise ValueError(f"this model has {quantization.backend} {quantization.mode} weights, which moelm does "
                             "not save; save the original checkpoint instead (load it without quantization)")
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        config = self.config.to_dict()
        if quantization is not None:  # compressed-tensors, as transformers and vLLM read it
            from ..loading.checkpoint import EXPERT_PARTS
            from ..loading.compressed import quantization_config

            config["quantization_config"] = quantization_config(self, EXPERT_PARTS.get(self.config.model_type, {}))
            if getattr(self, "quantized_tied_head", False):  # the head is its own quantized copy of the embedding
                config["tie_word_embeddings"] = False
        files = {"config.json": json.dumps(config, indent=2, sort_keys=True) + "\n"}
        if isinstance(self, GenerationMixin):
            files[GENERATION_CONFIG_NAME] = self.generation_config.to_json_string()
        return files


class DecoderModel(PreTrainedModel):
    """Embeddings, decoder layers, final norm. Families give the layers, the norm and the rotary cos/sin."""

    sliding_window: int | None = None

    def __init__(self, config, make_layer, make_norm):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        pad = config.pad_token_id  # a negative one counts from the end, as nn.Embedding's padding_idx
        pad = pad if pad is not None and -config.vocab_size <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, pad,  # init_weights initialises it
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm()

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def rotation_changes(self, length: int, longer: int) -> bool:
        """Whether a position is rotated otherwise in a forward whose largest position is longer - 1 than in one
        whose largest is length - 1 (a speculative check runs several positions in one forward). No by default."""
        return False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache_position=None, output_attentions=UNSET,
                output_hidden_states=UNSET, output_router_logits=UNSET, keep=None, return_dict=None,
                **kwargs) -> MoeModelOutputWithPast:
        """keep (a slice or indices of the sequence): the positions whose last hidden state is wanted; the last
        layer's MLP / MoE block runs on those only and last_hidden_state has those only. Output flags not given
        are the config's (configured); output_hidden_states may select indices (select_hidden). Other keywords: see
        check_inputs."""
        check_inputs(kwargs, attention_mask, input_ids, inputs_embeds, type(self))
        output_attentions, output_hidden_states, output_router_logits, return_dict = configured(
            self.config, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits, return_dict=return_dict)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and torch.is_grad_enabled() and \
                any(map(is_checkpointed, self.layers)):
            if past_key_values is not None:  # checkpointed layers write no cache (see checkpointed)
                raise ValueError("past_key_values cannot be used with activation checkpointing while training")
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        batch, seq = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + seq, device=inputs_embeds.device)
        elif not torch.equal(cache_position.reshape(-1).cpu(), torch.arange(past, past + seq)):
            raise ValueError(f"cache_position must be {past}..{past + seq - 1} (the cache holds {past} positions, "
                             f"{seq} come now; transformers 5 does not read it), got {cache_position.tolist()}")
        packed = position_ids is not None and attention_mask is None and past_key_values is None
        if position_ids is None:
            position_ids = cache_position[None]
        mask = packed_mask(position_ids, batch, self.sliding_window) if packed else None
        if mask is None:
            mask = attention_mask_4d(boolean_mask(attention_mask), batch, seq, past,
                                     self.sliding_window, inputs_embeds.device)
        cos_sin = self.rotary(inputs_embeds, position_ids)
        h, hidden_states, attentions, router_logits = self.run_layers(inputs_embeds, cos_sin, mask, past_key_values,
                                                                      output_attentions, output_hidden_states, keep)
        h = self.norm(h)
        if output_hidden_states:
            hidden_states.append(h)
        result = MoeModelOutputWithPast(
            last_hidden_state=h, past_key_values=past_key_values if use_cache else None,
            hidden_states=select_hidden(hidden_states, output_hidden_states),
            attentions=tuple(attentions) if output_attentions else None,
            router_logits=tuple(router_logits) if output_router_logits and router_logits else None)
        return result if return_dict else result.to_tuple()

    def run_layers(self, h, cos_sin, mask, cache, output_attentions=False, output_hidden_states=False, keep=None):
        """The decoder layers in order over h [B, S, H] -> (h, each layer's input if output_hidden_states, attention
        weights, router logits of the MoE layers)."""
        hidden_states, attentions, router_logits = [], [], []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(h)
            if keep is not None and i == last:
                h, weights, logits = layer(h, cos_sin, mask, cache, output_attentions, keep=keep)
            else:
                h, weights, logits = layer(h, cos_sin, mask, cache, output_attentions)
            attentions.append(weights)
            if logits is not None:
                router_logits.append(logits)
        return h, hidden_states, attentions, router_logits


class CausalLM(PreTrainedModel, GenerationMixin):
    """A DecoderModel under `model` plus `lm_head`; loss, aux loss and logits_to_keep like the reference;
    `generate` (moelm.generation) with `generation_config`."""

    base_class: type[DecoderModel]
    lm_head_bias = False
    loss_type = "ForCausalLM"  # transformers' name of the loss (HF Trainer counts shifted labels for it)

    def __init__(self, config):
        super().__init__(config)
        self.model = self.base_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=self.lm_head_bias)
        self.tie_weights()
        self.generation_config = GenerationConfig.from_model_config(config)

    def set_output_embeddings(self, new_embeddings: nn.Module):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, output_attentions=UNSET,
                output_hidden_states=UNSET, output_router_logits=None, logits_to_keep=0, return_dict=None,
                num_items_in_batch=None, shift_labels=None, **kwargs):
        check_inputs(kwargs, attention_mask, input_ids, inputs_embeds, type(self))
        if shift_labels is not None and labels is None:
            raise ValueError(f"{type(self).__name__}.forward(): shift_labels (labels already shifted, as "
                             "transformers' loss takes them) go with labels; pass labels too")
        moe = hasattr(self.config, "router_aux_loss_coef")
        output_attentions, output_hidden_states, output_router_logits, return_dict = configured(
            self.config, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=UNSET if output_router_logits is None else output_router_logits,
            return_dict=return_dict)
        seq = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        keep = logits_kept(logits_to_keep, seq)
        # the last layer's feed-forward for the kept positions only, unless every position's output is asked for
        trim = keep is not None and not output_hidden_states and not (moe and output_router_logits)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cache_position=cache_position, output_attentions=output_attentions,
                         output_hidden_states=output_hidden_states,
                         output_router_logits=moe and output_router_logits, keep=keep if trim else None,
                         return_dict=True)
        h = out.last_hidden_state
        if keep is not None and not trim:
            h = h[:, keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels=shift_labels)
        aux_loss = None
        if moe and output_router_logits:
            aux_loss = load_balancing_loss(out.router_logits, self.config.num_experts,
                                           self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        result = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits)
        return result if return_dict else result.to_tuple()


def boolean_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 4D float attention_mask is additive, as transformers adds it to the scores: 0 where a query attends, a large
    negative value (-inf, the dtype's min, -1e4) where it does not; moelm takes it as the boolean mask it stands for.
    Any other value is a ValueError (a float mask of ones and zeros, or a bias)."""
    if attention_mask is None or attention_mask.dim() != 4 or not attention_mask.is_floating_point():
        return attention_mask
    attend = attention_mask == 0
    if not bool((attend | (attention_mask <= -1e4)).all()):
        raise ValueError("a 4D float attention_mask is additive, as transformers takes it: 0 where a query attends "
                         "and -inf (or the dtype's min) where it does not; pass a boolean mask (True = attend) "
                         "otherwise")
    return attend


def packed_mask(position_ids: torch.Tensor, batch: int, sliding_window: int | None) -> torch.Tensor | None:
    """With no attention_mask and no cache, transformers reads packed sequences from position_ids: a position that
    is not the one before plus 1 starts a new sequence, attended to on its own (causal, windowed). None when no row
    has more than one sequence (plain causal)."""
    positions = position_ids.expand(batch, -1)
    starts = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1
    sequence = starts.cumsum(-1)  # [B, S]
    if not bool(sequence[:, -1].any()):
        return None
    q_idx = torch.arange(positions.shape[1], device=positions.device)[:, None]
    kv_idx = q_idx.T
    mask = kv_idx <= q_idx
    if sliding_window is not None:
        mask = mask & (kv_idx > q_idx - sliding_window)
    return (mask & (sequence[:, :, None] == sequence[:, None, :]))[:, None]


def check_inputs(kwargs: dict, attention_mask, input_ids, inputs_embeds, cls: type):
    """Exactly one of input_ids and inputs_embeds; forward's keywords beyond its named arguments: NeMo AutoModel's
    attn_kwargs when empty, and its padding_mask (bool [B, S], True at padding) when it says what attention_mask says
    (moelm takes the padding, for attention and the MoE aux loss alike, from attention_mask). Anything else is a
    TypeError naming it."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    inputs = input_ids if input_ids is not None else inputs_embeds
    where = f"{cls.__name__}.forward()"
    unknown = sorted(set(kwargs) - {"padding_mask", "attn_kwargs"})
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if kwargs.get("attn_kwargs"):
        raise TypeError(f"{where} does not take NeMo's attn_kwargs (got {sorted(kwargs['attn_kwargs'])}): moelm's "
                        "attention takes attention_mask and position_ids only")
    padding = kwargs.get("padding_mask")
    if padding is None:
        return
    seq = inputs.shape[:2]
    if attention_mask is not None and attention_mask.dim() != 2:
        raise TypeError(f"{where}: padding_mask goes with a 2D attention_mask only; pass attention_mask alone")
    want = torch.zeros(seq, dtype=torch.bool, device=padding.device) if attention_mask is None else \
        attention_mask[:, -seq[1]:].to(padding.device) == 0
    if tuple(padding.shape) != tuple(seq) or not torch.equal(padding.bool(), want):
        raise TypeError(f"{where} takes the padding from attention_mask (1 at tokens, 0 at padding), for attention "
                        "and the MoE aux loss alike; NeMo's padding_mask is accepted only where it is "
                        "~attention_mask: pass attention_mask=~padding_mask instead")


def resized_rows(weight: torch.Tensor, rows: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """weight [V, D] cut or grown to [rows, D]: added rows from N(mean, 1e-9 cov) of the old rows (their mean where
    that covariance is not positive definite), or N(0, std), as transformers resizes."""
    old = weight.shape[0]
    if rows <= old:
        return weight.data[:rows].clone()
    added = rows - old
    if mean_resizing:
        w = weight.data.float()
        mean = w.mean(0)
        cov = 1e-9 * (w - mean).T @ (w - mean) / old
        if torch.distributions.constraints.positive_definite.check(cov).all():
            extra = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((added,))
        else:
            extra = mean.expand(added, -1)
    else:
        extra = torch.empty(added, weight.shape[1]).normal_(0.0, std)
    return torch.cat([weight.data, extra.to(weight.device, weight.dtype)])


def resized_bias(bias: torch.Tensor, rows: int, mean_resizing: bool) -> torch.Tensor:
    """An LM head's bias [V] cut or grown to [rows]: added entries near the old mean (mean_resizing) or 0."""
    if rows <= bias.shape[0]:
        return bias.data[:rows].clone()
    extra = torch.zeros(rows - bias.shape[0])
    if mean_resizing:
        b = bias.data.float()
        extra.normal_(b.mean().item(), 1e-9 * b.std().item())
    return torch.cat([bias.data, extra.to(bias.device, bias.dtype)])


def moe_blocks(model) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, MoE block) of a causal LM's MoE layers: the blocks that route (they have `routed`,
    the routing their forward does, from router logits)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, layer.mlp_name, None)
        if hasattr(block, "routed"):
            out.append((i, block))
    return out


def logits_kept(logits_to_keep, seq: int):
    """logits_to_keep as transformers reads it (an int k > 0: the last k positions; 0: all; a 1-D tensor: those
    indices) -> an index of the sequence, or None for all of it in order."""
    if isinstance(logits_to_keep, int):
        return slice(-logits_to_keep, None) if logits_to_keep and logits_to_keep < seq else None
    if logits_to_keep.numel() == seq and torch.equal(logits_to_keep.cpu(), torch.arange(seq)):
        return None
    return logits_to_keep


def causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; labels are shifted here (shift_labels: already shifted, taken as
    they are, as transformers' loss), -100 ignored."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    labels = shift_labels.reshape(-1).to(logits.device)
    logits = logits.float().reshape(-1, logits.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


class SequenceClassification(PreTrainedModel):
    """A DecoderModel under `model` plus `score`; pools the last non-pad token of each row."""

    base_class: type[DecoderModel]
    new_heads = ("score.",)
    accepts_loss_kwargs = False  # transformers' Trainer: no num_items_in_batch (the loss is a mean over rows)
    loss_type = "ForSequenceClassification"

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_class(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=UNSET,
                output_hidden_states=UNSET, return_dict=None, **kwargs):
        check_inputs(kwargs, attention_mask, input_ids, inputs_embeds, type(self))
        output_attentions, output_hidden_states, return_dict = configured(
            self.config, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=False, return_dict=True)
        logits = self.score(out.last_hidden_state)  # [B, S, L]
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, device=logits.device)
        else:
            idx = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (idx * (input_ids != pad).to(logits.device, torch.int32)).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]  # [B, L]
        loss = None if labels is None else classification_loss(pooled, labels, self.config)
        result = SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                                  hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else result.to_tuple()


def classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    n = config.num_labels
    kind = config.problem_type
    if kind is None:
        integer = labels.dtype in (torch.long, torch.int)
        kind = "regression" if n == 1 else ("single_label_classification" if integer
                                            else "multi_label_classification")
        config.problem_type = kind
    labels = labels.to(pooled.device)
    if kind == "regression":
        return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
    if kind == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, n), labels.view(-1), ignore_index=-100)
    if kind == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled, labels)
    raise ValueError(f"invalid problem_type {kind!r}")
