"""RolloutPool fault tolerance and scaling with real vLLM workers in Ray actors: kill -9 of a
worker mid-batch, scaling 1 -> 2 -> 1 during a run, a weight sync to a worker that never
answers. Plus the pool in local mode (in-process, transformers backend)."""

import os
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tidal.actors.weights import WeightSyncError
from tidal.common.config import load_config
from tidal.common.models import load_causal_lm, load_tokenizer
from tidal.common.types import PromptBatch
from tidal.rollout.pool import RolloutPool
from tidal.rollout.sampling import Sampling
from tidal.rollout.worker import RolloutWorker

try:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
except ImportError:  # pragma: no cover
    pass


class GatedWorker(RolloutWorker):
    """A real vLLM worker with test controls: hold chunks while a gate file exists, hang in
    the next weight load, and remember which prompts it was sent."""

    def __init__(self, *args):
        super().__init__(*args)
        self.gate, self.hang_load, self.seen = None, False, []

    def set_gate(self, path):
        self.gate = path

    def hang_next_load(self):
        self.hang_load = True

    def received(self):
        return self.seen

    def generate(self, prompts, sampling):
        self.seen.append(list(prompts.index))
        deadline = time.monotonic() + 300
        while self.gate and os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().generate(prompts, sampling)

    def load_weights(self, handle):
        if self.hang_load:
            time.sleep(3600)  # a worker that never answers
        return super().load_weights(handle)


N_PROMPTS, N_SAMPLES = 24, 2
SAMPLING = Sampling(n=N_SAMPLES, temperature=1.0, max_new_tokens=12, seed=0)


def _cfg(**overrides):
    return load_config(None, ["rollout.max_model_len=128", "cluster.sync_timeout_s=240",
                              *[f"{k}={v}" for k, v in overrides.items()]])


def _prompts(path, n=N_PROMPTS):
    tok = load_tokenizer(path)
    texts = [f"review {i}: the movie was" for i in range(n)]
    return PromptBatch(list(range(100, 100 + n)), texts, [tok(t)["input_ids"] for t in texts])


def _assert_exactly_once(batch, prompts):
    assert Counter(batch.prompt_index) == {i: N_SAMPLES for i in prompts.index}
    assert batch.prompt_index == sorted(batch.prompt_index)
    for i, pid in enumerate(batch.prompt_index):  # rows belong to their prompt
        assert batch.prompt_ids[i] == prompts.token_ids[prompts.index.index(pid)]


def _wait_for(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_model):
    pool = RolloutPool(_cfg(**{"rollout.num_workers": 2}), tiny_model, worker_cls=GatedWorker, chunks_per_worker=3)
    yield pool
    pool.shutdown()


