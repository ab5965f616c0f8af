"""Weight transport: bucketing, packing, object-store publish/pull (workers pull directly),
the learner's dict-bucket handle form, and sync with hard timeouts naming the culprit."""

import os
import signal
import sys
import time

import pytest
import torch

from tidal.actors.actor_group import ActorGroup
from tidal.actors.collective import LIVE, STAGED
from tidal.actors.weights import (FlatBucket, InProcessTransport, ObjectStoreTransport, WeightHandle,
                                   WeightSyncError, iter_buckets, pull)

try:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
except ImportError:  # pragma: no cover
    pass


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("embed.weight", torch.randn(300, 64, generator=g)),  # 75 KiB
        ("layer.0.weight", torch.randn(64, 64, generator=g)),  # 16 KiB
        ("layer.0.bias", torch.randn(64, generator=g)),
        ("half.weight", torch.randn(32, 16, generator=g).to(torch.bfloat16)),
        ("odd", torch.randn(3, generator=g).to(torch.bfloat16)),  # 6 bytes: the next view needs alignment
        ("steps", torch.arange(5)),  # int64
        ("scalar", torch.tensor(3.5)),  # 0-d
    ]


def _same(a, b) -> bool:
    return [n for n, _ in a] == [n for n, _ in b] and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


def test_iter_buckets_respects_size_and_order():
    weights = _weights()
    buckets = list(iter_buckets(weights, bucket_mb=20 / 1024))  # 20 KiB
    assert [n for b in buckets for n, _ in b] == [n for n, _ in weights]
    assert [n for n, _ in buckets[0]] == ["embed.weight"]  # larger than a bucket: alone
    for b in buckets[1:]:
        assert sum(t.numel() * t.element_size() for _, t in b) <= 20 * 1024
    assert len(list(iter_buckets(weights, bucket_mb=64))) == 1
    with pytest.raises(ValueError, match="bucket_mb"):
        list(iter_buckets(weights, 0))


def test_flat_bucket_round_trip_keeps_dtypes_and_shapes():
    weights = _weights()
    flat = FlatBucket.pack(weights)
    assert flat.buffer.dtype == torch.uint8 and flat.buffer.is_contiguous()
    payload = sum(t.numel() * t.element_size() for _, t in weights)
    assert payload <= flat.buffer.numel() < payload + 16 * len(weights)  # aligned, little padding
    assert all(off % 16 == 0 for off in flat.offsets)
    assert _same(list(flat.tensors()), weights)


def test_in_process_transport():
    handle = InProcessTransport().publish(_weights(), version=4, bucket_mb=0.01)
    assert handle.version == 4 and handle.transport == "in_process" and len(handle.bucket_refs) > 1
    assert _same(list(pull(handle)), _weights())
    with pytest.raises(ValueError, match="version"):
        WeightHandle(-1)
    with pytest.raises(ValueError, match="no 'nccl' transport"):
        list(pull(WeightHandle(1, (), "nccl")))


class Receiver:
    """A minimal weight receiver: the load_weights(handle) contract of rollout workers."""

    def __init__(self, hang_on_load: bool = False):
        self.hang_on_load, self.state, self.version, self.transports = hang_on_load, {}, 0, {}

    def load_weights(self, handle: WeightHandle) -> int:
        if self.hang_on_load:
            time.sleep(3600)
        self.state = {n: t.clone() for n, t in pull(handle, self.transports)}
        self.version = handle.version
        return self.version

    def join_transport(self, transport) -> None:
        transport.join()
        self.transports = {transport.name: transport}

    def checksum(self) -> tuple[int, list[str], float]:
        return self.version, sorted(self.state), float(sum(t.double().sum() for t in self.state.values()))

    def pid(self) -> int:
        return os.getpid()


