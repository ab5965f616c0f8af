"""The rollout pool: N rollout workers (vLLM or transformers) as Ray actors behind one call.

`pool.generate(prompts, sampling)` answers every prompt exactly once, whatever happens to
the workers meanwhile:
  * the prompts are cut into chunks BEFORE `ray.put`, so each worker receives only its chunk;
  * a free chunk goes to the live worker with the fewest chunks in flight (least outstanding
    requests), one at a time per worker (an engine batches a chunk itself);
  * a worker that dies (or answers nothing for cluster.sync_timeout_s) has its chunks put back
    at the front of the queue for the others; results are kept per chunk, so a late duplicate
    is dropped and no prompt is answered twice;
  * a dead worker is restarted in the background and loads the current weights (and version)
    before it gets any work; when no worker can serve (all lost, none restarted, e.g. the
    only rollout node died) for cluster.node_wait_s, the call raises WorkersLost;
  * `scale(n)` may be called from another thread while a generate call runs: new workers join
    once their engine is up and holds the current weights; removed workers finish what they
    hold, then leave.
Weights: `load_weights(handle or named tensors)` pushes a new version through the weight
transport (Ray object store by default) with a hard timeout (WeightSyncError names the worker).
With a group-bound transport (rollout.weight_transport=collective, set by `set_transport`) a
new or restarted worker cannot load the current version alone: it boots, then the pool syncs
the current version to it through the transport (which forms a group for it). The transport
and the current version are the pool's `weights` (tidal.rollout.pool_weights.PoolWeights).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tidal.actors.actor_group import ActorGroup, call_error, is_actor_death
from tidal.actors.refs import wait_any
from tidal.actors.threads import run_threads
from tidal.actors.weights import (InProcessTransport, ObjectStoreTransport, WeightHandle, WeightSyncError,
                                  WeightTransport)
from tidal.common.config import TidalConfig
from tidal.common.lora import spec_from_config
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.rollout.pool_dispatch import ChunkScheduling, GenerateStats, PoolError, WorkersLost  # noqa: F401 (re-exported)
from tidal.rollout.pool_weights import NamedTensors, PoolWeights
from tidal.rollout.sampling import Sampling
from tidal.rollout.worker import check_prompts, order_by_prompt


@dataclass
class _Worker:
    status: str = "starting"  # starting -> ready -> draining
    ready_ref: Any = None  # weight load / readiness call of a starting worker
    in_flight: dict = field(default_factory=dict)  # ref -> (_Chunk, start time)


class RolloutPool(ChunkScheduling):
    """Rollout workers as Ray actors (or in-process objects with local=True).

    cfg: the run config (rollout.*, cluster.sync_timeout_s, model.dtype, seed).
    model_path: HF folder the engines start from (weight version 0).
    worker_cls: RolloutWorker / HFRolloutWorker by rollout.backend, or any class with their
        interface (tests inject misbehaving subclasses).
    actor_options: Ray options per worker id, e.g. `Placement.actor_options("rollout")`
        (tidal.actors.placement: a restarted worker keeps its slot, a removed one frees it);
        default: plain actors with {num_cpus: rollout.cpus_per_worker, num_gpus: rollout.gpus_per_worker}.
    chunks_per_worker: chunks per worker per call (more: finer balancing and re-queueing;
        fewer: bigger engine batches).
    """

    def __init__(self, cfg: TidalConfig, model_path: Union[str, Path], *, worker_cls: Optional[type] = None,
                 transport: Optional[WeightTransport] = None,
                 actor_options: Optional[Callable[[int], dict]] = None, local: bool = False,
                 chunks_per_worker: int = 1, max_restarts: int = 3,
                 wait_ready: bool = True):
        self.cfg, self.model_path = cfg, str(model_path)
        self.timeout_s = cfg.cluster.sync_timeout_s
        self.node_wait_s = cfg.cluster.node_wait_s  # for a restart when no worker is left to serve
        self.chunks_per_worker, self.max_restarts = chunks_per_worker, max_restarts
        self.default_sampling = Sampling.from_config(cfg.rollout, cfg.seed)
        self._workers: dict[int, _Worker] = {}
        self._restarts_in_a_row: dict[int, int] = {}  # reset once a restarted worker is ready
        self._target = cfg.rollout.num_workers
        self._stalled_since: Optional[float] = None  # when the pool last had no worker able to serve
        self._op_lock = threading.RLock()  # one generate / load_weights / resize at a time
        self.last_stats = GenerateStats()
        rc = cfg.rollout
        base_options = {"num_cpus": rc.cpus_per_worker, "num_gpus": rc.gpus_per_worker}
        self.num_threads = run_threads(cfg).rollout  # per worker (tidal.actors.threads)
        self.group = ActorGroup(
            worker_cls or _default_worker_cls(rc.backend), 0,
            args=lambda wid: (self.model_path, rc, cfg.model.dtype, cfg.seed * 1000 + wid, wid, self.num_threads,
                              spec_from_config(cfg)),
            options=base_options, options_fn=actor_options, local=local, name="rollout",
            call_timeout_s=self.timeout_s)
        transport = transport or (InProcessTransport() if local else ObjectStoreTransport(get_timeout_s=self.timeout_s))
        self.weights = PoolWeights(self.group, transport, rc.weight_bucket_mb, self.timeout_s, rc.weight_delta)
        try:
            with self._op_lock:
                self._resize()
                if wait_ready:
                    self._wait_ready(self.timeout_s)
        except BaseException:
            self.group.shutdown()  # leave no half-started actors behind
            raise

    # ------------------------------------------------------------------ properties

    @property
    def weight_version(self) -> int:
        return self.weights.version

    @property
    def num_workers(self) -> int:
        """Workers that serve (or are starting to serve) requests; draining ones excluded."""
        return sum(1 for w in self._workers.values() if w.status != "draining")

    def worker_ids(self) -> list[int]:
        return sorted(i for i, w in self._workers.items() if w.status != "draining")

    # ------------------------------------------------------------------ membership

    def _start(self, wid: int) -> None:
        """Readiness call of a new or restarted worker: load the current weights if any."""
        self._workers[wid] = _Worker("starting", self.group.submit(self.weights.start_call(), wid))

    def _resize(self) -> None:
        """Move toward `_target` workers: add new ones, or drain the least busy."""
        live = [i for i, w in self._workers.items() if w.status != "draining"]
        if len(live) < self._target:
            for wid in self.group.add(self._target - len(live)):
                self._start(wid)
        elif len(live) > self._target:
            order = sorted(live, key=lambda i: (self._workers[i].status == "ready", len(self._workers[i].in_flight)))
            for wid in order[: len(live) - self._target]:
                self._workers[wid].status = "draining"
        for wid in [i for i, w in self._workers.items() if w.status == "draining" and not w.in_flight]:
            del self._workers[wid]
            self.group.remove([wid])

    def _restart_dead(self, queue: Optional[deque] = None, stats: Optional[GenerateStats] = None) -> None:
        """Restart every unhealthy worker (a draining one is just dropped); a restarted worker
        loads the current weights before it is given work."""
        for wid in self.group.unhealthy_actor_ids():
            worker = self._workers.get(wid)
            if worker is not None and worker.in_flight and queue is not None:
                self._lose_worker(wid, queue, stats or GenerateStats())
            if worker is None or worker.status == "draining":
                self._workers.pop(wid, None)
                self.group.remove([wid])
            elif self._restarts_in_a_row.get(wid, 0) >= self.max_restarts:
                raise PoolError(f"{self.group.label(wid)} died {self.max_restarts + 1} times in a row; giving up "
                                f"(check its log for the cause, e.g. out of memory).")
        for wid in self.group.restore():
            self._restarts_in_a_row[wid] = self._restarts_in_a_row.get(wid, 0) + 1
            self._start(wid)
            if stats is not None:
                stats.restarted_workers.append(wid)

    def _poll_starting(self, timeout_s: float) -> None:
        """Promote starting workers whose readiness call finished; failed ones get marked dead."""
        starting = {w.ready_ref: i for i, w in self._workers.items() if w.status == "starting" and w.ready_ref is not None}
        for ref in wait_any(list(starting), timeout_s) if starting else []:
            wid = starting[ref]
            r = self.group.result(wid, ref)
            if r.ok:
                self._workers[wid].ready_ref = None  # booted; still "starting" if it awaits weights
                if not self.weights.group_bound:
                    self._workers[wid].status = "ready"
                    self._restarts_in_a_row.pop(wid, None)
            # A constructor that raised (bad model path, out of memory) fails the same way on
            # every restart: report it instead of retrying.
            elif not is_actor_death(r.error) or getattr(r.error, "actor_init_failed", False):
                raise call_error("start", [r], PoolError, timeout_s)
            else:
                self.group.mark_unhealthy(wid)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(w.status == "starting" for w in self._workers.values()):
            if time.monotonic() > deadline:
                slow = [self.group.label(i) for i, w in self._workers.items() if w.status == "starting"]
                raise PoolError(f"rollout workers {slow} did not start within {timeout_s:.0f}s "
                                f"(cluster.sync_timeout_s); check their logs and the cluster's free resources.")
            self._restart_dead()
            self._poll_starting(min(1.0, max(0.0, deadline - time.monotonic())))
            self._catch_up()

    def scale(self, num_workers: int, wait: bool = True) -> None:
        """Resize the pool. Safe to call from another thread during `generate`: the running
        call then applies it (new workers join when ready; removed ones finish their chunks)."""
        if num_workers < 1:
            raise ValueError(f"RolloutPool.scale: num_workers must be >= 1, got {num_workers}")
        self._target = num_workers
        if self._op_lock.acquire(blocking=False):  # no call running: apply it here
            try:
                self._resize()
                if wait:
                    self._wait_ready(self.timeout_s)
            finally:
                self._op_lock.release()

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: PromptBatch, sampling: Optional[Sampling] = None) -> RolloutBatch:
        """n samples for every prompt, rows grouped by prompt and ordered by prompt index."""
        sampling = sampling or self.default_sampling
        check_prompts(prompts, self.cfg.rollout.max_model_len, sampling.max_new_tokens)
        if len(set(prompts.index)) != len(prompts.index):
            dup = sorted({i for i in prompts.index if prompts.index.count(i) > 1})[:5]
            raise ValueError(f"PromptBatch.index must be unique per call; repeated: {dup}")
        if len(prompts) == 0:
            return RolloutBatch.concat([])
        with self._op_lock:
            stats = self.last_stats = GenerateStats()  # live: readable while the call runs
            start = time.perf_counter()
            queue = deque(self._chunks(prompts))
            self._stalled_since = None
            stats.chunks = len(queue)
            results: dict[int, RolloutBatch] = {}
            while len(results) < stats.chunks:
                self._step(queue, results, sampling, stats)
            self._resize()  # finish removals whose workers went idle
            stats.seconds = time.perf_counter() - start
        self._apply_pending_scale()
        batch = RolloutBatch.concat([results[c] for c in sorted(results)])
        return order_by_prompt(batch, prompts, sampling.n)

    def _apply_pending_scale(self) -> None:
        """A scale() that raced with the end of a call is applied now."""
        if self._target != self.num_workers and self._op_lock.acquire(blocking=False):
            try:
                self._resize()
            finally:
                self._op_lock.release()

    # ------------------------------------------------------------------ weights (self.weights)

    def set_transport(self, transport: WeightTransport) -> None:
        """Use another weight transport from the next push (e.g. the collective group, once the
        learners that send through it are up)."""
        with self._op_lock:
            self.weights.set_transport(transport)

    def publish(self, named_tensors: NamedTensors, version: int) -> WeightHandle:
        """Put weights into the transport (rollout.weight_bucket_mb buckets)."""
        return self.weights.publish(named_tensors, version)

    def load_weights(self, weights: Union[WeightHandle, NamedTensors], version: Optional[int] = None,
                     timeout_s: Optional[float] = None) -> float:
        """Push a new weight version to every worker; returns the sync time in seconds.

        weights: a WeightHandle (e.g. from LearnerGroup.export_weights) or (name, tensor)
        pairs, published here as `version` (default: current + 1). Versions must increase.
        Raises WeightSyncError naming every worker that failed or did not answer within
        `timeout_s` (default cluster.sync_timeout_s); those workers are restarted with these
        weights in the background."""
        version = self.weights.next_version(weights, version)
        with self._op_lock:
            start = time.perf_counter()
            self._probe_idle()
            live = [i for i, w in self._workers.items() if w.status != "draining" and self.group.is_healthy(i)]
            try:
                self.weights.push(weights, version, timeout_s or self.timeout_s, live)
            except WeightSyncError:
                self._restart_dead()  # the failed workers start with this version
                raise
            for i in live:  # a starting worker that loaded this version is ready
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
        idle = [i for i, w in self._workers.items() if w.status == "ready" and not w.in_flight]
        self.group.probe_unhealthy(min(10.0, self.timeout_s), actor_ids=idle)

    def _catch_up(self) -> None:
        """Booted workers that await the current weights (group-bound transport) get them now,
        in one sync of just those workers; the next push forms a group with every worker."""
        ids = [i for i, w in self._workers.items()
               if w.status == "starting" and w.ready_ref is None and self.group.is_healthy(i)]
        if ids and self.weights.catch_up(ids):
            for i in ids:
                self._workers[i].status = "ready"
                self._restarts_in_a_row.pop(i, None)

    def worker_infos(self) -> list:
        """WorkerInfo (id, pid, weight version, backend) of every serving worker."""
        return self.group.collect_or_raise(self.group.start(lambda a: a.info.remote(), self.worker_ids()), "info",
                                           PoolError)

    def shutdown(self) -> None:
        with self._op_lock:
            self.group.shutdown()
            self.weights.close()
            self._workers.clear()


def _default_worker_cls(backend: str) -> type:
    if backend == "hf":
        from tidal.rollout.hf_backend import HFRolloutWorker

        return HFRolloutWorker
    from tidal.rollout.worker import RolloutWorker

    return RolloutWorker
