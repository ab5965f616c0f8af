"""Delta weight sync over the object store (rollout.weight_delta; docs/rollout.md#delta-sync): a
push sends what changed since the version a worker holds, not the whole model.

Sender (`DeltaPublisher`, kept by whoever publishes every version: learner rank 0):
  * the tensors are cut into the same buckets every version (iter_buckets over the same names in
    the same order) and each bucket is packed flat and checksummed (CRC-32 of its bytes);
  * a bucket whose checksum did not change is not put again: the version points at the object of
    the version that last changed it (the version chain), so a FULL version costs no extra put -
    it is the newest object of every bucket;
  * `buckets`: a changed bucket travels as its new bytes; `xor`: as the XOR of its new and old
    bytes, zlib-compressed, when that is at most half its size (bf16 weights under small updates
    keep most bits: ~99% zero bytes measured) - otherwise as its new bytes (fp32 after an Adam step
    changes nearly every element's low bytes: the XOR compresses to ~55% at ~40 MB/s, slower than
    moving the bytes, docs/performance.md#delta-sync);
  * a bucket that holds a layer vLLM fuses with a layer of a changed bucket (q/k/v, gate/up) is
    loaded too: a partial reload needs whole fused groups (tidal.common.lora.FUSED_GROUPS).

Receiver (`DeltaReceiver`, one per rollout worker): a handle names its base version. A worker that
holds exactly that version pulls the changed buckets only (rebuilding an XOR delta from its copy of
the base bytes); a new worker, one that lags (it missed a version) or one whose rebuilt bytes fail
their checksum (a corrupted or lost delta) pulls the full version instead - every bucket's newest
object, each checked against its checksum too. Nothing is loaded before every bucket has passed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from tidal.actors.weights import FlatBucket, WeightHandle, iter_buckets

MODES = ("buckets", "xor")
XOR_MIN_ZERO_SHARE = 0.5  # below this share of unchanged bytes the XOR is not worth compressing
XOR_SAMPLE_BYTES = 1 << 20  # the compressibility of a bucket's XOR is judged on its first MiB first


def checksum(buffer: torch.Tensor) -> int:
    """CRC-32 of a flat uint8 CPU buffer (about 1 GB/s on one core here)."""
    return zlib.crc32(memoryview(buffer.numpy()))


@dataclass(frozen=True)
class BucketEntry:
    """One bucket of a delta version. `full_ref`: the newest object of the bucket (a FlatBucket),
    possibly put by an older version; `delta_ref`: this version's XOR delta (bytes), if any;
    `load`: a worker at the base version loads this bucket (changed, or fused with a changed one)."""

    index: int
    checksum: int
    nbytes: int
    full_ref: Any
    delta_ref: Any = None
    delta_nbytes: int = 0
    load: bool = True


@dataclass(frozen=True)
class DeltaSpec:
    """What `WeightHandle.delta` holds: the version a worker must hold to apply this one as a delta."""

    base_version: int  # -1: no base (the first version): every worker pulls it whole
    entries: tuple[BucketEntry, ...] = field(default=())
    mode: str = "buckets"  # "xor": receivers keep every bucket's bytes to rebuild the next deltas

    def delta_bytes(self) -> int:
        """Bytes a worker at the base version pulls (an XOR delta, or the bucket's new bytes)."""
        return sum(e.delta_nbytes or e.nbytes for e in self.entries if e.load)

    def full_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class DeltaPublisher:
    """Sender-side state of delta sync: the last version's bucket checksums, newest objects and (xor)
    bytes. `put`: how an object reaches the store (ray.put; tests may pass another)."""

    def __init__(self, mode: str, put=None):
        if mode not in MODES:
            raise ValueError(f"weight delta mode must be one of {MODES}, got {mode!r}")
        self.mode, self._put = mode, put
        self.version: Optional[int] = None
        self.layout: list[tuple] = []  # per bucket: ((name, shape, dtype), ...)
        self.sums: list[int] = []
        self.refs: list[Any] = []
        self.previous: list[torch.Tensor] = []  # xor: the last version's flat bytes per bucket

    def put(self, obj) -> Any:
        if self._put is not None:
            return self._put(obj)
        import ray

        return ray.put(obj)

    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_mb: float) -> WeightHandle:
        """Put what changed since the last version and return the handle of `version`."""
        flats = [FlatBucket.pack(b) for b in iter_buckets(named_tensors, bucket_mb)]
        layout = [tuple(zip(f.names, f.shapes, f.dtypes)) for f in flats]
        sums = [checksum(f.buffer) for f in flats]
        chained = self.version is not None and layout == self.layout
        changed = [not chained or s != old for s, old in zip(sums, self.sums if chained else sums)]
        load = _with_fused(layout, changed)
        entries, refs = [], []
        for i, (flat, s) in enumerate(zip(flats, sums)):
            full_ref = self.put(flat) if changed[i] else self.refs[i]
            delta_ref, delta_nbytes = None, 0
            if chained and changed[i] and self.mode == "xor":
                packed = _xor_delta(flat.buffer, self.previous[i])
                if packed is not None:
                    delta_ref, delta_nbytes = self.put(packed), len(packed)
            refs.append(full_ref)
            entries.append(BucketEntry(i, s, flat.buffer.numel(), full_ref, delta_ref, delta_nbytes, load[i]))
        base = self.version if chained else -1
        self.version, self.layout, self.sums, self.refs = version, layout, sums, refs
        if self.mode == "xor":
            self.previous = [f.buffer.clone() for f in flats]
        total = sum(e.nbytes for e in entries)
        return WeightHandle(version, tuple(refs), "object_store", total, delta=DeltaSpec(base, tuple(entries), self.mode))


