"""Staleness bookkeeping of the rollout pipeline (sync and async), with fake producers."""

import threading
import time

import pytest

from tidal.driver.pipeline import Produced, RolloutPipeline, StalenessError, check_staleness


class FakePool:
    """Records the order of generations and pushes and the version each generation saw."""

    def __init__(self, delays=None):
        self.version = 0
        self.log = []
        self.delays = delays or {}
        self.threads = set()

    def produce(self, step):
        self.threads.add(threading.get_ident())
        time.sleep(self.delays.get(step, 0.0))
        self.log.append(("gen", step, self.version))
        return Produced(step, f"batch-{step}", [self.version] * 4, {"generate": 0.0})

    def push(self, handle, version):
        self.threads.add(threading.get_ident())
        self.log.append(("push", version))
        self.version = version


def run_loop(pipe, pool, start, total, train_delay=0.0):
    lags = {}
    for s in range(start, total):
        p = pipe.get(s, timeout_s=10)
        lags[s] = s - min(p.weight_versions)
        time.sleep(train_delay)  # the update
        pipe.push(f"weights-{s + 1}", s + 1)
    pipe.drain()
    pipe.shutdown()
    return lags


def test_sync_generates_each_step_with_the_current_policy():
    pool = FakePool()
    pipe = RolloutPipeline(pool.produce, pool.push, 0, 4, max_staleness=0, pool_version=0)
    lags = run_loop(pipe, pool, 0, 4)
    assert lags == {0: 0, 1: 0, 2: 0, 3: 0}
    assert pool.log == [("gen", 0, 0), ("push", 1), ("gen", 1, 1), ("push", 2), ("gen", 2, 2),
                        ("push", 3), ("gen", 3, 3), ("push", 4)]
    assert len(pool.threads) == 1  # all rollout-side work on one thread


@pytest.mark.parametrize("k", [1, 2])
def test_async_runs_ahead_by_at_most_max_staleness(k):
    pool = FakePool(delays={0: 0.05, 2: 0.02})
    pipe = RolloutPipeline(pool.produce, pool.push, 0, 6, max_staleness=k, pool_version=0)
    lags = run_loop(pipe, pool, 0, 6, train_delay=0.01)
    assert max(lags.values()) == k and all(lag <= k for lag in lags.values())
    # step s is generated with version max(0, s - k), whatever the timing
    gens = {step: v for kind, step, *rest in [e for e in pool.log if e[0] == "gen"] for v in rest}
    assert gens == {s: max(0, s - k) for s in range(6)}


def test_async_generation_overlaps_training():
    """With k=1, step s+1 is being generated while step s trains."""
    pool = FakePool(delays={s: 0.1 for s in range(4)})
    pipe = RolloutPipeline(pool.produce, pool.push, 0, 4, max_staleness=1, pool_version=0)
    t0 = time.perf_counter()
    run_loop(pipe, pool, 0, 4, train_delay=0.1)
    overlapped = time.perf_counter() - t0
    pool2 = FakePool(delays={s: 0.1 for s in range(4)})
    pipe2 = RolloutPipeline(pool2.produce, pool2.push, 0, 4, max_staleness=0, pool_version=0)
    t0 = time.perf_counter()
    run_loop(pipe2, pool2, 0, 4, train_delay=0.1)
    serial = time.perf_counter() - t0
    assert serial > 0.75 and overlapped < serial - 0.2


def test_same_schedule_after_drain_and_preload():
    """A checkpoint in the middle of an async run: drain, store, resume with preload."""
    pool = FakePool()
    pipe = RolloutPipeline(pool.produce, pool.push, 0, 6, max_staleness=1, pool_version=0)
    for s in range(3):
        pipe.get(s)
        pipe.push(None, s + 1)
    stored = pipe.drain()
    assert [p.step for p in stored] == [3] and stored[0].weight_versions == [2] * 4
    pipe.shutdown()
    # resume: the pool restarts holding version 3 (the checkpoint's policy)
    pool2 = FakePool()
    pool2.version = 3
    pipe2 = RolloutPipeline(pool2.produce, pool2.push, 3, 6, max_staleness=1, pool_version=3)
    pipe2.preload(stored)
    lags = run_loop(pipe2, pool2, 3, 6)
    assert lags == {3: 1, 4: 1, 5: 1}
    assert [e for e in pool2.log if e[0] == "gen"] == [("gen", 4, 3), ("gen", 5, 4)]


def test_too_stale_samples_are_an_error():
    assert check_staleness(5, [4, 5], 1) == 1
    with pytest.raises(StalenessError, match="max_staleness=1"):
        check_staleness(5, [3, 5], 1)
    with pytest.raises(StalenessError, match="future"):
        check_staleness(5, [6], 1)

    def stale(step):
        return Produced(step, None, [-5], {})

    pipe = RolloutPipeline(stale, lambda h, v: None, 0, 2, max_staleness=0, pool_version=0)
    with pytest.raises(StalenessError):
        pipe.get(0)
    pipe.shutdown()


def test_producer_errors_reach_the_trainer_and_versions_must_grow():
    def boom(step):
        raise ValueError("engine died")

    pipe = RolloutPipeline(boom, lambda h, v: None, 0, 2, max_staleness=0, pool_version=0)
    with pytest.raises(ValueError, match="engine died"):
        pipe.get(0)
    with pytest.raises(ValueError, match="not newer"):
        pipe.push(None, 0)
    pipe.shutdown()
