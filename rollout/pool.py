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
the current version to it through the transport (which forms a group for it); the weight
side lives in tidal.rollout.pool_weights.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from tidal.actors.actor_group import ActorGroup, fetch, is_actor_death, wait_any
from tidal.actors.threads import run_threads
from tidal.actors.weights import InProcessTransport, ObjectStoreTransport, WeightHandle, WeightTransport
from tidal.common.config import TidalConfig
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.rollout.pool_weights import PoolWeights
from tidal.rollout.sampling import Sampling
from tidal.rollout.worker import check_prompts, order_by_prompt


class PoolError(RuntimeError):
    """The pool cannot finish a call (no worker left, restarts exhausted, bad worker output)."""


class WorkersLost(PoolError):
    """Every worker was lost and none came back within cluster.node_wait_s: typically the
    rollout nodes died and no node with room for a restarted worker took their place."""


@dataclass
class _Chunk:
    id: int
    payload: Any  # ObjectRef of a PromptBatch (Ray) or the PromptBatch itself (local mode)
    size: int
    first_index: int  # global index of its first prompt (for error messages)
    attempts: int = 0


@dataclass
class _Worker:
    status: str = "starting"  # starting -> ready -> draining
    ready_ref: Any = None  # weight load / readiness call of a starting worker
    in_flight: dict = field(default_factory=dict)  # ref -> (_Chunk, start time)


@dataclass
class GenerateStats:
    """What the last generate call did (for metrics and tests)."""

    chunks: int = 0
    chunks_by_worker: dict[int, int] = field(default_factory=dict)
    requeued_chunks: int = 0
    restarted_workers: list[int] = field(default_factory=list)
    seconds: float = 0.0


