import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from moelm.io import files, hub, weights
from moelm.io.files import parse_size
from moelm.io.hub import ModelNotFoundError, hf_cache_dir, resolve_model_dir
from moelm.io.weights import CheckpointError, SafetensorsCheckpoint, save_sharded


def sample():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(8, 4, generator=g),
        "layers.0.w": torch.randn(10, 10, generator=g).to(torch.bfloat16),
        "layers.0.b": torch.arange(10, dtype=torch.int64),
        "layers.1.w": torch.randn(6, 10, generator=g).t(),  # non-contiguous
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
    }


def assert_same(ckpt, tensors):
    assert ckpt.keys() == sorted(tensors)
    for name, t in tensors.items():
        assert name in ckpt
        assert ckpt.shape(name) == tuple(t.shape)
        assert ckpt.dtype(name) == t.dtype
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


def listing(d):
    return sorted(p.name for p in d.iterdir())


def test_round_trip_single(tmp_path):
    tensors = sample()
    tensors["tied"] = tensors["embed.weight"]  # shares storage with another tensor in the same shard
    tensors["view"] = tensors["layers.0.b"][2:5]  # view into a larger storage
    files = save_sharded(tensors, tmp_path / "m", metadata={"note": "hi"})
    assert files == [tmp_path / "m" / "model.safetensors"]
    assert listing(tmp_path / "m") == ["model.safetensors"]
    with SafetensorsCheckpoint(tmp_path / "m") as ckpt:
        assert ckpt.files == files
        assert_same(ckpt, tensors)
        assert ckpt.metadata("model.safetensors") == {"format": "pt", "note": "hi"}
        assert ckpt.file_of("mask") == files[0]
        with pytest.raises(KeyError, match="nope"):
            ckpt.get("nope")


def test_round_trip_sharded(tmp_path):
    tensors = sample()
    tied = dict(tensors, **{"lm_head.weight": tensors["embed.weight"]})  # same storage twice
    files = save_sharded(list(tied.items()), tmp_path, max_shard_size=200)
    n = len(files) - 1
    assert n >= 3
    assert [f.name for f in files[:-1]] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert files[-1].name == "model.safetensors.index.json"
    index = json.loads(files[-1].read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tied.values())
    assert list(index["weight_map"]) == sorted(tied)
    assert set(index["weight_map"].values()) == {f.name for f in files[:-1]}
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert len(ckpt.files) == n
        assert_same(ckpt, tied)


def test_shard_count_and_oversized_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    tensors["big"] = torch.zeros(600)  # 2400 bytes, larger than the limit
    tensors["last"] = torch.ones(10)
    files = save_sharded(tensors, tmp_path, max_shard_size=1000)
    wm = json.loads(files[-1].read_text())["weight_map"]
    # t0+t1 | t2+t3 | t4 | big | last
    assert len(files) - 1 == 5
    assert wm["t0"] == wm["t1"] != wm["t2"] == wm["t3"]
    assert len({wm["t4"], wm["big"], wm["last"]}) == 3
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert_same(ckpt, tensors)


def test_stale_shards_removed_on_resave(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(4)}
    save_sharded(tensors, tmp_path, max_shard_size=400)
    (tmp_path / "other.txt").write_text("keep me")
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4
    save_sharded(tensors, tmp_path, max_shard_size=800)
    assert listing(tmp_path) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                 "model.safetensors.index.json", "other.txt"]
    save_sharded({"x": torch.ones(2)}, tmp_path)
    assert listing(tmp_path) == ["model.safetensors", "other.txt"]
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert ckpt.keys() == ["x"]


def test_save_is_atomic(tmp_path, monkeypatch):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(4)}
    save_sharded(tensors, tmp_path, max_shard_size=400)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(weights, "save_file", flaky)
    new = {f"t{i}": torch.zeros(100) for i in range(4)}
    with pytest.raises(OSError, match="disk full"):
        save_sharded(new, tmp_path, max_shard_size=800)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_disk_full_is_an_oserror_naming_the_directory(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own SafetensorError (no OSError, so a CLI traceback): re-raised as an
    OSError naming the directory, nothing left behind."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(weights, "save_file", full)
    with pytest.raises(OSError, match=f"cannot save the checkpoint in {tmp_path}: .*No space left"):
        save_sharded({"a": torch.ones(3)}, tmp_path)
    assert listing(tmp_path) == []

    def stream_full(*args, **kwargs):  # the streamed (layout) writer's own writes: an OSError naming no file
        raise OSError(28, "No space left on device")

    layout = [("a", torch.float32, (3,))]
    monkeypatch.setattr(weights, "_stream_shards", stream_full)
    with pytest.raises(OSError, match=f"cannot save the checkpoint in {tmp_path}: No space left") as e:
        save_sharded([("a", torch.ones(3))], tmp_path, layout=layout)
    assert e.value.errno == 28 and listing(tmp_path) == []


def test_duplicate_names_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        save_sharded([("a", torch.ones(1)), ("a", torch.ones(1))], tmp_path)
    assert listing(tmp_path) == []


def test_truncated_file(tmp_path):
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'b'.*truncated"):
        SafetensorsCheckpoint(tmp_path)


def test_overlapping_tensors(tmp_path):
    """Two tensors whose data_offsets overlap would read each other's bytes: a corrupt header."""
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'b': corrupt header: data_offsets \[8, 16\] overlap .*'a'"):
        SafetensorsCheckpoint(tmp_path)


def test_garbage_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt header"):
        SafetensorsCheckpoint(tmp_path)


def test_bad_entry_in_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"tensor 'w'.*needs 16"):
        SafetensorsCheckpoint(tmp_path)