@pytest.mark.ray
@pytest.mark.parametrize("packing", ["dict", "flat"])
def test_object_store_publish_pull_and_sync(ray_cluster, packing):
    weights = _weights()
    transport = ObjectStoreTransport(packing=packing)
    handle = transport.publish(weights, version=1, bucket_mb=20 / 1024)
    assert len(handle.bucket_refs) == len(list(iter_buckets(weights, 20 / 1024)))
    assert handle.num_bytes == sum(t.numel() * t.element_size() for _, t in weights)
    assert _same(list(transport.pull(handle)), weights)

    group = ActorGroup(Receiver, 2, options={"num_cpus": 0}, name="receiver")
    try:
        transport.sync(group, handle, timeout_s=60)
        expected = float(sum(t.double().sum() for _, t in weights))
        for r in group.call(lambda a: a.checksum.remote(), timeout_s=30):
            version, names, total = r.get()
            assert version == 1 and names == sorted(n for n, _ in weights) and total == pytest.approx(expected)
    finally:
        group.shutdown()


@pytest.mark.ray
def test_learner_export_form_is_a_handle(ray_cluster):
    """LearnerGroup.export_weights returns ObjectRefs of dict[str, Tensor] buckets."""
    import ray

    weights = _weights()
    refs = [ray.put(dict(weights[:3])), ray.put(dict(weights[3:]))]
    assert _same(list(pull(WeightHandle(7, refs))), weights)


@pytest.mark.ray
def test_sync_to_a_stuck_or_dead_worker_fails_in_time_naming_it(ray_cluster):
    handle = ObjectStoreTransport().publish(_weights(), version=2, bucket_mb=1)
    group = ActorGroup(Receiver, 3, args=lambda i: (i == 1,), options={"num_cpus": 0}, name="receiver")
    try:
        pids = [r.get() for r in group.call(lambda a: a.pid.remote(), timeout_s=60)]
        os.kill(pids[2], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WeightSyncError) as info:
            ObjectStoreTransport().sync(group, handle, timeout_s=3.0)
        assert time.monotonic() - start < 15
        err = info.value
        assert set(err.failures) == {"receiver-1", "receiver-2"} and err.version == 2
        assert "receiver-1" in str(err) and "no answer within 3.0s" in str(err)
        assert group.unhealthy_actor_ids() == [1, 2]
        assert group.call(lambda a: a.checksum.remote(), actor_ids=[0], timeout_s=30)[0].get()[0] == 2
    finally:
        group.shutdown()


# ----------------------------------------------------------------------------- collective


class Sender:
    """Rank 0 of a collective group: the learner side."""

    def __init__(self, spec, device: str):
        from tidal.actors.collective import CollectiveTransport

        self.transport, self.device = CollectiveTransport(spec, rank=0), device

    def join(self) -> None:
        self.transport.join()

    def publish(self, version: int) -> WeightHandle:
        return self.transport.publish([(n, t.to(self.device)) for n, t in _weights()], version, bucket_mb=20 / 1024)

    def live_handle(self, version: int) -> WeightHandle:
        return self.transport.live_handle(version)

    def send(self, handle: WeightHandle, delay_s: float = 0.0) -> int:
        """A staged version from its host copy; a live one streamed from the tensors as they come."""
        time.sleep(delay_s)  # e.g. an update still running on the learner
        if handle.meta == (STAGED,):
            return self.transport.send(handle)
        live = ((n, t.to(self.device)) for n, t in _weights())
        return self.transport.send(handle, live, bucket_mb=20 / 1024)


