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
take that path; docs/platform.md#p-ray-zero-copy measured ray.put at 4x faster with it).

A bucket is either a dict[str, Tensor] (what the learner's `export_weights` puts; zero-copy
per tensor) or a `FlatBucket` (all tensors in one contiguous byte buffer plus names, shapes,
dtypes and offsets; one buffer per object). `bench/weight_sync.py` measures both.

The collective (NCCL on GPU, gloo on CPU) transport lives in `tidal.actors.collective`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Optional

import torch

from tidal.actors.actor_group import ActorGroup, CallResult


class WeightSyncError(RuntimeError):
    """Some workers did not load a weight version; `failures` maps worker label -> error."""

    def __init__(self, version: int, failures: dict[str, BaseException], timeout_s: float):
        self.version, self.failures, self.timeout_s = version, failures, timeout_s
        self.handle: Optional["WeightHandle"] = None  # what the other workers loaded (push sets it)
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
    board: set only on the handle a streamed push (`ObjectStoreTransport.push`) gives workers.
    delta: set by delta sync (tidal.actors.weight_delta): the version chain and per-bucket checksums;
        a worker without delta state pulls `bucket_refs`, the full version, as from any handle.
    """

    version: int
    bucket_refs: tuple = ()
    transport: str = "object_store"
    num_bytes: int = 0
    meta: tuple = field(default=())
    board: Any = None  # streamed push: the RefBoard actor that hands out bucket refs as they are put
    delta: Any = None  # rollout.weight_delta: a tidal.actors.weight_delta.DeltaSpec (bucket_refs: the full version)

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


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: float,
                 device: torch.device | str = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors grouped into buckets of at most `bucket_mb` MB (a larger tensor
    gets a bucket of its own). Tensors come out detached, contiguous and on `device`."""
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    limit = bucket_mb * 2**20
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named_tensors:
        t = t.detach().to(device).contiguous()
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

    def close(self) -> None:
        """Release what the sender side holds (helper actors, process groups)."""

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
        return check_loaded(group, results, handle.version, timeout_s)

    def push(self, group: ActorGroup, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             bucket_mb: float, timeout_s: float, actor_ids: Iterable[int] | None = None) -> WeightHandle:
        """publish + sync in one call (transports may overlap the two); returns the handle
        that restarted workers can load later."""
        handle = self.publish(named_tensors, version, bucket_mb)
        try:
            self.sync(group, handle, timeout_s, actor_ids)
        except WeightSyncError as e:
            e.handle = handle  # the workers that did load it hold this version now
            raise
        return handle


def check_loaded(group: ActorGroup, results: list[CallResult], version: int, timeout_s: float,
                 others: dict[str, BaseException] | None = None) -> list[CallResult]:
    """Mark failed workers unhealthy (what they hold is not `version`) and raise naming them, and
    the `others` that failed beside them (e.g. a sender), in one WeightSyncError. Every transport's
    sync ends here."""
    failures = {**{r.label: r.error for r in results if not r.ok}, **(others or {})}
    for r in results:
        if not r.ok:
            group.mark_unhealthy(r.actor_id)
    if failures:
        raise WeightSyncError(version, failures, timeout_s)
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
        self._board_actor = None  # RefBoard of streamed pushes, started on first use

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

        if handle.board is not None:  # streamed: each ref as soon as the sender has put it
            for index in itertools.count():
                wrapped = ray.get(handle.board.get.remote(handle.version, index, self.get_timeout_s),
                                  timeout=self.get_timeout_s + 10)
                if wrapped is None:
                    return
                yield from bucket_items(ray.get(wrapped[0], timeout=self.get_timeout_s))
        for ref in handle.bucket_refs:
            yield from bucket_items(ray.get(ref, timeout=self.get_timeout_s))

    def push(self, group: ActorGroup, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
             bucket_mb: float, timeout_s: float, actor_ids: Iterable[int] | None = None) -> WeightHandle:
        """Streamed publish + sync: the workers start pulling while later buckets are still
        being put (measured ~1.7x faster than put-all-then-pull for a 135M model). Returns
        only when every worker has loaded, so the caller may change the tensors afterwards."""
        import ray

        buckets = list(iter_buckets(named_tensors, bucket_mb))  # views: no copy yet
        if len(buckets) == 1:  # nothing to overlap: a plain put, then the workers' get
            return super().push(group, [t for b in buckets for t in b], version, bucket_mb, timeout_s, actor_ids)
        deadline = time.monotonic() + timeout_s
        board = self._board()
        ray.get(board.start.remote(version), timeout=timeout_s)
        streamed = WeightHandle(version, (), self.name, 0, board=board)
        started = group.start(lambda actor: actor.load_weights.remote(streamed), actor_ids)
        refs, num_bytes = [], 0
        try:
            for bucket in buckets:
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                refs.append(ray.put(FlatBucket.pack(bucket) if self.packing == "flat" else dict(bucket)))
                board.post.remote(version, [refs[-1]])  # nested: the board must not resolve it
            board.finish.remote(version, None)
        except BaseException as e:
            board.finish.remote(version, f"{type(e).__name__}: {e}")  # workers fail fast
            group.collect(started, timeout_s=5.0)
            raise
        handle = WeightHandle(version, tuple(refs), self.name, num_bytes)
        try:
            check_loaded(group, group.collect(started, max(0.0, deadline - time.monotonic())), version, timeout_s)
        except WeightSyncError as e:
            e.handle = handle
            raise
        return handle

    def _board(self):
        """The RefBoard actor of this sender, started on the first push and kept (a start-up
        costs seconds; a push milliseconds)."""
        import ray

        if self._board_actor is None:
            self._board_actor = ray.remote(RefBoard).options(num_cpus=0).remote()
        return self._board_actor

    def close(self) -> None:
        """End the RefBoard actor, if any."""
        board, self._board_actor = self._board_actor, None
        if board is not None:
            import ray

            ray.kill(board)


class RefBoard:
    """Async actor: the bucket refs of the version being pushed, posted by the sender as each
    ray.put finishes and handed to every worker that asks for bucket i."""

    def __init__(self):
        self.version, self.refs, self.done, self.error = -1, [], False, None
        self._cond = None

    def _changed(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def start(self, version: int) -> None:
        async with self._changed():
            self.version, self.refs, self.done, self.error = version, [], False, None
            self._changed().notify_all()

    async def post(self, version: int, wrapped_ref: list) -> None:
        async with self._changed():
            if version == self.version:
                self.refs.append(wrapped_ref)
                self._changed().notify_all()

    async def finish(self, version: int, error: Optional[str]) -> None:
        async with self._changed():
            if version == self.version:
                self.done, self.error = True, error
                self._changed().notify_all()

    async def get(self, version: int, index: int, timeout_s: float) -> Optional[list]:
        """[ref] of bucket `index`, or None after the last bucket."""
        async with self._changed():
            ready = lambda: version != self.version or index < len(self.refs) or self.done  # noqa: E731
            try:
                await asyncio.wait_for(self._changed().wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                raise TimeoutError(f"bucket {index} of weight version {version} was not put within {timeout_s:.0f}s") from None
            if version != self.version:
                raise RuntimeError(f"weight version {version} was superseded by {self.version} during its push")
            if index < len(self.refs):
                return self.refs[index]
            if self.error:
                raise RuntimeError(f"the sender failed while putting weight version {version}: {self.error}")
            return None


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
