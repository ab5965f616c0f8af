"""The HTTP reward server and its client, on real loopback sockets: auth (401), size limit
(413), malformed requests (400), hung servers (timeout), bad responses, retries, round-robin,
and `tidal reward serve` as a real subprocess."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from http_corpus import BODIES, BODY_IDS, check_json_error
from tidal.common.config import ConfigError, RewardConfig, RewardTerm
from tidal.reward_service.client import RemoteReward, RemoteRewardError
from tidal.reward_service.combine import build_reward
from tidal.reward_service.server import RewardServer, serve_from_cli

TOKEN = "s3cret-token"
TERMS = (RewardTerm(kind="sentiment"), RewardTerm(kind="match", target="exact", weight=2.0))


@contextmanager
def serving(score_fn, **kw):
    server = RewardServer(score_fn, **kw).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def local_reward():
    return build_reward(RewardConfig(terms=TERMS))


@pytest.fixture
def server(local_reward):
    with serving(local_reward.score_texts, token=TOKEN, max_body_bytes=4096) as s:
        yield s


def post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/score", body, headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_round_trip_equals_local_reward(server, local_reward):
    prompts, completions, refs = ["a", "b", "c"], ["I love it", "awful", "Paris"], ["x", "y", "paris"]
    client = RemoteReward([server.url], token=TOKEN, timeout_s=10)
    remote = client(prompts, completions, references=refs)
    assert remote == pytest.approx(local_reward.score_texts(prompts, completions, refs))
    assert remote[2] == pytest.approx(2.0)  # the reference reached the match term
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "busy_s": 0.0}
    # as a `remote` term of a combined reward, the token from the named env var
    os.environ["TIDAL_TEST_REWARD_TOKEN"] = TOKEN
    combined = build_reward(RewardConfig(terms=(RewardTerm(kind="remote", target=server.url, token_env="TIDAL_TEST_REWARD_TOKEN"),)))
    assert combined.score_texts(prompts, completions, refs) == pytest.approx(remote)


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
def test_missing_or_wrong_token_is_401(server, token):
    assert post(server.url, b'{"prompts": [], "completions": []}', token=token)[0] == 401
    client = RemoteReward([server.url], token=token, timeout_s=10, retries=3)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=rf"{server.url}/score: HTTP 401 .*bearer token"):
        client(["p"], ["c"])
    assert time.monotonic() - start < 1.0  # a 4xx is not retried


def test_oversized_body_is_413(server):
    status, body = post(server.url, json.dumps({"prompts": ["p"], "completions": ["x" * 10_000]}).encode())
    assert status == 413 and "over the limit of 4096" in body["error"]
    # far over the socket buffers too: the client still reads the 413, not a reset connection
    for size in (10_000, 3_000_000):
        with pytest.raises(RemoteRewardError, match=rf"{server.url}/score: HTTP 413 .*smaller batches"):
            RemoteReward([server.url], token=TOKEN, timeout_s=10)(["p"], ["x" * size])


@pytest.mark.parametrize("body,message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b'{"prompts": ["a"]}', "'completions' must be a list of strings"),
    (b'{"prompts": ["a"], "completions": [1]}', "'completions' must be a list of strings"),
    (b'{"prompts": [NaN], "completions": ["a"]}', "'prompts' must be a list of strings"),
    (b'{"prompts": ["a", "b"], "completions": ["a"]}', "they must match"),
    (b'{"prompts": ["a"], "completions": ["a"], "references": ["r", "s"]}', "'references' has 2 items"),
    (b'{"prompts": ["a"], "completions": ["a"], "extra": 1}', "unknown fields"),
], ids=["syntax", "non-utf8", "array", "missing-field", "non-string", "nan", "lengths", "references", "unknown"])
def test_malformed_requests_are_400(server, body, message):
    status, reply = post(server.url, body)
    assert status == 400 and message in reply["error"]


@pytest.mark.parametrize("body,status,message", [case[1:] for case in BODIES], ids=BODY_IDS)
def test_http_corpus_bodies_are_json_400s(local_reward, body, status, message):
    with serving(local_reward.score_texts, token=TOKEN) as s:  # the default body limit (8 MiB)
        r = requests.post(s.url + "/score", data=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        check_json_error(r, status, message)


@pytest.mark.parametrize("method,path,status,message", [
    ("GET", "/score", 405, "GET is not allowed on /score"),
    ("POST", "/health", 405, "POST is not allowed on /health"),
    ("GET", "/nope", 404, "no such endpoint /nope; use POST /score"),
    ("POST", "/score/extra", 404, "no such endpoint"),
], ids=["get-score", "post-health", "unknown-get", "unknown-post"])
def test_http_corpus_paths_and_methods_are_json(server, method, path, status, message):
    check_json_error(requests.request(method, server.url + path, data=b"{}", timeout=10), status, message)


def test_lone_surrogates_in_json_are_scored(server, local_reward):
    # JSON may carry lone surrogates (\udcff) that no UTF-8 encoder accepts; they are cleaned.
    status, reply = post(server.url, b'{"prompts": ["p"], "completions": ["good \\udcff"], "references": ["x"]}')
    assert status == 200 and reply["scores"] == pytest.approx(local_reward.score_texts(["p"], ["good"], ["x"]), abs=1e-4)
    # a reward that cannot score the request (match without references) answers 500 with why
    status, reply = post(server.url, b'{"prompts": ["p"], "completions": ["good"]}')
    assert status == 500 and "no reference answer" in reply["error"]


def test_hung_server_hits_the_client_timeout():
    release = threading.Event()

    def hang(prompts, completions, references):
        release.wait(30)
        return [0.0] * len(prompts)

    with serving(hang) as s:
        client = RemoteReward([s.url], timeout_s=0.5, retries=1)
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match=rf"after 2 attempts: {s.url}/score: no answer within reward.timeout_s=0.5s"):
            client(["p"], ["c"])
        assert time.monotonic() - start < 5
        release.set()


def test_failing_reward_is_500_and_retried():
    calls = []

    def flaky(prompts, completions, references):
        calls.append(1)
        if len(calls) in (1, 4):
            raise RuntimeError("model fell over")
        return [float("nan")] if len(calls) == 2 else [1.5]

    with serving(flaky) as s:
        assert RemoteReward([s.url], timeout_s=5, retries=2)(["p"], ["c"]) == [1.5]  # 500, 500 (NaN), ok
        assert len(calls) == 3
        with pytest.raises(RemoteRewardError, match=r"after 1 attempts: .*HTTP 500 \(RuntimeError: model fell over\)"):
            RemoteReward([s.url], timeout_s=5, retries=0)(["p"], ["c"])


@contextmanager
def canned(status: int, body: bytes):
    """A stub server that answers every POST with `status` and `body` (client-side checks)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("status,body,message", [
    (200, b'{"scores": [1.0]}', "sent 2 samples, got 1 scores back"),
    (200, b'{"scores": [1.0, NaN]}', "score 1 is nan, not a finite number"),
    (200, b'{"scores": [Infinity, 1.0]}', "score 0 is inf, not a finite number"),
    (200, b'{"scores": [1.0, "2"]}', "score 1 is '2', not a number"),
    (200, b'{"scores": [true, 1.0]}', "score 0 is True, not a number"),
    (200, b'{"rewards": [1, 2]}', "no 'scores' list"),
    (200, b"<html>", "not JSON"),
    (400, b'{"error": "bad field"}', r"HTTP 400 \(bad field\)"),
], ids=["count", "nan", "inf", "string", "bool", "field", "html", "400"])
def test_bad_responses_are_errors_naming_the_url(status, body, message):
    with canned(status, body) as url:
        with pytest.raises(RemoteRewardError, match=rf"{url}/score: .*{message}"):
            RemoteReward([url], timeout_s=5, retries=0)(["p", "q"], ["c", "d"])


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_round_robin_split_and_failover():
    with serving(lambda p, c, r: [1.0] * len(p)) as a, serving(lambda p, c, r: [2.0] * len(p)) as b:
        assert RemoteReward([a.url, b.url], timeout_s=5)(list("wxyz"), list("wxyz")) == [1.0, 1.0, 2.0, 2.0]
        dead = _closed_port_url()
        # the dead server's chunk is retried on the next URL
        assert RemoteReward([dead, a.url], timeout_s=5, retries=1)(list("wxyz"), list("wxyz")) == [1.0] * 4
        with pytest.raises(RemoteRewardError, match=rf"after 2 attempts: {dead}/score: cannot reach the server"):
            RemoteReward([dead], timeout_s=5, retries=1)(["p"], ["c"])


