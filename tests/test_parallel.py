"""Tensor and expert parallelism on torch.distributed (gloo, processes spawned here): for each layout, the sharded
tiny models of the three families against one process — logits, loss, aux loss, router logits, greedy and seeded
sampled generation, every gradient, the bytes each rank holds, and save_pretrained writing the same checkpoint;
FSDP2 composed over TP; the errors of layouts a model or the world cannot take.

One spawn per layout checks all families; each worker writes what it found to a JSON file per rank and the parent
asserts, so a failure names the rank, family and check. A worker's exception fails the test with its traceback."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import socket
import time
import traceback
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from moelm import AutoModelForCausalLM
from moelm.config import named_config
from moelm.io.weights import SafetensorsCheckpoint
from moelm.models.scaffold import new_checkpoint
from moelm.parallel import memory_plan
from moelm.parallel.config import DistributedConfig

FAMILIES = {"ernie4_5": "ernie4_5-tiny", "ernie4_5_moe": "ernie4_5_moe-tiny", "phimoe": "phimoe-tiny"}
MOE = ["ernie4_5_moe", "phimoe"]
# name -> (world size, DistributedConfig fields, families)
LAYOUTS = {
    "tp2": (2, dict(tp_size=2), list(FAMILIES)),
    "ep2-fsdp2": (2, dict(ep_size=2, fsdp_size=2), MOE),  # auto -> all_to_all: each rank its own batch
    "tp2-ep2": (2, dict(tp_size=2, ep_size=2), MOE),  # auto -> all_reduce at inference, all_to_all for grads
    "tp2-ep2-all_to_all": (2, dict(tp_size=2, ep_size=2, ep_implementation="all_to_all"), MOE),
    "tp2-fsdp2-ep4": (4, dict(tp_size=2, fsdp_size=2, ep_size=4), MOE),  # all_to_all across TP slices
}
CHECKS = ("logits", "loss", "aux_loss", "router_logits", "attentions", "greedy", "sampled", "uneven_stop", "grads")
TIMEOUT = 240  # seconds for one spawn, then its processes are killed
# The ranks are forked from a forkserver that has imported torch (with the torch._dynamo that building a model on the
# meta device first pulls in: 3.5 s), moelm and this module once, instead of paying ~8 s of CPU per rank per spawn
START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
PRELOAD = ["torch._dynamo", "torch.distributed.tensor.parallel", "torch.distributed.fsdp", "moelm", __name__]


def tokens(batch: int) -> torch.Tensor:
    """The input of data-parallel group `batch` (rank // tp_size): ids clear of the special tokens."""
    return torch.randint(10, 512, (2, 12), generator=torch.Generator().manual_seed(batch))


# ---- the parent side ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, world: int, *args, timeout: float = TIMEOUT) -> None:
    """Run worker(rank, world, port, *args) in `world` new processes; a worker's exception is raised here (with
    its traceback), a hang past `timeout` kills them and fails."""
    if START == "forkserver":
        multiprocessing.get_context(START).set_forkserver_preload(PRELOAD)  # used when the server starts
    context = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method=START)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout} s (a collective hung?)")


