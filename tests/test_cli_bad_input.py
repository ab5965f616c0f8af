"""Bad input of every kind through the real CLI (a subprocess, as a user runs it): each fails in
seconds, before Ray starts, with exit code 2 and ONE stderr line naming the file/row/field or
key, no traceback, and nothing in the folders it was pointed at changed or added."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tidal.driver import checkpoint as ck
from tidal.common.config import load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_grpo.yaml")


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "tmp" not in p.relative_to(root).parts[:1]}


def run_cli(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    tmp = cwd / "tmp"  # the embedded Ray would make its tidal-ray-* folder here
    tmp.mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p)  # the tidal under test
    env = {**os.environ, "TMPDIR": str(tmp), "WANDB_MODE": "disabled", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "tidal.commands.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_user_error(cwd: Path, args: list[str], *names: str) -> str:
    """Exit 2, one stderr line containing every name, no traceback, no Ray, under 15 s, no file touched."""
    before = _tree_hash(cwd)
    t0 = time.monotonic()
    res = run_cli(cwd, *args)
    took = time.monotonic() - t0
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert took < 15, f"took {took:.1f} s"
    assert not list((cwd / "tmp").glob("tidal-ray-*")), "Ray was started"
    assert _tree_hash(cwd) == before, "a file was changed or added"
    return lines[0]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def scratch(tmp_path):
    """A user's folder: data and runs that must come out of every failed command unchanged."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "ok.jsonl", [{"prompt": "hi"}])
    return tmp_path


def test_prompt_row_without_prompt(scratch):
    _jsonl(scratch / "data" / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    line = assert_user_error(scratch, ["train", TINY, "data.task=null", "data.prompts=data/p.jsonl"],
                             "p.jsonl:3", "field 'prompt'", "data.prompts")
    assert "missing" in line


def test_heldout_file_too_small_for_reporting_and_selection(scratch):
    _jsonl(scratch / "data" / "held.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    args = ["train", TINY, "data.task=null", "data.prompts=data/ok.jsonl", "data.eval_prompts=data/held.jsonl",
            "logging.gold_every=2", "logging.eval_samples=8"]
    line = assert_user_error(scratch, [*args, "logging.gold_samples=16"], "held.jsonl", "has 20 prompts", "24",
                             "logging.eval_samples=8", "logging.gold_samples=16")
    assert "disjoint" in line


def test_reward_function_module_missing(scratch):
    assert_user_error(scratch, ["train", TINY, "reward.terms.0.kind=function", "reward.terms[0].target=nosuchmodule:f"],
                      "reward.terms[0].target", "nosuchmodule")


def test_reward_function_without_meta(scratch):
    (scratch / "myrew.py").write_text("def score(prompts, completions):\n    return [0.0] * len(prompts)\n")
    assert_user_error(scratch, ["train", TINY, "reward.terms.0.kind=function", "reward.terms.0.target=myrew:score"],
                      "myrew:score", "**meta")


def test_policy_folder_missing(scratch):
    assert_user_error(scratch, ["train", TINY, "model.policy=/nonexistent"], "model.policy=/nonexistent")


def test_policy_folder_without_tokenizer(scratch):
    (scratch / "m").mkdir()
    (scratch / "m" / "config.json").write_text("{}")
    assert_user_error(scratch, ["train", TINY, "model.policy=m"], "model.policy=m", "tokenizer")


def _fake_run(scratch: Path, stages_done: dict, *overrides: str) -> Path:
    run = scratch / "runs" / "r"
    run.mkdir(parents=True)
    cfg = load_config(TINY, ["logging.output_dir=runs", "logging.run_name=r", "logging.wandb_mode=disabled", *overrides])
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "run_state.json").write_text(json.dumps({"stages": stages_done}))
    _jsonl(run / "metrics.jsonl", [{"stage": "rl", "step": 1, "rl/reward_mean": 0.5}, {"stage": "eval", "x": 1}])
    (run / "summary.json").write_text(json.dumps({"wall_time_s": 136.2}))
    return run