class RolloutPool(PoolWeights):
    """Rollout workers as Ray actors (or in-process objects with local=True).

    cfg: the run config (rollout.*, cluster.sync_timeout_s, model.dtype, seed).
    model_path: HF folder the engines start from (weight version 0).
    worker_cls: RolloutWorker / HFRolloutWorker by rollout.backend, or any class with their
        interface (tests inject misbehaving subclasses).
    actor_options: Ray options per worker id, e.g. `BundlePlacement(pg, bundle_indices,
        num_cpus, num_gpus)` (tidal.actors.actor_group) to run the workers on bundles of a
        placement group (a restarted worker keeps its bundle, a removed one frees it); default:
        plain actors with {num_cpus: rollout.cpus_per_worker, num_gpus: rollout.gpus_per_worker}.
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
        self.transport = transport or (
            InProcessTransport() if local else ObjectStoreTransport(get_timeout_s=self.timeout_s))
        self.chunks_per_worker, self.max_restarts = chunks_per_worker, max_restarts
        self.default_sampling = Sampling.from_config(cfg.rollout, cfg.seed)
        self._handle: Optional[WeightHandle] = None
        self._version = 0
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
            args=lambda wid: (self.model_path, rc, cfg.model.dtype, cfg.seed * 1000 + wid, wid, self.num_threads),
            options=base_options, options_fn=actor_options, local=local, name="rollout",
            call_timeout_s=self.timeout_s)
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
        return self._version

    @property
    def num_workers(self) -> int:
        """Workers that serve (or are starting to serve) requests; draining ones excluded."""
        return sum(1 for w in self._workers.values() if w.status != "draining")

    def worker_ids(self) -> list[int]:
        return sorted(i for i, w in self._workers.items() if w.status != "draining")

    # ------------------------------------------------------------------ membership

    def _start(self, wid: int) -> None:
        """Readiness call of a new or restarted worker: load the current weights if any."""
        handle = self._handle
        fn = (lambda a: a.load_weights.remote(handle)) if handle is not None and not self._group_bound() else (
            lambda a: a.info.remote())
        self._workers[wid] = _Worker("starting", self.group.submit(fn, wid))

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
            try:
                fetch(ref, 0.0)
                self._workers[wid].ready_ref = None  # booted; still "starting" if it awaits weights
                if not self._group_bound():
                    self._workers[wid].status = "ready"
                    self._restarts_in_a_row.pop(wid, None)
            except Exception as e:  # noqa: BLE001
                # A constructor that raised (bad model path, out of memory) fails the same way
                # on every restart: report it instead of retrying.
                if not is_actor_death(e) or getattr(e, "actor_init_failed", False):
                    raise PoolError(f"{self.group.label(wid)} failed to start: {type(e).__name__}: {e}") from e
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

    def _chunks(self, prompts: PromptBatch) -> list[_Chunk]:
        n_chunks = max(1, min(len(prompts), max(self._target, 1) * self.chunks_per_worker))
        size = math.ceil(len(prompts) / n_chunks)
        chunks = []
        for cid, start in enumerate(range(0, len(prompts), size)):
            part = prompts.slice(start, start + size)
            payload = part if self.group.local else _put(part)
            chunks.append(_Chunk(cid, payload, len(part), part.index[0]))
        return chunks

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

    def _step(self, queue: deque, results: dict, sampling: Sampling, stats: GenerateStats) -> None:
        """One round of the scheduling loop: resize, restart, dispatch, collect."""
        self._resize()
        self._restart_dead(queue, stats)
        self._poll_starting(0.0)
        self._catch_up()
        self._dispatch(queue, sampling, stats)
        in_flight = {ref: wid for wid, w in self._workers.items() for ref in w.in_flight}
        starting = [w.ready_ref for w in self._workers.values() if w.status == "starting" and w.ready_ref is not None]
        if not in_flight and not any(w.status in ("starting", "ready") for w in self._workers.values()):
            raise PoolError("no rollout worker left to serve the remaining prompts")
        self._check_stalled(bool(in_flight))
        # Short waits keep the loop responsive to scale() calls and worker start-ups.
        for ref in wait_any(list(in_flight) + starting, 0.5):
            if ref in in_flight:
                self._collect(ref, in_flight[ref], queue, results, stats)
        self._requeue_stuck(queue, stats)

    def _check_stalled(self, in_flight: bool) -> None:
        """Bound the wait for restarts when no worker can serve: a restarted worker whose node
        died waits for a node with room for it, which may never come."""
        if in_flight or any(w.status == "ready" for w in self._workers.values()):
            self._stalled_since = None
            return
        now = time.monotonic()
        self._stalled_since = self._stalled_since or now
        if now - self._stalled_since > self.node_wait_s:
            lost = [self.group.label(i) for i, w in self._workers.items() if w.status == "starting"]
            raise WorkersLost(f"the rollout workers {lost} were lost and none restarted within {self.node_wait_s:.0f} s "
                              f"(cluster.node_wait_s): their node died and no node with room for them took its place, "
                              f"or they start slower than that (`ray status` shows the nodes)")

    def _dispatch(self, queue: deque, sampling: Sampling, stats: GenerateStats) -> None:
        """Hand one chunk to each idle ready worker (lowest id first) while chunks remain."""
        idle = sorted(i for i, w in self._workers.items()
                      if w.status == "ready" and not w.in_flight and self.group.is_healthy(i))
        for wid in idle:
            if not queue:
                return
            chunk = queue.popleft()
            chunk.attempts += 1
            if chunk.attempts > self.max_restarts + 1:  # the chunk itself kills workers
                raise PoolError(f"the chunk of {chunk.size} prompts starting at prompt {chunk.first_index} was "
                                f"lost with its worker {chunk.attempts - 1} times; giving up (check the workers' "
                                f"logs, e.g. out of memory on these prompts).")
            ref = self.group.submit(lambda a: a.generate.remote(chunk.payload, sampling), wid)
            self._workers[wid].in_flight[ref] = (chunk, time.monotonic())
            stats.chunks_by_worker[wid] = stats.chunks_by_worker.get(wid, 0) + 1

    def _collect(self, ref: Any, wid: int, queue: deque, results: dict, stats: GenerateStats) -> None:
        chunk, _ = self._workers[wid].in_flight.pop(ref)
        try:
            batch = fetch(ref, 0.0)
        except Exception as e:  # noqa: BLE001
            if not is_actor_death(e):
                raise PoolError(f"{self.group.label(wid)} failed on a chunk of {chunk.size} prompts: "
                                f"{type(e).__name__}: {e}") from e
            self._lose_worker(wid, queue, stats)
            if chunk.id not in results:
                queue.appendleft(chunk)
                stats.requeued_chunks += 1
            return
        results.setdefault(chunk.id, batch)  # a late duplicate of a re-queued chunk is dropped

    def _lose_worker(self, wid: int, queue: deque, stats: GenerateStats) -> None:
        """A worker died: mark it for restart and put everything it held back in the queue."""
        self.group.mark_unhealthy(wid)
        worker = self._workers[wid]
        for chunk, _ in worker.in_flight.values():
            queue.appendleft(chunk)
            stats.requeued_chunks += 1
        worker.in_flight.clear()

    def _requeue_stuck(self, queue: deque, stats: GenerateStats) -> None:
        now = time.monotonic()
        for wid, w in list(self._workers.items()):
            if any(now - t > self.timeout_s for _, t in w.in_flight.values()):
                self._lose_worker(wid, queue, stats)  # restore() kills the stuck process

    def _apply_pending_scale(self) -> None:
        """A scale() that raced with the end of a call is applied now."""
        if self._target != self.num_workers and self._op_lock.acquire(blocking=False):
            try:
                self._resize()
            finally:
                self._op_lock.release()

    def worker_infos(self) -> list:
        """WorkerInfo (id, pid, weight version, backend) of every serving worker."""
        return [r.get() for r in self.group.call(lambda a: a.info.remote(), actor_ids=self.worker_ids())]

    def shutdown(self) -> None:
        with self._op_lock:
            self.group.shutdown()
            self.transport.close()
            self._workers.clear()
            self._handle = None


def _default_worker_cls(backend: str) -> type:
    if backend == "hf":
        from tidal.rollout.hf_backend import HFRolloutWorker

        return HFRolloutWorker
    from tidal.rollout.worker import RolloutWorker

    return RolloutWorker


def _put(obj: Any) -> Any:
    import ray

    return ray.put(obj)
