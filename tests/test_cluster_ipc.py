"""rollout.weight_transport=ipc on CPU: the driver clocks a version bucket by bucket through the
learner ranks' real IpcSender (tidal.actors.ipc) and the workers, worker k from rank k; a failing
worker is named; a worker without a rank on its GPU is refused. On CPU a bucket carries its buffer
(Ray copies it); the CUDA IPC handle itself is exercised by bench/gpu_check.py on a GPU.

Also the rollout worker's vLLM sleep mode (rollout.sleep): the engine is awake only inside its
calls - a recording stand-in for vllm.LLM, since sleep mode exists on CUDA only."""

import sys
from types import SimpleNamespace

import pytest
import torch
from tidal.actors.actor_group import ActorGroup
from tidal.actors.ipc import IpcSender, IpcWeights, opened
from tidal.actors.weight_delta import DeltaReceiver
from tidal.actors.weights import WeightHandle, WeightSyncError, iter_buckets
from tidal.common.config import load_config
from tidal.common.types import PromptBatch
from tidal.rollout.sampling import Sampling
from tidal.rollout.worker import RolloutWorker

try:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
except ImportError:  # pragma: no cover
    pass


def _weights(rank: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [("embed.weight", torch.randn(300, 64, generator=g)), ("layer.weight", torch.randn(64, 64, generator=g)),
            ("half.weight", torch.randn(32, 16, generator=g).to(torch.bfloat16)), ("steps", torch.arange(5) + rank)]


class Rank:
    """A learner rank's ipc methods, sharing the test's weights instead of a DeepSpeed engine's."""

    def __init__(self, rank: int):
        self.rank, self.ipc = rank, IpcSender()

    def ipc_open(self, handle) -> None:
        self.ipc.open(handle.version, iter_buckets(_weights(self.rank), 20 / 1024), torch.device("cpu"))

    def ipc_next(self):
        return self.ipc.next()

    def ipc_close(self) -> None:
        self.ipc.close()

    def is_open(self) -> bool:
        return self.ipc._buckets is not None


class Worker:
    def __init__(self, fail: bool = False):
        self.fail, self.state, self.version, self.buckets = fail, {}, 0, 0

    def load_ipc_bucket(self, bucket) -> int:
        if self.fail:
            raise RuntimeError("engine refused the bucket")
        with opened(bucket) as named:
            self.state.update({n: t.clone() for n, t in named})
        self.buckets += 1
        return len(bucket.names)

    def finish_ipc(self, version: int) -> int:
        self.version = version
        return version

    def checksum(self):
        return self.version, self.buckets, sorted(self.state), float(sum(t.double().sum() for t in self.state.values()))


def _total(rank: int) -> float:
    return float(sum(t.double().sum() for _, t in _weights(rank)))


@pytest.mark.ray
def test_ipc_version_goes_bucket_by_bucket_from_each_rank_to_the_worker_on_its_gpu(ray_cluster):
    ranks = ActorGroup(Rank, 2, args=lambda i: (i,), options={"num_cpus": 0}, name="learner")
    workers = ActorGroup(Worker, 3, args=lambda i: (i == 1,), options={"num_cpus": 0}, name="rollout")
    try:
        weights, handle = IpcWeights(ranks, timeout_s=60), WeightHandle(2, (), "ipc")
        weights.sync(workers, handle, timeout_s=60, actor_ids=[0])
        version, buckets, names, total = workers.call(lambda a: a.checksum.remote(), actor_ids=[0])[0].get()
        assert version == 2 and buckets == len(list(iter_buckets(_weights(0), 20 / 1024))) > 1
        assert names == sorted(n for n, _ in _weights(0)) and total == pytest.approx(_total(0))  # rank 0's own
        with pytest.raises(WeightSyncError) as info:  # worker 1 fails on its first bucket
            weights.sync(workers, WeightHandle(3, (), "ipc"), timeout_s=60, actor_ids=[0, 1])
        assert list(info.value.failures) == ["rollout-1"] and workers.unhealthy_actor_ids() == [1]
        assert not any(r.get() for r in ranks.call(lambda a: a.is_open.remote()))  # the ranks closed the version
        with pytest.raises(WeightSyncError, match="no learner rank 2 shares its GPU"):
            weights.sync(workers, handle, timeout_s=60, actor_ids=[2])
    finally:
        workers.shutdown()
        ranks.shutdown()


# ----------------------------------------------------------------------------- sleep mode


class RecordingLLM:
    """Stands where vllm.LLM does; records what the worker asks of the engine and whether it was awake."""

    def __init__(self):
        self.events, self.awake = [], True  # an engine starts awake

    def wake_up(self, tags=None):
        self.events.append("wake_up")
        self.awake = True

    def sleep(self, level=1):
        self.events.append(f"sleep({level})")
        self.awake = False

    def collective_rpc(self, method, args=()):
        self.events.append(f"{method}:{'awake' if self.awake else 'ASLEEP'}:{len(list(args[0]))}")
        return [1]

    def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")

    def generate(self, inputs, params, use_tqdm=False, lora_request=None):
        self.events.append(f"generate:{'awake' if self.awake else 'ASLEEP'}")
        done = SimpleNamespace(index=0, token_ids=[7], logprobs=[{7: SimpleNamespace(logprob=-0.5)}], text="x")
        return [SimpleNamespace(outputs=[done]) for _ in inputs]


def _worker(sleep: bool) -> RolloutWorker:
    cfg = load_config(None, ["learner.gpus_per_worker=1", "rollout.gpus_per_worker=1", f"rollout.sleep={sleep}"])
    w = object.__new__(RolloutWorker)  # the engine itself needs CUDA: the worker's own logic around it
    w.llm, w.rollout, w.worker_id, w.weight_version, w.eos_ids, w.transports = RecordingLLM(), cfg.rollout, 0, 0, {2}, {}
    w.asleep, w.lora, w.lora_request = False, None, None
    w.delta = DeltaReceiver()
    if sleep:
        w._sleep()  # what __init__ does once the engine is up
    return w


def test_sleep_mode_wakes_the_engine_only_inside_its_calls():
    w = _worker(sleep=True)
    w.generate(PromptBatch([0], ["p"], [[1, 2]]), Sampling(max_new_tokens=4))
    w.load_named_tensors(iter(_weights(0)), 1)
    bucket = IpcSender()
    bucket.open(2, iter_buckets(_weights(0), 20 / 1024), torch.device("cpu"))
    while (b := bucket.next()) is not None:
        w.load_ipc_bucket(b)
    w.finish_ipc(2)
    assert w.llm.events == [
        "sleep(1)",  # at start-up, before the learners allocate beside it
        "wake_up", "generate:awake", "sleep(1)",
        "wake_up", "tidal_load_weights:awake:4", "reset_prefix_cache", "sleep(1)",
        "wake_up", "tidal_load_weights:awake:1", "tidal_load_weights:awake:3",  # two buckets, one wake
        "reset_prefix_cache", "sleep(1)"]
    assert w.weight_version == 2 and w.asleep


def test_without_sleep_mode_the_engine_is_never_put_to_sleep():
    w = _worker(sleep=False)
    w.generate(PromptBatch([0], ["p"], [[1, 2]]), Sampling(max_new_tokens=4))
    w.load_named_tensors(iter(_weights(0)), 1)
    assert w.llm.events == ["generate:awake", "tidal_load_weights:awake:4", "reset_prefix_cache"]
