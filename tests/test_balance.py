"""ERNIE's aux-free balancing: the loads (the router's own choice, padding excluded, summed over micro-batches and
two ranks) and the bias update, on a hand-computed example."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelm.train import ExpertLoad, update_correction_bias

# 4 experts, top-2; three tokens, the last one padding. The bias moves expert 3 into every token's top-2:
# probabilities ~[.64 .24 .09 .03], [.03 .03 .68 .25], [.72 .27 .005 .005], plus [0 0 0 .7].
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 2.0], [5.0, 4.0, 0.0, 0.0]])
BIAS = torch.tensor([[0.0, 0.0, 0.0, 0.7]])
MASK = torch.tensor([[1, 1, 0]])


def test_loads_follow_the_router_and_skip_padding():
    load = ExpertLoad()
    load.add((LOGITS,), [BIAS], k=2, attention_mask=MASK)
    # token 0 -> experts 0 and 3 (the bias), token 1 -> 2 and 3, token 2 is padding
    assert load.loads[0].tolist() == [1.0, 0.0, 1.0, 2.0]
    load.add((LOGITS,), [BIAS], k=2)  # a second micro-batch, no padding: token 2 -> 0 and 3 too
    assert load.loads[0].tolist() == [3.0, 0.0, 2.0, 5.0] and load.loads[0].dtype == torch.float32


def test_bias_update_is_the_formula():
    bias = BIAS.clone()
    update_correction_bias([bias], [torch.tensor([3.0, 1.0, 2.0, 4.0])], factor=0.01)  # mean 2.5
    torch.testing.assert_close(bias, torch.tensor([[-0.01, 0.01, 0.01, 0.69]]))
    update_correction_bias([bias], [torch.tensor([3.0, 1.0, 2.0, 4.0])], factor=0.0)  # NeMo's default: off
    torch.testing.assert_close(bias, torch.tensor([[-0.01, 0.01, 0.01, 0.69]]))


def two_ranks(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    load = ExpertLoad()
    mask = MASK if rank == 0 else torch.ones(1, 3, dtype=torch.long)
    load.add((LOGITS,), [BIAS], k=2, attention_mask=mask)
    bias = BIAS.clone()
    update_correction_bias([bias], load.reduce(), factor=0.5)
    torch.save((load.loads[0], bias), f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_sum_their_loads(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(two_ranks, args=(port, str(tmp_path / "r")), nprocs=2)
    # rank 0 [1 0 1 2] + rank 1 [2 0 1 3] (its token 2 counts) = [3 0 2 5], mean 2.5: signs [- + + -]
    for rank in (0, 1):
        load, bias = torch.load(tmp_path / f"r.{rank}")
        assert load.tolist() == [3.0, 0.0, 2.0, 5.0]
        torch.testing.assert_close(bias, torch.tensor([[-0.5, 0.5, 0.5, 0.2]]))
