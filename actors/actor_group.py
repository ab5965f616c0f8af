"""A generic fault-tolerant group of actors (RLlib's actor-manager shape).

`ActorGroup(cls, n, args)` creates n actors of a plain class. A call on the group takes a
callable per actor, `lambda actor: actor.method.remote(x)` (no string dispatch: the method
name is code that grep and type checkers see), and returns one `CallResult` per actor: the
value or the error, never an exception that hides the other actors' results. Every wait has
a timeout, so a dead or stuck actor becomes an error naming it, never a hang.

Health: an actor whose call raised `RayActorError` or timed out is marked unhealthy;
`probe_unhealthy()` pings actors; `restore()` replaces unhealthy actors by fresh ones with
the same id. `add()` / `remove()` resize the group (independent scaling of a role).

Every role group (learner ranks, rollout pool, reward pool) turns failures into its own error
type the same way: `collect_or_raise(started, what, error_type)` returns the values or raises
one error naming the actor ("fit_sft: learner rank 1/2 died: ...", labels from `label`), and
`put(value)` is what an actor call receives (an object-store ref, the value itself locally).

Local mode (`local=True`): the same class runs in-process as plain objects behind a shim
whose `obj.method.remote(...)` calls the method at once, so the same callables, the same
results and the same error handling work without Ray (unit tests, debugging).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Optional, TypeVar

from tidal.actors.refs import ActorCallTimeout, LocalHandle, LocalRef, fetch, wait_any

T = TypeVar("T")


class ActorCallAborted(RuntimeError):
    """A call that was still running when another actor of the same fail-fast call failed."""


@dataclass(frozen=True)
class CallResult(Generic[T]):
    """The outcome of one call on one actor: `value` when ok, else `error`."""

    actor_id: int
    label: str  # human-readable actor name for error messages, e.g. "rollout-2"
    ok: bool
    value: Optional[T] = None
    error: Optional[BaseException] = None

    def get(self) -> T:
        """The value, or re-raise the actor's error."""
        if not self.ok:
            raise self.error  # type: ignore[misc]
        return self.value  # type: ignore[return-value]


def is_actor_death(error: BaseException) -> bool:
    """Whether an error means the actor process is gone (as opposed to a method raising)."""
    try:
        import ray
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, (ray.exceptions.RayActorError, ActorCallTimeout))


def call_error(what: str, failed: list[CallResult], error_type: type[Exception], timeout_s: float,
               timeout_hint: str = "") -> Exception:
    """The one error of a role group's call `what` that failed on the actors `failed` (not
    empty): the first actor that raised or died, by its label ("fit_sft: learner rank 1/2 died:
    ..."), or, when every one of them timed out, all of their labels with `timeout_hint` (e.g.
    the setting that sets the timeout). The cause is chained; the caller raises it."""
    late = [r for r in failed if isinstance(r.error, ActorCallTimeout)]
    if len(late) == len(failed):
        cause = late[0].error
        message = f"{', '.join(r.label for r in late)} did not answer within {timeout_s:.0f} s{timeout_hint}"
    else:
        first = next(r for r in failed if not isinstance(r.error, ActorCallTimeout))
        cause, others = first.error, [r.label for r in failed if r is not first]
        # a constructor that raised also ends the process, yet it is the actor's code that failed
        died = is_actor_death(cause) and not getattr(cause, "actor_init_failed", False)
        message = f"{first.label} {'died' if died else 'failed'}: {type(cause).__name__}: {cause}"
        message += f" (also failed: {', '.join(others)})" if others else ""
    error = error_type(f"{what}: {message}")
    error.__cause__ = cause
    return error


# ----------------------------------------------------------------------------- the group


@dataclass
class _Member:
    handle: Any
    healthy: bool = True
    restarts: int = 0


