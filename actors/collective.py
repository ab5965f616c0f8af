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
        self._pending: dict[int, list[list[tuple[str, torch.Tensor]]]] = {}

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
        self._pending = {version: buckets}  # only the newest version is kept
        meta = tuple(tuple((n, tuple(t.shape), t.dtype) for n, t in b) for b in buckets)
        num_bytes = sum(t.numel() * t.element_size() for b in buckets for _, t in b)
        return WeightHandle(version, (), self.name, num_bytes, meta)

    def send(self, handle: WeightHandle) -> int:
        """Broadcast every bucket of a published version as one flat byte buffer."""
        buckets = self._pending.get(handle.version)
        if buckets is None:
            raise KeyError(f"version {handle.version} was not published on this sender")
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