@pytest.mark.ray
def test_kill_worker_mid_batch_answers_every_prompt_once(pool, tiny_model, tmp_path):
    model = load_causal_lm(tiny_model)
    pool.load_weights([(k, v * 1.01) for k, v in model.state_dict().items()])  # restarts must reload this
    version = pool.weight_version
    victim = pool.worker_ids()[0]
    old_pid = next(i.pid for i in pool.worker_infos() if i.worker_id == victim)
    gate = tmp_path / "gate"
    gate.touch()
    pool.group.call(lambda a: a.set_gate.remote(str(gate)), actor_ids=[victim], timeout_s=30)
    prompts = _prompts(tiny_model)
    with ThreadPoolExecutor(1) as ex:
        future = ex.submit(pool.generate, prompts, SAMPLING)
        _wait_for(lambda: pool.last_stats.chunks_by_worker.get(victim), 60, "a chunk on the victim")
        os.kill(old_pid, signal.SIGKILL)  # the victim dies holding a chunk
        batch = future.result(timeout=600)
    _assert_exactly_once(batch, prompts)
    stats = pool.last_stats
    assert stats.requeued_chunks >= 1 and victim in stats.restarted_workers
    assert set(batch.weight_version) == {version}
    infos = pool.worker_infos()  # waits for the restarted engine
    assert len(infos) == 2 == pool.num_workers
    restarted = next(i for i in infos if i.worker_id == victim)
    assert restarted.pid != old_pid and restarted.weight_version == version
    # Every chunk a worker received was a slice, never the whole batch.
    for r in pool.group.call(lambda a: a.received.remote(), timeout_s=60):
        assert all(len(c) <= -(-N_PROMPTS // stats.chunks) for c in r.get())


@pytest.mark.ray
def test_scale_up_and_down_during_a_run_loses_nothing(pool, tiny_model, tmp_path):
    pool.scale(1)
    assert pool.num_workers == 1
    (first,) = pool.worker_ids()
    gate = tmp_path / "gate"
    gate.touch()  # the first worker holds its chunk until a second worker has served one
    pool.group.call(lambda a: a.set_gate.remote(str(gate)), actor_ids=[first], timeout_s=30)
    pool.chunks_per_worker = 6
    prompts = _prompts(tiny_model)
    try:
        with ThreadPoolExecutor(1) as ex:
            future = ex.submit(pool.generate, prompts, SAMPLING)
            _wait_for(lambda: pool.last_stats.chunks_by_worker.get(first), 60, "the run to start")
            pool.scale(2)  # applied by the running call
            _wait_for(lambda: any(w != first for w in pool.last_stats.chunks_by_worker), 300,
                      "the added worker to serve a chunk")
            pool.scale(1)
            gate.unlink()
            batch = future.result(timeout=600)
    finally:
        pool.chunks_per_worker = 3
    _assert_exactly_once(batch, prompts)
    served = pool.last_stats.chunks_by_worker
    assert len(served) == 2 and sum(served.values()) == pool.last_stats.chunks == 6
    assert pool.num_workers == 1 and len(pool.group.actor_ids) == 1
    pool.scale(2)
    assert pool.num_workers == 2
    assert len({i.weight_version for i in pool.worker_infos()} | {pool.weight_version}) == 1


@pytest.mark.ray
def test_sync_to_a_worker_that_never_answers_fails_in_time_naming_it(pool, tiny_model):
    stuck, healthy = pool.worker_ids()
    pool.group.call(lambda a: a.hang_next_load.remote(), actor_ids=[stuck], timeout_s=30)
    model = load_causal_lm(tiny_model)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as info:
        pool.load_weights(model.state_dict().items(), timeout_s=5.0)
    assert time.monotonic() - start < 30
    assert list(info.value.failures) == [f"rollout-{stuck}"]
    assert f"rollout-{stuck}" in str(info.value) and f"rollout-{healthy}" not in str(info.value)
    # The pool replaced the stuck worker; it loads the new version before serving.
    prompts = _prompts(tiny_model, 6)
    batch = pool.generate(prompts, SAMPLING)
    _assert_exactly_once(batch, prompts)
    infos = pool.worker_infos()
    assert len(infos) == 2 and {i.weight_version for i in infos} == {pool.weight_version}


def test_local_mode_pool_with_transformers_backend(tiny_model):
    cfg = _cfg(**{"rollout.num_workers": 2, "rollout.backend": "hf"})
    pool = RolloutPool(cfg, tiny_model, local=True, chunks_per_worker=2)
    try:
        prompts = _prompts(tiny_model, 8)
        batch = pool.generate(prompts, SAMPLING)
        _assert_exactly_once(batch, prompts)
        assert pool.last_stats.chunks_by_worker == {0: 2, 1: 2}
        greedy = Sampling(n=N_SAMPLES, temperature=0.0, max_new_tokens=8)
        before = pool.generate(prompts, greedy).response_ids
        state = load_causal_lm(tiny_model).state_dict()
        pool.load_weights([(k, v + 0.05 * torch.randn_like(v)) for k, v in state.items()])
        assert pool.generate(prompts, greedy).response_ids != before
        pool.load_weights(state.items())
        assert pool.generate(prompts, greedy).response_ids == before and pool.weight_version == 2
        pool.scale(3)
        assert pool.num_workers == 3 and {i.weight_version for i in pool.worker_infos()} == {2}
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="unique"):
        RolloutPool(cfg, tiny_model, local=True).generate(PromptBatch([1, 1], ["a", "b"], [[5], [6]]))


@pytest.mark.ray
def test_a_worker_that_cannot_start_is_reported_not_retried(ray_cluster, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a folder vLLM cannot load
    start = time.monotonic()
    with pytest.raises(Exception, match="start: rollout-0 failed: "):
        RolloutPool(_cfg(**{"rollout.num_workers": 1}), tmp_path)
    assert time.monotonic() - start < 120


@pytest.mark.ray
def test_a_worker_that_died_while_idle_is_restarted_by_the_next_push(pool, tiny_model):
    victim = pool.worker_ids()[0]
    os.kill(next(i.pid for i in pool.worker_infos() if i.worker_id == victim), signal.SIGKILL)
    time.sleep(1.0)
    model = load_causal_lm(tiny_model)
    pool.load_weights(model.state_dict().items())  # no WeightSyncError: the dead worker is replaced
    infos = pool.worker_infos()
    assert len(infos) == 2 and {i.weight_version for i in infos} == {pool.weight_version}


@pytest.mark.ray
def test_a_worker_that_hangs_in_an_rl_push_is_restarted_and_the_run_goes_on(pool, tiny_model, capsys):
    from tidal.driver.pipeline import load_or_restart

    stuck, _ = pool.worker_ids()
    pool.group.call(lambda a: a.hang_next_load.remote(), actor_ids=[stuck], timeout_s=30)
    version = pool.weight_version + 1
    assert load_or_restart(pool, load_causal_lm(tiny_model).state_dict().items(), version, timeout_s=5.0) == 1
    assert pool.weight_version == version and f"rollout-{stuck}" in capsys.readouterr().err
    prompts = _prompts(tiny_model, 6)
    _assert_exactly_once(pool.generate(prompts, SAMPLING), prompts)  # served at the new version only
    assert {i.weight_version for i in pool.worker_infos()} == {version}
    with pytest.raises(ValueError, match="not newer"):  # not a WeightSyncError: raised as it is
        load_or_restart(pool, load_causal_lm(tiny_model).state_dict().items(), version)
