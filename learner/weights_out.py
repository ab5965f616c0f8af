"""A learner rank's side of the weight push to the rollout workers (rollout.weight_transport):

* object_store: rank 0 puts CPU copies into the object store (`export` with the transport); with
  rollout.weight_delta only the buckets that changed since the last version (tidal.actors.weight_delta).
* LoRA (learner.lora_rank > 0, any transport but ipc): the push carries the adapter matrices only.
* collective: rank 0 is the sender of the broadcast group (tidal.actors.collective). In
  algorithm.mode=sync a version is *live*: nothing is copied at export; when the driver syncs,
  every rank gathers (ZeRO-3) and rank 0 streams the tensors from its device into the broadcast.
  In async mode the policy moves on while the pool still generates, so rank 0 stages the version
  in host memory at export.
* ipc (colocated on GPU): every rank shares its live weights, bucket by bucket, with the rollout
  worker on its own GPU (tidal.actors.ipc); always live (preflight requires sync mode).

A live version is the weights at export time; sending it after they changed (an optimizer step, a
checkpoint load) would send another version under its number, so that is refused (`stamp`).
"""

from __future__ import annotations

from typing import Iterator

import torch

from tidal.actors.ipc import IpcSender


class PolicyWeightsOut:
    """Owned by a LearnerWorker (`rank.weights_out`), which Ray calls."""

    def __init__(self, rank):
        self.rank = rank  # the LearnerWorker
        self.sender = None  # collective: rank 0's CollectiveTransport
        self.ipc = IpcSender()
        self.live: tuple | None = None  # (version, stamp, bucket MB) of the last live export
        self.delta = None  # rollout.weight_delta: rank 0's DeltaPublisher

    def stamp(self) -> tuple[int, int]:
        """Changes whenever the policy's weights do: optimizer steps, checkpoint loads."""
        return int(self.rank.engine.global_steps), self.rank.checkpoint_loads

    def export(self, version: int, bucket_mb: float, transport=None):
        """Publish the policy as `version` through `transport` (the object store), or, None, for the
        configured collective / ipc push: live (sync mode, ipc) or staged by rank 0 (async collective).
        Rank 0 returns the WeightHandle; the other ranks return None."""
        r, cfg = self.rank, self.rank.cfg
        if transport is None and (cfg.algorithm.mode != "async" or cfg.rollout.weight_transport == "ipc"):
            self.live = (version, self.stamp(), bucket_mb)
            if r.rank != 0:
                return None
            if cfg.rollout.weight_transport == "ipc":
                from tidal.actors.collective import LIVE
                from tidal.actors.weights import WeightHandle

                return WeightHandle(version, (), "ipc", 0, (LIVE,))
            return self._sender().live_handle(version)
        if r.rank != 0:
            for _ in self.tensors():
                pass
            return None
        if transport is not None and transport.name == "object_store" and cfg.rollout.weight_delta != "off":
            return self._delta_publisher().publish(self.tensors(), version, bucket_mb)
        return (transport or self._sender()).publish(self.tensors(), version, bucket_mb)

    def _delta_publisher(self):
        """Rank 0's delta-sync state (rollout.weight_delta), kept across versions: the version chain."""
        if self.delta is None:
            from tidal.actors.weight_delta import DeltaPublisher

            self.delta = DeltaPublisher(self.rank.cfg.rollout.weight_delta)
        return self.delta

    def _live_tensors(self, version: int, keep_all: bool = False) -> tuple[Iterator[tuple[str, torch.Tensor]], float]:
        """The live weights of `version` on this rank's device (every rank gathers; rank 0 keeps them,
        or every rank with keep_all), and the export's bucket size; refused if the policy changed."""
        live_version, stamp, bucket_mb = self.live or (None, None, 0)
        if live_version != version or stamp != self.stamp():
            raise RuntimeError(
                f"learner rank {self.rank.rank}: weight version {version} was exported live (not staged) and the "
                f"policy has changed since (an update or a checkpoint load; this rank's live version is "
                f"{live_version}); a live version is sent before the next update, which algorithm.mode=sync guarantees")
        return self.tensors(to_cpu=False, keep_all=keep_all), bucket_mb

    def tensors(self, to_cpu: bool = True, keep_all: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """What a push sends: with LoRA adapters (rollout.lora_load adapter or merge) only the adapter
        matrices under peft's names (tidal.learner.lora), else the merged HF weights (ZeRO-3 gathered).
        Every rank must exhaust it; rank 0 (or every rank with keep_all) gets the tensors."""
        from tidal.learner.export import iter_named_weights
        from tidal.learner.lora import iter_adapter_weights

        r = self.rank
        r._need(r.spec.role == "policy", "the weight push", "a policy learner")
        keep = keep_all or r.rank == 0
        if r.lora is not None and r.lora.load != "full":
            return iter_adapter_weights(r.engine.module, keep, to_cpu)
        return iter_named_weights(r.engine.module, keep, to_cpu)

    # ------------------------------------------------------------------ collective

    def _sender(self):
        """Rank 0's collective sender: stages published versions; broadcasts once joined."""
        if self.sender is None:
            from tidal.actors.collective import CollectiveSpec, CollectiveTransport, collective_backend

            staging = CollectiveSpec(collective_backend(self.rank.use_gpu), "", 0, 1, "staging")  # no group yet
            self.sender = CollectiveTransport(staging, rank=0)
        return self.sender

    def join_collective(self, spec) -> None:
        """Join a new weight broadcast group as its sender (rank 0); the staged versions carry over."""
        from tidal.actors.collective import CollectiveTransport

        sender = CollectiveTransport(spec, rank=0)
        sender.adopt(self.sender)
        self.sender = sender
        sender.join()

    def send_collective(self, handle) -> int:
        """Broadcast a version to the current group (the driver starts the loads): a staged one from
        rank 0's host copy; a live one gathered by every rank and streamed by rank 0 from its device."""
        from tidal.actors.collective import STAGED

        if handle.meta == (STAGED,):
            return self._sender().send(handle) if self.rank.rank == 0 else handle.version
        named, bucket_mb = self._live_tensors(handle.version)
        if self.rank.rank != 0:
            for _ in named:
                pass
            return handle.version
        return self._sender().send(handle, named, bucket_mb)

    # ------------------------------------------------------------------ ipc

    def ipc_open(self, handle) -> None:
        """Start sharing a live version with the worker on this rank's GPU, bucket by bucket (ipc_next)."""
        from tidal.actors.weights import iter_buckets

        named, bucket_mb = self._live_tensors(handle.version, keep_all=True)
        device = self.rank.device
        self.ipc.open(handle.version, iter_buckets(named, bucket_mb, device), device)
