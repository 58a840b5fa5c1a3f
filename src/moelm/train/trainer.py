"""The finetune loop: a recipe's model, data and optimizer; gradient accumulation with the loss normalised by the
global label-token count; the aux loss; ERNIE's aux-free balancing; clipping; validation; progress, JSONL metrics
(with NeMo's MoE load-balance metrics) and atomic checkpoints with exact resume (state.py)."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..io.files import make_dir
from ..models.modeling import causal_lm_loss, moe_blocks
from . import state
from .balance import RoutedLoad, balance_metrics, update_correction_bias
from .data import batch_length, collate, load_examples
from .distributed import all_sum, clip_grad_norm, layout_for, reduce_replicated, shard, split_experts
from .evaluate import load_choices, multiple_choice, perplexity
from .recipe import Recipe, RecipeError


def lr_lambda(section, max_steps: int):
    """The multiplier of the lr at a step, as transformers' schedules: linear warmup from 0, then constant, linear
    (to 0) or cosine decay (to min_lr, as get_cosine_with_min_lr_schedule_with_warmup)."""
    warmup = section.warmup_steps

    def factor(step: int, lr: float) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if section.decay == "constant":
            return 1.0
        if section.decay == "linear":
            return max(0.0, (max_steps - step) / max(1, max_steps - warmup))
        progress = (step - warmup) / max(1, max_steps - warmup)
        floor = section.min_lr / lr if lr else 0.0
        return floor + (1.0 - floor) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


class Trainer:
    """recipe -> train() -> the history of logged steps. A model and tokenizer may be given (tests, scripts);
    otherwise they come from recipe.model."""

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, resume: str | None = None,
                 progress: bool | None = None):
        self.recipe = recipe
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if progress is None:  # a bar on a terminal, a line per logged step otherwise; False: quiet
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.progress = ("bar" if progress is True else progress) if progress and self.rank == 0 else None
        self.out = Path(recipe.checkpoint.dir)
        self.history: list[dict] = []
        torch.manual_seed(recipe.seed)
        self.resume_dir = state.find(self.out, resume) if resume else None
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.model)
        self.examples = load_examples(recipe.dataset, self.tokenizer)
        val = recipe.validation_dataset
        self.val_examples = load_examples(val, self.tokenizer) if val is not None else None
        self.val_choices = load_choices(val.path, self.tokenizer, val.num_samples_limit) \
            if val is not None and val.kind == "hellaswag" else None
        self._order: tuple[int, list[int]] | None = None  # (epoch, its example order)
        self.model = model if model is not None else load_model(recipe.model, self.resume_dir)
        if model is not None and self.resume_dir is not None and recipe.peft is None:
            from ..io.weights import SafetensorsCheckpoint
            from ..loading.checkpoint import load_checkpoint

            with SafetensorsCheckpoint(self.resume_dir) as ckpt:
                load_checkpoint(model, ckpt, progress=False)
        cfg = self.model.config
        self.num_experts = getattr(cfg, "num_experts", None)
        self.layout = layout_for(recipe.distributed, self.world, self.rank, cfg, recipe.source)
        self.check_sizes()
        if recipe.model.quantization and self.layout.distributed:
            raise NotImplementedError(f"{recipe.source}: model.quantization ({recipe.model.quantization}, QLoRA) runs "
                                      "in one process; FSDP2/EP shard float weights (drop the quantization under "
                                      "torchrun)")
        # ERNIE's MTP head (loading leaves it in the checkpoint until its first use): built now, before adapters and
        # the optimizer take the parameters, unless its loss is off (then it is saved as loaded)
        self.mtp = getattr(self.model, "mtp", None) if recipe.moe.mtp_loss_coef != 0 else None
        self.model.train()
        if self.layout.distributed:
            split_experts(self.model, self.layout)
        self.lora = None
        if recipe.peft is not None:  # the aux-free balancing's biases change: the adapter carries them (peft's way)
            statics = recipe.moe.gate_bias_update_factor and any(hasattr(b, "moe_statics")
                                                                 for _, b in moe_blocks(self.model))
            self.lora = state.attach_lora(self.model, recipe.peft, self.resume_dir,
                                          ["moe_statics"] if statics else None)
        if recipe.distributed.activation_checkpointing:  # RNG states kept: PhiMoE's jitter draws the same again
            self.model.activation_checkpointing_enable()
        if self.layout.distributed:
            shard(self.model, self.layout)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        opt = recipe.optimizer
        make = torch.optim.AdamW if opt.name == "AdamW" else torch.optim.Adam
        self.optimizer = make(param_groups(self.params), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                              weight_decay=opt.weight_decay, **({"fused": True} if opt.fused else {"foreach": False}))
        factor = lr_lambda(recipe.lr_scheduler, self.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: factor(s, opt.lr))
        blocks = moe_blocks(self.model)  # [(decoder layer index, MoE block)]
        self.biases = [b.moe_statics.e_score_correction_bias for _, b in blocks if hasattr(b, "moe_statics")]
        if recipe.moe.gate_bias_update_factor and not self.biases:
            raise RecipeError(f"{recipe.source}: moe.gate_bias_update_factor is ERNIE MoE's aux-free balancing; "
                              f"{cfg.model_type} has no e_score_correction_bias")
        self.moe_layers = [i for i, _ in blocks]
        self.balance = recipe.moe_metrics.enabled and bool(blocks)
        self.loads = RoutedLoad([b for _, b in blocks], self.num_experts, self.model.device) \
            if self.balance or (self.biases and recipe.moe.gate_bias_update_factor) else None
        coef = recipe.moe.aux_loss_coef
        self.aux_coef = getattr(cfg, "router_aux_loss_coef", 0.0) if coef is None else coef
        if self.aux_coef and self.num_experts is None:
            raise RecipeError(f"{recipe.source}: moe.aux_loss_coef is set but {cfg.model_type} has no experts")
        coef = recipe.moe.mtp_loss_coef
        self.mtp_coef = (getattr(cfg, "multi_token_pred_lambda", None) or 0.3 if coef is None else coef) \
            if self.mtp is not None else 0.0
        if coef and self.mtp is None:
            raise RecipeError(f"{recipe.source}: moe.mtp_loss_coef is set but the model has no MTP head "
                              "(ERNIE 4.5 MoE checkpoints with model.mtp_* tensors)")
        if self.mtp_coef and self.layout.distributed:
            raise RecipeError(f"{recipe.source}: training the MTP head across processes is not implemented; set "
                              "moe.mtp_loss_coef: 0 (the head is then saved as loaded)")
        self.step = 0
        if self.resume_dir is not None:
            self.step = state.load(self, self.resume_dir)
            if self.step > self.max_steps:
                raise RecipeError(f"{recipe.source}: --resume from {self.resume_dir} (step {self.step}) is past the "
                                  f"run's last step ({self.max_steps}: step.max_steps, step.num_epochs)")
            if self.rank == 0:  # the records after the checkpoint are logged again
                state.truncate_metrics(self.out / "metrics.jsonl", self.step)
        elif self.rank == 0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()  # a fresh run's log; a resumed run appends to its own

    # --- sizes ---
    def check_sizes(self):
        step, dp = self.recipe.step, self.layout.fsdp
        if step.global_batch_size % (step.local_batch_size * dp):
            raise RecipeError(f"{self.recipe.source}: step.global_batch_size ({step.global_batch_size}) must be a "
                              f"multiple of step.local_batch_size * data-parallel ranks ({step.local_batch_size} * "
                              f"{dp})")
        self.accumulation = step.global_batch_size // (step.local_batch_size * dp)
        self.steps_per_epoch = len(self.examples) // step.global_batch_size
        if self.steps_per_epoch == 0:
            raise RecipeError(f"{self.recipe.source}: dataset {self.recipe.dataset.path} has {len(self.examples)} "
                              f"examples, fewer than one global batch ({step.global_batch_size})")
        self.max_steps = step.max_steps
        if step.num_epochs is not None:
            self.max_steps = min(self.max_steps, step.num_epochs * self.steps_per_epoch)

    def global_batch(self, step: int) -> list:
        """The examples of optimizer step `step` (0-based): the epoch's order (seeded) in global batches."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        n, size = len(self.examples), self.recipe.step.global_batch_size
        if self._order is None or self._order[0] != epoch:  # drawn once an epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.recipe.seed + epoch)).tolist() \
                if self.recipe.step.shuffle else list(range(n))
            self._order = (epoch, order)
        return [self.examples[i] for i in self._order[1][offset * size:(offset + 1) * size]]

    def micro_batches(self, examples: list) -> list[dict]:
        """This rank's micro-batches: rank r takes micro-batches r*accumulation ... of the global batch, each padded
        as the dataset's `padding` says (to its own longest, or to seq_length)."""
        local, first = self.recipe.step.local_batch_size, self.rank * self.accumulation
        parts = [examples[(first + i) * local:(first + i + 1) * local] for i in range(self.accumulation)]
        pad = pad_id(self.tokenizer)
        return [collate(part, pad, batch_length(self.recipe.dataset, part)) for part in parts]

    # --- the loop ---
    def autocast(self):
        if self.recipe.model.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=getattr(torch, self.recipe.model.autocast))

    def train_step(self) -> dict:
        examples = self.global_batch(self.step)
        targets = sum(sum(1 for t in ex.labels[1:] if t != -100) for ex in examples)  # shifted labels
        tokens = sum(len(ex.input_ids) for ex in examples)
        moe = self.num_experts is not None
        bias_update = bool(self.biases and self.recipe.moe.gate_bias_update_factor)
        count = self.loads is not None and (bias_update or self.balance and self.logs(self.step + 1))
        micro_total = self.accumulation * self.layout.fsdp
        mtp_targets = sum(sum(1 for t in ex.labels[2:] if t != -100) for ex in examples)
        ce_sum = aux_sum = mtp_sum = 0.0
        first = self.rank * self.accumulation  # this rank's first micro-batch in the global batch
        for i, batch in enumerate(self.micro_batches(examples)):
            # the random numbers of a micro-batch (PhiMoE's routing, LoRA dropout) from the seed, the step and its
            # place in the global batch, whichever rank runs it: a sharded run draws what one process draws
            torch.manual_seed(hash((self.recipe.seed, self.step, first + i)) % 2 ** 63)
            with self.autocast(), self.last_hidden() as hidden:
                with self.loads.recording(batch["attention_mask"]) if count else contextlib.nullcontext():
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False, output_router_logits=moe)
                ce = causal_lm_loss(out.logits, batch["labels"], num_items_in_batch=1)  # a sum over tokens
                loss = ce / targets
                if moe and self.aux_coef:
                    loss = loss + self.aux_coef * out.aux_loss / micro_total
                if self.mtp_coef:  # ERNIE's: the main loss + coef * the MTP head's (the token after the next)
                    logits = self.mtp.sequence_logits(batch["input_ids"], hidden[-1], batch["attention_mask"])
                    mtp = causal_lm_loss(logits, batch["labels"][:, 1:], num_items_in_batch=1)
                    loss = loss + self.mtp_coef * mtp / max(mtp_targets, 1)
                    mtp_sum += float(mtp.detach())
            loss.backward()
            ce_sum += float(ce.detach())
            aux_sum += float(out.aux_loss.detach()) if moe else 0.0
        reduce_replicated(self.layout)
        norm = clip_grad_norm(self.params, self.recipe.optimizer.max_grad_norm, self.layout)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = self.loads.reduce() if count else None  # every rank's tokens (a collective)
        if bias_update:
            update_correction_bias(self.biases, loads, self.recipe.moe.gate_bias_update_factor)
        ce_sum, aux_sum, mtp_sum = all_sum([ce_sum, aux_sum, mtp_sum], self.layout)
        self.step += 1
        record = {"step": self.step, "loss": ce_sum / targets, "lr": lr, "grad_norm": norm, "tokens": tokens}
        if moe:
            record["aux_loss"] = aux_sum / micro_total
        if self.mtp_coef:
            record["mtp_loss"] = mtp_sum / max(mtp_targets, 1)
        if self.balance and self.logs(self.step):
            record.update(self.balance_record(loads))
        if count:
            self.loads.clear()
        return record

    def logs(self, step: int) -> bool:
        """Whether step `step` (1-based) is a logged one."""
        return step % self.recipe.step.log_every_steps == 0 or step == self.max_steps

    def balance_record(self, loads: list[torch.Tensor]) -> dict[str, float]:
        """NeMo's brief (or detailed) load-balance metrics of the step's loads, layers named by decoder index."""
        section = self.recipe.moe_metrics
        every = section.detailed_every_steps
        detailed = section.mode == "detailed" and (every is None or self.step % every == 0)
        return balance_metrics([load.cpu() for load in loads], detailed=detailed, top_k=section.top_k_experts,
                               layers=self.moe_layers)

    @contextlib.contextmanager
    def last_hidden(self):
        """The last decoder layer's output (the final norm's input) of the forwards inside, when the MTP head
        trains (a list the forward appends to), else nothing is hooked."""
        seen: list = []
        if not self.mtp_coef:
            yield seen
            return
        hook = self.model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            yield seen
        finally:
            hook.remove()

    def train(self) -> list[dict]:
        start, done_tokens = time.perf_counter(), 0
        first_step, saved = self.step, None
        every = self.recipe.checkpoint.every_steps
        val_every = self.recipe.step.val_every_steps
        while self.step < self.max_steps:
            record = self.train_step()
            done_tokens += record["tokens"]
            elapsed = time.perf_counter() - start
            record["tokens_per_s"] = done_tokens / elapsed
            record["elapsed_s"] = elapsed
            if val_every and self.val_examples is not None and self.step % val_every == 0 \
                    and self.step < self.max_steps:
                record.update(self.validate())
            self.history.append(record)
            if self.logs(self.step):
                self.log(record, (self.max_steps - self.step) * elapsed / (self.step - first_step))
            if every and (self.step % every == 0 or self.step == self.max_steps):  # the last step too: resumable
                saved = state.save(self, self.step)  # the loop ends on a saved step
        if self.val_examples is not None:
            final = {"step": self.step, **self.validate()}
            self.history.append(final)
            self.log(final, 0.0)
        if self.progress == "bar":
            print(file=sys.stderr)
        state.save_final(self, saved)  # final/ from the last step's checkpoint when there is one
        if self.loads is not None:
            self.loads.remove()
        return self.history

    def validate(self) -> dict:
        local = self.recipe.step.local_batch_size
        with self.autocast():
            result = perplexity(self.model, self.val_examples, batch_size=local, pad_id=pad_id(self.tokenizer),
                                mtp=bool(self.mtp_coef))
            out = {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}
            if "mtp_loss" in result:  # the MTP head's, when it trains
                out["val_mtp_loss"] = result["mtp_loss"]
            if self.val_choices is not None:
                out["val_accuracy"] = multiple_choice(self.model, self.val_choices, batch_size=local)["accuracy_norm"]
        return out

    def log(self, record: dict, eta_s: float):
        if self.rank != 0:
            return
        make_dir(self.out)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.progress:
            return
        done = self.step / self.max_steps
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        text = f"\r[{bar}] {self.step}/{self.max_steps}"
        if "loss" in record:
            mtp = f" mtp {record['mtp_loss']:.4f}" if "mtp_loss" in record else ""
            text += (f" loss {record['loss']:.4f}{mtp} lr {record['lr']:.2e} "
                     f"{record['tokens_per_s']:.0f} tok/s ETA {eta_s // 60:.0f}m{eta_s % 60:02.0f}s")
        if "val_loss" in record:
            text += f" val {record['val_loss']:.4f}"
        if "val_mtp_loss" in record:
            text += f" val mtp {record['val_mtp_loss']:.4f}"
        if self.progress == "lines":
            text = text.lstrip("\r")
        print(text, end="" if self.progress == "bar" else "\n", file=sys.stderr, flush=True)