def _with_fused(layout: list[tuple], changed: list[bool]) -> list[bool]:
    """`changed`, plus every bucket holding a layer fused (in vLLM) with a layer of a changed bucket."""
    from tidal.common.lora import fused_siblings

    where = {name: i for i, bucket in enumerate(layout) for name, _, _ in bucket}
    load = list(changed)
    for i, bucket in enumerate(layout):
        if changed[i]:
            for name, _, _ in bucket:
                for sibling in fused_siblings(name):
                    if sibling in where:
                        load[where[sibling]] = True
    return load


def _xor_delta(new: torch.Tensor, old: torch.Tensor) -> Optional[bytes]:
    """zlib(new XOR old), or None when it would not be at most half of the bucket."""
    if new.numel() != old.numel():
        return None
    x = torch.bitwise_xor(new, old)
    if (x == 0).float().mean().item() < XOR_MIN_ZERO_SHARE:
        return None
    # a 1 MiB sample first: fp32 after an Adam step passes the zero-byte test (the high bytes stay)
    # yet compresses to ~55%, and compressing a whole bucket to learn that cost 8x the full push
    sample = x[: XOR_SAMPLE_BYTES].numpy()
    if len(zlib.compress(memoryview(sample), 1)) > sample.size // 2:
        return None
    packed = zlib.compress(memoryview(x.numpy()), 1)
    return packed if len(packed) <= new.numel() // 2 else None


class DeltaCorrupt(RuntimeError):
    """A bucket's bytes do not match its checksum."""


@dataclass
class PullStats:
    """What one load moved: `full` (pulled the whole version), bytes pulled, and why it went full."""

    full: bool = False
    bytes: int = 0
    reason: str = ""


