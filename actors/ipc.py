"""IPC weight transport (rollout.weight_transport=ipc): colocated on GPU, learner rank k hands each
bucket of the new weights to the rollout worker on its own GPU as a CUDA IPC handle - the worker
maps the rank's buffer and loads from it, no copy through host memory and no NCCL (which refuses
two ranks on one device). The approach of the colocated peers (OpenRLHF, verl; vLLM's own
`ipc` weight-transfer engine works the same way).

Flow of one version, clocked by the driver one bucket at a time (`IpcWeights.sync`):
  every learner rank  ipc_open(handle)   its live weights (gathered under ZeRO-3 on every rank, so
                                         each rank holds each bucket whole), checked unchanged since
                                         the export
  repeat:             ipc_next()         packs the next ~bucket_mb into one device buffer, returns
                                         its IpcBucket (the buffer stays alive until the next call)
  worker k            load_ipc_bucket(b) maps rank k's buffer, loads the tensors, synchronises
  until every rank returns None; then   finish_ipc(version) on the workers, ipc_close on the ranks.
At most one bucket per rank is in flight: no staged copy of the model anywhere.

Worker k must sit on learner rank k's GPU: colocated placement puts rollout worker k and learner
rank k on bundle k (tidal.actors.placement), and preflight requires as many workers as ranks.
The GPU is matched by UUID, not index: each actor numbers the GPUs it sees from 0.

On CPU (tests of the protocol) an IpcBucket carries the buffer itself, which Ray copies; on
CUDA it carries torch's IPC handle (torch.multiprocessing.reductions.reduce_tensor).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from tidal.actors.actor_group import ActorGroup, CallResult
from tidal.actors.weights import WeightHandle, WeightSyncError, WeightTransport, byte_layout, check_loaded


@dataclass(frozen=True)
class IpcBucket:
    """One bucket of a version, shared by a learner rank: what a worker needs to map and read it."""

    version: int
    index: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # byte offset of each tensor in the buffer
    gpu_uuid: Optional[str]  # the sharing rank's GPU; None: a CPU buffer, carried in `buffer`
    rebuild_args: Optional[tuple] = None  # torch.multiprocessing.reductions.rebuild_cuda_tensor's
    buffer: Optional[torch.Tensor] = None  # (nbytes,) uint8, CPU only


def pack_bucket(named: list[tuple[str, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The tensors copied into one (nbytes,) uint8 buffer on `device`, and their offsets."""
    offsets, total = byte_layout([t.numel() * t.element_size() for _, t in named])
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    for (_, t), off in zip(named, offsets):
        flat[off:off + t.numel() * t.element_size()].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, offsets


def share(flat: torch.Tensor, named: list[tuple[str, torch.Tensor]], offsets: list[int], version: int,
          index: int) -> IpcBucket:
    """The IpcBucket of a packed buffer: an IPC handle on CUDA (the caller keeps `flat` alive until
    the workers have loaded it), the buffer itself on CPU."""
    meta = (tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named), tuple(t.dtype for _, t in named),
            tuple(offsets))
    if flat.device.type != "cuda":
        return IpcBucket(version, index, *meta, gpu_uuid=None, buffer=flat)
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.synchronize(flat.device)  # the packing copies are done before another process reads
    _, args = reduce_tensor(flat)
    uuid = str(torch.cuda.get_device_properties(flat.device).uuid)
    return IpcBucket(version, index, *meta, gpu_uuid=uuid, rebuild_args=tuple(args))


def _local_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(f"the learner rank shared a buffer on GPU {uuid}, which this process does not see "
                       f"(its GPUs: {[str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]}); "
                       "rollout.weight_transport=ipc needs rollout worker k on learner rank k's GPU (colocated)")


