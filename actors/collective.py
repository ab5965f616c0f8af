"""Collective weight transport: a broadcast from the sender (learner rank 0, rank 0 here) to
every rollout worker (ranks 1..N) over a dedicated process group: NCCL on GPU (tensors never
leave device memory), gloo on CPU (the same code path, so CPU tests exercise it).

The group is built directly from a TCPStore, not with `init_process_group`, so it lives next
to whatever default group the learner (DeepSpeed) or the engine (vLLM) already initialised.

Flow of one version (the driver coordinates, holding only the small handle):
  sender:    handle = transport.publish(named_tensors, version, bucket_mb)  # metadata only
  driver:    coordinator.sync(workers, handle, timeout_s)
               -> starts sender.send(handle) and every worker's load_weights(handle) at once
  workers:   load_weights -> transport.pull(handle): receive bucket after bucket (one flat
             buffer per bucket), yield views, which the engine loads.
Every collective op waits with the hard timeout; the driver's sync names each rank that
failed or did not answer (WeightSyncError). After a failure the group is unusable: the driver
builds a new one (a new group_name) with the current members. The same holds after a worker
restart or a resize: membership is fixed per group.

Importing this module needs no GPU; the NCCL path is exercised only when CUDA is present.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import torch

from tidal.actors.actor_group import ActorGroup, CallResult, fetch
from tidal.actors.weights import (WeightHandle, WeightSyncError, WeightTransport, byte_layout, iter_buckets,
                                  pack_bytes)


@dataclass(frozen=True)
class CollectiveSpec:
    """How to reach the group: rank 0 (the sender) hosts the TCPStore at master_addr:port."""

    backend: Literal["nccl", "gloo"]
    master_addr: str
    master_port: int
    world_size: int  # sender + number of receivers
    group_name: str = "tidal-weights"
    timeout_s: float = 300.0


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class CollectiveTransport(WeightTransport):
    """One endpoint of the broadcast group (rank 0 sends, others receive), or, with
    rank=None, the driver-side coordinator whose `sync` drives a version through."""

    name = "collective"

    def __init__(self, spec: CollectiveSpec, rank: Optional[int] = None,
                 start_send: Optional[Callable[[WeightHandle], Any]] = None):
        self.spec, self.rank, self.start_send = spec, rank, start_send
        self.pg = None
        # Staged versions: the newest published and the last sent (a worker that joins a rebuilt
        # group gets the pool's current version again, even if a newer one is already published).
        self._pending: dict[int, list[list[tuple[str, torch.Tensor]]]] = {}
        self._sent = -1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.spec.backend == "nccl" else torch.device("cpu")

    def join(self) -> None:
        """Rendezvous (blocks until every rank joined, or the timeout)."""
        import torch.distributed as dist

        if self.rank is None:
            raise RuntimeError("the driver-side coordinator (rank=None) holds no process group")
        timeout = datetime.timedelta(seconds=self.spec.timeout_s)
        store = dist.TCPStore(self.spec.master_addr, self.spec.master_port, self.spec.world_size,
                              self.rank == 0, timeout=timeout)
        store = dist.PrefixStore(self.spec.group_name, store)
        if self.spec.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, self.rank, self.spec.world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, self.rank, self.spec.world_size, opts)

    def adopt(self, previous: Optional["CollectiveTransport"]) -> None:
        """Take over the staged versions of the sender this one replaces (a rebuilt group)."""
        if previous is not None:
            self._pending, self._sent = previous._pending, previous._sent
            previous.close()

    def close(self) -> None:
        self.pg = None  # dropping the group and its store ends its connections

    def _broadcast(self, flat: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.pg is None:
            raise RuntimeError(f"rank {self.rank} has not joined collective group {self.spec.group_name!r}")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([flat], opts).wait(datetime.timedelta(seconds=self.spec.timeout_s))

    # ------------------------------------------------------------------ sender (rank 0)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                bucket_mb: float) -> WeightHandle:
        """Stage the tensors for `send`; the handle carries each bucket's names, shapes, dtypes."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 (the sender) publishes")
        buckets = list(iter_buckets(named_tensors, bucket_mb, self.device))
        self._pending = {v: b for v, b in self._pending.items() if v == self._sent}
        self._pending[version] = buckets
        meta = tuple(tuple((n, tuple(t.shape), t.dtype) for n, t in b) for b in buckets)
        num_bytes = sum(t.numel() * t.element_size() for b in buckets for _, t in b)
        return WeightHandle(version, (), self.name, num_bytes, meta)

    def send(self, handle: WeightHandle) -> int:
        """Broadcast every bucket of a published version as one flat byte buffer."""
        buckets = self._pending.get(handle.version)
        if buckets is None:
            raise KeyError(f"version {handle.version} was not published on this sender")
        self._sent = handle.version
        self._pending = {v: b for v, b in self._pending.items() if v >= handle.version}
        for bucket in buckets:
            _, flat = pack_bytes([t for _, t in bucket], self.device)  # (nbytes,) uint8
            self._broadcast(flat)
        return handle.version

    # ------------------------------------------------------------------ receivers

    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in handle.meta:
            sizes = [_nbytes(shape, dtype) for _, shape, dtype in bucket]
            offsets, total = byte_layout(sizes)
            flat = torch.empty(total, dtype=torch.uint8, device=self.device)
            self._broadcast(flat)
            for (name, shape, dtype), off, size in zip(bucket, offsets, sizes):
                yield name, flat[off:off + size].view(dtype).view(shape)

    # ------------------------------------------------------------------ driver

    def sync(self, group: ActorGroup, handle: WeightHandle, timeout_s: float,
             actor_ids: Iterable[int] | None = None) -> list[CallResult]:
        """Start the sender and every receiver's load at once; all must finish in timeout_s."""
        if self.start_send is None:
            raise RuntimeError("sync runs on the driver: build CollectiveTransport(spec, start_send=...)")
        deadline = time.monotonic() + timeout_s
        sender_ref = self.start_send(handle)
        results = group.call(lambda actor: actor.load_weights.remote(handle), actor_ids=actor_ids,
                             timeout_s=timeout_s)
        failures = {r.label: r.error for r in results if not r.ok}
        try:
            fetch(sender_ref, max(1.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001
            failures["sender (rank 0)"] = e
        for r in results:
            if not r.ok:
                group.mark_unhealthy(r.actor_id)
        if failures:
            raise WeightSyncError(handle.version, failures, timeout_s)
        return results


def collective_backend(use_gpu: bool) -> Literal["nccl", "gloo"]:
    """The broadcast's backend: NCCL where the learner trains on CUDA, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"


class CollectiveWeights(WeightTransport):
    """rollout.weight_transport=collective, the driver's side: the one owner of the group's
    lifecycle. The sender is actor `sender_id` of `senders` (learner rank 0, with
    `master_address`, `join_weight_sender(spec)` and `send_weights(handle)`); the receivers are
    the rollout pool's workers (`join_transport`, `load_weights`).

    `sync(group, handle, timeout_s, actor_ids)` first checks the membership: when the receivers
    (or a restarted sender) differ from the current group's, a new group (new name, a free port
    on the sender's node) is formed and every member joins it, all at once; then the sender's
    broadcast and the receivers' loads start together. A pool therefore just syncs the workers
    it has: a restarted or added worker is picked up by the next sync (the pool re-sends the
    current version to such workers at once, see RolloutPool). A failed sync or join drops the
    group, so the next sync builds a new one."""

    name = "collective"
    group_bound = True  # a worker loads a handle only as a member of the current group

    def __init__(self, senders: ActorGroup, backend: Literal["nccl", "gloo"], timeout_s: float, sender_id: int = 0):
        self.senders, self.sender_id, self.backend, self.timeout_s = senders, sender_id, backend, timeout_s
        self.spec: Optional[CollectiveSpec] = None
        self.builds = 0  # groups formed so far (tests, metrics)
        self._members: Optional[tuple] = None

    def publish(self, named_tensors, version, bucket_mb) -> WeightHandle:
        raise RuntimeError("the sender (learner rank 0) publishes; use LearnerGroup.export_weights")

    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        raise RuntimeError("a rollout worker pulls through the transport it joined (join_transport)")

    def _sender(self):
        return self.senders.actor(self.sender_id)

    def _key(self, group: ActorGroup, ids: list[int]) -> tuple:
        """Who is in a group: each process incarnation (a restart makes a new one)."""
        return self.senders.restarts(self.sender_id), tuple((i, group.restarts(i)) for i in ids)

    def _build(self, group: ActorGroup, ids: list[int], version: int, timeout_s: float) -> None:
        import uuid

        self._members = None
        deadline = time.monotonic() + timeout_s
        try:
            addr, port = fetch(self._sender().master_address.remote(), timeout_s)
        except Exception as e:  # noqa: BLE001
            raise WeightSyncError(version, {"sender (rank 0)": e}, timeout_s) from e
        spec = CollectiveSpec(self.backend, addr, port, 1 + len(ids), f"tidal-weights-{uuid.uuid4().hex[:12]}",
                              timeout_s)
        sender_ref = self._sender().join_weight_sender.remote(spec)
        started = group.start_each({i: (lambda a, r=r: a.join_transport.remote(CollectiveTransport(spec, rank=r)))
                                    for r, i in enumerate(ids, start=1)})
        results = group.collect(started, max(1.0, deadline - time.monotonic()))
        failures = {r.label: r.error for r in results if not r.ok}
        try:
            fetch(sender_ref, max(1.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001
            failures["sender (rank 0)"] = e
        for r in results:
            if not r.ok:
                group.mark_unhealthy(r.actor_id)
        if failures:
            raise WeightSyncError(version, failures, timeout_s)
        self.spec, self.builds, self._members = spec, self.builds + 1, self._key(group, ids)

    def connect(self, group: ActorGroup, actor_ids: Iterable[int] | None = None, version: int = 0,
                timeout_s: Optional[float] = None) -> list[int]:
        """Form a group of the sender and `actor_ids` (default: the healthy actors of `group`)
        unless the current one has exactly these members; returns the receivers' ids."""
        ids = sorted(group.healthy_actor_ids() if actor_ids is None else actor_ids)
        if ids and self._members != self._key(group, ids):
            self._build(group, ids, version, self.timeout_s if timeout_s is None else timeout_s)
        return ids

    def sync(self, group: ActorGroup, handle: WeightHandle, timeout_s: float,
             actor_ids: Iterable[int] | None = None) -> list[CallResult]:
        ids = self.connect(group, actor_ids, handle.version, timeout_s)
        if not ids:
            return []
        coordinator = CollectiveTransport(self.spec, start_send=lambda h: self._sender().send_weights.remote(h))
        try:
            return coordinator.sync(group, handle, timeout_s, ids)
        except WeightSyncError:
            self._members = None  # a broadcast that failed half-way leaves the group unusable
            raise

    def close(self) -> None:
        self._members, self.spec = None, None
