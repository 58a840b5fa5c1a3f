"""The examples as users launch them: real torchrun, two processes on gloo, a tiny checkpoint with its tokenizer
and chat template. The model page's TP example (verbatim but for the import) prints the same tokens on both ranks;
the EP example generates on each rank."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moelm.models.scaffold import new_checkpoint

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(new_checkpoint("ernie4_5_moe-tiny", tmp_path_factory.mktemp("torchrun"), seed=0))


def torchrun(script: str, path: str) -> dict[int, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(EXAMPLES / script), path]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {int(m[1]): m[2] for m in re.finditer(r"rank (\d): (\[[\d, ]*\])", done.stdout)}  # the token ids


def test_the_model_page_tp_example(checkpoint):
    """The checkpoint's generation config samples: the two ranks agree only because generate aligns their random
    state (seeded sampling under TP equal to one process is tests/test_parallel.py's)."""
    printed = torchrun("tp_generate.py", checkpoint)
    assert set(printed) == {0, 1} and printed[0] == printed[1]
    ids = json.loads(printed[0])
    # 32 new tokens, or fewer ending where an end-of-sequence token was sampled (the example does not seed)
    eos = json.loads((Path(checkpoint) / "generation_config.json").read_text())["eos_token_id"]
    assert len(ids) == 32 or (0 < len(ids) < 32 and ids[-1] in eos), ids


def test_the_ep_example(checkpoint):
    printed = torchrun("ep_generate.py", checkpoint)
    assert set(printed) == {0, 1} and all(len(ids.split(",")) == 32 for ids in printed.values())


def test_the_process_group_moelm_opens_is_closed_at_exit():
    """moelm opens the process group for a model loaded with a DistributedConfig or tp_plan (torchrun's variables
    set, nothing initialised); it closes it at exit while the interpreter still runs. Left to the interpreter's
    teardown, a gloo thread still freeing a finished collective's tensors aborted the EP example about once in ten
    runs ("terminate called without an active exception"). A group the user opened is theirs to close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent("""
        import atexit, os, sys
        import torch, torch.distributed as dist
        from moelm.parallel.config import init_process_group
        if sys.argv[1] == "user":
            dist.init_process_group("gloo")
        init_process_group()
        dist.all_reduce(torch.ones(2))
        atexit._run_exitfuncs()
        print("initialised after the exit hooks:", dist.is_initialized())
    """)
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    for who, after in (("moelm", "False"), ("user", "True")):
        done = subprocess.run([sys.executable, "-c", script, who], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"initialised after the exit hooks: {after}" in done.stdout, (who, done.stdout)
