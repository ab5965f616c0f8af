"""The HTTP edge cases every tidal JSON server must answer with a JSON 4xx (never a plain-text
500 with a traceback): one table, run against the labeling app (tests/test_feedback_http.py)
and the reward server (tests/test_reward_server.py)."""

from __future__ import annotations

import json

import requests

DEPTH = 100_000
# (id, request body, status, a piece of the error message)
BODIES = [
    ("nested-arrays-100k", b"[" * DEPTH + b"]" * DEPTH, 400, "too deeply"),
    ("nested-objects-30k", b'{"":' * 30_000 + b"1" + b"}" * 30_000, 400, "too deeply"),
    ("not-utf8", b"\xff\xfe{}", 400, "not UTF-8"),
    ("truncated", b'{"a": [1, 2', 400, "not valid JSON"),
    ("empty", b"", 400, "not valid JSON"),
    ("integer-5000-digits", b'{"a": ' + b"9" * 5000 + b"}", 400, "not JSON this server can read"),
    ("array", b"[1, 2]", 400, "JSON object"),
    ("null", b"null", 400, "JSON object"),
    ("string", b'"hello"', 400, "JSON object"),
]
BODY_IDS = [case[0] for case in BODIES]


def check_json_error(r: requests.Response, status: int, message: str) -> None:
    """The answer is `status` with a JSON {"error"} that holds `message`."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    error = json.loads(r.text)["error"]
    assert message in error, error
    assert "Traceback" not in r.text
