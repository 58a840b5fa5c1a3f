"""The thread count of decoding, measured while it runs (inference.threads.ThreadTuner), and the OpenMP wait
policy chosen at import (moelm.omp)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref

import torch

import moelm
from moelm.inference.threads import FIRST_PERIOD, PROBE, ThreadTuner


class FakeClock:
    """Time advances only by the steps: a step at n threads costs cost[n]."""

    def __init__(self, cost: dict[int, float]):
        self.now, self.cost = 0.0, cost

    def __call__(self) -> float:
        return self.now

    def step(self):
        self.now += self.cost[torch.get_num_threads()]
        return torch.get_num_threads()


def run(cost: dict[int, float], steps: int, most: int = 2) -> tuple[ThreadTuner, list[int]]:
    before = torch.get_num_threads()
    clock = FakeClock(cost)
    tuner = ThreadTuner(clock.step, most=most, clock=clock)
    used = [tuner() for _ in range(steps)]
    tuner.restore()
    assert torch.get_num_threads() == before
    return tuner, used


def test_keeps_the_faster_count_and_probes_less_often():
    tuner, used = run({1: 2.0, 2: 1.0}, 200)
    assert tuner.current == 2 and used[:FIRST_PERIOD] == [2] * FIRST_PERIOD
    assert used[FIRST_PERIOD:FIRST_PERIOD + PROBE] == [1] * PROBE  # one probe at half
    assert used.count(1) <= 5 * PROBE and tuner.period > FIRST_PERIOD  # then ever rarer


def test_moves_to_fewer_threads_when_they_are_faster():
    """A machine whose other cores are busy: one thread beats two, and decoding moves there after one probe."""
    tuner, used = run({1: 1.0, 2: 5.0}, 100)
    assert tuner.current == 1 and used[FIRST_PERIOD + PROBE:FIRST_PERIOD + PROBE + FIRST_PERIOD] == [1] * FIRST_PERIOD
    assert used[-50:].count(2) <= PROBE


def test_finds_a_middle_count():
    tuner, _ = run({1: 4.0, 2: 2.0, 4: 1.0, 8: 3.0}, 300, most=8)
    assert tuner.current == 4


def test_generate_restores_the_thread_count_and_gives_the_same_tokens():
    model = moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5-tiny"), seed=0).eval()
    ids = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model.generate(ids, max_new_tokens=30, do_sample=False)
        torch.set_num_threads(2)
        two = model.generate(ids, max_new_tokens=30, do_sample=False)  # tuned between 2 and 1 threads
        assert torch.get_num_threads() == 2
        beams = model.generate(ids, max_new_tokens=12, num_beams=2, do_sample=False)
        assert torch.get_num_threads() == 2 and beams.shape[0] == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_a_resumed_tuner_keeps_its_choice_and_period():
    clock = FakeClock({1: 2.0, 2: 1.0})
    tuner = ThreadTuner(clock.step, most=2, clock=clock)
    for _ in range(FIRST_PERIOD + PROBE + 1):  # one probe at half, rejected: the period doubles
        tuner()
    period, left = tuner.period, tuner.left
    assert period == 2 * FIRST_PERIOD
    tuner.restore()
    assert tuner.resume(clock.step) is tuner and (tuner.period, tuner.left) == (period, left)
    used = [tuner() for _ in range(left)]
    assert used == [2] * left  # no probe before the carried-over period runs out
    tuner.restore()


def test_generate_keeps_a_tuner_per_model_across_calls():
    """Each generate call used to start its thread tuner over, probing half the threads at its 8th step: 8-12%
    of a 64-token call at full size. The tuner of a model (per kind of step, thread count and batch rows) now
    carries over, so its probes grow rarer across calls."""
    from moelm.generation import generate as gen

    model = moelm.AutoModelForCausalLM.from_config(moelm.named_config("ernie4_5-tiny"), seed=0).eval()
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        model.generate(ids, max_new_tokens=12, do_sample=False)
        (key, tuner), = gen._TUNERS[model].items()
        assert key == ("decode", 2, 1)
        model.generate(ids, max_new_tokens=4, do_sample=False)
        assert list(gen._TUNERS[model]) == [key] and gen._TUNERS[model][key] is tuner
        model.generate(ids.repeat(2, 1), max_new_tokens=4, do_sample=False)  # another batch: its own tuner
        assert set(gen._TUNERS[model]) == {key, ("decode", 2, 2)}
        assert torch.get_num_threads() == 2
        # a step that holds the model (generate_tokens takes any step) does not keep it alive through its tuner
        list(gen.generate_tokens(model, ids, max_new_tokens=4, do_sample=False,
                                 step=lambda m, state, _model=model: gen.decode_step(m, state)))
    finally:
        torch.set_num_threads(before)
    gone = weakref.ref(model)
    del model, tuner
    gc.collect()
    assert gone() is None


def test_wait_policy_chosen_at_import_keeps_the_users_and_measures_otherwise():
    code = "import moelm.omp as o, moelm, os; print(o.chosen, '|', os.environ.get('OMP_WAIT_POLICY'))"

    def chosen(**env) -> str:
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert chosen(OMP_WAIT_POLICY="ACTIVE").endswith("| ACTIVE") and "set before moelm" in chosen(
        OMP_WAIT_POLICY="ACTIVE")
    free = chosen()
    assert ("default waits" in free and free.endswith("| None")) or ("PASSIVE" in free and "cores" in free)
    from moelm import omp
    assert omp.other_load() is None or omp.other_load() >= 0.0
