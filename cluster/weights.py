"""Weight transport: how a new policy version travels from the learner to rollout workers.

The interface (`WeightTransport`) has three verbs:
  publish(named_tensors, version, bucket_mb) -> WeightHandle   sender side, once per version
  pull(handle) -> iterator of (name, tensor)                     receiver side, in each worker
  sync(group, handle, timeout_s)                                 driver side: every actor of
      the group loads the handle (its `load_weights(handle)` method), with a HARD timeout.

`ObjectStoreTransport` (the default) puts the weights into Ray's object store in buckets of
about `bucket_mb` MB: one `ray.put` per bucket, so a 500-tensor model is a handful of
objects, not 500 messages. The handle holds only the bucket ObjectRefs; each worker `ray.get`s
the buckets itself (the driver is not in the data path), and on one node that get maps the
shared-memory copy without copying (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 makes torch tensors
take that path; PLATFORM.md measured ray.put at 4x faster with it).

A bucket is either a dict[str, Tensor] (what the learner's `export_weights` puts; zero-copy
per tensor) or a `FlatBucket` (all tensors in one contiguous byte buffer plus names, shapes,
dtypes and offsets; one buffer per object). `bench/weight_sync.py` measures both.

The collective (NCCL on GPU, gloo on CPU) transport lives in `tidal.cluster.collective`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

import torch

from tidal.cluster.actor_group import ActorGroup, CallResult


class WeightSyncError(RuntimeError):
    """Some workers did not load a weight version; `failures` maps worker label -> error."""

    def __init__(self, version: int, failures: dict[str, BaseException], timeout_s: float):
        self.version, self.failures, self.timeout_s = version, failures, timeout_s
        detail = "; ".join(f"{label}: {type(e).__name__}: {e}" for label, e in failures.items())
        super().__init__(
            f"weight sync of version {version} failed on {len(failures)} worker(s) "
            f"(timeout {timeout_s:.1f}s): {detail}")


@dataclass(frozen=True)
class WeightHandle:
    """A published weight version: small, passed to every worker, which pulls the data itself.

    bucket_refs: ObjectRefs of buckets (dict[str, Tensor] or FlatBucket); empty for
        collective transports, whose data flows in the collective itself.
    transport: name of the transport that can pull it.
    meta: transport-specific description of the buckets (collective: names/shapes/dtypes).
    """

    version: int
    bucket_refs: tuple = ()
    transport: str = "object_store"
    num_bytes: int = 0
    meta: tuple = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "bucket_refs", tuple(self.bucket_refs))
        if not isinstance(self.version, int) or self.version < 0:
            raise ValueError(f"WeightHandle.version must be a non-negative int, got {self.version!r}")


@dataclass(frozen=True)
class FlatBucket:
    """Several tensors packed into one contiguous byte buffer."""

    buffer: torch.Tensor  # (nbytes,) uint8
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]  # byte offset of each tensor in `buffer`

    @staticmethod
    def pack(named: list[tuple[str, torch.Tensor]]) -> "FlatBucket":
        tensors = [t for _, t in named]
        offsets, buffer = pack_bytes(tensors, torch.device("cpu"))
        return FlatBucket(buffer, tuple(n for n, _ in named), tuple(tuple(t.shape) for t in tensors),
                          tuple(t.dtype for t in tensors), tuple(offsets))

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Views into the buffer (no copy)."""
        for name, shape, dtype, off in zip(self.names, self.shapes, self.dtypes, self.offsets):
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            yield name, self.buffer[off:off + nbytes].view(dtype).view(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


ALIGN = 16  # bytes; a tensor view of a byte buffer must start at a multiple of its element size


def byte_layout(nbytes: list[int]) -> tuple[list[int], int]:
    """Offsets of consecutive blocks of `nbytes` bytes, each aligned to ALIGN; total size."""
    offsets, total = [], 0
    for n in nbytes:
        total = -(-total // ALIGN) * ALIGN
        offsets.append(total)
        total += n
    return offsets, total


def pack_bytes(tensors: list[torch.Tensor], device: torch.device) -> tuple[list[int], torch.Tensor]:
    """All tensors copied into one aligned byte buffer on `device`: (offsets, buffer)."""
    offsets, total = byte_layout([t.numel() * t.element_size() for t in tensors])
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    for t, off in zip(tensors, offsets):
        buffer[off:off + t.numel() * t.element_size()].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return offsets, buffer


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_mb: float) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors grouped into buckets of at most `bucket_mb` MB (a larger tensor
    gets a bucket of its own). Tensors come out detached, contiguous and on the CPU."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    limit = bucket_mb * 2**20
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def bucket_items(bucket: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a bucket in either form."""
    if isinstance(bucket, FlatBucket):
        return bucket.tensors()
    if isinstance(bucket, dict):
        return iter(bucket.items())
    raise TypeError(f"a weight bucket must be a dict[str, Tensor] or a FlatBucket, got {type(bucket).__name__}")


class WeightTransport(ABC):
    """Moves versioned weights from one sender to the actors of a group."""

    name: str

    def join(self) -> None:
        """Called once in each receiving process before its first pull (collective
        transports build their process group here); nothing to do for the object store."""

    @abstractmethod
    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                bucket_mb: float) -> WeightHandle:
        """Sender side: make `named_tensors` available as weight version `version`."""

    @abstractmethod
    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver side (inside a worker): the tensors of `handle`, bucket after bucket."""

    def sync(self, group: ActorGroup, handle: WeightHandle, timeout_s: float,
             actor_ids: Iterable[int] | None = None) -> list[CallResult]:
        """Every (healthy) actor of `group` loads `handle` via its `load_weights(handle)`,
        all within `timeout_s`. Raises WeightSyncError naming each worker that failed,
        died or did not answer; those workers are marked unhealthy."""
        results = group.call(lambda actor: actor.load_weights.remote(handle),
                             actor_ids=actor_ids, timeout_s=timeout_s)
        failures = {r.label: r.error for r in results if not r.ok}
        for r in results:
            if not r.ok:
                group.mark_unhealthy(r.actor_id)  # whatever it holds now is not `handle`
        if failures:
            raise WeightSyncError(handle.version, failures, timeout_s)
        return results


class ObjectStoreTransport(WeightTransport):
    """Buckets in Ray's object store; workers pull them directly (see module docstring).

    packing: "dict" puts each bucket as a dict[str, Tensor]; "flat" packs it into one
    contiguous buffer first (one extra copy on the sender, one buffer per object)."""

    name = "object_store"

    def __init__(self, packing: Literal["dict", "flat"] = "dict", get_timeout_s: float = 300.0):
        if packing not in ("dict", "flat"):
            raise ValueError(f"packing must be 'dict' or 'flat', got {packing!r}")
        self.packing, self.get_timeout_s = packing, get_timeout_s

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                bucket_mb: float) -> WeightHandle:
        import ray

        refs, num_bytes = [], 0
        for bucket in iter_buckets(named_tensors, bucket_mb):
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            obj = FlatBucket.pack(bucket) if self.packing == "flat" else dict(bucket)
            refs.append(ray.put(obj))
        return WeightHandle(version, tuple(refs), self.name, num_bytes)

    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        import ray

        for ref in handle.bucket_refs:
            yield from bucket_items(ray.get(ref, timeout=self.get_timeout_s))


class InProcessTransport(WeightTransport):
    """Buckets held in the handle itself: for local mode (no Ray), where sender and
    receivers share one process."""

    name = "in_process"

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                bucket_mb: float) -> WeightHandle:
        buckets = [dict(b) for b in iter_buckets(named_tensors, bucket_mb)]
        num_bytes = sum(t.numel() * t.element_size() for b in buckets for t in b.values())
        return WeightHandle(version, tuple(buckets), self.name, num_bytes)

    def pull(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in handle.bucket_refs:
            yield from bucket_items(bucket)


_STATELESS = {ObjectStoreTransport.name: ObjectStoreTransport, InProcessTransport.name: InProcessTransport}


def pull(handle: WeightHandle, transports: dict[str, WeightTransport] | None = None
         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver-side dispatch on `handle.transport` (object store unless told otherwise)."""
    transports = transports or {}
    if handle.transport in transports:
        return transports[handle.transport].pull(handle)
    if handle.transport in _STATELESS:
        return _STATELESS[handle.transport]().pull(handle)
    raise ValueError(f"no {handle.transport!r} transport on this worker: join it before pulling "
                     f"(known: {sorted(set(transports) | set(_STATELESS))})")


def timed_sync(transport: WeightTransport, group: ActorGroup, handle: WeightHandle,
               timeout_s: float) -> float:
    """`transport.sync` and its wall time in seconds."""
    start = time.perf_counter()
    transport.sync(group, handle, timeout_s)
    return time.perf_counter() - start
