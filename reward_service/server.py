"""HTTP JSON reward server (`tidal reward serve CONFIG`): a Starlette app run by uvicorn.

    POST /score   {"prompts": [...], "completions": [...], "references"?: [...]} -> {"scores": [...]}
    GET  /health  -> {"status": "ok", "busy_s": S}   (no token needed; reveals nothing)

One scoring runs at a time. A user function that passes its deadline (reward.function_timeout_s,
tidal.reward_service.sandbox) answers 504 naming it, and /health answers 503 {"status": "stuck"}
until a scoring succeeds again, or while one has run longer than that deadline; a request that
waited that long for another one to finish gets 503 (clients retry 5xx on the next server).

The served reward is the weighted sum of the config's reward terms (`CombinedReward.score_texts`);
normalization, clipping and the EOS penalty stay with the trainer that calls it.
Security: binds 127.0.0.1 unless told otherwise; with a token every /score call needs
`Authorization: Bearer <token>` (401 otherwise), and a non-loopback bind without a token is
refused. Bodies over `max_body_bytes` get 413 without being read; malformed JSON (not UTF-8,
nested too deep, an integer too long to convert) or fields 400; a reward that fails or gives
NaN/inf 500. Every error, an unknown path (404), a wrong method (405) and an uncaught exception
(500) included, is JSON: {"error": "..."}.
"""

from __future__ import annotations

import hmac
import math
import os
import sys
import threading
import time
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tidal.common.config import ConfigError
from tidal.reward_service.sandbox import RewardTimeout
from tidal.common.web import BadJSON, BodyTooLarge, WebServer, drain, error_handlers, is_loopback, parse_json, read_body

MAX_BODY_BYTES = 8 * 1024 * 1024
ScoreFn = Callable[[list[str], list[str], "list[str | None] | None"], list[float]]


class BadRequest(ValueError):
    """A request the server refuses with 400; the message tells the caller what to fix."""


def parse_request(body: bytes) -> tuple[list[str], list[str], list[str | None] | None]:
    """(prompts, completions, references) of a /score body, or BadRequest naming the field."""
    try:
        req = parse_json(body)
    except BadJSON as e:
        raise BadRequest(str(e)) from None
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object with 'prompts' and 'completions'")
    unknown = set(req) - {"prompts", "completions", "references"}
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)}; allowed: prompts, completions, references")
    for key in ("prompts", "completions"):
        if not isinstance(req.get(key), list) or not all(isinstance(x, str) for x in req[key]):
            raise BadRequest(f"'{key}' must be a list of strings")
    prompts, completions, references = req["prompts"], req["completions"], req.get("references")
    if len(prompts) != len(completions):
        raise BadRequest(f"'prompts' has {len(prompts)} items and 'completions' {len(completions)}; they must match")
    if references is not None:
        if not isinstance(references, list) or not all(r is None or isinstance(r, str) for r in references):
            raise BadRequest("'references' must be a list of strings (or nulls)")
        if len(references) != len(prompts):
            raise BadRequest(f"'references' has {len(references)} items for {len(prompts)} prompts")
    return prompts, completions, references