def reports(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def assert_clean(found: list[dict], expected: list[str]) -> None:
    """Every rank ran each expected check and none failed."""
    failures = [f"rank {r} {f}" for r, rep in enumerate(found) for f in rep["failures"]]
    shown = failures[:12] + ([f"... and {len(failures) - 12} more"] if len(failures) > 12 else [])
    assert not failures, "\n\n".join(shown)
    for r, rep in enumerate(found):
        missing = sorted(set(expected) - set(rep["checked"]))
        assert not missing, f"rank {r} did not check {missing}"


def assert_same_checkpoint(saved: Path, original: Path) -> None:
    a, b = SafetensorsCheckpoint(saved), SafetensorsCheckpoint(original)
    try:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in b.keys():
            x, y = a.get(key), b.get(key)
            assert (x.dtype, x.shape) == (y.dtype, y.shape), key
            assert torch.equal(x, y), f"{key}: the saved tensor differs from the original"
    finally:
        a.close()
        b.close()
    for name in ("config.json", "generation_config.json"):
        assert json.loads((saved / name).read_text()) == json.loads((original / name).read_text()), name


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """The three tiny families with every weight randomised (norms, biases, the correction bias)."""
    from reference import randomise

    root = tmp_path_factory.mktemp("parallel")
    dirs = {}
    for family, name in FAMILIES.items():
        path = new_checkpoint(name, root / family, seed=0)
        model = AutoModelForCausalLM.from_pretrained(path, fast=False)
        randomise(model, seed=1)
        model.save_pretrained(path)
        dirs[family] = str(path)
    return dirs


@pytest.fixture(autouse=True)
def one_thread_per_worker(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks share two cores


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(layout, checkpoints, tmp_path):
    """Forward, generation, gradients, resident bytes and save_pretrained of each family under the layout equal
    one process's."""
    world, fields, families = LAYOUTS[layout]
    launch(layout_worker, world, fields, {f: checkpoints[f] for f in families}, str(tmp_path))
    found = reports(tmp_path, world)
    checks = CHECKS + (("attention_plan",) if layout == "tp2" else ())
    assert_clean(found, [f"{f}/{c}" for f in families for c in checks])
    tp, ep = fields.get("tp_size", 1), fields.get("ep_size", 1)
    for family in families:
        sizes = found[0]["bytes"][family]
        assert all(rep["bytes"][family] == sizes for rep in found), "the ranks hold different amounts"
        if ep == 1:  # about 1/tp: the norms (and PhiMoE's routers) are whole on every rank
            assert 0.45 <= sizes["local"] / sizes["whole"] <= 0.56, sizes
        else:  # whole experts, 1/ep of them; the rest 1/tp
            assert sizes["experts_whole"] > 0 and sizes["experts"] * ep == sizes["experts_whole"], sizes
            dense = (sizes["local"] - sizes["experts"]) / (sizes["whole"] - sizes["experts_whole"])
            assert dense == 1 if tp == 1 else 0.45 <= dense <= 0.56, sizes
        if tp > 1:
            assert sizes["sharded_linear"], f"{family}: no DTensor parameter under tp={tp}"
        assert sizes["local"] == sizes["plan"], f"{family}: moelm info's memory plan says {sizes['plan']} bytes"
        assert_same_checkpoint(tmp_path / "saved" / family, Path(checkpoints[family]))
    if layout == "tp2":
        reference_loads(tmp_path / "saved", checkpoints)


def reference_loads(saved: Path, checkpoints: dict[str, str]) -> None:
    """transformers loads what the sharded models saved: its logits equal moelm's single-process ones."""
    import transformers

    ids = tokens(7)
    for family in FAMILIES:
        ours = AutoModelForCausalLM.from_pretrained(checkpoints[family], fast=False)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(saved / family, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{family}: {m}")


@pytest.fixture(scope="session")
def phimoe_tp4(tmp_path_factory) -> str:
    """PhiMoE that takes tp=4: 4 kv heads; experts 24 wide, so 6 per rank (24 bytes in fp32, narrower than
    torch._grouped_mm's 16-byte rows); attention and LM head biases, a sliding window."""
    from reference import randomise

    config = named_config("phimoe-tiny")
    config.num_key_value_heads, config.intermediate_size, config.sliding_window = 4, 24, 5
    config.attention_bias = config.lm_head_bias = True
    path = tmp_path_factory.mktemp("phimoe_tp4")
    randomise(AutoModelForCausalLM.from_config(config, seed=0, fast=False), seed=2).save_pretrained(path)
    return str(path)


def test_four_ranks(checkpoints, phimoe_tp4, tmp_path):
    """fully_shard over dp_shard of a tp=2 x fsdp=2 model: each rank's loss is one process's on its batch, and the
    gathered gradients are the average of one process's over the two data-parallel batches. Then tp=4 (experts
    sliced narrow) and tp=4 x ep=4 with all_to_all over 22 rows, which DTensor lays 6, 6, 6, 4 over the TP slices:
    logits, loss, gradients and greedy tokens are one process's. Then a user's (dp, tp) device_mesh."""
    launch(fsdp_worker, 4, checkpoints["ernie4_5"], phimoe_tp4, str(tmp_path))
    found = reports(tmp_path, 4)
    assert_clean(found, ["mesh", "loss", "grads", "2d_mesh"] + [f"{what}/{c}" for what in TP4 for c in TP4_CHECKS])


BAD = {  # what -> (the error each rank must raise, a pattern of its message)
    "kv heads": ("ValueError", r"tp=2 must divide the attention heads \(4\) and the key/value heads \(1\)"),
    "experts": ("ValueError", r"ep=2 must divide the experts \(3\)"),
    "world": ("ValueError", r"needs dp_replicate_size \* fsdp_size \* tp_size = 1 \* 2 \* 2 = 4"),
    "dense": ("ValueError", "ernie4_5 has no experts"),
    "part of attention": ("ValueError", r"plan for model\.layers\.0\.self_attn: q_proj colwise, k_proj unsharded, "
                          r"v_proj unsharded, o_proj unsharded; moelm shards it as q_proj colwise, k_proj colwise"),
    "one tied end": ("ValueError", "model.embed_tokens and lm_head are tied"),
    "head not gathered": ("ValueError", "plan for lm_head: 'colwise'; moelm shards it as 'colwise_gather_output'"),
    "mlp width": ("ValueError", r"tp=2 must divide the intermediate size of model\.layers\.0\.mlp \(129\)"),
    "rule naming nothing": ("ValueError", r"plan rule 'layers\.\*\.self_attn\.q_proj' names no module"),
    "misshapen expert": ("CheckpointError", r"experts\.7\.down_proj\.weight: checkpoint \[64, 31\] vs model "
                                            r"\[64, 32\]"),
}


def test_layouts_a_model_or_the_world_cannot_take(checkpoints, tmp_path):
    """Each rank raises a ValueError naming the numbers (or the modules of a tp_plan one process would not compute
    alike), before any collective."""
    kv = named_config("ernie4_5-tiny")
    kv.num_key_value_heads = 1
    AutoModelForCausalLM.from_config(kv, seed=0, fast=False).save_pretrained(tmp_path / "kv1")
    three = named_config("phimoe-tiny")
    three.num_local_experts = 3
    AutoModelForCausalLM.from_config(three, seed=0, fast=False).save_pretrained(tmp_path / "three")
    wide = named_config("ernie4_5-tiny")
    wide.intermediate_size = 129
    AutoModelForCausalLM.from_config(wide, seed=0, fast=False).save_pretrained(tmp_path / "wide")
    misshapen = tmp_path / "misshapen"  # the last expert's down_proj one column short: rank 0 must see it too
    shutil.copytree(checkpoints["ernie4_5_moe"], misshapen)
    weights = safetensors.torch.load_file(misshapen / "model.safetensors")
    key = next(k for k in weights if k.endswith("experts.7.down_proj.weight"))
    weights[key] = weights[key][:, :-1].contiguous()
    safetensors.torch.save_file(weights, misshapen / "model.safetensors", metadata={"format": "pt"})
    dirs = {"kv1": str(tmp_path / "kv1"), "three": str(tmp_path / "three"), "dense": checkpoints["ernie4_5"],
            "wide": str(tmp_path / "wide"), "misshapen": str(misshapen)}
    launch(bad_worker, 2, dirs, str(tmp_path))
    for rank, rep in enumerate(reports(tmp_path, 2)):
        for what, (kind, pattern) in BAD.items():
            got = rep["errors"][what]
            assert got is not None, f"rank {rank}: {what}: no error"
            assert got[0] == kind, f"rank {rank}: {what}: {got[2]}"
            assert re.search(pattern, got[1]), f"rank {rank}: {what}: {got[1]}"


@pytest.mark.parametrize("fields,message", [
    (dict(tp_size=2, ep_size=3, fsdp_size=3), r"ep_size \(3\) must be a multiple of tp_size \(2\)"),
    (dict(tp_size=2, ep_size=4), r"ep_size \(4\) must divide fsdp_size \* tp_size \(1 \* 2 = 2\)"),
    (dict(tp_size=0), "tp_size must be an integer >= 1, got 0"),
    (dict(fsdp_size=2.0), "fsdp_size must be an integer >= 1"),
    (dict(ep_implementation="bogus"), "ep_implementation must be one of .*'bogus'"),
    (dict(ep_implementation="all_reduce", ep_size=2, fsdp_size=2), r"ep_size == tp_size\), got ep_size=2, tp_size=1"),
])
def test_distributed_config_rules(fields, message):
    with pytest.raises(ValueError, match=message):
        DistributedConfig(**fields)


def test_distributed_config_sizes():
    config = DistributedConfig(tp_size=2, fsdp_size=2, ep_size=4)
    assert (config.world_size, config.efsdp_size, config.dp_replicate_size) == (4, 1, 1)
    assert DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_reduce").ep_implementation == "all_reduce"


# ---- the workers (spawned: importable at module level) ------------------------------------------------------------

def join_world(rank: int, world: int, port: int) -> None:
    """torchrun's variables; moelm's from_pretrained initialises the gloo process group from them."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def leave_world() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class Report:
    """What one rank checked and what failed, written to rank{r}.json."""

    def __init__(self):
        self.checked, self.failures, self.extra = [], [], {}

    def close(self, what: str, actual, expected, atol=1e-5, rtol=1e-4) -> None:
        try:
            torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
        except AssertionError as e:
            self.failures.append(f"{what}: {e}")

    def true(self, what: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.failures.append(f"{what}: {detail}")

    def done(self, *whats: str) -> None:
        self.checked.extend(whats)

    def write(self, out: str, rank: int) -> None:
        text = json.dumps(dict(checked=self.checked, failures=self.failures, **self.extra))
        (Path(out) / f"rank{rank}.json").write_text(text)


def grads_on(model, ids) -> dict[str, torch.Tensor | None]:
    """One process's gradients (eval mode: PhiMoE's training path draws random numbers) of the loss on `ids`."""
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def nbytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def check_family(family: str, path: str, fields: dict, rank: int, out: str, report: Report) -> None:
    from torch.distributed.tensor import DTensor

    config = DistributedConfig(**fields)
    tp, ep = config.tp_size, config.ep_size
    ref = AutoModelForCausalLM.from_pretrained(path, fast=False)
    if family == "ernie4_5" and fields == {"tp_size": 2}:  # tp over the whole world, transformers' shorthand
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    elif family == "phimoe" and fields == {"tp_size": 2}:  # a user's 1-D mesh over the world
        from torch.distributed.device_mesh import init_device_mesh

        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", device_mesh=init_device_mesh("cpu", (2,)))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config)
    state = model.parallel
    report.true(f"{family}/sizes", (state.tp_size, state.ep_size) == (tp, ep), f"{state.tp_size}, {state.ep_size}")
    batch = rank // tp
    ids = tokens(batch)

    # 1. forward
    with torch.no_grad():
        got = model(ids, labels=ids, output_router_logits=True)
        want = ref(ids, labels=ids, output_router_logits=True)
    report.close(f"{family}/logits", got.logits, want.logits)
    report.close(f"{family}/loss", got.loss, want.loss)
    report.done(f"{family}/logits", f"{family}/loss")
    if family in MOE:
        report.close(f"{family}/aux_loss", got.aux_loss, want.aux_loss)
        report.true(f"{family}/router_logits", len(got.router_logits) == len(want.router_logits) > 0,
                    f"{len(got.router_logits)} vs {len(want.router_logits)}")
        for i, (a, b) in enumerate(zip(got.router_logits, want.router_logits)):
            report.close(f"{family}/router_logits[{i}]", a, b)
    else:
        report.true(f"{family}/aux_loss", got.aux_loss is None and want.aux_loss is None, "a dense model's aux loss")
    report.done(f"{family}/aux_loss", f"{family}/router_logits")
    with torch.no_grad():  # every head's weights, not this rank's
        heads, ref_heads = (m(ids, output_attentions=True).attentions for m in (model, ref))
    report.true(f"{family}/attentions", len(heads) == len(ref_heads), f"{len(heads)} vs {len(ref_heads)}")
    for i, (a, b) in enumerate(zip(heads, ref_heads)):
        report.close(f"{family}/attentions[{i}]", a, b)
    report.done(f"{family}/attentions")

    if (tp, ep) == (2, 1):  # a tp_plan of the attention only: the rest whole on every rank, experts included
        from moelm.parallel.plans import ATTENTION

        plan = DistributedConfig(tp_size=2, tp_plan=ATTENTION)
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(path, distributed_config=plan)(ids).logits
        report.close(f"{family}/attention_plan", logits, want.logits)
        report.done(f"{family}/attention_plan")

    # 2. generation (min_new_tokens: ranks with different batches must step together, none stopping early)
    from moelm.inference import kernels

    # the attention alone, a whole layer, or a whole step
    attend, layer, layers, calls = kernels.attend, kernels.decode_layer, kernels.decode_layers, []
    kernels.attend = lambda *a, **k: calls.append(1) or attend(*a, **k)
    kernels.decode_layer = lambda *a, **k: calls.append(1) or layer(*a, **k)
    kernels.decode_layers = lambda *a, **k: calls.append(1) or layers(*a, **k)
    for what, kwargs in (("greedy", dict(do_sample=False)), ("sampled", dict(do_sample=True))):
        outs = []
        for m in (model, ref):
            torch.manual_seed(5)
            outs.append(m.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs))
            if m is model:  # a decoding step's attention in moelm's C kernels, on the local heads
                report.true(f"{family}/{what}", bool(calls) or not kernels.available(), "C attention not used")
                calls.clear()
        new = [o[:, ids.shape[1]:].tolist() for o in outs]
        report.true(f"{family}/{what}", torch.equal(outs[0], outs[1]), f"new tokens {new[0]}, one process {new[1]}")
        report.done(f"{family}/{what}")

    kernels.attend, kernels.decode_layer, kernels.decode_layers = attend, layer, layers

    # 2b. ranks whose batches end at different steps (batch 0 at its first token): the others' collectives still
    # meet theirs (generate keeps the ranks in step) and every rank's tokens are one process's
    one = ids[:1]  # one sequence, so that batch 0 is done after one token
    eos = int(ref.generate(one, max_new_tokens=1, do_sample=False)[0, -1]) if batch == 0 else 1
    outs = [m.generate(one, max_new_tokens=8, do_sample=False, eos_token_id=eos) for m in (model, ref)]
    if batch == 0:
        report.true(f"{family}/uneven_stop", outs[1].shape[1] == one.shape[1] + 1, "batch 0 stops at once")
    report.true(f"{family}/uneven_stop", torch.equal(outs[0], outs[1]), f"{outs[0].tolist()} vs {outs[1].tolist()}")
    report.done(f"{family}/uneven_stop")

    # 3. gradients: dense ones are one process's on this rank's batch; under EP the experts take the tokens of every
    # batch in their EP group (ep consecutive ranks), so theirs are the sum of one process's over those batches
    mine = set(range(rank // ep * ep, rank // ep * ep + ep))
    group_batches = sorted({r // tp for r in mine})
    expected = {b: grads_on(ref, tokens(b)) for b in group_batches}
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, output_router_logits=True).loss.backward()
    compared = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            report.true(f"{family}/grads {name}", expected[batch][name] is None, "no gradient")
            continue
        whole = state.full(name, p.grad)
        layout = state.layouts.get(name)
        if layout is not None and layout[1] == 0:  # whole experts per rank: EP
            want = sum(expected[b][name] for b in group_batches)
        else:
            want = expected[batch][name]
        report.close(f"{family}/grads {name}", whole, want)
        compared += 1
    report.true(f"{family}/grads", compared == sum(p.requires_grad for p in ref.parameters()),
                f"{compared} gradients compared")
    report.done(f"{family}/grads")

    # 4. resident bytes
    experts = set(state.layouts)
    report.extra.setdefault("bytes", {})[family] = dict(
        local=sum(nbytes(p) for p in model.parameters()), whole=sum(nbytes(p) for p in ref.parameters()),
        experts=sum(nbytes(p) for n, p in model.named_parameters() if n in experts),
        experts_whole=sum(nbytes(p) for n, p in ref.named_parameters() if n in experts),
        sharded_linear=any(isinstance(p, DTensor) for p in model.parameters()),
        plan=memory_plan(ref, tp, ep, torch.float32)["weights"])

    # 5. save_pretrained: gathered, written by rank 0
    model.save_pretrained(Path(out) / "saved" / family)


def layout_worker(rank: int, world: int, port: int, fields: dict, paths: dict[str, str], out: str) -> None:
    join_world(rank, world, port)
    report = Report()
    for family, path in paths.items():
        check_family(family, path, fields, rank, out, report)
    report.write(out, rank)
    leave_world()


def fsdp_worker(rank: int, world: int, port: int, path: str, tp4_path: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    join_world(rank, world, port)
    report = Report()
    ref = AutoModelForCausalLM.from_pretrained(path, fast=False)
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=2, fsdp_size=2))
    mesh = model.parallel.dense_mesh["dp_shard"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    q = model.model.layers[0].self_attn.q_proj.weight
    report.true("mesh", q.device_mesh.mesh_dim_names == ("dp_shard", "tp"), f"{q.device_mesh}, {q.placements}")
    report.done("mesh")
    expected = [grads_on(ref, tokens(b)) for b in (0, 1)]
    ids = tokens(rank // 2)
    with torch.no_grad():
        want = ref(ids, labels=ids).loss
    loss = model(ids, labels=ids).loss
    report.close("loss", loss, want)
    report.done("loss")
    loss.backward()
    for name, p in model.named_parameters():
        report.close(f"grads {name}", p.grad.full_tensor(), (expected[0][name] + expected[1][name]) / 2)
    report.done("grads")
    tp4_checks(tp4_path, report)
    two_d_mesh(path, rank, report)
    report.write(out, rank)
    leave_world()


def two_d_mesh(path: str, rank: int, report: Report) -> None:
    """A user's (dp, tp) mesh, as transformers takes it: TP over its tp groups, each dp replica its own batch."""
    from torch.distributed.device_mesh import init_device_mesh

    ref = AutoModelForCausalLM.from_pretrained(path, fast=False)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", device_mesh=mesh)
    ids = tokens(rank // 2)
    with torch.no_grad():
        report.close("2d_mesh", model(ids).logits, ref(ids).logits)
    outs = [m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False) for m in (model, ref)]
    report.true("2d_mesh", torch.equal(*outs), f"{outs[0].tolist()} vs {outs[1].tolist()}")
    report.done("2d_mesh")


TP4 = {"tp4": dict(tp_size=4), "tp4-ep4-all_to_all": dict(tp_size=4, ep_size=4, ep_implementation="all_to_all")}
TP4_CHECKS = ("logits", "loss", "grads", "greedy")


def tp4_checks(path: str, report: Report) -> None:
    """Every rank holds the same batch of 2 x 11 rows."""
    ref = AutoModelForCausalLM.from_pretrained(path, fast=False)
    ids = torch.randint(10, 512, (2, 11), generator=torch.Generator().manual_seed(3))
    expected = grads_on(ref, ids)
    with torch.no_grad():
        want = ref(ids, labels=ids, output_router_logits=True)
    for what, fields in TP4.items():
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(**fields))
        got = model(ids, labels=ids, output_router_logits=True)
        report.close(f"{what}/logits", got.logits, want.logits)
        report.close(f"{what}/loss", got.loss, want.loss)
        got.loss.backward()
        for name, p in model.named_parameters():
            report.close(f"{what}/grads {name}", model.parallel.full(name, p.grad), expected[name])
        outs = [m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False) for m in (model, ref)]
        report.true(f"{what}/greedy", torch.equal(*outs), f"{outs[0].tolist()} vs {outs[1].tolist()}")
        report.done(*(f"{what}/{c}" for c in TP4_CHECKS))


