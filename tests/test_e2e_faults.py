"""Faults during a run: a rollout worker killed with SIGKILL, and the driver killed and resumed."""

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from e2e_support import HALF_FLAT_REWARD, REPO, read_jsonl, rl_records, subprocess_env, tiny_overrides, uneven_model
from tidal.driver import rl_stage
from tidal.driver.job import prepare_data, run_pipeline
from tidal.actors.placement import Placement
from tidal.common.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

VOLATILE = ("time/", "idle/", "rl/tokens_per_s")  # wall-clock dependent metrics


def _expected_prompt_batches(cfg, steps):
    """The prompt rows each step must train on, from an independent PromptDataset."""
    from tidal.common.prompts import PromptDataset
    from tidal.common.models import resolve_model

    ds = PromptDataset.from_config(prepare_data(cfg).prompts, resolve_model(cfg.model.policy), cfg.data, seed=cfg.seed)
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
        placement, parts, calibration = real_start(*args, **kwargs)
        started.update(placement=placement, parts=parts, pids=[i.pid for i in parts.pool.worker_infos()])
        return placement, parts, calibration

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
    return subprocess.Popen([sys.executable, "-m", "tidal.commands.cli", "train", *args], env=env, cwd=REPO,
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


STEPS = 8


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tmp_path_factory):
    """An uninterrupted async run (in this process, on the session's cluster) to compare with."""
    tmp = tmp_path_factory.mktemp("ref")
    overrides = _overrides(tmp, "ref")
    run_pipeline(load_config(REPO / "configs" / "tiny_ppo.yaml", overrides), tmp / "ref")
    return tmp / "ref"


def _overrides(tmp, name, *extra):
    return tiny_overrides(tmp, name, f"algorithm.steps={STEPS}", "logging.checkpoint_every=2", "algorithm.mode=async",
                          *extra)


def _assert_same_run(run_dir, ref_dir):
    got, want = rl_records(run_dir), rl_records(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no step lost or repeated
    for g, w in zip(_comparable(got), _comparable(want)):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g["step"], k)
    assert read_jsonl(run_dir / "rollouts.jsonl") == read_jsonl(ref_dir / "rollouts.jsonl")
    after = [r["completion"] for r in read_jsonl(run_dir / "samples_after.jsonl")]
    assert after == [r["completion"] for r in read_jsonl(ref_dir / "samples_after.jsonl")]


def _kill_after_checkpoint(args, run_dir, step_dir):
    """Start the driver on `args`, wait until its newest checkpoint is `step_dir`, then kill
    the driver's whole process tree (as a power cut would)."""
    proc = _run_driver(args, subprocess_env())
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == step_dir:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"driver ended before its {step_dir} checkpoint:\n{proc.stdout.read()[-3000:]}"
    _kill_tree(proc)