# Sender and each receiver on a GPU of its own: NCCL refuses a group with two ranks on one device,
# and fractional requests let Ray pack all of them onto GPU 0 (tests/test_cluster_gpu_plan.py checks
# where these options land on a cluster of logical GPUs).
NCCL_ACTOR_OPTIONS = {"num_gpus": 1}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_round_trip(backend: str, device: str, hang: bool, live: bool = False, send_delay_s: float = 0.0):
    import ray

    from tidal.actors.collective import CollectiveSpec, CollectiveTransport

    n = 2
    spec = CollectiveSpec(backend, "127.0.0.1", _free_port(), world_size=n + 1,
                          group_name=f"t-{backend}-{hang}-{live}", timeout_s=5.0, start_timeout_s=30.0)
    gpu = NCCL_ACTOR_OPTIONS if device == "cuda" else {}
    sender = ray.remote(Sender).options(num_cpus=0, **gpu).remote(spec, device)
    group = ActorGroup(Receiver, n, args=lambda i: (hang and i == 1,), options={"num_cpus": 0, **gpu}, name="receiver")
    try:
        joins = [sender.join.remote()] + [
            group.submit(lambda a, i=i: a.join_transport.remote(CollectiveTransport(spec, rank=i + 1)), i)
            for i in range(n)]
        ray.get(joins, timeout=60)
        handle = ray.get((sender.live_handle if live else sender.publish).remote(3), timeout=60)
        assert handle.transport == "collective" and handle.bucket_refs == ()
        assert handle.meta == ((LIVE,) if live else (STAGED,)) and handle.num_bytes == (0 if live else handle.num_bytes)
        coordinator = CollectiveTransport(spec, start_send=lambda h: sender.send.remote(h, send_delay_s))
        start = time.monotonic()
        if hang:
            with pytest.raises(WeightSyncError) as info:
                coordinator.sync(group, handle, timeout_s=4.0)
            assert time.monotonic() - start < 20 and "receiver-1" in info.value.failures
            return
        coordinator.sync(group, handle, timeout_s=60)
        expected = float(sum(t.double().sum() for _, t in _weights()))
        for r in group.call(lambda a: a.checksum.remote(), timeout_s=30):
            version, names, total = r.get()
            assert version == 3 and names == sorted(n for n, _ in _weights()) and total == pytest.approx(expected)
    finally:
        group.shutdown()
        ray.kill(sender)


@pytest.mark.ray
def test_collective_transport_gloo_broadcast(ray_cluster):
    _collective_round_trip("gloo", "cpu", hang=False)


@pytest.mark.ray
def test_collective_transport_names_a_receiver_that_never_answers(ray_cluster):
    _collective_round_trip("gloo", "cpu", hang=True)


@pytest.mark.ray
def test_collective_live_version_streams_and_receivers_wait_for_the_send_to_start(ray_cluster):
    """A live version goes from the sender's tensors into the broadcast bucket by bucket (nothing
    staged); receivers that started loading 7 s before the sender began (its update still running)
    wait on the group's store (up to the 30 s the start may take), not in a broadcast, whose 5 s
    timeout would have failed them."""
    _collective_round_trip("gloo", "cpu", hang=False, live=True, send_delay_s=7.0)


@pytest.mark.ray
def test_a_sender_that_never_starts_is_named_by_the_waiting_receivers(ray_cluster):
    from tidal.actors.collective import CollectiveSpec, CollectiveTransport

    spec = CollectiveSpec("gloo", "127.0.0.1", _free_port(), world_size=2, group_name="t-nosend", timeout_s=2.0)
    sender = CollectiveTransport(spec, rank=0)
    group = ActorGroup(Receiver, 1, options={"num_cpus": 0}, name="receiver")
    try:
        group.call(lambda a: a.pid.remote(), timeout_s=60)  # the receiver is up: its start is not the 2 s under test
        ref = group.submit(lambda a: a.join_transport.remote(CollectiveTransport(spec, rank=1)), 0)
        sender.join()
        group.collect({0: ref}, timeout_s=60)[0].get()
        (result,) = group.call(lambda a: a.load_weights.remote(sender.live_handle(4)), timeout_s=30)
        assert not result.ok and "weight version 4: the sender (rank 0 of group t-nosend) did not start sending within 2 s" \
            in str(result.error)
    finally:
        group.shutdown()


@pytest.mark.ray
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs 3 CUDA GPUs: NCCL refuses two ranks on one device")
def test_collective_transport_nccl_broadcast(ray_cluster):
    _collective_round_trip("nccl", "cuda", hang=False)


