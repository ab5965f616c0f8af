"""The weight side of a rollout pool (tidal.rollout.pool): the weight transport and the version
every worker must hold. `RolloutPool` owns one `PoolWeights` (`pool.weights`) and decides who
gets weights when (its live workers on a push, booted workers that await the current version);
`PoolWeights` moves them through the transport and keeps the version that restarted workers load.

With a group-bound transport (rollout.weight_transport=collective) a worker can load a version
only as a member of the transport's group, so a new or restarted worker boots first and gets the
current version from `catch_up`; with the object store it loads `start_call`'s handle as it boots.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from tidal.actors.actor_group import ActorGroup
from tidal.actors.weight_delta import DeltaPublisher
from tidal.actors.weights import WeightHandle, WeightSyncError, WeightTransport

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class PoolWeights:
    """The transport and current weight version of the workers of `group`.

    bucket_mb: bucket size of a push (rollout.weight_bucket_mb); timeout_s: default timeout of
    a sync (cluster.sync_timeout_s)."""

    def __init__(self, group: ActorGroup, transport: WeightTransport, bucket_mb: float, timeout_s: float,
                 delta: str = "off"):
        self.group, self.transport, self.bucket_mb, self.timeout_s = group, transport, bucket_mb, timeout_s
        # rollout.weight_delta: named-tensor pushes through the object store send what changed only
        # (tidal.actors.weight_delta); the version chain lives here, as on learner rank 0
        self.delta = None if delta == "off" else DeltaPublisher(delta)
        self.handle: Optional[WeightHandle] = None  # what restarted workers load (None: the initial weights)
        self.version = 0

    @property
    def group_bound(self) -> bool:
        """Whether a worker can load the current weights only as a member of the transport's
        group (collective); it then boots first and gets them from `catch_up`."""
        return self.handle is not None and getattr(self.transport, "group_bound", False)

    def start_call(self) -> Callable[[Any], Any]:
        """The readiness call of a new or restarted worker: load the current weights, unless
        there are none yet or the transport is group-bound (then it only reports that it is up)."""
        handle = self.handle
        if handle is not None and not self.group_bound:
            return lambda a: a.load_weights.remote(handle)
        return lambda a: a.info.remote()

    def set_transport(self, transport: WeightTransport) -> None:
        """Use another transport from the next push (the old one is closed)."""
        self.transport.close()
        self.transport = transport

    def publish(self, named_tensors: NamedTensors, version: int) -> WeightHandle:
        """Put weights into the transport (in bucket_mb buckets; with delta sync, the changed ones)."""
        if self._delta_on():
            return self.delta.publish(named_tensors, version, self.bucket_mb)
        return self.transport.publish(named_tensors, version, self.bucket_mb)

    def _delta_on(self) -> bool:
        return self.delta is not None and self.transport.name == "object_store"

    def next_version(self, weights: Union[WeightHandle, NamedTensors], version: Optional[int]) -> int:
        """The version a push of `weights` makes current (a handle's own; else `version`, default
        current + 1); raises ValueError unless it is newer than the current one."""
        version = weights.version if isinstance(weights, WeightHandle) else (
            self.version + 1 if version is None else version)
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than the pool's {self.version}")
        return version

    def push(self, weights: Union[WeightHandle, NamedTensors], version: int, timeout_s: float,
             actor_ids: list[int]) -> None:
        """Workers `actor_ids` load `weights` (a handle, or named tensors streamed through the
        transport) as `version`, which becomes current even when some of them fail: the
        WeightSyncError names those, and they restart with this version."""
        if not isinstance(weights, WeightHandle) and self._delta_on():
            weights = self.publish(weights, version)  # a delta version: put first, then every worker pulls
        try:
            if isinstance(weights, WeightHandle):
                self.handle, self.version = weights, version  # restarts load this from now on
                self.transport.sync(self.group, weights, timeout_s, actor_ids=actor_ids)
            else:  # streamed: workers pull while later buckets are still being put
                self.handle = self.transport.push(self.group, weights, version, self.bucket_mb, timeout_s, actor_ids)
                self.version = version
        except WeightSyncError as e:
            if e.handle is not None:  # the failed workers restart with this version
                self.handle, self.version = e.handle, version
            raise

    def catch_up(self, actor_ids: list[int]) -> bool:
        """Booted workers that await the current weights (group-bound transport) load them, in
        one sync of just those workers. False when a worker failed (it restarts and waits
        again); a WeightSyncError of the sender's own is raised."""
        try:
            self.transport.sync(self.group, self.handle, self.timeout_s, actor_ids=actor_ids)
        except WeightSyncError:
            if all(self.group.is_healthy(i) for i in actor_ids):  # the sender failed, not a worker
                raise
            return False
        return True

    def close(self) -> None:
        self.transport.close()
        self.handle = None