def test_driver_killed_after_a_corrupt_checkpoint_resumes_from_the_one_before(reference_run, tmp_path):
    """The driver's whole process tree SIGKILLed after its step-4 checkpoint, which then loses the
    end of a learner file: the resume names the file, continues from step 2, ends equal to an
    uninterrupted run, and keeps the bad checkpoint aside instead of replacing it. (A resume
    from the newest checkpoint after a kill: the state tests below, and the SIGINT test.)"""
    run_dir = tmp_path / "bad"
    args = ["configs/tiny_ppo.yaml", *_overrides(tmp_path, "bad", "cluster.ray_temp_dir=" + tempfile.mkdtemp(prefix="tr-"))]
    _kill_after_checkpoint(args, run_dir, "step-000004")
    logged = [r["step"] for r in rl_records(run_dir)]
    assert 4 <= max(logged) < STEPS, logged  # killed mid-run, after the checkpoint
    newest = run_dir / "checkpoints" / "step-000004"
    bad = max((p for p in (newest / "learner").rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # what a full disk or a copy cut short leaves

    resumed = _run_driver(["--resume", str(run_dir)], subprocess_env())
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    warnings = [ln for ln in out.splitlines() if str(bad) in ln]
    # one warning when the resume skips it, one when the resumed run sets the folder aside
    assert len(warnings) == 2 and all("warning" in w for w in warnings), out[-3000:]
    assert "step-000002" in warnings[0] and ".corrupt-" in warnings[1], out[-3000:]
    _assert_same_run(run_dir, reference_run)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(names) == 4 and names[0] == "latest" and names[2:] == ["step-000006", "step-000008"], names
    assert names[1].startswith("step-000004.corrupt-")


def test_sigint_stops_at_a_safe_point_cleans_up_and_resumes_to_the_same_metrics(reference_run, tmp_path):
    run_dir = tmp_path / "int"
    temp = Path(tempfile.mkdtemp(prefix="tr", dir="/tmp"))  # the driver's own temp folder: other runs use /tmp too
    before = set(temp.glob("tidal-ray-*"))
    # a step here takes seconds on a busy machine: the grace period lets it finish and checkpoint
    proc = _run_driver(["configs/tiny_ppo.yaml", *_overrides(tmp_path, "int", "logging.interrupt_grace_s=300")],
                       {**subprocess_env(), "TMPDIR": str(temp)})
    stop_after = random.Random(0).choice([1, 2, 3])  # the step after which Ctrl-C comes
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(rl_records(run_dir)) >= stop_after:
            break
        time.sleep(0.05)
    temp_dirs = set(temp.glob("tidal-ray-*")) - before
    assert proc.poll() is None and len(temp_dirs) == 1, proc.stdout.read()[-3000:] if proc.poll() is not None else temp_dirs
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and f"Resume with: tidal train --resume {run_dir}" in out, out[-3000:]
    engine_lines = [ln for ln in out.splitlines() if ln.startswith("(") or "\x1b[" in ln]  # Ray worker output, ANSI
    assert not engine_lines, engine_lines[:5]  # a quiet console: worker and engine logs stay in RUN/logs/ray
    stopped_at = max(r["step"] for r in rl_records(run_dir))
    assert stop_after <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:06d}"  # checkpoint at the stop
    (temp_dir,) = temp_dirs
    time.sleep(10)
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left behind: {left}"
    assert not temp_dir.exists()  # the embedded cluster's temp folder is removed ...
    assert list((run_dir / "logs" / "ray").glob("*"))  # ... after its worker logs were kept in the run

    resumed = _run_driver(["--resume", str(run_dir)], subprocess_env())
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    _assert_same_run(run_dir, reference_run)


@pytest.mark.parametrize("kind", ["dynamic_sampling", "partial"])
def test_a_run_with_state_between_steps_killed_after_a_checkpoint_resumes_to_the_same_metrics(ray_cluster, tmp_path,
                                                                                               kind):
    """Async runs that carry state from one step's generation to the next. dynamic_sampling: DAPO's
    dynamic sampling, half of the prompts without signal, whose extra rounds consume a varying number
    of prompts per step. partial: rollout.partial=continue on a model whose responses end at uneven
    lengths, unfinished responses in flight over the checkpoint. SIGKILL after the step-4 checkpoint
    and --resume: the same rollouts, metrics (sampling/*, rollout/partial_* included) and policy."""
    if kind == "dynamic_sampling":
        extra = ("algorithm.dynamic_sampling=true", f"reward.terms={HALF_FLAT_REWARD}")
    else:
        extra = (f"model.policy={uneven_model(tmp_path / 'uneven', stop_every=8)}", "rollout.partial=continue",
                 "rollout.max_new_tokens=32", "rollout.partial_tokens=8", "rollout.partial_spare=8")
    ref = tmp_path / "ref"
    run_pipeline(load_config(REPO / "configs" / "tiny_grpo.yaml", _overrides(tmp_path, "ref", *extra)), ref)
    if kind == "dynamic_sampling":
        assert max(r["sampling/rounds"] for r in rl_records(ref)) >= 2  # the rounds this test is about happened
    else:  # responses in flight across steps (and so in the checkpoint), continued under newer weights
        assert sum(r["rollout/partial_mixed"] for r in rl_records(ref)) > 0

    run_dir = tmp_path / "crash"
    args = ["configs/tiny_grpo.yaml", *_overrides(tmp_path, "crash", *extra,
                                                   "cluster.ray_temp_dir=" + tempfile.mkdtemp(prefix="tr-"))]
    _kill_after_checkpoint(args, run_dir, "step-000004")
    assert 4 <= max(r["step"] for r in rl_records(run_dir)) < STEPS
    resumed = _run_driver(["--resume", str(run_dir)], subprocess_env())
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    _assert_same_run(run_dir, ref)
