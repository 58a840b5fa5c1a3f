"""Bytes handed to collectives per forward: comm_plan's arithmetic against a counted gloo run of every family and
layout on world 2 (exact; the all-to-all as the mean over the EP group, since each rank's share follows its
routing)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelm import AutoModelForCausalLM, DistributedConfig
from moelm.config import named_config
from moelm.models.scaffold import new_checkpoint
from moelm.parallel.comm import CountCollectives, comm_plan

LAYOUTS = [dict(tp_size=2), dict(ep_size=2, fsdp_size=2), dict(tp_size=2, ep_size=2),
           dict(tp_size=2, ep_size=2, ep_implementation="all_to_all")]
FAMILIES = ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"]


def count(rank: int, port: int, dirs: dict, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    results = []
    for name, path in dirs.items():
        for layout in LAYOUTS:
            if "ep_size" in layout and name.startswith("ernie4_5-tiny"):
                continue
            model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(**layout))
            seed = rank // layout.get("tp_size", 1)
            ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad(), CountCollectives() as counted:
                model(ids, logits_to_keep=1)
            mean = torch.tensor([counted.bytes["all_to_all"]])
            dist.all_reduce(mean)
            got = {k: v for k, v in counted.bytes.items() if k != "all_to_all"}
            if mean:
                got["all_to_all"] = int(mean) // 2
            want = comm_plan(model.config, layout.get("tp_size", 1), layout.get("ep_size", 1), tokens=18, logits=2,
                             dtype=torch.float32, ep_implementation=layout.get("ep_implementation", "auto"))
            results.append((name, layout, got, want))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {n: str(new_checkpoint(n, tmp_path_factory.mktemp(n), seed=0)) for n in FAMILIES}
    odd = named_config("ernie4_5-tiny")
    odd.vocab_size = 511  # the LM head's shards 256 and 255 rows, gathered padded to 256
    out["ernie4_5-tiny-511"] = str(tmp_path_factory.mktemp("odd"))
    AutoModelForCausalLM.from_config(odd, seed=0, fast=False).save_pretrained(out["ernie4_5-tiny-511"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_counted_bytes_equal_the_plan(dirs, tmp_path):
    out = str(tmp_path / "results.pt")
    mp.spawn(count, args=(free_port(), dirs, out), nprocs=2)
    results = torch.load(out)
    assert len(results) == 1 + 4 + 4 + 1  # the dense family (and its odd vocabulary) under TP only
    for name, layout, got, want in results:
        assert got == want, (name, layout)
        assert got.get("all_reduce", 0) > 0 or got.get("all_to_all", 0) > 0