class DeltaReceiver:
    """Receiver-side state of delta sync (one per worker): the version it holds and, with `keep`
    (xor mode, or a LoRA worker that must hand its engine the complete adapter), each bucket's bytes."""

    def __init__(self, keep: bool = False, get_timeout_s: float = 300.0):
        self.keep, self.get_timeout_s = keep, get_timeout_s
        self.version: Optional[int] = None
        self.held: dict[int, FlatBucket] = {}
        self.last = PullStats()

    def forget(self) -> None:
        self.version, self.held = None, {}

    def pull(self, handle: WeightHandle, complete: bool = False) -> list[tuple[str, torch.Tensor]]:
        """The tensors to load for `handle`: the changed (and fused) buckets when this worker holds
        the base version, else (or on a checksum failure) every bucket; with `complete`, every
        tensor of the version (unchanged ones from the kept bytes). All checked before returning."""
        spec: DeltaSpec = handle.delta
        stats = PullStats()
        buckets: Optional[dict[int, FlatBucket]] = None
        if spec.base_version < 0 or self.version != spec.base_version:
            stats.reason = "new" if self.version is None else f"holds version {self.version}, delta is from {spec.base_version}"
        elif complete and len(self.held) < len(spec.entries):
            stats.reason = "the complete version is needed and this worker kept no copy of it"
        else:
            try:
                buckets = self._delta(spec, stats)
            except DeltaCorrupt as e:
                stats.reason = str(e)
        if buckets is None:
            stats.full = True
            buckets = self._full(handle, stats)
        if self.keep or complete or spec.mode == "xor":
            self.held.update(buckets)
        self.version, self.last = handle.version, stats
        chosen = sorted(buckets) if not complete else [e.index for e in spec.entries]
        source = {**self.held, **buckets}
        return [item for i in chosen for item in source[i].tensors()]

    def _delta(self, spec: DeltaSpec, stats: PullStats) -> dict[int, FlatBucket]:
        out = {}
        for e in spec.entries:
            if not e.load:
                continue
            try:
                flat, pulled = self._rebuild(e)
                ok = checksum(flat.buffer) == e.checksum
            except Exception as err:  # noqa: BLE001 - a lost object, a damaged stream: the full version recovers
                raise DeltaCorrupt(f"bucket {e.index}'s delta could not be read ({type(err).__name__})") from err
            if not ok:
                raise DeltaCorrupt(f"bucket {e.index} failed its checksum")
            stats.bytes += pulled
            out[e.index] = flat
        return out

    def _rebuild(self, e: BucketEntry) -> tuple[FlatBucket, int]:
        """Bucket `e` of the new version, and the bytes pulled for it: the kept bytes XOR the delta,
        the kept bytes themselves (a fused neighbour that did not change), or its new object."""
        old = self.held.get(e.index)
        if e.delta_ref is not None and old is not None:
            x = torch.frombuffer(bytearray(zlib.decompress(_get(e.delta_ref, self.get_timeout_s))), dtype=torch.uint8)
            if x.numel() != old.buffer.numel():
                raise DeltaCorrupt(f"bucket {e.index}: a delta of {x.numel()} bytes for {old.buffer.numel()}")
            return FlatBucket(torch.bitwise_xor(old.buffer, x), old.names, old.shapes, old.dtypes, old.offsets), e.delta_nbytes
        if e.delta_ref is None and old is not None and checksum(old.buffer) == e.checksum:
            return old, 0
        return _get(e.full_ref, self.get_timeout_s), e.nbytes

    def _full(self, handle: WeightHandle, stats: PullStats) -> dict[int, FlatBucket]:
        """Every bucket of the version (the handle's own refs), each checked against its checksum."""
        out = {}
        for e, ref in zip(handle.delta.entries, handle.bucket_refs):
            flat = _get(ref, self.get_timeout_s)
            if checksum(flat.buffer) != e.checksum:
                raise DeltaCorrupt(f"bucket {e.index} of the full weight version {handle.version} failed its checksum: "
                                   "the object store holds damaged weights; nothing was loaded")
            stats.bytes += e.nbytes
            out[e.index] = flat
        return out


def _get(ref: Any, timeout_s: float) -> bytes:
    import ray

    return ray.get(ref, timeout=timeout_s)


def load_source(handle: WeightHandle, transports: dict, receiver: Optional[DeltaReceiver],
                complete: bool = False) -> tuple[Iterable[tuple[str, torch.Tensor]], bool]:
    """What a worker loads for `handle` and whether it is part of the model only (a delta): the
    delta receiver's pick for a delta handle, else the transport's pull of every tensor."""
    if handle.delta is None or receiver is None:
        from tidal.actors.weights import pull

        if receiver is not None:
            receiver.forget()  # the worker holds a version outside the chain now: the next delta goes full
        return pull(handle, transports), False
    named = receiver.pull(handle, complete)
    return named, not (complete or receiver.last.full)
