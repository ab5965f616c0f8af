"""The rollout pool's weight side (a base class of RolloutPool, tidal.rollout.pool): pushing
a new version to every worker through the weight transport, and, with a group-bound transport
(rollout.weight_transport=collective), getting the current version to workers that booted
without it. It works on the pool's state: transport, group, _workers, _handle, _version,
_op_lock, timeout_s and the membership methods (_poll_starting, _restart_dead, ...)."""

from __future__ import annotations

import time
from typing import Iterable, Optional, Union

import torch

from tidal.actors.weights import WeightHandle, WeightSyncError, WeightTransport

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class PoolWeights:
    """Weight pushes of RolloutPool; see the module docstring."""

    def _group_bound(self) -> bool:
        """Whether a worker can load the current weights only as a member of the transport's
        group (collective); it then boots first and gets them from `_catch_up`."""
        return self._handle is not None and getattr(self.transport, "group_bound", False)

    def set_transport(self, transport: WeightTransport) -> None:
        """Use another weight transport from the next push (e.g. the collective group, once the
        learners that send through it are up)."""
        with self._op_lock:
            self.transport.close()
            self.transport = transport

    def _catch_up(self) -> None:
        """Booted workers that await the current weights (group-bound transport) get them now,
        in one sync of just those workers; the next push forms a group with every worker."""
        ids = [i for i, w in self._workers.items()
               if w.status == "starting" and w.ready_ref is None and self.group.is_healthy(i)]
        if not ids:
            return
        try:
            self.transport.sync(self.group, self._handle, self.timeout_s, actor_ids=ids)
        except WeightSyncError:
            if all(self.group.is_healthy(i) for i in ids):  # the sender failed, not a worker
                raise
            return  # the failed workers are restarted and wait again
        for i in ids:
            self._workers[i].status = "ready"
            self._restarts_in_a_row.pop(i, None)

    def publish(self, named_tensors: NamedTensors, version: int) -> WeightHandle:
        """Put weights into the transport (rollout.weight_bucket_mb buckets)."""
        return self.transport.publish(named_tensors, version, self.cfg.rollout.weight_bucket_mb)

    def load_weights(self, weights: Union[WeightHandle, NamedTensors], version: Optional[int] = None,
                     timeout_s: Optional[float] = None) -> float:
        """Push a new weight version to every worker; returns the sync time in seconds.

        weights: a WeightHandle (e.g. from LearnerGroup.export_weights) or (name, tensor)
        pairs, published here as `version` (default: current + 1). Versions must increase.
        Raises WeightSyncError naming every worker that failed or did not answer within
        `timeout_s` (default cluster.sync_timeout_s); those workers are restarted with these
        weights in the background."""
        version = weights.version if isinstance(weights, WeightHandle) else (
            self._version + 1 if version is None else version)
        if version <= self._version:
            raise ValueError(f"weight version {version} is not newer than the pool's {self._version}")
        timeout_s = timeout_s or self.timeout_s
        with self._op_lock:
            start = time.perf_counter()
            self._probe_idle()
            live = [i for i, w in self._workers.items() if w.status != "draining" and self.group.is_healthy(i)]
            try:
                if isinstance(weights, WeightHandle):
                    self._handle, self._version = weights, version  # restarts load this from now on
                    self.transport.sync(self.group, weights, timeout_s, actor_ids=live)
                else:  # streamed: workers pull while later buckets are still being put
                    self._handle = self.transport.push(self.group, weights, version,
                                                       self.cfg.rollout.weight_bucket_mb, timeout_s, live)
                    self._version = version
            except WeightSyncError as e:
                if e.handle is not None:  # the failed workers restart with this version
                    self._handle, self._version = e.handle, version
                self._restart_dead()
                raise
            for i in live:  # a starting worker that loaded this handle is ready
                if self._workers[i].status == "starting":
                    self._workers[i].status, self._workers[i].ready_ref = "ready", None
            self._restart_dead()  # workers found dead before the push start with this version
            seconds = time.perf_counter() - start
        self._apply_pending_scale()
        return seconds

    def _probe_idle(self) -> None:
        """Find workers that died while idle (between calls), so that a push does not count
        them as sync failures: they are restarted with the new weights instead."""
        self._poll_starting(0.0)  # a start that finished since the last call counts as ready
        if self.group.local:
            return
        idle = [i for i, w in self._workers.items() if w.status == "ready" and not w.in_flight]
        self.group.call(lambda a: a.__ray_ready__.remote(), actor_ids=idle, timeout_s=min(10.0, self.timeout_s))
