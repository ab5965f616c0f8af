"""The rollout pipeline of the RL loop: sync and async (bounded-staleness) generation.

Step s trains policy version s (the weights after s updates; version 0 is the initial policy).
A sample generated with weight version v and trained at step s lags `s - v` versions.

All rollout-side work - `produce(step)` (sample prompts, generate, score) and weight pushes -
runs on ONE background thread, in the order it was queued. That single queue is what makes the
pipeline both safe (the rollout pool and the reward's normalizer are only ever touched by one
thread) and deterministic (the same generations see the same weights on every run, however
long each call takes).

A step is launched only when its lag would stay within `max_staleness`: with the pool holding
version v (the last push queued), step s may start when `s - v <= max_staleness`.
  * sync (max_staleness 0): step s is launched after version s is pushed: generate, then train.
  * async (max_staleness k >= 1): up to k steps are generated ahead while the learners train;
    with k = 1, step s+1 is generated (with version s) while step s trains - one step off policy.
The off-policy gap is corrected in the loss with truncated importance weights
min(pi_old / pi_rollout, cap) from the samples' engine logprobs (see tidal.driver.rl_loop).

`drain()` waits for every queued job and returns the finished, not yet consumed steps, so a
checkpoint can store them; `preload()` puts them back on resume, which keeps an async run's
resumed trajectory identical to the uninterrupted one.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from tidal.common.types import ScoredBatch
from tidal.driver.daemon_executor import DaemonExecutor


class StalenessError(RuntimeError):
    """A sample lags the policy it trains by more than algorithm.max_staleness."""


@dataclass
class Produced:
    """One step's rollout-side result."""

    step: int
    batch: ScoredBatch
    weight_versions: list[int]  # (B,) version that generated each sample
    timings: dict[str, float]  # seconds of the rollout-side blocks: generate, score
    metrics: dict[str, float] = field(default_factory=dict)  # rollout/..., reward/... of the step


def check_staleness(step: int, weight_versions: list[int], max_staleness: int) -> int:
    """Largest lag of a step's samples; raises StalenessError past the bound."""
    lag = step - min(weight_versions) if weight_versions else 0
    if lag > max_staleness or (weight_versions and max(weight_versions) > step):
        raise StalenessError(
            f"step {step} got samples of weight versions {sorted(set(weight_versions))}: lag {lag} exceeds "
            f"algorithm.max_staleness={max_staleness} (or comes from a future version). The rollout pool "
            f"did not load the pushed weights in time; check cluster.sync_timeout_s and the pool's weight sync.")
    return lag


def load_or_restart(pool, weights: Any, version: int, timeout_s: float | None = None) -> int:
    """Push weight `version` to the pool; returns how many workers failed to load it. A worker
    killed or hung during the load does not stop the run: the pool has made `version` current
    and restarts that worker with it (tidal.rollout.pool_weights), so every later generation is
    served at `version`; the failure is said on stderr. Any other failure (the version did not
    become current, e.g. the sender failed) is raised."""
    from tidal.actors.weights import WeightSyncError

    try:
        pool.load_weights(weights, version, timeout_s)
    except WeightSyncError as e:
        if pool.weight_version != version:
            raise
        print(f"tidal: warning: weight version {version} did not load on {', '.join(e.failures)}; restarted "
              f"with it, the run goes on ({e})", file=sys.stderr, flush=True)
        return len(e.failures)
    return 0


class RolloutPipeline:
    """Schedules `produce(step)` and weight pushes on one background thread (see module doc)."""

    def __init__(self, produce: Callable[[int], Produced], push: Callable[[Any, int], None],
                 start_step: int, total_steps: int, max_staleness: int, pool_version: int,
                 max_lag: int | None = None):
        """`max_lag`: the most versions a sample handed out may lag (None: max_staleness; rollout.partial
        carries responses over steps, whose newest tokens may lag one more)."""
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.produce, self.push_fn = produce, push
        self.total_steps, self.max_staleness = total_steps, max_staleness
        self.max_lag = max_staleness if max_lag is None else max_lag
        self.next_step = start_step  # the next step to launch
        self.pool_version = pool_version  # version of the last push queued
        self.futures: dict[int, Future] = {}
        self._executor = DaemonExecutor("tidal-rollout")  # abandoned, not joined, when a run is interrupted
        self._lock = threading.Lock()

    def launch(self) -> list[int]:
        """Queue every step that may start now; returns the steps launched."""
        launched = []
        with self._lock:
            while self.next_step < self.total_steps and self.next_step - self.pool_version <= self.max_staleness:
                s = self.next_step
                self.futures[s] = self._executor.submit(self.produce, s)
                self.next_step += 1
                launched.append(s)
        return launched

    def get(self, step: int, timeout_s: float | None = None) -> Produced:
        """The result of `step` (launching it first if allowed); re-raises the producer's error."""
        self.launch()
        if step not in self.futures:
            raise RuntimeError(f"step {step} was never launched (next {self.next_step}, pool version "
                               f"{self.pool_version}, max_staleness {self.max_staleness}); push weights first")
        result = self.futures.pop(step).result(timeout=timeout_s)
        check_staleness(step, result.weight_versions, self.max_lag)
        return result

    def push(self, handle: Any, version: int) -> Future:
        """Queue a weight push behind the queued generations; later launches see `version`."""
        with self._lock:
            if version <= self.pool_version:
                raise ValueError(f"weight version {version} is not newer than the pool's {self.pool_version}")
            self.pool_version = version
            return self._executor.submit(self.push_fn, handle, version)

    def drain(self) -> list[Produced]:
        """Wait for all queued work; the finished, unconsumed steps (in order), kept queued."""
        self._executor.submit(lambda: None).result()
        return [self.futures[s].result() for s in sorted(self.futures)]

    def preload(self, produced: list[Produced]) -> None:
        """Put back steps a checkpoint stored (resume); launching continues after them."""
        for p in sorted(produced, key=lambda p: p.step):
            f: Future = Future()
            f.set_result(p)
            self.futures[p.step] = f
            self.next_step = max(self.next_step, p.step + 1)

    def shutdown(self, wait: bool = True) -> None:
        """wait=False (an interrupted run): leave a job that is still running to its daemon thread."""
        for f in self.futures.values():
            f.cancel()
        self._executor.shutdown(wait=wait, cancel_futures=True)
