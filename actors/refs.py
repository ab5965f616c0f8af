"""Refs of actor calls, on Ray or in-process: the local-mode shim (`LocalHandle`, whose
`obj.method.remote(...)` runs the method at once and returns a finished `LocalRef`), waiting for
the first of several calls (`wait_any`) and fetching one with a deadline (`fetch`). The actor
group (tidal.actors.actor_group) and the weight transports stand on these."""

from __future__ import annotations

from typing import Any, Callable


class ActorCallTimeout(TimeoutError):
    """An actor did not answer within the timeout."""


class LocalRef:
    """The finished result of a local-mode call (stands where a Ray ObjectRef would)."""

    def __init__(self, fn: Callable[[], Any]):
        try:
            self.value, self.error = fn(), None
        except Exception as e:  # noqa: BLE001 - returned to the caller as a CallResult
            self.value, self.error = None, e

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _LocalMethod:
    def __init__(self, bound: Callable):
        self._bound = bound

    def remote(self, *args: Any) -> LocalRef:
        return LocalRef(lambda: self._bound(*[_resolve(a) for a in args]))


class LocalHandle:
    """Wraps a plain object so `handle.method.remote(*args)` calls `obj.method(*args)`.

    Like Ray, a top-level ObjectRef argument is resolved to its value first."""

    def __init__(self, obj: Any):
        self.obj = obj  # the plain object itself (tests and debugging reach it here)

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.obj, name))


def _resolve(arg: Any) -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return arg
    return ray.get(arg) if isinstance(arg, ray.ObjectRef) else arg


def wait_any(refs: list, timeout_s: float) -> list:
    """The refs among `refs` that finished within `timeout_s` (at least one unless timed out)."""
    local = [r for r in refs if isinstance(r, LocalRef)]
    if local or not refs:
        return local
    import ray

    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
    if ready:  # collect everything else that is already done too
        more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = list({id(r): r for r in ready + more}.values())
    return ready


def fetch(ref: Any, timeout_s: float) -> Any:
    """The value of one call, raising its error, or ActorCallTimeout after `timeout_s`."""
    if isinstance(ref, LocalRef):
        return ref.result()
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ActorCallTimeout(f"no answer within {timeout_s:.1f}s") from None
