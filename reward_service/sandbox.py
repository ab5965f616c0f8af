"""User reward functions with a deadline: each runs in a process of its own.

A Python call cannot be abandoned from another thread: a reward function that hangs (a lock, a
network call without a timeout, an endless loop) would stall the step forever, keep the rollout
thread busy so that Ctrl-C cannot end the run, and block every request of `tidal reward serve`.
So a `kind: function` term (and a function gold judge) is called in a child process, started
once per import path and kept for the run, which the caller stops with SIGKILL when one call
passes `reward.function_timeout_s`: the call is then an error naming the function, the deadline
and the batch, and the next call starts a fresh process. The child ignores SIGINT (Ctrl-C in a
terminal reaches the whole process group; the driver decides), dies with its parent (Linux
PR_SET_PDEATHSIG, and EOF on its pipe elsewhere), and shares the parent's sys.path so the same
modules import. Its output goes to the parent's stdout/stderr, as an in-process call's would.

Cost on the normal path: one pickle of the batch each way over a pipe, ~0.2 ms for 64 samples of
32 tokens (bench: `python -m tidal.reward_service.sandbox --bench`), plus the child's start-up
and the user module's import once per run. `reward.function_timeout_s: null` calls the function
in the driver's process instead, without a deadline (no copy at all).

A function that raises, or returns something that is not one number per sample, is an error
naming the sample: the failing batch is tried again sample by sample (within the deadline) to
find the first one that fails alone.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

from tidal.common.errors import UserError


class RewardFunctionError(UserError):
    """A user reward function raised, hung past its deadline, or its process died; names the
    function and the sample (or the batch)."""

    kind = "reward error"

    def __init__(self, message: str, sample: int | None = None):
        super().__init__(message)
        self.sample = sample  # index in the batch of the sample that fails alone, when known


class RewardTimeout(RewardFunctionError):
    pass


def describe_batch(prompts: list[str]) -> str:
    first = prompts[0] if prompts else ""
    return f"a batch of {len(prompts)} samples (the first prompt {first[:60]!r}{'...' if len(first) > 60 else ''})"


def one_sample(prompts: list[str], completions: list[str], meta: dict, i: int) -> tuple[list, list, dict]:
    """Sample i of a batch as a batch of one: every per-sample meta list is cut to its row."""
    n = len(prompts)
    return [prompts[i]], [completions[i]], {k: [v[i]] if isinstance(v, list) and len(v) == n else v
                                            for k, v in meta.items()}


def locate(call: Callable[..., Any], prompts: list[str], completions: list[str], meta: dict,
           budget_s: float) -> int | None:
    """The first sample that fails (raises) on its own, trying them in order for at most
    `budget_s` seconds; None when none does (or the time ran out)."""
    end = time.monotonic() + budget_s
    for i in range(len(prompts)):
        if time.monotonic() > end:
            return None
        try:
            call(*one_sample(prompts, completions, meta, i))
        except RewardTimeout:
            return None
        except Exception:  # noqa: BLE001 - any failure of the user's code names this sample
            return i
    return None


def _user_frame(tb) -> str:
    """file:line of the innermost frame of a traceback (the user's code that raised)."""
    frames = traceback.extract_tb(tb)
    return f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""


class InProcessFunction:
    """reward.function_timeout_s null: the function is called in this process, without a deadline;
    an exception is still the one-line error naming the sample."""

    def __init__(self, target: str, fn: Callable[..., Any]):
        self.target, self.fn = target, fn

    def __call__(self, prompts: list[str], completions: list[str], **meta) -> Any:
        try:
            return self.fn(prompts, completions, **meta)
        except Exception as e:  # noqa: BLE001 - the user's code: one line naming it and the sample
            where = _user_frame(e.__traceback__)
            i = locate(lambda p, c, m: self.fn(p, c, **m), prompts, completions, meta, budget_s=60.0) \
                if len(prompts) > 1 else (0 if prompts else None)
            raise RewardFunctionError(_raised(self.target, type(e).__name__, str(e), where, prompts, i), i) from None

    def close(self) -> None:
        pass


def _raised(target: str, kind: str, message: str, where: str, prompts: list[str], i: int | None) -> str:
    what = f"sample {i} (prompt {prompts[i][:60]!r})" if i is not None else describe_batch(prompts)
    return f"reward function {target} raised {kind}: {message}{where} on {what}; fix the function."


class _Child:
    """One child process running one function; its calls are serialized."""

    def __init__(self, target: str, import_timeout_s: float):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the modules this process sees
        self.proc = subprocess.Popen([sys.executable, "-m", "tidal.reward_service.sandbox", str(to_child_r),
                                      str(from_child_w)], pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                                     env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.send, self.recv = Connection(to_child_w, readable=False), Connection(from_child_r, writable=False)
        self.lock = threading.Lock()
        self.target = target
        self.send.send((list(sys.path), target))
        reply = self._answer(import_timeout_s, "importing it")
        if reply[0] != "ok":
            self.kill()
            raise RewardFunctionError(f"reward function {target}: {reply[1]}")

    def _answer(self, timeout_s: float, doing: str) -> tuple:
        if not self.recv.poll(timeout_s):
            self.kill()
            raise RewardTimeout(f"reward function {self.target} did not return within {timeout_s:g} s {doing}; it "
                                f"was stopped.")
        try:
            return self.recv.recv()
        except (EOFError, OSError):
            code = self.proc.wait()
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RewardFunctionError(f"reward function {self.target}: its process ended ({why}) while {doing}.") from None

    def call(self, payload: tuple, timeout_s: float, doing: str) -> tuple:
        with self.lock:
            self.send.send(payload)
            return self._answer(timeout_s, doing)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for conn in (self.send, self.recv):
            conn.close()


_CHILDREN: dict[str, _Child] = {}  # one process per import path, shared like the module would be
_CHILDREN_LOCK = threading.Lock()


class IsolatedFunction:
    """A user reward function ('module:function') called in its own process with a deadline of
    `timeout_s` per call; `__call__` has the rule signature."""

    def __init__(self, target: str, timeout_s: float):
        self.target, self.timeout_s = target, timeout_s

    def _child(self) -> _Child:
        with _CHILDREN_LOCK:
            child = _CHILDREN.get(self.target)
            if child is None or not child.alive():
                child = _CHILDREN[self.target] = _Child(self.target, max(60.0, self.timeout_s))
            return child

    def _call(self, prompts: list[str], completions: list[str], meta: dict) -> Any:
        doing = f"scoring {describe_batch(prompts)}"
        try:
            reply = self._child().call(("call", prompts, completions, meta), self.timeout_s, doing)
        except RewardTimeout:
            raise RewardTimeout(f"reward function {self.target} did not return within reward.function_timeout_s="
                                f"{self.timeout_s:g} s {doing}; it was stopped. Make it faster (or find where it "
                                f"waits), or raise reward.function_timeout_s.") from None
        if reply[0] == "error":
            raise _Raised(*reply[1:])
        return reply[1]

    def __call__(self, prompts: list[str], completions: list[str], **meta) -> Any:
        try:
            return self._call(prompts, completions, meta)
        except _Raised as e:
            i = locate(self._call, prompts, completions, meta, self.timeout_s) if len(prompts) > 1 else 0
            raise RewardFunctionError(_raised(self.target, e.kind, e.message, e.where, prompts, i), i) from None

    def close(self) -> None:
        with _CHILDREN_LOCK:
            child = _CHILDREN.pop(self.target, None)
        if child is not None:
            child.kill()


class _Raised(Exception):
    def __init__(self, kind: str, message: str, where: str):
        super().__init__(message)
        self.kind, self.message, self.where = kind, message, where


# ----------------------------------------------------------------------------- the child


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux); elsewhere EOF ends the loop
    except (OSError, AttributeError):
        pass


def _serve(read_fd: int, write_fd: int) -> None:
    """The child's loop: import the function, then answer calls until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    recv, send = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    paths, target = recv.recv()
    sys.path[:0] = [p for p in paths if p not in sys.path]
    try:
        from tidal.reward_service.rules import load_function

        fn = load_function(target)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        send.send(("error", str(e)))
        return
    send.send(("ok",))
    while True:
        try:
            _, prompts, completions, meta = recv.recv()
        except EOFError:
            return
        try:
            values = fn(prompts, completions, **meta)
            values = values.tolist() if hasattr(values, "tolist") else list(values) if _iterable(values) else values
            pickle.dumps(values)
            send.send(("ok", values))
        except Exception as e:  # noqa: BLE001 - the user's code failed: the parent names it
            send.send(("error", type(e).__name__, str(e), _user_frame(e.__traceback__)))


def _iterable(values: Any) -> bool:
    return not isinstance(values, (str, bytes, dict)) and hasattr(values, "__iter__")


def _bench(n: int = 64, tokens: int = 32, calls: int = 200) -> None:
    """Seconds per call of a trivial function, in-process and isolated (the overhead)."""
    prompts, completions = [f"prompt {i} " * 4 for i in range(n)], [f"completion {i} " * 8 for i in range(n)]
    meta = {"references": [None] * n, "response_lengths": [tokens] * n, "token_ids": [list(range(2 * tokens))] * n,
            "ended": [True] * n, "target": None}
    from tidal.reward_service.rules import load_function

    for name, fn in (("in-process", load_function("tidal.reward_service.rules:length")),
                     ("isolated", IsolatedFunction("tidal.reward_service.rules:length", 60.0))):
        fn(prompts, completions, **{**meta, "target": "8"})
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(prompts, completions, **{**meta, "target": "8"})
        print(f"{name}: {(time.perf_counter() - t0) / calls * 1e3:.3f} ms per call of {n} samples")


if __name__ == "__main__":
    if sys.argv[1:] == ["--bench"]:
        _bench()
    else:
        _serve(int(sys.argv[1]), int(sys.argv[2]))