def param_groups(params: list) -> list[dict]:
    """One group per kind of tensor: plain, and DTensors per mesh (a fused optimizer step takes one kind a call)."""
    groups: dict = {}
    for p in params:
        groups.setdefault(id(getattr(p, "device_mesh", None)), []).append(p)
    return [{"params": group} for group in groups.values()]


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return value


def load_tokenizer(section):
    from ..text.tokenizer import AutoTokenizer

    where = section.tokenizer or section.name_or_path
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise RecipeError(f"model.tokenizer: no tokenizer at {where!r} ({str(e).splitlines()[0]}); a named config "
                          "needs model.tokenizer") from None


def load_model(section, resume_dir: Path | None = None):
    """The recipe's model in its dtype, without the inference fast paths; a full fine-tune resumes from the
    checkpoint's weights."""
    from ..config import NAMED_CONFIGS, named_config
    from ..models.auto import AutoModelForCausalLM

    dtype = getattr(torch, section.dtype)
    path = section.name_or_path
    if resume_dir is not None and (resume_dir / "config.json").is_file():
        path = str(resume_dir)
    if path in NAMED_CONFIGS and not Path(path).exists():
        base = named_config(path)
        for key in section.config_overrides:  # fields, aliases, properties, optional hub keys (ERNIE's MTP)
            if not (hasattr(base, key) or base.has_field(key)):
                raise RecipeError(f"model.config_overrides: {base.model_type} has no config key {key!r}")
        cls, kwargs = NAMED_CONFIGS[path]  # built with the overrides, so derived keys follow them
        config = cls(**{**copy.deepcopy(kwargs), **section.config_overrides})
        return AutoModelForCausalLM.from_config(config, dtype=dtype, fast=False)
    if section.config_overrides:
        raise RecipeError("model.config_overrides apply to a named config, not to a checkpoint "
                          f"({section.name_or_path})")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, fast=False, quantization=section.quantization)
