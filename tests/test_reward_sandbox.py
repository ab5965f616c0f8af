"""Deadlines on user reward functions (tidal.reward_service.sandbox): a function that hangs ends
its call with an error naming it, within reward.function_timeout_s; one that raises or returns
garbage is one error naming the sample; `tidal reward serve` answers and reports a stuck scorer."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from reward_fixtures import make_rollout
from tidal.common.config import RewardConfig, RewardTerm
from tidal.common.errors import UserError
from tidal.reward_service.combine import build_reward

USER_MODULE = '''
import os, time

def hang(prompts, completions, **meta):
    time.sleep(3600)

def pid(prompts, completions, **meta):
    return [float(os.getpid())] * len(prompts)

def fails_on_bad(prompts, completions, **meta):
    return [1.0 / (c != "bad") for c in completions]

def none(prompts, completions, **meta):
    return None

def dies(prompts, completions, **meta):
    os._exit(3)

def hang_on_slow(prompts, completions, **meta):
    if "slow" in completions:
        time.sleep(3600)
    return [1.0] * len(prompts)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myrewards", None)
    return tmp_path


def _reward(fn: str, timeout_s: float | None = 2.0):
    return build_reward(RewardConfig(terms=(RewardTerm(kind="function", target=f"myrewards:{fn}"),),
                                     function_timeout_s=timeout_s))


def test_a_hung_function_ends_its_call_within_the_deadline_naming_it(user_module):
    from tidal.reward_service.sandbox import RewardTimeout

    reward = _reward("hang_on_slow", timeout_s=2.0)
    try:
        reward.score(make_rollout(["p", "q"], ["fast", "fast"]))  # the process is up and answering
        t0 = time.monotonic()
        with pytest.raises(RewardTimeout) as e:
            reward.score(make_rollout(["p0", "p1"], ["fast", "slow"]))
        took = time.monotonic() - t0
        assert 2.0 <= took < 6, took
        assert isinstance(e.value, UserError)  # the CLI's one-line path
        message = str(e.value)
        for name in ("myrewards:hang_on_slow", "reward.function_timeout_s=2", "prompt indices [0, 1]", "'p0'"):
            assert name in message, message
        assert reward.score(make_rollout(["p"], ["fast"])).scores.tolist() == [1.0]  # a fresh process next time
    finally:
        reward.close()


def test_the_deadline_setting_decides_where_the_function_runs(user_module):
    """function_timeout_s set: a process of its own; null: this process (and no deadline)."""
    isolated, in_process = _reward("pid", 5.0), _reward("pid", None)
    try:
        assert isolated.score(make_rollout(["p"], ["c"])).raw_scores.item() != float(os.getpid())
        assert in_process.score(make_rollout(["p"], ["c"])).raw_scores.item() == float(os.getpid())
    finally:
        isolated.close()


@pytest.mark.parametrize("timeout_s", [5.0, None], ids=["isolated", "in-process"])
def test_a_function_that_raises_is_one_error_naming_the_sample(user_module, timeout_s):
    from tidal.reward_service.sandbox import RewardFunctionError

    reward = _reward("fails_on_bad", timeout_s)
    try:
        with pytest.raises(RewardFunctionError) as e:
            reward.score(make_rollout(["a", "b", "c"], ["good", "bad", "good"]))
        message = str(e.value)
        assert "ZeroDivisionError" in message and "myrewards.py:11" in message, message
        assert "sample 1 (prompt 'b')" in message and "(prompt index 1)" in message, message
    finally:
        reward.close()


def test_garbage_and_a_dying_process_are_errors_naming_the_function(user_module):
    from tidal.reward_service.sandbox import RewardFunctionError

    reward = _reward("none")
    try:
        with pytest.raises(RewardFunctionError, match="returned NoneType"):
            reward.score(make_rollout(["p"], ["c"]))
    finally:
        reward.close()
    reward = _reward("dies")
    try:
        with pytest.raises(RewardFunctionError, match=r"myrewards:dies: its process ended \(exit code 3\)"):
            reward.score(make_rollout(["p"], ["c"]))
    finally:
        reward.close()


# ----------------------------------------------------------------------------- the reward server


def _serve(cwd: Path, port_file: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "tidal.commands.cli", "reward", "serve", "--port", "0",
                             *overrides], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_reward_serve_with_a_hung_function_answers_reports_it_and_stops_on_one_ctrl_c(user_module):
    server = _serve(user_module, user_module / "port", "reward.terms=[{kind: function, target: 'myrewards:hang'}]",
                    "reward.function_timeout_s=2")
    try:
        banner = server.stdout.readline()
        assert "tidal reward server on http://" in banner, banner + server.stdout.read()
        url = banner.split(" on ")[1].split()[0]
        assert _request(url + "/health") == (200, {"status": "ok", "busy_s": 0.0})
        t0 = time.monotonic()
        code, body = _request(url + "/score", {"prompts": ["p"], "completions": ["c"]})
        assert code == 504 and 2.0 <= time.monotonic() - t0 < 10, (code, body)
        assert "myrewards:hang" in body["error"] and "reward.function_timeout_s=2" in body["error"]
        code, body = _request(url + "/health")
        assert code == 503 and body["status"] == "stuck" and "myrewards:hang" in body["error"], body
        # a request hangs again; one Ctrl-C ends the server all the same
        import threading

        threading.Thread(target=_request, args=(url + "/score", {"prompts": ["p"], "completions": ["c"]}),
                         daemon=True).start()
        time.sleep(0.5)
        kids = _children(server.pid)
        assert kids, "the function runs in a process of the server's"
        t0 = time.monotonic()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=15)
        assert time.monotonic() - t0 < 10
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    time.sleep(2)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()], "the function's process outlived the server"


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().split(")")[-1].split()[1] == str(pid):
                out.append(int(entry.name))
        except OSError:
            pass
    return out
