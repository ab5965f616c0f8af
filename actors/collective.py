"""Collective weight transport: a broadcast from the sender (learner rank 0, rank 0 here) to
every rollout worker (ranks 1..N) over a dedicated process group: NCCL on GPU (tensors never
leave device memory), gloo on CPU (the same code path, so CPU tests exercise it).

The group is built directly from a TCPStore, not with `init_process_group`, so it lives next
to whatever default group the learner (DeepSpeed) or the engine (vLLM) already initialised.

A version streams bucket by bucket: the sender packs about `bucket_mb` of tensors into one flat
buffer on its device, preceded by a small JSON header (names, shapes, dtypes, offsets), and
broadcasts [sizes] then [header | tensors]; a [0, 0] sizes broadcast ends the version. Receivers
learn each bucket's layout from its header, so nothing is staged and nothing is described in
advance. Where the tensors come from:
  live    (algorithm.mode=sync) `live_handle(version)`: the learner ranks gather and stream their
          current weights when the driver syncs - straight from the device into the broadcast, at
          most a bucket or two in flight, no host round trip, no copy of the whole model.
  staged  (async) `publish(named_tensors, version, bucket_mb)`: each bucket packed into host
          memory (pinned under NCCL, copied to the device bucket by bucket when sent), because the
          policy moves on while the pool still generates with the previous version.
Receivers wait for a send to start on the group's TCPStore (a key the sender sets when it begins)
before their first broadcast: an update that keeps the sender busy never runs into a collective's
timeout. Every broadcast waits with the hard timeout; NCCL is told to abort the group's
communicators and raise in the waiting call rather than tear the process down (its default), so
a failed or late broadcast is a `CollectiveError` naming the version, the bucket and the ranks,
and the driver's sync names each actor that failed (WeightSyncError). After a failure the group
is unusable: the driver builds a new one (a new group_name) with the current members. The same
holds after a worker restart or a resize: membership is fixed per group.

Flow of one version (the driver coordinates, holding only the small handle):
  learners:  handle = export (live_handle or publish)              # no data in the handle
  driver:    CollectiveWeights.sync(workers, handle, timeout_s)
               -> every learner rank's send_weights(handle) (they gather; rank 0 broadcasts) and
                  every worker's load_weights(handle) start at once
  workers:   load_weights -> transport.pull(handle): bucket after bucket, views into each flat
             buffer, which the engine loads.

Importing this module needs no GPU; the NCCL path is exercised only when CUDA is present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import torch

from tidal.actors.actor_group import ActorGroup, CallResult
from tidal.actors.refs import fetch
from tidal.actors.weights import (ALIGN, FlatBucket, WeightHandle, WeightSyncError, WeightTransport, byte_layout,
                                  check_loaded, iter_buckets)

LIVE, STAGED = "live", "staged"  # WeightHandle.meta of a collective version: where the sender takes it from


class CollectiveError(RuntimeError):
    """A broadcast of the weight group failed or did not finish in time."""


@dataclass(frozen=True)
class CollectiveSpec:
    """How to reach the group: rank 0 (the sender) hosts the TCPStore at master_addr:port."""

    backend: Literal["nccl", "gloo"]
    master_addr: str
    master_port: int
    world_size: int  # sender + number of receivers
    group_name: str = "tidal-weights"
    timeout_s: float = 300.0  # of each broadcast
    start_timeout_s: Optional[float] = None  # how long receivers wait for a send to begin (None: timeout_s)


# Read by ProcessGroupNCCL when it is built: wait() blocks the calling thread until the op is done or
# its timeout passed, and raises then (blocking wait); an error the watchdog finds aborts the group's
# communicators and raises in the waiting call (CleanUpOnly, 2). The defaults return from wait() at
# once and let the watchdog take the whole process down (3), which the driver would see as a silent
# actor death instead of an error naming the version and the ranks.
NCCL_ERROR_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


@contextlib.contextmanager
def _nccl_raises_on_error() -> Iterator[None]:
    """NCCL_ERROR_ENV while a ProcessGroupNCCL is built, the process's own values afterwards (the
    learners' DeepSpeed group keeps its defaults)."""
    before = {k: os.environ.get(k) for k in NCCL_ERROR_ENV}
    os.environ.update(NCCL_ERROR_ENV)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class CollectiveTransport(WeightTransport):
    """One endpoint of the broadcast group (rank 0 sends, others receive), or, with
    rank=None, the driver-side coordinator whose `sync` drives a version through."""

    name = "collective"

    def __init__(self, spec: CollectiveSpec, rank: Optional[int] = None,
                 start_send: Optional[Callable[[WeightHandle], Any]] = None):
        self.spec, self.rank, self.start_send = spec, rank, start_send
        self.pg = None
        self.store = None
        # Staged versions (async mode): the newest published and the last sent (a worker that joins
        # a rebuilt group gets the pool's current version again, even if a newer one is published).
        self._staged: dict[int, list[FlatBucket]] = {}
        self._sent = -1
        self._sends = 0  # versions sent (sender) or pulled (receiver) in this group: the store key of the next

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
        self.store = dist.PrefixStore(self.spec.group_name, store)
        if self.spec.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, self.rank, self.spec.world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            with _nccl_raises_on_error():
                self.pg = dist.ProcessGroupNCCL(self.store, self.rank, self.spec.world_size, opts)

    def adopt(self, previous: Optional["CollectiveTransport"]) -> None:
        """Take over the staged versions of the sender this one replaces (a rebuilt group)."""
        if previous is not None:
            self._staged, self._sent = previous._staged, previous._sent
            previous.close()

    def close(self) -> None:
        self.pg, self.store = None, None  # dropping the group and its store ends its connections

    def _broadcast(self, flat: torch.Tensor, version: int, bucket: int) -> None:
        import torch.distributed as dist

        if self.pg is None:
            raise RuntimeError(f"rank {self.rank} has not joined collective group {self.spec.group_name!r}")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        try:
            self.pg.broadcast([flat], opts).wait(datetime.timedelta(seconds=self.spec.timeout_s))
        except Exception as e:  # noqa: BLE001 - gloo and NCCL raise their own types
            role = "the sender" if self.rank == 0 else f"receiver {self.rank}"
            raise CollectiveError(
                f"weight version {version} (the policy after RL step {version}), bucket {bucket}: the broadcast in "
                f"group {self.spec.group_name} ({self.spec.backend}, {self.spec.world_size} ranks: rank 0 sends, "
                f"1..{self.spec.world_size - 1} receive; this is {role}) failed or took over {self.spec.timeout_s:.0f} s: "
                f"{type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ sender (rank 0)

    def live_handle(self, version: int) -> WeightHandle:
        """A version the learner ranks send from their live weights when the driver syncs."""
        return WeightHandle(version, (), self.name, 0, (LIVE,))

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                bucket_mb: float) -> WeightHandle:
        """Stage a version in host memory, bucket by bucket, for `send` (async mode)."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 (the sender) publishes")
        pin = self.spec.backend == "nccl" and torch.cuda.is_available()
        buckets = []
        for bucket in iter_buckets(named_tensors, bucket_mb):
            flat = FlatBucket.pack(bucket)
            buckets.append(dataclasses.replace(flat, buffer=flat.buffer.pin_memory()) if pin else flat)
        self._staged = {v: b for v, b in self._staged.items() if v == self._sent}
        self._staged[version] = buckets
        return WeightHandle(version, (), self.name, sum(b.buffer.numel() for b in buckets), (STAGED,))

    def send(self, handle: WeightHandle, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
             bucket_mb: float = 64) -> int:
        """Broadcast a version: its staged buckets, or (a live handle) `named_tensors` packed into one
        device buffer per bucket as they come."""
        if handle.meta == (STAGED,):
            if handle.version not in self._staged:
                raise KeyError(f"version {handle.version} was not published on this sender")
            self._sent = handle.version
            self._staged = {v: b for v, b in self._staged.items() if v >= handle.version}
            source = (self._pack_staged(b) for b in self._staged[handle.version])
        elif named_tensors is None:
            raise ValueError(f"version {handle.version} is live: send it with the learner's named tensors")
        else:
            source = (self._pack(b) for b in iter_buckets(named_tensors, bucket_mb, self.device))
        self._sends += 1
        self.store.set(f"send-{self._sends}", str(handle.version))  # the receivers may enter the broadcasts now
        bucket = -1
        for bucket, (sizes, flat) in enumerate(source):
            self._broadcast(sizes, handle.version, bucket)
            self._broadcast(flat, handle.version, bucket)
        self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device), handle.version, bucket + 1)
        return handle.version

    def _buffer(self, named: list[tuple[str, torch.Size, torch.dtype]], offsets: list[int],
                data: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[header length, total bytes] (2,) int64 and an empty bucket buffer (total,) uint8 on this
        rank's device holding the JSON header; the tensors go at `start` + their ALIGNed offsets."""
        header = json.dumps([[n, list(shape), str(dtype).removeprefix("torch."), off]
                             for (n, shape, dtype), off in zip(named, offsets)]).encode()
        start = _aligned(len(header))
        flat = torch.empty(start + data, dtype=torch.uint8, device=self.device)
        flat[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        return torch.tensor([len(header), start + data], dtype=torch.int64, device=self.device), flat, start

    def _pack(self, named: list[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A live bucket: each tensor copied into the device buffer (device to device on GPU)."""
        offsets, data = byte_layout([t.numel() * t.element_size() for _, t in named])
        sizes, flat, start = self._buffer([(n, t.shape, t.dtype) for n, t in named], offsets, data)
        for (_, t), off in zip(named, offsets):
            flat[start + off:start + off + t.numel() * t.element_size()].copy_(
                t.detach().contiguous().reshape(-1).view(torch.uint8))
        return sizes, flat

    def _pack_staged(self, bucket: FlatBucket) -> tuple[torch.Tensor, torch.Tensor]:
        """A staged bucket (the same ALIGNed layout): its host buffer copied to the device in one go."""
        named = list(zip(bucket.names, bucket.shapes, bucket.dtypes))
        sizes, flat, start = self._buffer(named, list(bucket.offsets), bucket.buffer.numel())
        flat[start:].copy_(bucket.buffer, non_blocking=True)  # pinned under NCCL: an async host-to-device copy
        return sizes, flat

    # ------------------------------------------------------------------ receivers

    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """The version's tensors, views into each received bucket, once the sender has begun."""
        self._sends += 1
        wait_s = self.spec.start_timeout_s or self.spec.timeout_s
        try:
            self.store.wait([f"send-{self._sends}"], datetime.timedelta(seconds=wait_s))
        except Exception as e:  # noqa: BLE001
            raise CollectiveError(f"weight version {handle.version}: the sender (rank 0 of group {self.spec.group_name}) "
                                  f"did not start sending within {wait_s:.0f} s: {e}") from e
        for bucket in itertools.count():
            sizes = torch.empty(2, dtype=torch.int64, device=self.device)
            self._broadcast(sizes, handle.version, bucket)
            header_len, total = sizes.tolist()
            if total == 0:
                return
            flat = torch.empty(total, dtype=torch.uint8, device=self.device)
            self._broadcast(flat, handle.version, bucket)
            start = _aligned(header_len)
            for name, shape, dtype, off in json.loads(bytes(flat[:header_len].cpu().numpy())):
                dt = getattr(torch, dtype)
                size = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
                yield name, flat[start + off:start + off + size].view(dt).view(shape)

    # ------------------------------------------------------------------ driver

    def sync(self, group: ActorGroup, handle: WeightHandle, timeout_s: float,
             actor_ids: Iterable[int] | None = None) -> list[CallResult]:
        """Start the senders and every receiver's load at once; all must finish in timeout_s.
        `start_send(handle)`: the senders' call, one ref or {label: ref} (every learner rank of a
        live version, which all gather)."""
        if self.start_send is None:
            raise RuntimeError("sync runs on the driver: build CollectiveTransport(spec, start_send=...)")
        deadline = time.monotonic() + timeout_s
        senders = self.start_send(handle)
        senders = senders if isinstance(senders, dict) else {"sender (rank 0)": senders}
        results = group.call(lambda actor: actor.load_weights.remote(handle), actor_ids=actor_ids,
                             timeout_s=timeout_s)
        failures = {}
        for label, ref in senders.items():
            try:
                if isinstance(ref, Exception):
                    raise ref
                fetch(ref, max(1.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001
                failures[label] = e
        return check_loaded(group, results, handle.version, timeout_s, others=failures)


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

    def _start_senders(self, handle: WeightHandle) -> dict[str, Any]:
        """send_weights on every learner rank: a live version is gathered by all of them (ZeRO-3
        gathers are collective) while rank 0 broadcasts; a staged one only rank 0 sends."""
        started = self.senders.start(lambda a: a.send_weights.remote(handle))
        return {f"{self.senders.label(i)} (sender)" if i == self.sender_id else self.senders.label(i): ref
                for i, ref in started.items()}

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
        coordinator = CollectiveTransport(self.spec, start_send=self._start_senders)
        try:
            return coordinator.sync(group, handle, timeout_s, ids)
        except WeightSyncError:
            self._members = None  # a broadcast that failed half-way leaves the group unusable
            raise

    def close(self) -> None:
        self._members, self.spec = None, None
