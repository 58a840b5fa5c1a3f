"""Training checkpoints: every N steps and at the last step a directory step_N (written as .tmp-step_N, then
renamed, so an interrupted save leaves the previous one intact) holding the model as a hub checkpoint (or the LoRA
adapter in PEFT's format), the tokenizer, trainer_state.json (step, scheduler, layout) and per rank its optimizer
shard and RNG state; the last `keep_last` are kept. `resume` reads the newest (or a given one) back, so the run
continues exactly (a finished one too, with a larger max_steps), and cuts metrics.jsonl back to its step."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..io.files import atomic_write_text, locked, make_dir, swap_dirs, temp_folder, writing

STEP_DIR = re.compile(r"^step_(\d+)$")
LEFT = re.compile(r"^\.tmp-(step_\d+|final)(-old)?$")


def barrier(trainer):
    if trainer.layout.distributed:
        dist.barrier()


@contextlib.contextmanager
def atomic_dir(trainer, target: Path):
    """Every rank writes into a temporary sibling of `target`; rank 0 swaps it into place at the end (and first
    sweeps those a killed save left)."""
    tmp = target.parent / f".tmp-{target.name}"
    if trainer.rank == 0:
        for left in target.parent.glob(".tmp-*"):  # by a killed save
            if LEFT.match(left.name):
                shutil.rmtree(left, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(trainer)
    with writing(target):  # a full disk is said of target, not of tmp
        try:
            yield tmp
        except BaseException:
            if trainer.rank == 0:  # the space it took goes back at once
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        barrier(trainer)
        if trainer.rank == 0:
            swap_dirs(tmp, target)
    barrier(trainer)


def steps(out: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := STEP_DIR.match(p.name))] if out.is_dir() else []
    return sorted(found)


def find(out: Path, resume: str) -> Path:
    """`resume`: "auto"/"latest" (the newest step_N under the checkpoint directory) or a step directory."""
    if resume in ("auto", "latest"):
        found = steps(out)
        if not found:
            raise FileNotFoundError(f"--resume: no step_N checkpoint under {out} (a run writes them when "
                                    "checkpoint.every_steps > 0)")
        return found[-1][1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume: {path} is not a training checkpoint (no trainer_state.json)")
    return path


def write_model(trainer, directory: Path):
    """The model (full fine-tune) or the adapter (LoRA), and the tokenizer: every rank gathers, rank 0 writes."""
    if trainer.lora is not None:
        from .lora import save_adapter

        save_adapter(trainer.model, directory, trainer.lora, base_model_name_or_path=trainer.recipe.model.name_or_path)
    else:
        trainer.model.save_pretrained(directory)
    if trainer.rank == 0:
        trainer.tokenizer.save_pretrained(directory)


def save(trainer, step: int) -> Path:
    out = trainer.out
    target = out / f"step_{step}"
    with atomic_dir(trainer, target) as tmp:
        write_model(trainer, tmp)
        rng = {"rng": torch.get_rng_state()}
        if trainer.model.device.type == "cuda":  # PhiMoE's jitter and LoRA dropout draw on the GPU there
            rng["cuda_rng"] = torch.cuda.get_rng_state(trainer.model.device)
        save_torch({"optimizer": to_local(trainer.optimizer.state_dict()), **rng}, tmp / f"rank{trainer.rank}.pt")
        if trainer.rank == 0:
            info = {"step": step, "scheduler": trainer.scheduler.state_dict(), "world": trainer.world,
                    "fsdp": trainer.layout.fsdp, "ep": trainer.layout.ep, "recipe": trainer.recipe.to_dict()}
            atomic_write_text(tmp / "trainer_state.json", json.dumps(info, indent=1, default=str) + "\n")
    if trainer.rank == 0:
        for _, old in steps(out)[:-trainer.recipe.checkpoint.keep_last]:
            shutil.rmtree(old)
    barrier(trainer)
    return target


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, whose OSError (disk full: "No space left on device") is raised instead of
    the RuntimeError torch makes of it ("unexpected pos ...")."""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from e
        raise


def load(trainer, directory: Path) -> int:
    """Optimizer, scheduler and RNG from a step checkpoint (the weights were loaded with the model); the step."""
    info = read_state(directory)
    layout = (info["world"], info["fsdp"], info["ep"])
    now = (trainer.world, trainer.layout.fsdp, trainer.layout.ep)
    if layout != now:
        raise ValueError(f"--resume: {directory} was written by world {layout[0]} (fsdp {layout[1]}, ep {layout[2]}); "
                         f"this run is world {now[0]} (fsdp {now[1]}, ep {now[2]}): resume with the same layout")
    path = directory / f"rank{trainer.rank}.pt"
    shard = read_shard(path)
    optim = shard["optimizer"]
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]  # state_dict's numbering
    for index, values in optim["state"].items():
        param = params[int(index)]
        for key, value in values.items():
            if isinstance(param, DTensor) and value.dim() > 0:
                values[key] = DTensor.from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                                 stride=param.stride())
    try:
        trainer.optimizer.load_state_dict(optim)
        trainer.scheduler.load_state_dict(info["scheduler"])
        torch.set_rng_state(shard["rng"])
        if "cuda_rng" in shard and trainer.model.device.type == "cuda":
            torch.cuda.set_rng_state(shard["cuda_rng"], trainer.model.device)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
        raise ValueError(f"--resume: {path}: its optimizer, scheduler or RNG state does not fit this run's "
                         f"trainable parameters ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return info["step"]


STATE_KEYS = {"step": int, "scheduler": dict, "world": int, "fsdp": int, "ep": int}


def read_state(directory: Path) -> dict:
    """trainer_state.json, checked to hold what resuming needs."""
    path = directory / "trainer_state.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: {path} is not valid JSON ({e}); the checkpoint is corrupt") from None
    bad = [k for k, kind in STATE_KEYS.items() if not isinstance(info, dict) or not isinstance(info.get(k), kind)]
    if bad:
        raise ValueError(f"--resume: {path} lacks {', '.join(bad)} (or has the wrong type); the checkpoint is "
                         "corrupt or not moelm's")
    return info