def _checkpoint(run: Path, step: int, corrupt: bool) -> Path:
    """A checkpoint as the RL loop publishes it (driver state, RNG, a learner file; COMPLETE manifest)."""
    def write(d: Path) -> None:
        ck.DriverState(step=step, weight_version=step, kl_controller={}, reward_state={}, data_state={}).save(d)
        (d / "learner").mkdir()
        torch.save({"w": torch.zeros(16)}, d / "learner" / "model_states.pt")

    d = ck.write_checkpoint(run, step, write)
    if corrupt:  # what a disk-full or killed copy leaves: the zip's end cut off
        data = (d / "rng.pt").read_bytes()
        (d / "rng.pt").write_bytes(data[: len(data) // 2])
    return d


def test_resume_with_no_readable_checkpoint_names_every_bad_file(scratch):
    run = _fake_run(scratch, {})
    _checkpoint(run, 1, corrupt=True)
    _checkpoint(run, 2, corrupt=True)
    assert_user_error(scratch, ["train", "--resume", "runs/r"], "step-000002/rng.pt", "step-000001/rng.pt")


def test_resume_with_a_corrupt_newest_checkpoint_warns_once_before_ray(scratch):
    """The fallback is decided at preflight: one warning naming the file and the checkpoint used.
    (A bad prompts row stops this resume right after, so no Ray starts; the e2e fault test
    resumes such a run for real.)"""
    _jsonl(scratch / "data" / "p.jsonl", [{"prompt": "a"}, {"text": "b"}])
    run = _fake_run(scratch, {}, "data.task=null", "data.prompts=data/p.jsonl")
    _checkpoint(run, 1, corrupt=False)
    _checkpoint(run, 2, corrupt=True)
    before = _tree_hash(scratch)
    res = run_cli(scratch, "train", "--resume", "runs/r")
    warning, error = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "warning" in warning and "step-000002/rng.pt" in warning and "step-000001" in warning, warning
    assert "p.jsonl:2" in error
    assert not list((scratch / "tmp").glob("tidal-ray-*")) and _tree_hash(scratch) == before


def test_resume_refuses_changing_a_key_that_breaks_exactness(scratch):
    _fake_run(scratch, {})
    assert_user_error(scratch, ["train", "--resume", "runs/r", "learner.lr=1"], "learner.lr", "algorithm.steps")


def test_comparison_with_chosen_equal_rejected(scratch):
    _jsonl(scratch / "data" / "c.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                                          {"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert_user_error(scratch, ["train", TINY, "data.task=null", "stages.run=[rm]", "data.comparisons=data/c.jsonl"],
                      "c.jsonl:2", "field 'rejected'", "chosen")


def test_ranking_with_duplicate_responses(scratch):
    _jsonl(scratch / "data" / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}])
    assert_user_error(scratch, ["train", TINY, "data.task=null", "stages.run=[rm]", "stages.rm.loss=ranking",
                                "data.rankings=data/r.jsonl"], "r.jsonl:1", "responses[2]", "responses[0]")


def test_empty_yaml(scratch):
    (scratch / "empty.yaml").write_text("# nothing yet\n")
    assert_user_error(scratch, ["train", "empty.yaml"], "empty.yaml", "empty")


def test_duplicate_yaml_key(scratch):
    (scratch / "dup.yaml").write_text("algorithm:\n  steps: 5\n  name: grpo\n  steps: 8\n")
    assert_user_error(scratch, ["train", "dup.yaml"], "dup.yaml", "line 4", "'steps'", "line 2")


def test_unknown_key(scratch):
    assert_user_error(scratch, ["train", TINY, "learner.lrr=1e-6"], "learner.lrr", "learner.lr")


def test_config_show_check_and_submit_run_the_same_preflight(scratch):
    assert_user_error(scratch, ["config", "show", TINY, "--check", "model.policy=/nonexistent"], "model.policy")
    # overrides after --address; the cluster address is never contacted
    (scratch / "c.yaml").write_text((REPO / "configs" / "tiny_grpo.yaml").read_text())
    assert_user_error(scratch, ["submit", "c.yaml", "--address", "http://127.0.0.1:9", "model.policy=/nonexistent"],
                      "model.policy")


def test_resume_of_a_finished_run_says_so_and_changes_nothing(scratch):
    run = _fake_run(scratch, {"rl": {"output": "runs/r/policy", "summary": {}}})
    _checkpoint(run, 2, corrupt=False)
    before = _tree_hash(scratch)
    t0 = time.monotonic()
    res = run_cli(scratch, "train", "--resume", "runs/r")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already finished" in res.stdout and time.monotonic() - t0 < 15
    assert not list((scratch / "tmp").glob("tidal-ray-*"))
    assert _tree_hash(scratch) == before
    # extending a finished run goes on from its final checkpoint: this run's newest is step 2 of
    # 20, so there is nothing to go on from; refused, nothing changed (tests/test_first_hour.py
    # extends a real one)
    assert_user_error(scratch, ["train", "--resume", "runs/r", "algorithm.steps=80"], "final step 20", "model.policy=")
    assert_user_error(scratch, ["train", "--resume", "runs/r", "algorithm.steps=10"], "finished 20 steps")
