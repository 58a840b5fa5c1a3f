"""Writers killed for real (SIGKILL) at each rename, and two writers at once: what is on disk is the whole old
state, the whole new one, or a clear error, never a mixture; the temporary files of a killed writer go with the
next save."""
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moelm import AutoModelForCausalLM, CheckpointError
from moelm.config import Ernie4_5Config
from moelm.io.weights import SafetensorsCheckpoint, save_sharded
from moelm.train.state import atomic_dir, write_checkpoint


def forked(fn, kill_at=0, pause_at=0, hook="replace"):
    """fn() in a forked process whose `kill_at`-th os.<hook> call SIGKILLs it (or sleeps a second before its
    `pause_at`-th); its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        real, calls = getattr(os, hook), [0]

        def patched(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if calls[0] == pause_at:
                time.sleep(1)
            return real(*args, **kwargs)

        setattr(os, hook, patched)
        fn()
    finally:
        os._exit(0)


def wait(pid) -> bool:
    """True if the process was killed."""
    return os.WIFSIGNALED(os.waitpid(pid, 0)[1])


def state(directory):
    """The value every tensor of the checkpoint holds, as its config.json says, or "error" (a CheckpointError or
    no config.json, as from_pretrained)."""
    try:
        with SafetensorsCheckpoint(directory) as ckpt:
            values = {ckpt.get(k).unique().item() for k in ckpt.keys()}
        config = (directory / "config.json").read_text()
    except (CheckpointError, FileNotFoundError):
        return "error"
    return values if {float(config)} == values else f"config.json {config} beside {values}"


def save(value, directory, max_shard_size):
    save_sharded(tensors(value), directory, max_shard_size=max_shard_size, extra_files={"config.json": str(value)})


def tensors(value, n=4):
    return {f"t{i}": torch.full((64,), float(value)) for i in range(n)}


@pytest.mark.parametrize("old, new", [(1000, 1000), (1000, 10**6), (10**6, 1000)])
def test_a_save_killed_at_any_rename_leaves_old_new_or_an_error(tmp_path, old, new):
    """Sharded over sharded with the same shard names, and single over sharded and back: the old index never
    points at new shards, nor the old config.json stands beside new weights, and shards without their index are an
    error (as transformers), not read one by one."""
    seen = set()
    for n in range(1, 20):
        d = tmp_path / str(n)
        save(0, d, old)
        killed = wait(forked(lambda: save(1, d, new), kill_at=n))
        got = state(d)
        assert got in ({0.0}, {1.0}, "error"), (n, got, sorted(p.name for p in d.iterdir()))
        seen.add(str(got))
        if not killed:
            break
    assert {"{0.0}", "{1.0}"} <= seen
    save(2, d, new)  # and the next save sweeps the killed ones' temporary folders
    assert state(d) == {2.0} and not [p for p in d.iterdir() if p.name.startswith(".")]


def test_two_saves_into_one_directory_at_once(tmp_path):
    """The first pauses after moving in its first shard; the second, started then, waits for it and then
    replaces all of it, and leaves the first one's (live) temporary folder alone."""
    save(0, tmp_path, 1000)
    first = forked(lambda: save(1, tmp_path, 1000), pause_at=4)
    time.sleep(0.5)
    second = forked(lambda: save(2, tmp_path, 1000))
    assert not wait(first) and not wait(second)
    assert state(tmp_path) == {2.0}


def tiny(seed):
    config = Ernie4_5Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16, vocab_size=64, intermediate_size=48)
    return AutoModelForCausalLM.from_config(config, seed=seed).eval()


def test_merge_or_prune_output_killed_while_replaced(tmp_path):
    """write_checkpoint (moelm merge / prune) over an existing output: killed at any rename or delete, the output
    is the old checkpoint or the new one, whole."""
    out = tmp_path / "out"
    old, new = tiny(0), tiny(1)
    ref = {id(m): m.model.embed_tokens.weight for m in (old, new)}
    for hook in ("rename", "unlink"):
        for n in range(1, 12):
            write_checkpoint(old, out, [])
            killed = wait(forked(lambda: write_checkpoint(new, out, []), kill_at=n, hook=hook))
            weight = AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight
            assert any(torch.equal(weight, w) for w in ref.values()), (hook, n, sorted(os.listdir(out)))
            if not killed:
                break
    write_checkpoint(new, out, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_training_save_is_swept_by_the_next(tmp_path):
    trainer = SimpleNamespace(rank=0, layout=SimpleNamespace(distributed=False))
    (tmp_path / ".tmp-step_3").mkdir()  # a save killed at step 3
    (tmp_path / ".tmp-step_3" / "rank0.pt").write_bytes(b"x")
    with atomic_dir(trainer, tmp_path / "step_4") as tmp:
        (tmp / "trainer_state.json").write_text("{}")
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["step_4"]


def test_an_adapter_save_killed_between_its_files(tmp_path):
    """adapter_model.safetensors and adapter_config.json are replaced one by one: the old config never stands
    beside the new weights (another lora_alpha would scale them silently); the next save sweeps what a killed one
    left."""
    from moelm.train.lora import LoraConfig, apply_lora, read_files, save_adapter

    model, out = tiny(0), tmp_path / "adapter"
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))

    def save_new():
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.lora_B.fill_(1)
        save_adapter(model, out, LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj"]))

    for n in range(1, 4):
        save_adapter(model, out, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
        killed = wait(forked(save_new, kill_at=n))
        try:
            config, saved = read_files(out)
        except FileNotFoundError:  # killed between the two: no adapter_config.json, an error naming it
            continue
        new = any(bool((t == 1).all()) for k, t in saved.items() if "lora_B" in k)
        assert config.lora_alpha == (16 if new else 8), n
        if not killed:
            break
    save_adapter(model, out, LoraConfig(r=2, target_modules=["q_proj"]))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
