"""ActorGroup: result-or-error per actor, timeouts, health probes, restarts, resizing;
in-process (local) and on a private Ray cluster with plain small actors."""

import os
import signal
import sys
import time

import pytest

from tidal.actors.actor_group import ActorGroup
from tidal.actors.refs import ActorCallTimeout

# Ray workers cannot import this test module by name: ship its classes by value.
try:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
except ImportError:  # pragma: no cover
    pass


class Counter:
    def __init__(self, start: int):
        self.value = start

    def add(self, x: int) -> int:
        self.value += x
        return self.value

    def add_all(self, xs: list[int]) -> int:
        return self.add(sum(xs))

    def fail_if(self, value: int) -> int:
        if self.value == value:
            raise ValueError(f"refusing at {value}")
        return self.value

    def pid(self) -> int:
        return os.getpid()

    def placement(self) -> tuple:
        import ray

        ctx = ray.get_runtime_context()
        return ctx.get_placement_group_id(), ctx.get_assigned_resources()

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def _values(results):
    return [r.get() for r in results]


# ----------------------------------------------------------------------------- local mode


def test_local_call_returns_value_per_actor():
    group = ActorGroup(Counter, 3, args=(10,), local=True, name="counter")
    assert group.actor_ids == [0, 1, 2]
    assert _values(group.call(lambda a: a.add.remote(5))) == [15, 15, 15]
    assert _values(group.call(lambda a: a.add.remote(1), actor_ids=[1])) == [16]


def test_local_error_is_a_result_not_an_exception():
    group = ActorGroup(Counter, 2, args=(10,), local=True, name="counter")
    group.call(lambda a: a.add.remote(1), actor_ids=[1])  # actor 1 now at 11
    results = group.call(lambda a: a.fail_if.remote(10))
    assert [r.ok for r in results] == [False, True]
    assert isinstance(results[0].error, ValueError) and results[0].label == "counter-0"
    assert results[1].value == 11
    with pytest.raises(ValueError, match="refusing"):
        results[0].get()
    # A method that raises is the caller's business: the actor stays healthy.
    assert group.healthy_actor_ids() == [0, 1]


def test_local_add_remove_and_restore():
    group = ActorGroup(Counter, 1, args=(0,), local=True)
    assert group.add(2) == [1, 2]
    group.remove([1])
    assert group.actor_ids == [0, 2] and group.num_actors == 2
    assert group.add(1) == [3]  # ids are never reused
    group.call(lambda a: a.add.remote(7), actor_ids=[3])
    group.mark_unhealthy(3)
    assert group.probe_unhealthy() == [3]
    assert group.restore() == [3]
    assert group.restarts(3) == 1 and group.is_healthy(3)
    assert _values(group.call(lambda a: a.add.remote(0), actor_ids=[3])) == [0]  # a fresh object


class GroupError(RuntimeError):
    pass


def test_collect_or_raise_names_the_failed_actor_by_its_label():
    group = ActorGroup(Counter, 3, args=(10,), local=True, label=lambda i: f"counter {i}/3")
    assert group.collect_or_raise(group.start(lambda a: a.add.remote(1)), "add", GroupError) == [11, 11, 11]
    group.call(lambda a: a.add.remote(1), actor_ids=[0])  # actor 0 at 12, the others at 11
    with pytest.raises(GroupError, match=r"^fail_if: counter 1/3 failed: ValueError: refusing at 11 "
                                         r"\(also failed: counter 2/3\)$") as info:
        group.collect_or_raise(group.start(lambda a: a.fail_if.remote(11)), "fail_if", GroupError)
    assert isinstance(info.value.__cause__, ValueError)
    results = group.call(lambda a: a.fail_if.remote(12))
    assert results[0].label == "counter 0/3" and not results[0].ok


@pytest.mark.ray
def test_collect_or_raise_lists_every_actor_that_timed_out_with_the_hint(ray_cluster):
    group = ActorGroup(Counter, 2, args=(0,), options={"num_cpus": 0}, label=lambda i: f"worker {i}")
    try:
        with pytest.raises(GroupError, match=r"^sleep: worker 0, worker 1 did not answer within 1 s \(some.setting\)$"):
            group.collect_or_raise(group.start(lambda a: a.sleep.remote(60)), "sleep", GroupError, timeout_s=1.0,
                                   timeout_hint=" (some.setting)")
        assert group.unhealthy_actor_ids() == [0, 1]
        group.restore()
        ref = group.put([1, 2, 3])  # one object-store copy, resolved for the call like any argument
        assert group.collect_or_raise(group.start(lambda a: a.add_all.remote(ref)), "add_all", GroupError,
                                      timeout_s=60) == [6, 6]
    finally:
        group.shutdown()


def test_negative_size_is_rejected():
    with pytest.raises(ValueError, match="num_actors"):
        ActorGroup(Counter, -1, local=True)


# ----------------------------------------------------------------------------- Ray actors


@pytest.mark.ray
def test_ray_call_error_and_timeout(ray_cluster):
    group = ActorGroup(Counter, 2, args=(3,), options={"num_cpus": 0}, name="counter")
    try:
        assert _values(group.call(lambda a: a.add.remote(1))) == [4, 4]
        results = group.call(lambda a: a.fail_if.remote(4))
        assert not results[0].ok and "refusing at 4" in str(results[0].error)
        assert group.healthy_actor_ids() == [0, 1]  # an application error is not a death

        start = time.monotonic()
        results = group.call(lambda a: a.sleep.remote(60), actor_ids=[1], timeout_s=1.0)
        assert time.monotonic() - start < 10
        assert isinstance(results[0].error, ActorCallTimeout)
        assert "counter-1" in str(results[0].error)
        assert group.unhealthy_actor_ids() == [1]
        assert group.restore() == [1]  # kills the stuck process and starts a new one
        assert _values(group.call(lambda a: a.add.remote(0), actor_ids=[1], timeout_s=60)) == [3]
    finally:
        group.shutdown()


@pytest.mark.ray
def test_ray_killed_actor_is_detected_and_restored(ray_cluster):
    group = ActorGroup(Counter, 2, args=(0,), options={"num_cpus": 0}, name="counter")
    try:
        pids = _values(group.call(lambda a: a.pid.remote(), timeout_s=60))
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while group.probe_unhealthy(timeout_s=5) != [0] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert group.unhealthy_actor_ids() == [0]
        assert group.healthy_actor_ids() == [1]
        assert group.restore() == [0]
        new_pids = _values(group.call(lambda a: a.pid.remote(), timeout_s=60))
        assert new_pids[0] != pids[0] and new_pids[1] == pids[1]
        assert group.restarts(0) == 1 and group.probe_unhealthy(timeout_s=30) == []

        group.add(1)
        assert _values(group.call(lambda a: a.add.remote(2), timeout_s=60)) == [2, 2, 2]
        group.remove([0, 2])
        assert group.actor_ids == [1]
    finally:
        group.shutdown()
