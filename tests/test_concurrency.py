"""One model object used from several Python threads, forked DataLoader workers, and a generate interrupted by
Ctrl-C: every result equals the same call made alone."""
from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import moelm
from moelm.generation import generate as gen


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the thread tuner runs (on a 1-core machine too)
    yield
    torch.set_num_threads(before)


def tiny(name: str = "ernie4_5_moe-tiny"):
    return moelm.AutoModelForCausalLM.from_config(moelm.named_config(name), seed=0).eval()


def calls():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 200, (b, n), generator=g) for b, n in [(1, 4), (2, 7), (1, 9), (3, 5)]]
    return [("generate", i, 4 + 5 * k) for k, i in enumerate(ids)] + [("forward", ids[1], 0)]


def run(model, call):
    kind, ids, new = call
    if kind == "forward":
        with torch.no_grad():
            return model(ids).logits
    return model.generate(ids, max_new_tokens=new, do_sample=False)


def test_threads_sharing_a_model_get_what_each_call_gets_alone(two_threads):
    """The tuner kept per model was shared by concurrent generate calls: one call's end cleared its step while
    another was decoding with it (TypeError: 'NoneType' object is not callable)."""
    model, todo = tiny(), calls()
    alone = [run(model, c) for c in todo]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(6):
            done = [(k % len(todo), pool.submit(run, model, c)) for k, c in enumerate(todo * 2)]
            for k, future in done:
                assert torch.equal(future.result(timeout=60), alone[k])
    assert torch.get_num_threads() == 2 and not gen._TUNING.locked()


def test_the_tuner_leaves_the_thread_count_alone_while_other_calls_run(two_threads):
    """torch's thread count is the process's, and a result depends on it (reduction order, the kernel chosen per
    count): a generate probing 1 thread at its 9th step changed what a generate in another thread computed. While
    another generate runs, the tuner does not probe; a thread that only exists (a server's, a pool's) does not stop
    it."""
    model, counts = tiny("ernie4_5-tiny"), []

    def step(m, state):
        counts.append(torch.get_num_threads())
        return gen.decode_step(m, state)

    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    waiting, release = threading.Event(), threading.Event()

    def held(m, state):  # the other call, held inside its decoding loop
        waiting.set()
        release.wait(60)
        return gen.decode_step(m, state)

    idle = threading.Thread(target=release.wait, args=(60,))
    idle.start()
    counts.clear()
    list(gen.generate_tokens(model, ids, max_new_tokens=24, do_sample=False, step=step))
    assert 1 in counts  # another thread alive, no other call: tuned
    other = threading.Thread(target=lambda: list(gen.generate_tokens(model, ids, max_new_tokens=3, do_sample=False,
                                                                     step=held)))
    other.start()
    counts.clear()
    try:
        waiting.wait(60)
        list(gen.generate_tokens(model, ids, max_new_tokens=24, do_sample=False, step=step))
    finally:
        release.set()
        other.join(60)
        idle.join(60)
    assert len(counts) == 23 and set(counts) == {2}
    counts.clear()
    list(gen.generate_tokens(model, ids, max_new_tokens=24, do_sample=False, step=step))  # alone: tuned again
    assert 1 in counts and torch.get_num_threads() == 2


class Calls(torch.utils.data.Dataset):
    def __init__(self, model, todo):
        self.model, self.todo = model, todo

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, k):
        return torch.get_num_threads(), run(self.model, self.todo[k])


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="no fork")
def test_forked_dataloader_workers_compute_as_the_parent(two_threads):
    """DataLoader workers forked after the model ran (OpenMP's pool started) do not hang; each runs at one thread
    (DataLoader sets it) and gets what the parent gets at one thread."""
    model, todo = tiny(), calls()
    run(model, todo[1])
    torch.set_num_threads(1)
    alone = [run(model, c) for c in todo]
    torch.set_num_threads(2)
    loader = torch.utils.data.DataLoader(Calls(model, todo), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=60)
    got = list(loader)
    assert [n for n, _ in got] == [1] * len(todo)
    assert all(torch.equal(out, a) for (_, out), a in zip(got, alone))


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or threading.current_thread() is not threading.main_thread(),
                    reason="needs SIGINT in the main thread")
def test_ctrl_c_during_generate_leaves_nothing_half_done(two_threads):
    model, todo = tiny(), calls()
    alone = [run(model, c) for c in todo]
    interrupted = 0
    for delay in (0.002, 0.01, 0.03):
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            for c in todo * 1000:  # until interrupted
                run(model, c)
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
    assert interrupted == 3 and torch.get_num_threads() == 2 and not gen._TUNING.locked()
    assert all(torch.equal(run(model, c), a) for c, a in zip(todo, alone))