def _error(code: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else {}
    return JSONResponse({"error": message}, status_code=code, headers={**headers, "Connection": "close"})


class Busy(Exception):
    """Another request held the scorer for longer than a request waits (503)."""


class _Scorer:
    """One scoring at a time (the model is not faster in parallel), with what /health reports."""

    def __init__(self, score_fn: ScoreFn, stuck_after_s: float):
        self.score_fn, self.stuck_after_s = score_fn, stuck_after_s
        self.lock = threading.Lock()
        self.since: float | None = None  # monotonic start of the scoring in progress
        self.stuck: str | None = None  # the last scoring's deadline error, until one succeeds

    def __call__(self, prompts, completions, references) -> list:
        if not self.lock.acquire(timeout=self.stuck_after_s):
            raise Busy(f"another request has held the scorer for over {self.stuck_after_s:g} s; retry later")
        try:
            self.since = time.monotonic()
            out = self.score_fn(prompts, completions, references)
            self.stuck = None
            return out
        except RewardTimeout as e:
            self.stuck = str(e)
            raise
        finally:
            self.since = None
            self.lock.release()

    def health(self) -> tuple[int, dict]:
        busy = time.monotonic() - self.since if self.since is not None else 0.0
        if self.stuck is not None or busy > self.stuck_after_s:
            why = self.stuck or f"a scoring has run for {busy:.0f} s, past {self.stuck_after_s:g} s"
            return 503, {"status": "stuck", "busy_s": round(busy, 1), "error": why}
        return 200, {"status": "ok", "busy_s": round(busy, 1)}


def build_app(score_fn: ScoreFn, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              stuck_after_s: float = 60.0) -> Starlette:
    """The Starlette app: POST /score and GET /health (see module doc). stuck_after_s: the
    scorer's deadline (reward.function_timeout_s)."""
    scorer = _Scorer(score_fn, stuck_after_s)

    def score(prompts, completions, references) -> list[float]:
        scores = [float(s) for s in scorer(prompts, completions, references)]
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"the reward gave non-finite scores for items {bad[:10]}")
        if len(scores) != len(prompts):
            raise ValueError(f"the reward gave {len(scores)} scores for {len(prompts)} items")
        return scores

    async def post_score(request: Request) -> JSONResponse:
        if token is not None:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                await drain(request)
                return _error(401, "missing or wrong bearer token")
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            await drain(request)
            return _error(411, "Content-Length is required")
        try:
            body = await read_body(request, max_body_bytes)
        except BodyTooLarge as e:
            await drain(request)
            return _error(413, f"body of {e.args[0]} bytes is over the limit of {max_body_bytes}")
        try:
            prompts, completions, references = parse_request(body)
        except BadRequest as e:
            return _error(400, str(e))
        try:
            scores = await run_in_threadpool(score, prompts, completions, references)
        except RewardTimeout as e:
            return _error(504, str(e))
        except Busy as e:
            return _error(503, str(e))
        except Exception as e:  # a failing reward must answer the caller, not kill the server
            return _error(500, f"{type(e).__name__}: {e}")
        return JSONResponse({"scores": scores})

    async def health(request: Request) -> JSONResponse:
        code, body = scorer.health()
        return JSONResponse(body, status_code=code)

    return Starlette(routes=[Route("/score", post_score, methods=["POST"]), Route("/health", health, methods=["GET"])],
                     exception_handlers=error_handlers(_error, "POST /score or GET /health"))


class RewardServer(WebServer):
    """Serves `score_fn(prompts, completions, references) -> scores` over HTTP (see module doc)."""

    def __init__(self, score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, stuck_after_s: float = 60.0):
        if token is None and not is_loopback(host):
            raise ConfigError(f"refusing to serve rewards on {host} without a token: anyone who can reach it could "
                              f"call it. Set a bearer token in the token env var, or bind 127.0.0.1.")
        self.score_fn = score_fn
        self.token = token
        self.max_body_bytes = max_body_bytes
        super().__init__(build_app(score_fn, token, max_body_bytes, stuck_after_s), host, port, name="reward-server")


def serve_from_cli(config: str | None, overrides: list[str], host: str = "127.0.0.1", port: int = 8000,
                   token_env: str = "TIDAL_REWARD_TOKEN") -> int:
    """`tidal reward serve`: serve the config's reward terms until interrupted."""
    from tidal.common.config import load_config
    from tidal.reward_service.combine import build_reward

    cfg = load_config(config, overrides)
    token = os.environ.get(token_env) or None
    if token is None and not is_loopback(host):
        raise ConfigError(f"--host {host} is not a loopback address and ${token_env} is empty: set a bearer token "
                          f"in ${token_env} (or --token-env VAR), or bind 127.0.0.1.")
    # Model terms run in this process: a reward server needs no Ray cluster.
    reward = build_reward(cfg.reward, reward_model=cfg.model.reward, local=True, dtype=cfg.model.dtype)
    try:
        server = RewardServer(reward.score_texts, host, port, token, stuck_after_s=cfg.reward.function_timeout_s or 60.0)
    except BaseException:
        reward.close()
        raise
    kinds = ", ".join(f"{t.kind}x{t.weight:g}" for t in cfg.reward.terms)
    auth = "bearer token required" if token else f"NO token (${token_env} unset; loopback only)"
    print(f"tidal reward server on {server.url} (POST /score, GET /health); terms: {kinds}; {auth}", flush=True)
    try:
        server.run()
    finally:
        reward.close()
    return 0


if __name__ == "__main__":  # python -m tidal.reward_service.server CONFIG [overrides]
    sys.exit(serve_from_cli(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