@contextlib.contextmanager
def opened(bucket: IpcBucket) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(name, view) of every tensor of a bucket, mapped from the sharing rank's memory; the mapping
    is dropped on exit, after the device finished reading it."""
    if bucket.gpu_uuid is None:
        flat = bucket.buffer
    else:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        args = list(bucket.rebuild_args)
        args[6] = _local_index(bucket.gpu_uuid)  # storage_device: this process's number for that GPU
        flat = rebuild_cuda_tensor(*args)
    named = []
    for name, shape, dtype, off in zip(bucket.names, bucket.shapes, bucket.dtypes, bucket.offsets):
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        named.append((name, flat[off:off + size].view(dtype).view(shape)))
    try:
        yield named
    finally:
        if flat.device.type == "cuda":
            torch.cuda.synchronize(flat.device)
        del named, flat


class IpcSender:
    """A learner rank's side: the bucket iterator of one version and the buffer last shared."""

    def __init__(self):
        self._buckets: Optional[Iterator] = None
        self._live: Any = None  # the buffer the workers may still be reading
        self._version, self._index = -1, 0

    def open(self, version: int, buckets: Iterable[list[tuple[str, torch.Tensor]]], device: torch.device) -> None:
        self._buckets, self._device, self._version, self._index, self._live = iter(buckets), device, version, 0, None

    def next(self) -> Optional[IpcBucket]:
        """The next bucket, shared; None after the last (the version is done)."""
        if self._buckets is None:
            raise RuntimeError("ipc_next before ipc_open")
        self._live = None  # the workers loaded the previous bucket before the driver asked for this one
        named = next(self._buckets, None)
        if named is None:
            self.close()
            return None
        flat, offsets = pack_bucket(named, self._device)
        self._live, self._index = flat, self._index + 1
        return share(flat, named, offsets, self._version, self._index - 1)

    def close(self) -> None:
        self._buckets, self._live = None, None


class IpcWeights(WeightTransport):
    """The driver's side: clocks each version through the learner ranks (`senders`: ipc_open,
    ipc_next, ipc_close) and the rollout workers (load_ipc_bucket, finish_ipc), worker k from rank k."""

    name = "ipc"
    group_bound = True  # a worker loads only through a sync (it boots first, then catches up)

    def __init__(self, senders: ActorGroup, timeout_s: float):
        self.senders, self.timeout_s = senders, timeout_s

    def publish(self, named_tensors, version, bucket_mb) -> WeightHandle:
        raise RuntimeError("the learner ranks export ipc versions (LearnerGroup.export_weights)")

    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        raise RuntimeError("an ipc version is loaded bucket by bucket (load_ipc_bucket), driven by IpcWeights.sync")

    def sync(self, group: ActorGroup, handle: WeightHandle, timeout_s: float,
             actor_ids: Iterable[int] | None = None) -> list[CallResult]:
        deadline = time.monotonic() + timeout_s
        ids = sorted(group.healthy_actor_ids() if actor_ids is None else actor_ids)
        ranks = self.senders.actor_ids
        strays = {group.label(i): RuntimeError(f"no learner rank {i} shares its GPU (rollout.weight_transport=ipc "
                                               f"pairs worker k with rank k; ranks: {ranks})") for i in ids if i not in ranks}
        if strays:
            raise WeightSyncError(handle.version, strays, timeout_s)
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        try:
            self._senders("ipc_open", lambda a: a.ipc_open.remote(handle), handle, left())
            while True:
                buckets = self._senders("ipc_next", lambda a: a.ipc_next.remote(), handle, left())
                if all(b is None for b in buckets.values()):
                    break
                self._workers(group, {i: (lambda a, b=buckets[i]: a.load_ipc_bucket.remote(b)) for i in ids},
                              handle, left())
            return self._workers(group, {i: (lambda a: a.finish_ipc.remote(handle.version)) for i in ids}, handle, left())
        finally:
            self.senders.call(lambda a: a.ipc_close.remote(), timeout_s=min(30.0, self.timeout_s))

    def _senders(self, what: str, fn, handle: WeightHandle, timeout_s: float) -> dict[int, Any]:
        results = self.senders.call(fn, timeout_s=timeout_s, fail_fast=True)
        failures = {f"{r.label} ({what})": r.error for r in results if not r.ok}
        if failures:
            raise WeightSyncError(handle.version, failures, timeout_s)
        return {r.actor_id: r.value for r in results}

    def _workers(self, group: ActorGroup, calls: dict, handle: WeightHandle, timeout_s: float) -> list[CallResult]:
        return check_loaded(group, group.collect(group.start_each(calls), timeout_s), handle.version, timeout_s)