def test_header_length_larger_than_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 1_000_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt header.*1000000"):
        SafetensorsCheckpoint(tmp_path)


def test_index_missing_shard(tmp_path):
    save_sharded({"a": torch.ones(100), "b": torch.ones(100)}, tmp_path, max_shard_size=400)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing.*index\.json"):
        SafetensorsCheckpoint(tmp_path)


def test_index_with_empty_weight_map(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json: corrupt index: 'weight_map' lists no tensors"):
        SafetensorsCheckpoint(tmp_path)


def test_tensor_in_index_not_in_file(tmp_path):
    save_sharded({"a": torch.ones(100), "b": torch.ones(100)}, tmp_path, max_shard_size=400)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: tensor 'ghost'.*index"):
        SafetensorsCheckpoint(tmp_path)


def test_same_tensor_in_two_files(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match="'a' also appears"):
        SafetensorsCheckpoint(tmp_path)


def test_pickle_weights_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle would run code")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*only safetensors.*never loaded.*[Cc]onvert"):
        SafetensorsCheckpoint(tmp_path)


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("100") == 100
    assert parse_size("10KB") == 10_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 MiB") == 1536 * 1024
    assert parse_size("5gb") == 5_000_000_000
    for bad in ["", "GB", "5XB", "-5GB", "0", 0, None, True]:
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_atomic_write_text(tmp_path):
    p = tmp_path / "config.json"
    files.atomic_write_text(p, "a")
    files.atomic_write_text(p, "b")
    assert p.read_text() == "b"
    assert listing(tmp_path) == ["config.json"]


# --- hub ---


def fake_snapshot(cache, repo_id, commit, ref="main"):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def test_hf_cache_dir(monkeypatch, tmp_path):
    for v in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hf_cache_dir() == tmp_path / "c"


def test_hub_cache_refs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = fake_snapshot(tmp_path, "baidu/ERNIE-4.5-0.3B-PT", "a" * 40)
    b = fake_snapshot(tmp_path, "baidu/ERNIE-4.5-0.3B-PT", "b" * 40, ref="dev")
    assert resolve_model_dir("baidu/ERNIE-4.5-0.3B-PT") == a
    assert resolve_model_dir("baidu/ERNIE-4.5-0.3B-PT@dev") == b
    assert resolve_model_dir("baidu/ERNIE-4.5-0.3B-PT@" + "b" * 40) == b


def test_hub_cache_snapshot_without_refs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old = fake_snapshot(tmp_path, "microsoft/Phi-tiny-MoE-instruct", "1" * 40, ref=None)
    assert resolve_model_dir("microsoft/Phi-tiny-MoE-instruct") == old
    new = fake_snapshot(tmp_path, "microsoft/Phi-tiny-MoE-instruct", "2" * 40, ref=None)
    os.utime(old, (1, 1))
    assert resolve_model_dir("microsoft/Phi-tiny-MoE-instruct") == new


def test_hub_miss_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model_dir("baidu/ERNIE-4.5-0.3B-PT")
    msg = str(e.value)
    assert "'baidu/ERNIE-4.5-0.3B-PT'" in msg and str(tmp_path) in msg
    assert "hf download baidu/ERNIE-4.5-0.3B-PT" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_hub_download_failure(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub

    def boom(*args, **kwargs):
        raise RuntimeError("no network here\nsecond line")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="owner/name.*RuntimeError: no network here;") as e:
        resolve_model_dir("owner/name")
    assert "second line" not in str(e.value)


def test_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"")
    assert resolve_model_dir("m") == (tmp_path / "m").resolve()
    assert resolve_model_dir(tmp_path / "m" / "config.json") == (tmp_path / "m").resolve()
    with pytest.raises(ModelNotFoundError, match="expected a model directory"):
        resolve_model_dir("m/model.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"model path './x' does not exist"):
        resolve_model_dir("./x")


def test_hub_id_syntax():
    assert hub._parse_hub_id("baidu/ERNIE-4.5-0.3B-PT") == ("baidu/ERNIE-4.5-0.3B-PT", None)
    assert hub._parse_hub_id("a/b@refs/pr/1") == ("a/b", "refs/pr/1")
    for bad in ["./x", "/a/b", "~/a", "a/b/c", "a", ".a/b", "a/b@", "a b/c", "a/..", "a/b@../x"]:
        assert hub._parse_hub_id(bad) is None, bad