def bad_worker(rank: int, world: int, port: int, dirs: dict[str, str], out: str) -> None:
    join_world(rank, world, port)
    attempts = {
        "kv heads": (dirs["kv1"], DistributedConfig(tp_size=2)),
        "experts": (dirs["three"], DistributedConfig(ep_size=2, fsdp_size=2)),
        "world": (dirs["dense"], DistributedConfig(tp_size=2, fsdp_size=2)),
        "dense": (dirs["dense"], DistributedConfig(ep_size=2, fsdp_size=2)),
        "part of attention": (dirs["dense"], DistributedConfig(tp_size=2, tp_plan={
            "model.layers.*.self_attn.q_proj": "colwise"})),
        "one tied end": (dirs["dense"], DistributedConfig(tp_size=2, tp_plan={"lm_head": "colwise_gather_output"})),
        "head not gathered": (dirs["three"], DistributedConfig(tp_size=2, tp_plan={"lm_head": "colwise"})),
        "mlp width": (dirs["wide"], DistributedConfig(tp_size=2)),
        "misshapen expert": (dirs["misshapen"], DistributedConfig(ep_size=2, fsdp_size=2)),
        "rule naming nothing": (dirs["dense"], DistributedConfig(tp_size=2, tp_plan={  # relative to the base model
            f"layers.*.self_attn.{p}_proj": "rowwise" if p == "o" else "colwise" for p in "qkvo"})),
    }
    errors = {}
    for what, (path, config) in attempts.items():
        try:
            AutoModelForCausalLM.from_pretrained(path, distributed_config=config)
            errors[what] = None
        except Exception as e:  # noqa: BLE001 — the parent asserts the kind and the message
            errors[what] = [type(e).__name__, str(e), traceback.format_exc()]
    report = Report()
    report.extra["errors"] = errors
    report.write(out, rank)
    import torch.distributed as dist

    if dist.is_initialized():  # a rank leaving first would cut off the other's gloo connections still being made
        dist.barrier()
    leave_world()
