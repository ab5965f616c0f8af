"""Faults during a run: a rollout worker killed with SIGKILL, and the driver killed and resumed."""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from e2e_support import REPO, read_jsonl, rl_records, subprocess_env, tiny_overrides
from tidal.cluster import rl_stage
from tidal.cluster.driver import prepare_data, run_pipeline
from tidal.actors.placement import Placement
from tidal.common.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

VOLATILE = ("time/", "idle/", "rl/tokens_per_s")  # wall-clock dependent metrics


def _expected_prompt_batches(cfg, steps):
    """The prompt rows each step must train on, from an independent PromptDataset."""
    from tidal.common.data import PromptDataset
    from tidal.common.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(cfg.model.policy))
    ds = PromptDataset(prepare_data(cfg).prompts, tok, cfg.data.max_prompt_tokens, cfg.data.chat_template, seed=cfg.seed)
    return [ds.next_batch(cfg.algorithm.prompts_per_step).index for _ in range(steps)]


def test_killed_rollout_worker_loses_and_duplicates_no_prompt(ray_cluster, tmp_path, monkeypatch):
    """SIGKILL one of two rollout workers mid-run and grow the pool to three meanwhile
    (disaggregated: the new worker gets its own placement group). Every step must train on
    exactly its prompts, each sampled n times."""
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", tiny_overrides(
        tmp_path, "kill", "cluster.placement=disaggregated", "rollout.num_workers=2", "algorithm.steps=10"))
    started = {}
    real_start = rl_stage.start_parts

    def capture(*args, **kwargs):
        placement, parts = real_start(*args, **kwargs)
        started.update(placement=placement, parts=parts, pids=[i.pid for i in parts.pool.worker_infos()])
        return placement, parts

    monkeypatch.setattr(rl_stage, "start_parts", capture)
    # Slots are freed when the pool shuts down, so record the ones added while the run is live.
    added = []
    real_add = Placement.add_rollout_slot

    def record_add(self, worker_id):
        real_add(self, worker_id)
        added.append((worker_id, self.rollout_slots[worker_id].group, set(self.plan.groups)))

    monkeypatch.setattr(Placement, "add_rollout_slot", record_add)
    run_dir = tmp_path / "kill"
    events = {}

    def chaos():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            rollouts = run_dir / "rollouts.jsonl"
            if rollouts.is_file() and len(rollouts.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        started["parts"].pool.scale(3, wait=False)
        os.kill(started["pids"][0], signal.SIGKILL)
        events["killed_at"] = len((run_dir / "rollouts.jsonl").read_text().splitlines())

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    run_pipeline(cfg, run_dir)
    killer.join(timeout=5)
    assert events["killed_at"] < cfg.algorithm.steps, "the kill came too late to test anything"

    n = cfg.rollout.n_samples
    expected = _expected_prompt_batches(cfg, cfg.algorithm.steps)
    rollouts = read_jsonl(run_dir / "rollouts.jsonl")
    assert [r["step"] for r in rollouts] == list(range(1, cfg.algorithm.steps + 1))
    for rec, rows in zip(rollouts, expected):
        assert sorted(rec["prompt_index"]) == sorted(i for i in rows for _ in range(n)), f"step {rec['step']}"
    recs = rl_records(run_dir)
    assert sum(r["rollout/restarted_workers"] for r in recs) >= 1  # the pool noticed and replaced it
    # the worker added mid-run got a slot in a placement group of its own, outside the plan's groups
    assert [(wid, group) for wid, group, _ in added] == [(2, "rollout-2")]
    assert all(group not in planned for _, group, planned in added)
    assert started["placement"].pgs == {}  # and every group was freed at the end


def _run_driver(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "tidal.cluster.cli", "train", *args], env=env, cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _kill_tree(proc):
    """SIGKILL the driver, then everything its embedded Ray cluster left behind."""
    try:
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in ("time", "stage") and not k.startswith(VOLATILE)} for r in records]


@pytest.mark.parametrize("mode", ["async"])
def test_driver_killed_after_a_checkpoint_resumes_to_the_same_metrics(ray_cluster, tmp_path, mode):
    steps = 8
    overrides = tiny_overrides(tmp_path, "x", f"algorithm.steps={steps}", "logging.checkpoint_every=2",
                               f"algorithm.mode={mode}", "cluster.ray_temp_dir=" + tempfile.mkdtemp(prefix="tr-"))
    # the reference: an uninterrupted run (in this process, on the session's cluster)
    ref_cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", overrides[:1] + ["logging.run_name=ref"] + overrides[2:])
    run_pipeline(ref_cfg, tmp_path / "ref")

    run_dir = tmp_path / "crash"
    args = ["configs/tiny_ppo.yaml", *overrides[:1], "logging.run_name=crash", *overrides[2:]]
    proc = _run_driver(args, subprocess_env())
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "step-000004":
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"driver ended before its step-4 checkpoint:\n{proc.stdout.read()[-3000:]}"
    _kill_tree(proc)
    logged = [r["step"] for r in rl_records(run_dir)]
    assert 4 <= max(logged) < steps, logged  # killed mid-run, after the checkpoint

    resumed = _run_driver(["--resume", str(run_dir)], subprocess_env())
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    got, want = rl_records(run_dir), rl_records(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no step lost or repeated
    for g, w in zip(_comparable(got), _comparable(want)):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g["step"], k)
    assert read_jsonl(run_dir / "rollouts.jsonl") == read_jsonl(tmp_path / "ref" / "rollouts.jsonl")
    after = [r["completion"] for r in read_jsonl(run_dir / "samples_after.jsonl")]
    assert after == [r["completion"] for r in read_jsonl(tmp_path / "ref" / "samples_after.jsonl")]