@pytest.mark.ray
def test_streamed_push_loads_every_worker_and_names_a_stuck_one(ray_cluster):
    weights = _weights()
    transport = ObjectStoreTransport()
    group = ActorGroup(Receiver, 2, args=lambda i: (i == 1,), options={"num_cpus": 0}, name="receiver")
    try:
        handle = transport.push(group, weights, version=5, bucket_mb=20 / 1024, timeout_s=60, actor_ids=[0])
        # The returned handle is a plain one (all refs), for workers that join later.
        assert handle.board is None and len(handle.bucket_refs) == len(list(iter_buckets(weights, 20 / 1024)))
        assert _same(list(pull(handle)), weights)
        version, names, total = group.call(lambda a: a.checksum.remote(), actor_ids=[0], timeout_s=30)[0].get()
        assert version == 5 and total == pytest.approx(float(sum(t.double().sum() for _, t in weights)))
        start = time.monotonic()
        with pytest.raises(WeightSyncError) as info:
            transport.push(group, weights, version=6, bucket_mb=20 / 1024, timeout_s=3.0)
        assert time.monotonic() - start < 15 and list(info.value.failures) == ["receiver-1"]
        assert info.value.handle is not None and info.value.handle.version == 6
        assert group.call(lambda a: a.checksum.remote(), actor_ids=[0], timeout_s=30)[0].get()[0] == 6
    finally:
        group.shutdown()


def _tiny_cfg():
    from tidal.common.config import load_config

    return load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_grpo.yaml"), [])


class LearnerSender:
    """Learner rank 0's real sender methods (master_address, join_weight_sender, send_weights,
    the staged export); only the weights are the test's instead of a DeepSpeed engine's."""

    def __init__(self, cfg):
        from tidal.learner.worker import LearnerWorker

        self.worker = LearnerWorker(cfg, 0, 1)

    def master_address(self):
        return self.worker.master_address()

    def join_weight_sender(self, spec) -> None:
        self.worker.join_weight_sender(spec)

    def send_weights(self, handle: WeightHandle) -> int:
        return self.worker.send_weights(handle)

    def publish(self, version: int) -> WeightHandle:
        return self.worker.weights_out._sender().publish(_weights(), version, bucket_mb=20 / 1024)


@pytest.mark.ray
def test_collective_weights_rebuild_the_group_when_membership_changes(ray_cluster):
    """rollout.weight_transport=collective on the driver: the group forms for the receivers it is
    given, a dead receiver makes the next sync form a new group of the survivors, and a restarted
    receiver gets the current version (still staged on the sender) through yet another group."""
    import ray

    from tidal.actors.collective import CollectiveWeights

    senders = ActorGroup(LearnerSender, 1, args=(_tiny_cfg(),), options={"num_cpus": 0}, name="learner")
    group = ActorGroup(Receiver, 3, options={"num_cpus": 0}, name="receiver")
    try:
        weights = CollectiveWeights(senders, "gloo", timeout_s=30)
        assert weights.connect(group) == [0, 1, 2] and weights.builds == 1
        h1 = ray.get(senders.actor(0).publish.remote(1))
        weights.sync(group, h1, timeout_s=30)
        assert weights.builds == 1  # same members: the group is reused
        h2 = ray.get(senders.actor(0).publish.remote(2))
        pid = group.call(lambda a: a.pid.remote(), actor_ids=[2])[0].get()
        os.kill(pid, signal.SIGKILL)
        group.call(lambda a: a.__ray_ready__.remote(), timeout_s=10)  # marks the dead one
        assert group.unhealthy_actor_ids() == [2]
        weights.sync(group, h2, timeout_s=30)
        assert weights.builds == 2 and weights.spec.world_size == 3
        ray.get(senders.actor(0).publish.remote(3))  # a newer version staged, not sent yet
        assert group.restore() == [2]
        weights.sync(group, h2, timeout_s=30, actor_ids=[2])  # catch-up of the restarted one
        assert weights.builds == 3 and weights.spec.world_size == 2
        expected = float(sum(t.double().sum() for _, t in _weights()))
        for r in group.call(lambda a: a.checksum.remote(), timeout_s=30):
            version, _, total = r.get()
            assert version == 2 and total == pytest.approx(expected)
    finally:
        group.shutdown()
        senders.shutdown()