class ActorGroup(Generic[T]):
    """n actors of `cls(*args)`; ids are stable across restarts and never reused after removal.

    args: constructor arguments, or a function of the actor id that returns them (e.g. a
        per-actor seed); a restarted actor is built with the same arguments as the first.
    options: Ray actor options for every actor (num_cpus, num_gpus, max_concurrency, ...).
    options_fn: extra options per actor id (e.g. its placement-group bundle).
    local: run plain objects in-process instead of Ray actors.
    name: prefix of actor labels in errors ("rollout" -> "rollout-3").
    label: how errors name actor i instead (e.g. lambda i: f"learner rank {i}/{n}").
    call_timeout_s: default timeout of `call`.
    """

    def __init__(self, cls: type, num_actors: int, args: tuple | Callable[[int], tuple] = (),
                 options: Optional[dict] = None,
                 options_fn: Optional[Callable[[int], dict]] = None, local: bool = False,
                 name: str = "actor", label: Optional[Callable[[int], str]] = None,
                 call_timeout_s: float = 300.0):
        if num_actors < 0:
            raise ValueError(f"ActorGroup({name}): num_actors must be >= 0, got {num_actors}")
        self.cls, self.args, self.options, self.options_fn = cls, args, dict(options or {}), options_fn
        self.local, self.name, self.call_timeout_s = local, name, call_timeout_s
        self._label = label or (lambda i: f"{name}-{i}")
        self._members: dict[int, _Member] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self.add(num_actors)

    # ------------------------------------------------------------------ membership

    def _create(self, actor_id: int) -> Any:
        args = self.args(actor_id) if callable(self.args) else self.args
        if self.local:
            return LocalHandle(self.cls(*args))
        import ray

        from tidal.actors.devices import with_device_env

        opts = {**self.options, **(self.options_fn(actor_id) if self.options_fn else {})}
        # the device variables of what Ray gives it (tidal.actors.devices): every actor, by construction
        return ray.remote(self.cls).options(**with_device_env(opts)).remote(*args)

    def add(self, n: int) -> list[int]:
        """Create n more actors; returns their ids (their constructors may still be running)."""
        with self._lock:
            ids = list(range(self._next_id, self._next_id + n))
            self._next_id += n
            for i in ids:
                self._members[i] = _Member(self._create(i))
            return ids

    def remove(self, actor_ids: Iterable[int], kill: bool = True) -> None:
        """Drop actors from the group (and end their processes unless kill=False)."""
        with self._lock:
            for i in list(actor_ids):
                member = self._members.pop(i, None)
                if member is not None and kill:
                    self._kill(member.handle)
                if member is not None and hasattr(self.options_fn, "release"):
                    self.options_fn.release(i)  # e.g. give its placement bundle back

    def _kill(self, handle: Any) -> None:
        if self.local:
            return
        import ray

        try:
            ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass

    @property
    def num_actors(self) -> int:
        with self._lock:
            return len(self._members)

    @property
    def actor_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._members)

    def healthy_actor_ids(self) -> list[int]:
        with self._lock:
            return [i for i in sorted(self._members) if self._members[i].healthy]

    def unhealthy_actor_ids(self) -> list[int]:
        with self._lock:
            return [i for i in sorted(self._members) if not self._members[i].healthy]

    @property
    def num_healthy(self) -> int:
        return len(self.healthy_actor_ids())

    def actor(self, actor_id: int) -> Any:
        """The handle (Ray actor handle, or LocalHandle in local mode) of one actor."""
        with self._lock:
            return self._members[actor_id].handle

    def label(self, actor_id: int) -> str:
        return self._label(actor_id)

    def restarts(self, actor_id: int) -> int:
        with self._lock:
            return self._members[actor_id].restarts

    def mark_unhealthy(self, actor_id: int) -> None:
        with self._lock:
            if actor_id in self._members:
                self._members[actor_id].healthy = False

    def is_healthy(self, actor_id: int) -> bool:
        with self._lock:
            return actor_id in self._members and self._members[actor_id].healthy

    # ------------------------------------------------------------------ calls

    def submit(self, fn: Callable[[Any], Any], actor_id: int) -> Any:
        """Start `fn(handle)` on one actor without waiting; returns its ref."""
        return fn(self.actor(actor_id))

    def put(self, value: Any) -> Any:
        """What a call receives for `value`: one object-store copy that any number of calls share
        (slice data per actor BEFORE putting it, so each actor gets only its part), or, in local
        mode, the value itself."""
        if self.local:
            return value
        import ray

        return ray.put(value)

    def call(self, fn: Callable[[Any], Any], actor_ids: Optional[Iterable[int]] = None,
             timeout_s: Optional[float] = None, mark_unhealthy: bool = True,
             fail_fast: bool = False) -> list[CallResult]:
        """Run `fn(handle)` on each actor (default: all healthy ones) and wait for all of them,
        at most `timeout_s` in total. Actors that died or timed out are marked unhealthy."""
        return self.collect(self.start(fn, actor_ids), timeout_s, mark_unhealthy, fail_fast)

    def start(self, fn: Callable[[Any], Any], actor_ids: Optional[Iterable[int]] = None) -> dict[int, Any]:
        """Start `fn(handle)` on each actor without waiting: {actor id: ref or the error of
        submitting it}. `collect` waits for them."""
        ids = self.healthy_actor_ids() if actor_ids is None else list(actor_ids)
        return self.start_each({i: fn for i in ids})

    def start_each(self, calls: dict[int, Callable[[Any], Any]]) -> dict[int, Any]:
        """Like `start`, with a call of its own per actor id (e.g. each rank's data shard)."""
        started: dict[int, Any] = {}
        for i, fn in calls.items():
            try:
                started[i] = self.submit(fn, i)
            except Exception as e:  # noqa: BLE001 - e.g. the handle's actor is already dead
                started[i] = e
        return started

    def collect(self, started: dict[int, Any], timeout_s: Optional[float] = None,
                mark_unhealthy: bool = True, fail_fast: bool = False) -> list[CallResult]:
        """Wait (at most `timeout_s` in total) for calls begun with `start`; results in the
        order of `started`. Results are taken as they finish, so with `fail_fast` the first
        failure ends the wait: the calls still running get an `ActorCallAborted` error (they are
        not marked unhealthy), which is what a group in one collective wants - a dead rank is
        named at once instead of after its blocked peers time out."""
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        results: dict[int, CallResult] = {}
        pending: dict[Any, int] = {}
        for i, ref in started.items():
            if isinstance(ref, Exception):
                results[i] = CallResult(i, self.label(i), False, error=ref)
            elif isinstance(ref, LocalRef):
                results[i] = self.result(i, ref)
            else:
                pending[ref] = i
        while pending and not (fail_fast and any(not r.ok for r in results.values())):
            ready = wait_any(list(pending), max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                i = pending.pop(ref)
                results[i] = self.result(i, ref)
        failed = [r.label for r in results.values() if not r.ok] if fail_fast else []
        for ref, i in pending.items():
            error = (ActorCallAborted(f"{self.label(i)}: not awaited after {failed[0]} failed") if failed
                     else ActorCallTimeout(f"{self.label(i)}: no answer within {timeout:.1f}s"))
            results[i] = CallResult(i, self.label(i), False, error=error)
        ordered = [results[i] for i in started]
        if mark_unhealthy:
            for r in ordered:
                if not r.ok and is_actor_death(r.error):
                    self.mark_unhealthy(r.actor_id)
        return ordered

    def collect_or_raise(self, started: dict[int, Any], what: str, error_type: type[Exception] = RuntimeError,
                         timeout_s: Optional[float] = None, fail_fast: bool = False, timeout_hint: str = "") -> list:
        """The values of calls begun with `start`, in the order of `started`, or `error_type`
        naming the actor that failed (`call_error`). Waits like `collect`; with `fail_fast` the
        calls still running when one fails are not waited for (and not blamed)."""
        timeout = self.call_timeout_s if timeout_s is None else timeout_s
        results = self.collect(started, timeout, fail_fast=fail_fast)
        failed = [r for r in results if not r.ok and not isinstance(r.error, ActorCallAborted)]
        if failed:
            raise call_error(what, failed, error_type, timeout, timeout_hint)
        return [r.value for r in results]

    def result(self, i: int, ref: Any) -> CallResult:
        """The outcome of a finished call `ref` on actor i."""
        try:
            return CallResult(i, self.label(i), True, value=fetch(ref, 0.0))
        except Exception as e:  # noqa: BLE001 - returned as the actor's error
            return CallResult(i, self.label(i), False, error=e)

    def probe_unhealthy(self, timeout_s: float = 10.0, actor_ids: Optional[Iterable[int]] = None) -> list[int]:
        """Ping the healthy actors (or `actor_ids`) with Ray's built-in readiness call; returns
        the ids of actors that are unhealthy afterwards. A busy single-threaded actor answers only
        after its current call, so probe with a timeout longer than that call or only idle actors."""
        if self.local:
            return self.unhealthy_actor_ids()
        ids = self.healthy_actor_ids() if actor_ids is None else list(actor_ids)
        self.call(lambda a: a.__ray_ready__.remote(), actor_ids=ids, timeout_s=timeout_s)
        return self.unhealthy_actor_ids()

    def restore(self) -> list[int]:
        """Replace every unhealthy actor by a fresh one with the same id; returns their ids.
        The old process is killed first (a stuck actor must not keep its resources)."""
        with self._lock:
            restored = self.unhealthy_actor_ids()
            for i in restored:
                member = self._members[i]
                self._kill(member.handle)
                self._members[i] = _Member(self._create(i), True, member.restarts + 1)
            return restored

    def shutdown(self) -> None:
        self.remove(self.actor_ids, kill=True)

