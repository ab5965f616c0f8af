"""Client of remote reward servers (`kind: remote`): the rule signature over HTTP.

The batch is split into one contiguous chunk per URL and the chunks are sent concurrently;
a failed chunk is retried (reward.retries times) on the next URL in the list, round-robin.
Timeouts, refused connections and 5xx answers are retried; 4xx answers (bad token, body too
large, malformed request) are not, since sending the same request again cannot fix them.
Every error names the URL and the fix. A response must be {"scores": [one finite number per
sample]}, anything else is an error.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tidal.common.config import ConfigError, RewardTerm
from tidal.common.errors import UserError


class RemoteRewardError(UserError, RuntimeError):
    """A remote reward server failed, refused the request or answered nonsense (names the URL);
    a user error: one line on the console, naming the URL and the fix."""

    kind = "reward error"


class _ClientError(RemoteRewardError):
    """A 4xx answer: not retried."""


_HINTS = {
    401: "the server rejected the bearer token; set the term's token_env variable to the server's token",
    413: "the request body is over the server's size limit; send smaller batches or raise the server's limit",
    400: "the server could not parse the request",
}


def score_url(url: str) -> str:
    """A server base URL ('http://host:8000') gets the /score endpoint; a full URL is kept."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"remote reward URL {url!r} must look like http://HOST:PORT (or https://...).")
    return url.rstrip("/") + "/score" if parsed.path in ("", "/") else url


class RemoteReward:
    """Calls a list of reward servers; `__call__` has the rule signature."""

    def __init__(self, urls: list[str], token: str | None = None, timeout_s: float = 30.0, retries: int = 2):
        if not urls:
            raise ConfigError("remote reward: no URLs; set the term's target to comma-separated server URLs.")
        self.urls = [score_url(u) for u in urls]
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries

    @classmethod
    def from_term(cls, term: RewardTerm, timeout_s: float, retries: int, where: str) -> "RemoteReward":
        urls = [u.strip() for u in (term.target or "").split(",") if u.strip()]
        if not urls:
            raise ConfigError(f"{where}: set target to the reward servers' URLs, comma-separated (http://HOST:PORT).")
        token = None
        if term.token_env:
            token = os.environ.get(term.token_env)
            if not token:
                raise ConfigError(f"{where}: token_env names {term.token_env!r}, but that environment variable is not set.")
        return cls(urls, token, timeout_s, retries)

    def __call__(self, prompts: list[str], completions: list[str], **meta) -> list[float]:
        n = len(prompts)
        if n == 0:
            return []
        references = meta.get("references")
        k = min(len(self.urls), n)
        bounds = [n * j // k for j in range(k + 1)]
        payloads = []
        for j in range(k):
            body = {"prompts": prompts[bounds[j]:bounds[j + 1]], "completions": completions[bounds[j]:bounds[j + 1]]}
            if references is not None and any(r is not None for r in references):
                body["references"] = references[bounds[j]:bounds[j + 1]]
            payloads.append(body)
        if k == 1:
            return self._send_with_retries(0, payloads[0])
        with ThreadPoolExecutor(max_workers=k) as pool:
            parts = list(pool.map(self._send_with_retries, range(k), payloads))
        return [s for part in parts for s in part]

    def _send_with_retries(self, first: int, body: dict) -> list[float]:
        data = json.dumps(body).encode("utf-8")
        failures = []
        for attempt in range(self.retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                return self._send(url, data, len(body["prompts"]))
            except _ClientError:
                raise
            except RemoteRewardError as e:
                failures.append(str(e))
            if attempt < self.retries:
                time.sleep(min(1.0, 0.1 * 2 ** attempt))
        raise RemoteRewardError(f"remote reward failed after {self.retries + 1} attempts: " + "; ".join(failures))

    def _send(self, url: str, data: bytes, n: int) -> list[float]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            hint = _HINTS.get(e.code, "")
            cls = _ClientError if 400 <= e.code < 500 else RemoteRewardError
            raise cls(f"{url}: HTTP {e.code} ({detail}){'; ' + hint if hint else ''}") from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise RemoteRewardError(f"{url}: no answer within reward.timeout_s={self.timeout_s}s") from None
            raise RemoteRewardError(f"{url}: cannot reach the server ({reason})") from None
        return _parse_scores(url, raw, n)


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read().decode("utf-8"))["error"])
    except Exception:  # the body of an error is best-effort context only
        return e.reason if isinstance(e.reason, str) else "no detail"


def _parse_scores(url: str, raw: bytes, n: int) -> list[float]:
    """The `scores` of a response body; anything but n finite numbers is an error naming the URL."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _ClientError(f"{url}: the response is not JSON: {raw[:200]!r}") from None
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list):
        raise _ClientError(f"{url}: the response has no 'scores' list: {str(body)[:200]}")
    if len(scores) != n:
        raise _ClientError(f"{url}: sent {n} samples, got {len(scores)} scores back")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise _ClientError(f"{url}: score {i} is {s!r}, not a number")
        if not math.isfinite(s):
            raise _ClientError(f"{url}: score {i} is {s}, not a finite number")
    return [float(s) for s in scores]