def read_shard(path: Path) -> dict:
    """A rank's optimizer and RNG state, checked to be one."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found (each rank's optimizer and RNG state; the checkpoint "
                                "is incomplete or was written by more ranks)")
    try:
        shard = torch.load(path, weights_only=True)
    except Exception as e:  # torch's zip reader and unpickler raise many kinds
        raise ValueError(f"--resume: {path} is not a readable torch file (truncated or corrupt): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not (isinstance(shard, dict) and isinstance(shard.get("optimizer"), dict)
            and isinstance(shard.get("rng"), torch.Tensor)):
        raise ValueError(f"--resume: {path} holds no optimizer and RNG state; the checkpoint is corrupt")
    return shard


def truncate_metrics(path: Path, step: int) -> None:
    """metrics.jsonl without the records of steps after `step` (rewritten atomically), as a resumed run logs
    them again; a line cut short by an interrupted run goes too."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and record_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def to_local(tree):
    if isinstance(tree, dict):
        return {k: to_local(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_local(v) for v in tree]
    return tree.to_local() if isinstance(tree, DTensor) else tree


def attach_lora(model, section, resume_dir: Path | None, modules_to_save: list[str] | None = None):
    """LoRA as the recipe's peft section asks (with modules_to_save: the modules whose tensors the adapter carries
    whole), or the adapter of the checkpoint being resumed."""
    from .lora import LoraConfig, apply_lora, build_named_mtp, load_tensors, read_files

    config = LoraConfig(r=section.r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
                        target_modules=section.target_modules, target_parameters=list(section.target_parameters),
                        use_rslora=section.use_rslora, modules_to_save=modules_to_save)
    saved = read_files(resume_dir) if resume_dir is not None else None
    if saved is not None:  # the checkpoint's adapter is the recipe's, or the run would silently train another one
        for key in ("r", "lora_alpha", "lora_dropout", "use_rslora"):
            if getattr(saved[0], key) != getattr(config, key):
                raise ValueError(f"--resume: the adapter in {resume_dir} has {key}={getattr(saved[0], key)!r}, the "
                                 f"recipe's peft.{key} is {getattr(config, key)!r}; resume with the recipe it was "
                                 "trained with")
    if saved is not None:
        build_named_mtp(model, saved[1])
    apply_lora(model, config)
    if saved is not None:  # other targets: its tensors are named as missing or unexpected
        load_tensors(model, saved[1], resume_dir)
    return config


def save_final(trainer, last: Path | None = None) -> Path:
    """checkpoint.dir/final: the hub checkpoint (or the adapter), hard links to the files of `last` (the step
    checkpoint of the same weights) when given; with LoRA and checkpoint.merge, also checkpoint.dir/merged, the base
    with the adapter folded in."""
    target = trainer.out / "final"
    with atomic_dir(trainer, target) as tmp:
        if last is None:
            write_model(trainer, tmp)
        elif trainer.rank == 0:
            link_model(last, tmp)
    if trainer.lora is not None and trainer.recipe.checkpoint.merge:
        if trainer.rank == 0:
            merge_to(trainer.recipe.model.name_or_path, target, trainer.out / "merged",
                     dtype=getattr(torch, trainer.recipe.model.dtype))
        barrier(trainer)
    return target


def link_model(step_dir: Path, out: Path) -> None:
    """The model and tokenizer files of a step checkpoint into `out` (hard links, or copies where the file system
    has none), without its training state."""
    for path in step_dir.iterdir():
        if path.name == "trainer_state.json" or re.fullmatch(r"rank\d+\.pt", path.name):
            continue
        if path.is_dir():
            shutil.copytree(path, out / path.name, copy_function=link_or_copy)
        else:
            link_or_copy(path, out / path.name)


def link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def merge_to(base: str, adapter: str | Path, out: str | Path, dtype=torch.float32) -> Path:
    """`moelm merge`: base checkpoint + PEFT adapter -> a hub checkpoint at `out` with the adapter folded in, the
    base's tokenizer, chat template and generation config carried over (written atomically)."""
    from ..models.auto import AutoModelForCausalLM
    from .lora import load_adapter, merge_lora

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, fast=False)
    load_adapter(model, adapter)
    merge_lora(model)
    return write_checkpoint(model, out, [adapter, base])  # the adapter's tokenizer (saved by finetune) or the base's


def write_checkpoint(model, out: str | Path, tokenizer_sources: list, files: dict[str, str] | None = None) -> Path:
    """The model as a hub checkpoint at `out` with the tokenizer (and chat template) of the first of
    tokenizer_sources that has one and the text `files` (name -> text), written to a temporary directory beside
    it and renamed into place (an existing `out` is replaced)."""
    from ..text.tokenizer import AutoTokenizer

    tokenizer = None
    for source in tokenizer_sources:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            break
        except (OSError, ValueError):
            continue
    out = Path(os.path.realpath(out)) if Path(out).is_symlink() else Path(out)  # where a link points: written there
    if out.exists() and not out.is_dir():  # swap_dirs would exchange it with the checkpoint, then hide it
        raise NotADirectoryError(f"{out} exists and is not a directory")
    make_dir(out.parent)
    with writing(out), temp_folder(out.parent, f".tmp-{out.name}-") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        with locked(out.parent):
            swap_dirs(tmp, out)
    return out
