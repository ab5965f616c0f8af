"""The chunk scheduling of `RolloutPool.generate` (tidal.rollout.pool): cut the prompts into
chunks, hand a chunk to each idle ready worker, collect results, and put back the chunks of a worker
that died or hangs. A mixin of RolloutPool: it works on the pool's workers (`_workers`, `group`) and
membership steps (`_resize`, `_restart_dead`, `_poll_starting`, `_catch_up`); the pool's module
docstring states the guarantees (every prompt answered exactly once).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tidal.actors.actor_group import call_error, is_actor_death
from tidal.actors.refs import wait_any
from tidal.common.types import PromptBatch
from tidal.rollout.sampling import Sampling


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
class GenerateStats:
    """What the last generate call did (for metrics and tests)."""

    chunks: int = 0
    chunks_by_worker: dict[int, int] = field(default_factory=dict)
    requeued_chunks: int = 0
    restarted_workers: list[int] = field(default_factory=list)
    seconds: float = 0.0


class ChunkScheduling:
    """generate's scheduling loop, mixed into RolloutPool (see the module docstring)."""

    def _chunks(self, prompts: PromptBatch) -> list[_Chunk]:
        n_chunks = max(1, min(len(prompts), max(self._target, 1) * self.chunks_per_worker))
        size = math.ceil(len(prompts) / n_chunks)
        chunks = []
        for cid, start in enumerate(range(0, len(prompts), size)):
            part = prompts.slice(start, start + size)
            payload = self.group.put(part)
            chunks.append(_Chunk(cid, payload, len(part), part.index[0]))
        return chunks

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
        r = self.group.result(wid, ref)
        if r.ok:
            results.setdefault(chunk.id, r.value)  # a late duplicate of a re-queued chunk is dropped
        elif not is_actor_death(r.error):
            raise call_error(f"generate (the {chunk.size} prompts from prompt {chunk.first_index})", [r], PoolError,
                             self.timeout_s)
        else:
            self._lose_worker(wid, queue, stats)
            if chunk.id not in results:
                queue.appendleft(chunk)
                stats.requeued_chunks += 1

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