def test_non_loopback_bind_without_token_is_refused(monkeypatch):
    monkeypatch.delenv("TIDAL_TEST_UNSET_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="not a loopback address"):
        serve_from_cli(None, ["reward.terms=[{kind: sentiment}]"], host="0.0.0.0", port=0, token_env="TIDAL_TEST_UNSET_TOKEN")
    with pytest.raises(ConfigError, match="without a token"):
        RewardServer(lambda p, c, r: [], host="0.0.0.0", port=0)


def test_tidal_reward_serve_cli(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text("reward:\n  terms:\n    - kind: sentiment\n    - kind: length\n      target: '2'\n      weight: 0.5\n")
    env = {**os.environ, "TIDAL_TEST_SERVE_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "tidal.commands.cli", "reward", "serve", str(config), "--port", "0",
           "--token-env", "TIDAL_TEST_SERVE_TOKEN"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = ""
        while "reward server on" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the server exited before serving"
        url = line.split(" on ")[1].split()[0]
        assert "bearer token required" in line
        # "good" 0.4404; length: 1 word vs target 2 -> -0.5, weight 0.5
        assert RemoteReward([url], token=TOKEN, timeout_s=10)(["p"], ["good"]) == pytest.approx([0.4404 - 0.25], abs=1e-4)
        assert post(url, b'{"prompts": [], "completions": []}', token=None)[0] == 401
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
