"""Issue 24's fine-tuning papercuts, on a tiny ERNIE MoE in fp32, one process: a finished run is resumable with a
larger max_steps (the last step's checkpoint) and then equals an uninterrupted run to the bit; an in-place resume
logs each step once (metrics.jsonl cut back to the checkpoint); `moelm merge` prints its result on stdout;
distributed.ep > 1 without torchrun says how to launch it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from moelm import AutoModelForCausalLM
from moelm.cli import main
from moelm.config import named_config
from moelm.io.weights import SafetensorsCheckpoint
from moelm.train import LoraConfig, apply_lora, save_adapter
from moelm.train.distributed import layout_for
from moelm.train.recipe import DistributedSection, build_recipe
from moelm.train.state import truncate_metrics
from moelm.train.trainer import Trainer
from test_finetune import one_thread  # noqa: F401  (autouse: one intra-op thread)
from test_finetune_dist import recipe_dict, tiny_moe_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_moe_run(tmp_path_factory.mktemp("papercuts"))


def make_recipe(root: Path, out: Path, steps: int, every: int) -> dict:
    """4 micro-batches a step, 4 steps an epoch, ERNIE's bias update on; a constant lr after one warmup step, so
    the schedule of a step does not depend on max_steps."""
    recipe = recipe_dict(str(root / "model"), str(root / "train.jsonl"), str(out), steps=steps)
    recipe["lr_scheduler"] = {"warmup_steps": 1, "decay": "constant"}
    recipe["checkpoint"]["every_steps"] = every
    return recipe


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_dirs(out: Path) -> list[str]:
    return sorted((p.name for p in out.iterdir() if p.name.startswith("step_")), key=lambda n: int(n[5:]))


def weights(directory: Path) -> dict:
    with SafetensorsCheckpoint(directory) as f:
        return {key: f.get(key).clone() for key in f.keys()}


def assert_same_weights(a: Path, b: Path):
    ours, theirs = weights(a), weights(b)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.fixture(scope="module")
def straight(root):
    """The uninterrupted 8-step run (a checkpoint every 4 steps): its output directory."""
    out = root / "straight"
    Trainer(build_recipe(make_recipe(root, out, 8, 4)), progress=False).train()
    return out


def test_a_finished_run_resumes_with_a_larger_max_steps(root, straight, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(build_recipe(make_recipe(root, run, 4, 3)), progress=False).train()
    assert step_dirs(run) == ["step_3", "step_4"]  # 4 is no multiple of 3: the last step is written too
    final = run / "final"
    assert not (final / "trainer_state.json").exists() and not (final / "rank0.pt").exists()
    tensors = sorted(final.glob("*.safetensors"))
    assert tensors and all(t.samefile(run / "step_4" / t.name) for t in tensors)  # linked, not written again
    recipe = run / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(root, run, 4, 3)))
    capsys.readouterr()
    assert main(["finetune", str(recipe), "--resume", "--step.max_steps=8", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 8
    assert step_dirs(run) == ["step_4", "step_6", "step_8"]  # keep_last 3
    found, expected = metrics(run), metrics(straight)
    assert [m["step"] for m in found] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "aux_loss"):
        assert [m[key] for m in found] == [m[key] for m in expected], key  # ==: the same numbers
    assert_same_weights(run / "final", straight / "final")
    assert_same_weights(run / "step_8", straight / "step_8")


def test_resume_in_place_logs_each_step_once(root, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = metrics(run)
    assert [m["step"] for m in before] == list(range(1, 9))
    Trainer(build_recipe(make_recipe(root, run, 8, 4)), resume=str(run / "step_4"), progress=False).train()
    after = metrics(run)
    assert [m["step"] for m in after] == list(range(1, 9))  # not 1..8 then 5..8
    assert [m["loss"] for m in after] == [m["loss"] for m in before]
    assert_same_weights(run / "final", straight / "final")


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)] + [{"step": 4, "val_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # cut short by a kill
    truncate_metrics(path, 4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    truncate_metrics(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    truncate_metrics(tmp_path / "none.jsonl", 2)  # a run without a log yet
    assert not (tmp_path / "none.jsonl").exists()


def test_merge_prints_the_merged_checkpoint_on_stdout(root, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(root / "model", fast=False)
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    apply_lora(model, config)
    save_adapter(model, tmp_path / "adapter", config, base_model_name_or_path=str(root / "model"))
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(root / "model"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert str(out) not in captured.err
    assert (out / "config.json").is_file()
    # a folder that is not empty (here: the last merge) is replaced only with --force, as `moelm prune`'s
    args = ["merge", "--model", str(root / "model"), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    assert main(args) == 1
    assert f"--out {out} exists and is not empty (--force replaces it)" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0 and (out / "config.json").is_file()


def test_ep_without_torchrun_says_how_to_launch(root, tmp_path, capsys):
    config = named_config("ernie4_5_moe-tiny")
    with pytest.raises(ValueError) as error:
        layout_for(DistributedSection(ep=2), 1, 0, config, "r.yaml")
    message = str(error.value)
    assert message.startswith("r.yaml: distributed.ep=2 needs 2 processes or a multiple")
    assert "torchrun --nproc-per-node 2 -m moelm finetune" in message and "(1)" not in message
    with pytest.raises(ValueError, match=r"distributed.ep=2 must divide the number of processes \(3\)"):
        layout_for(DistributedSection(ep=2), 3, 0, config, "r.yaml")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(root, tmp_path / "out", 2, 0)))
    capsys.readouterr()
    assert main(["finetune", str(recipe), "--distributed.ep=2", "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moelm: error: ") and "torchrun --nproc-per-node 2" in lines[0]


@pytest.fixture(scope="module")
def lora_run(root) -> dict:
    """A 2-step LoRA run with step_1 and step_2: its recipe."""
    recipe = make_recipe(root, root / "lora", 2, 1)
    recipe["peft"] = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    Trainer(build_recipe(recipe), progress=False).train()
    return recipe


def write_bytes(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


@pytest.mark.parametrize("corrupt, override, message", [
    (write_bytes("rank0.pt", b"not a torch file" * 8), None, "rank0.pt is not a readable torch file"),
    (write_bytes("trainer_state.json", b"{"), None, "trainer_state.json is not valid JSON"),
    (write_bytes("trainer_state.json", b'{"step": 2}'), None, "trainer_state.json lacks scheduler"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:64]),
     None, "adapter_model.safetensors is not a readable safetensors file"),
    (write_bytes("adapter_config.json", b"{"), None, "adapter_config.json is not valid JSON"),
    (None, "--peft.r=4", "the recipe's peft.r is 4"),  # not silently the checkpoint's r=2
    (None, "--step.max_steps=1", "(step 2) is past the run's last step (1"),
], ids=["rank0.pt", "state-json", "state-keys", "adapter-weights", "adapter-config", "peft.r", "past-max-steps"])
def test_a_bad_resume_is_one_error_naming_what_is_wrong(corrupt, override, message, lora_run, tmp_path, capsys):
    step = shutil.copytree(Path(lora_run["checkpoint"]["dir"]) / "step_2", tmp_path / "step_2")
    if corrupt is not None:
        corrupt(step)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(dict(lora_run, checkpoint={"dir": str(tmp_path / "out"), "every_steps": 1})))
    capsys.readouterr()
    args = ["finetune", str(recipe), "--resume", str(step), "--no-progress"] + ([override] if override else [])
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moelm: error: ") and message in err[0], err
