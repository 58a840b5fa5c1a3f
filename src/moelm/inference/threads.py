"""The thread count of a stream of like steps (decoding), chosen by timing them as they run.

On a machine whose cores other processes also use, an OpenMP barrier can wait a whole scheduler slice for a thread
that was descheduled: with every core asked for, each parallel region of a decoding step may cost milliseconds,
and fewer threads are then faster. The load comes and goes, so the count is measured while decoding, not fixed:
the steps run at the current count, and now and then a few run at the neighbouring count (half, or double up to the
most); the faster one stays. When the choice holds, the probes grow rarer (every 8, 16, ... 256 steps), also across the
calls of one model (generation.generate keeps a tuner per model): a probe at half the threads costs a memory-bound
step up to 1.6x, and starting over each call cost 8-12% of a 64-token generate (full-size ERNIE-4.5-21B-A3B, Zen 3).
While `shared()` says other calls are running (generate calls in other Python threads), the steps run at the count
the caller had, untimed: torch's thread count is the whole process's, and an op's result (its reduction order, the
kernel path chosen for it) depends on it, so a probe would change what the other calls compute.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

PROBE = 3  # steps timed at the other count
FIRST_PERIOD, LAST_PERIOD = 8, 256


class ThreadTuner:
    """Wraps a step function; each call runs it at the chosen torch thread count and times it. `most` (default:
    torch's count now) is the upper bound; `restore()` puts torch's count back."""

    def __init__(self, step: Callable, most: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.step, self.clock = step, clock
        self.before = torch.get_num_threads()
        self.most = most or self.before
        self.current = self.most
        self.period, self.left = FIRST_PERIOD, FIRST_PERIOD
        self.recent: list[float] = []  # the last steps at `current`
        self.trial: int | None = None  # the count being probed
        self.trial_times: list[float] = []
        self.down = True  # the direction of the next probe
        self.shared: Callable[[], bool] = lambda: False  # whether other calls run now (then: no probes)

    def __call__(self, *args, **kwargs):
        if self.shared():  # torch's count is the process's: the others' results would change with it
            return self._at(self.before, args, kwargs)
        n = self.trial or self.current
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        start = self.clock()
        out = self.step(*args, **kwargs)
        self._record(self.clock() - start)
        return out

    def resume(self, step: Callable) -> "ThreadTuner":
        """The same choice and probing period for another run of like steps (the next generate call): the probes
        stay rare instead of starting over every call. Times from the last run are dropped (its contexts were
        others); torch's count now is the one `restore()` puts back."""
        self.step, self.before = step, torch.get_num_threads()
        self.recent, self.trial, self.trial_times = [], None, []
        self.left = max(self.left, 1)
        return self

    def untimed(self, *args, **kwargs):
        """A step of another kind (a speculative check of several tokens) at the chosen count, not timed: the
        choice compares like steps only."""
        return self._at(self.before if self.shared() else self.current, args, kwargs)

    def _at(self, n: int, args, kwargs):
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return self.step(*args, **kwargs)

    def _record(self, seconds: float):
        if self.trial is not None:
            self.trial_times.append(seconds)
            if len(self.trial_times) == PROBE:
                self._decide()
            return
        self.recent = (self.recent + [seconds])[-PROBE:]
        self.left -= 1
        if self.left <= 0 and self.most > 1:
            down = self.current > 1 and (self.down or self.current == self.most)
            self.trial = self.current // 2 if down else min(2 * self.current, self.most)
            self.down = not down
            self.trial_times = []

    def _decide(self):
        better = statistics.median(self.trial_times) < 0.95 * statistics.median(self.recent)
        if better:
            self.current, self.period, self.recent = self.trial, FIRST_PERIOD, self.trial_times
        else:
            self.period = min(2 * self.period, LAST_PERIOD)
        self.trial, self.left = None, self.period

    def restore(self):
        torch.set_num_threads(self.before)
