"""Writers and readers on a file system that fails for real: a full one (a small tmpfs: ENOSPC), a read-only one, a
file size limit (EFBIG), no file descriptors left (EMFILE), a file or a dangling link where a folder goes. The error
names the path at fault and the cause; what was there before is whole (and loads); no temporary file stays. Mounting
needs root: without it these tests skip."""
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moelm import AutoModelForCausalLM, AutoTokenizer
from moelm.config import Ernie4_5Config
from moelm.io.weights import SafetensorsCheckpoint
from moelm.models.scaffold import new_checkpoint


@pytest.fixture(scope="module")
def disk():
    """disk(size) -> a fresh tmpfs of that size ("300k"), unmounted after the module; skips where mounting is not
    permitted."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def make(size: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix="moelm-disk-"))
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode:
            path.rmdir()
            pytest.skip("mounting a tmpfs is not permitted here")
        mounted.append(path)
        return path

    try:
        yield make
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)
            path.rmdir()


def read_only(path: Path, on: bool = True):
    subprocess.run(["mount", "-o", "remount," + ("ro" if on else "rw"), str(path)], check=True)


def fill(path: Path):
    with contextlib.suppress(OSError), open(path / "filler", "wb") as f:
        f.write(b"x" * (64 << 20))


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def limited(fsize=None, free_fds=None):
    """This process with a file size limit (writing past it: EFBIG), or with only `free_fds` more file descriptors
    to open (EMFILE after), for the block."""
    kind = resource.RLIMIT_FSIZE if fsize is not None else resource.RLIMIT_NOFILE
    before = resource.getrlimit(kind)
    if free_fds is not None:  # the limit: the lowest number with `free_fds` unused ones below it
        fsize = 0
        while free_fds or is_open(fsize):
            free_fds -= not is_open(fsize)
            fsize += 1
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(kind, (fsize, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(kind, before)
        signal.signal(signal.SIGXFSZ, handler)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def tiny(seed=0, vocab=64, **kw):
    config = Ernie4_5Config(**{**dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=16, vocab_size=vocab, intermediate_size=48),
                               **kw})
    return AutoModelForCausalLM.from_config(config, seed=seed).eval()


def embedding(directory) -> torch.Tensor:
    with SafetensorsCheckpoint(directory) as ckpt:
        return ckpt.get("model.embed_tokens.weight")


def test_full_and_read_only_disks_keep_the_old_files(disk, tmp_path):
    """save_pretrained of a model (sharded: the message names the checkpoint folder, not its temporary one), its
    config, generation config and tokenizer: each error names the path and the cause; the old files load."""
    source = new_checkpoint("ernie4_5-tiny", tmp_path / "src")
    tokenizer = AutoTokenizer.from_pretrained(source)
    old, new = tiny(0), tiny(1)
    root = disk("200k")
    out = root / "out ü"
    old.save_pretrained(out, max_shard_size="10KB")
    tokenizer.save_pretrained(out)
    before = snapshot(out)
    fill(root)
    writers = {"config.json": new.config.save_pretrained, "": tokenizer.save_pretrained,
               "generation_config.json": new.generation_config.save_pretrained}
    for cause in ("No space left on device", "Read-only file system"):
        if cause == "Read-only file system":
            (root / "filler").unlink()
            read_only(root)
        with pytest.raises(OSError, match=re.escape(f"cannot save the checkpoint in {out}: {cause}")):
            new.save_pretrained(out, max_shard_size="10KB")
        for name, save in writers.items():
            with pytest.raises(OSError) as e:
                save(out)
            assert str(e.value) == f"[Errno {e.value.errno}] {cause}: '{out / name if name else out}'"
        assert snapshot(out) == before
    read_only(root, False)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight,
                       old.model.embed_tokens.weight)


def test_no_file_descriptors_left_at_any_point_of_a_save(tmp_path):
    """A sharded save over a sharded checkpoint, with one more file descriptor allowed each time: it fails or not,
    and what is on disk loads as the old or the new weights (the old index was deleted before the old config was
    read: no descriptor left there, shards without an index)."""
    old, new = tiny(0), tiny(1)
    out = tmp_path / "out"
    seen = set()
    for extra in range(12):
        old.save_pretrained(out, max_shard_size="10KB")
        error = None
        try:
            with limited(free_fds=extra):
                new.save_pretrained(out, max_shard_size="10KB")
        except OSError as e:
            error = e
        got = embedding(out)
        assert any(torch.equal(got, m.model.embed_tokens.weight) for m in (old, new)), (extra, error)
        seen.add(error is None)
    assert seen == {True, False}


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    """An expert report (moelm experts --out) over an earlier one, with files too large for the limit: the plots and
    report.json written before report.html failed must not stand beside the old report.html."""
    from moelm.config import named_config
    from moelm.experts import report as rp
    from moelm.train.data import Example

    model = AutoModelForCausalLM.from_config(named_config("ernie4_5_moe-tiny"), seed=0, fast=False)
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0)).tolist()
    report = rp.build(rp.record(model, [Example(x, x) for x in ids]), model, "tiny", {"path": "x", "kind": "text",
                                                                                      "examples": 2})
    rp.write(report, tmp_path)
    before = snapshot(tmp_path)
    limit = (len(before["report.json"]) + len(before["report.html"])) // 2
    assert len(before["report.json"]) < limit < len(before["report.html"])
    with limited(fsize=limit), pytest.raises(OSError, match=re.escape(f"File too large: '{tmp_path}'")):
        rp.write({**report, "model": "another"}, tmp_path)
    assert snapshot(tmp_path) == before


def test_training_checkpoint_and_adapter_on_a_full_disk(disk):
    """A step checkpoint's optimizer state (torch.save: a RuntimeError "unexpected pos" of its own) and a LoRA
    adapter (safetensors' SafetensorError, not an OSError: a CLI traceback) on a full disk: an OSError naming the
    step folder / adapter folder and the cause; the temporary step folder goes at once; the old adapter loads."""
    from moelm.train.lora import LoraConfig, apply_lora, read_files, save_adapter
    from moelm.train.state import atomic_dir, save_torch

    root = disk("64k")
    trainer = SimpleNamespace(rank=0, layout=SimpleNamespace(distributed=False))
    with atomic_dir(trainer, root / "step_1") as tmp:
        save_torch({"rng": torch.get_rng_state()}, tmp / "rank0.pt")
    with pytest.raises(OSError, match=f"No space left on device: '{root / 'step_2'}'"):
        with atomic_dir(trainer, root / "step_2") as tmp:
            save_torch({"optimizer": torch.zeros(64 << 10)}, tmp / "rank0.pt")
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]

    model = tiny(0)
    config = LoraConfig(r=2, target_modules=["q_proj"])
    apply_lora(model, config)
    save_adapter(model, root / "adapter", config)
    before = snapshot(root / "adapter")
    fill(root)
    with pytest.raises(OSError, match=f"No space left on device: '{root / 'adapter'}'"):
        save_adapter(model, root / "adapter", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    assert snapshot(root / "adapter") == before and read_files(root / "adapter")[0].r == 2


def test_merge_or_prune_output_that_is_a_file_or_a_link(tmp_path):
    """write_checkpoint (moelm merge / prune): onto a file, an error (it was exchanged with the checkpoint and left
    hidden as .tmp-NAME-*); through a link (dangling too), the checkpoint goes where it points; a tokenizer that
    cannot be written is an error, not a checkpoint without one."""
    from moelm.train.state import write_checkpoint

    model = tiny(0, vocab=320, hidden_size=16, head_dim=8, intermediate_size=16).to(torch.bfloat16)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotADirectoryError, match="file exists and is not a directory"):
        write_checkpoint(model, tmp_path / "file", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"

    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "out")
    write_checkpoint(model, tmp_path / "link", [])
    assert (tmp_path / "link").is_symlink() and (tmp_path / "elsewhere" / "out" / "model.safetensors").is_file()

    source = new_checkpoint("ernie4_5-tiny", tmp_path / "src")
    size = (tmp_path / "link" / "model.safetensors").stat().st_size
    assert size < (source / "tokenizer.json").stat().st_size
    with limited(fsize=size + 4096), pytest.raises(OSError) as e:
        write_checkpoint(model, tmp_path / "out", [source])
    assert str(e.value) == f"[Errno 27] File too large: '{tmp_path / 'out'}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "file", "link", "src"]


def test_an_unwritable_kernel_cache_is_not_an_error(disk, tmp_path, capsys, monkeypatch):
    """A read-only MOELM_CACHE and a read-only checkpoint: `moelm generate` runs (it was "not a writable
    directory"); the compiled library is kept where the cache can take it, used from where it was built where not
    (one warning); measured choices that do not fit leave no temporary file."""
    from moelm.cli import main
    from moelm.inference import cpu, kernels

    root = disk("600k")
    new_checkpoint("ernie4_5-tiny", root / "model")
    (root / "cache").mkdir()
    read_only(root)
    monkeypatch.setenv("MOELM_CACHE", str(root / "cache"))
    monkeypatch.setenv("MOELM_NO_KERNELS", "1")
    cpu.reset()
    args = ["generate", "--model", str(root / "model"), "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0"]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    assert list((root / "cache").iterdir()) == []

    built = tmp_path / "gemv.so"
    built.write_bytes(b"\x7fELF" + bytes(100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels._kept(built, root / "cache" / "kernels" / "k" / "gemv.so") == built
    assert len(caught) == 1 and "Read-only file system" in str(caught[0].message)
    read_only(root, False)
    assert kernels._kept(built, root / "cache" / "k" / "gemv.so") == root / "cache" / "k" / "gemv.so"

    cpu.cache_dir().mkdir(parents=True)
    fill(root)
    for i in range(3):
        cpu._save(f"test|{i}" + "x" * 8192, "torch")
    assert list(cpu.cache_dir().iterdir()) == []
    cpu.reset()


def test_a_gguf_is_written_whole_or_not_at_all(tmp_path):
    """write_gguf over an earlier GGUF, with a file size limit below the new one's size: the error names the file,
    the old GGUF is whole, no temporary file stays."""
    from moelm.bench.gguf import write_gguf

    source = new_checkpoint("ernie4_5-tiny", tmp_path / "src")
    out = tmp_path / "model.gguf"
    write_gguf(source, out, "q8_0")
    before = snapshot(tmp_path)
    with limited(fsize=len(before["model.gguf"]) // 2), pytest.raises(OSError, match=re.escape(f"write {out}")):
        write_gguf(source, out, "f32")
    assert snapshot(tmp_path) == before
