"""Ctrl-C and SIGTERM during a run: stop at a safe point, keep what was done, say how to go on.

`StopRequests` installs handlers for SIGINT and SIGTERM in the driver's main thread. While a
loop that has safe points runs (`safe_points()`), the first signal only sets a flag the loop
reads between steps (a step is never cut in half, so the checkpoint written then is exact); a
second signal raises KeyboardInterrupt at once. Outside such a loop (start-up, SFT, RM) the
first signal raises KeyboardInterrupt. Either way the driver's `finally` blocks stop the actors
and shut Ray down.

One signal always ends the run within seconds: when the current step and its checkpoint have
not finished `grace_s` seconds after the first signal (logging.interrupt_grace_s; a step stuck
in a reward function or a worker), the process signals itself again, which stops at once; a
resume then continues from the last checkpoint. A thread stuck in user code cannot be killed,
so the rollout thread is a daemon thread that the driver abandons (tidal.driver.pipeline) and
user reward functions run in processes of their own (tidal.reward_service.sandbox).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator


class StopRequests:
    def __init__(self, grace_s: float | None = None) -> None:
        """grace_s: seconds the current step may take to reach its safe point after the first
        signal (None: as long as it takes)."""
        self.requested: str | None = None  # name of the signal that asked to stop
        self.grace_s = grace_s
        self._safe_depth = 0
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        if self._safe_depth and self.requested is None:
            self.requested = name
            limit = f" (at most {self.grace_s:g} s more" if self.grace_s is not None else " ("
            print(f"\ntidal: {name}: stopping after the current step{limit}; again to stop at once)", flush=True)
            if self.grace_s is not None:
                self._timer = threading.Timer(self.grace_s, self._expire, args=(signum,))
                self._timer.daemon = True
                self._timer.start()
            return
        raise KeyboardInterrupt(name)

    def _expire(self, signum: int) -> None:
        """The grace period passed and the handlers are still ours: stop at once."""
        if self._previous:
            print(f"tidal: the current step did not end within logging.interrupt_grace_s={self.grace_s:g} s; "
                  f"stopping at once", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def safe_points(self) -> Iterator["StopRequests"]:
        """Within this block the first signal only sets `requested`."""
        self._safe_depth += 1
        try:
            yield self
        finally:
            self._safe_depth -= 1


class Interrupted(Exception):
    """The run stopped at a safe point after Ctrl-C / SIGTERM (see tidal.driver.interrupt)."""

    def __init__(self, signal_name: str, step: int, total: int, checkpointed: bool):
        self.signal_name, self.step, self.total, self.checkpointed = signal_name, step, total, checkpointed
        super().__init__(f"{signal_name} after rl step {step} of {total}"
                         + (" (checkpoint written)" if checkpointed else " (no checkpoint: logging.checkpoint_on_interrupt=false)"))


NO_STOPS = StopRequests()  # never installed: `requested` stays None (library use, tests)
