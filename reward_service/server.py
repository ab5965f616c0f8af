"""HTTP JSON reward server (`tidal reward serve CONFIG`), standard library only.

    POST /score   {"prompts": [...], "completions": [...], "references"?: [...]} -> {"scores": [...]}
    GET  /health  -> {"status": "ok"}   (no token needed; reveals nothing)

The served reward is the weighted sum of the config's reward terms (`CombinedReward.score_texts`);
normalization, clipping and the EOS penalty stay with the trainer that calls it.
Security: binds 127.0.0.1 unless told otherwise; with a token every /score call needs
`Authorization: Bearer <token>` (401 otherwise), and a non-loopback bind without a token is
refused. Bodies over `max_body_bytes` get 413 without being read; malformed JSON or fields 400;
a reward that fails or gives NaN/inf 500. Errors are {"error": "..."}.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from tidal.common.config import ConfigError

MAX_BODY_BYTES = 8 * 1024 * 1024
# An error answer is sent after reading (and discarding) the body up to this size: closing a
# socket with unread input resets the connection, and the client would never see the 401/413.
DRAIN_BYTES = 64 * 1024 * 1024
ScoreFn = Callable[[list[str], list[str], "list[str | None] | None"], list[float]]


class BadRequest(ValueError):
    """A request the server refuses with 400; the message tells the caller what to fix."""


def parse_request(body: bytes) -> tuple[list[str], list[str], list[str | None] | None]:
    """(prompts, completions, references) of a /score body, or BadRequest naming the field."""
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
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


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass  # one line per request on stderr is noise for a training job's reward calls

    body_read = False

    def _drain_body(self) -> None:
        try:
            left = min(int(self.headers.get("Content-Length", "0")), DRAIN_BYTES)
        except ValueError:
            return
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _reply(self, code: int, payload: dict) -> None:
        if code >= 400 and self.command == "POST" and not self.body_read:
            self._drain_body()
        data = json.dumps(payload).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if code == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if code >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True  # the body may not have been read
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._reply(200, {"status": "ok"})
        else:
            self._reply(404, {"error": f"no such endpoint {self.path}; use POST /score or GET /health"})

    def do_POST(self) -> None:
        app = self.server.app
        self.body_read = False  # per request: one connection may carry several (keep-alive)
        if self.path != "/score":
            return self._reply(404, {"error": f"no such endpoint {self.path}; use POST /score"})
        if app.token is not None:
            sent = self.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {app.token}".encode()):
                return self._reply(401, {"error": "missing or wrong bearer token"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"error": "Content-Length is required"})
        if length > app.max_body_bytes:
            return self._reply(413, {"error": f"body of {length} bytes is over the limit of {app.max_body_bytes}"})
        body, self.body_read = self.rfile.read(length), True
        try:
            prompts, completions, references = parse_request(body)
        except BadRequest as e:
            return self._reply(400, {"error": str(e)})
        try:
            with app.lock:  # one scoring at a time: the model is not faster in parallel
                scores = [float(s) for s in app.score_fn(prompts, completions, references)]
            bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
            if bad:
                raise ValueError(f"the reward gave non-finite scores for items {bad[:10]}")
            if len(scores) != len(prompts):
                raise ValueError(f"the reward gave {len(scores)} scores for {len(prompts)} items")
        except Exception as e:  # a failing reward must answer the caller, not kill the server
            return self._reply(500, {"error": f"{type(e).__name__}: {e}"})
        self._reply(200, {"scores": scores})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: "RewardServer"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RewardServer:
    """Serves `score_fn(prompts, completions, references) -> scores` over HTTP (see module doc)."""

    def __init__(self, score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        if token is None and not is_loopback(host):
            raise ConfigError(f"refusing to serve rewards on {host} without a token: anyone who can reach it could "
                              f"call it. Set a bearer token in the token env var, or bind 127.0.0.1.")
        self.score_fn = score_fn
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.lock = threading.Lock()
        self.httpd = _Server((host, port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "RewardServer":
        """Serve in a background thread (tests, embedding)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
        self.httpd.server_close()


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
    reward = build_reward(cfg.reward, reward_model=cfg.model.reward, num_workers=0, dtype=cfg.model.dtype)
    server = RewardServer(reward.score_texts, host, port, token)
    kinds = ", ".join(f"{t.kind}x{t.weight:g}" for t in cfg.reward.terms)
    auth = "bearer token required" if token else f"NO token (${token_env} unset; loopback only)"
    print(f"tidal reward server on {server.url} (POST /score, GET /health); terms: {kinds}; {auth}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        reward.close()
    return 0


if __name__ == "__main__":  # python -m tidal.reward_service.server CONFIG [overrides]
    sys.exit(serve_from_cli(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
