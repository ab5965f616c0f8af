"""A one-thread executor whose thread is a daemon: the rollout pipeline's (tidal.driver.pipeline).

concurrent.futures.ThreadPoolExecutor joins its threads when the interpreter exits, so a job
stuck in a call that never returns (a reward function, a worker that does not answer) would keep
the driver alive after Ctrl-C. Here `shutdown(wait=False)` abandons such a job: its thread is a
daemon and does not hold the process, which ends the run's processes on its way out.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class DaemonExecutor:
    """submit(fn, *args) -> Future, run in order on one daemon thread; shutdown(wait, cancel_futures)."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._closed:
            raise RuntimeError("cannot submit to an executor that was shut down")
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop taking jobs; cancel_futures: drop the queued ones; wait: until the running one ends."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        self._jobs.put(None)
        if wait:
            self._thread.join()
