"""The real `tidal` console script: config show (errors, overrides, --doc) and report."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tidal.common.config import LoggingConfig
from tidal.common.metrics import MetricsLogger

TIDAL = shutil.which("tidal", path=str(Path(sys.executable).parent)) or shutil.which("tidal")


def tidal(*args, cwd=None):
    assert TIDAL, f"no tidal console script next to {sys.executable}; run `make install`"
    return subprocess.run([TIDAL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def test_config_show_misspelled_key_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  lr: 1.0e-5\n  mini_bach_size: 8\n")
    res = tidal("config", "show", path)
    assert res.returncode == 2, res
    assert "unknown key 'learner.mini_bach_size'" in res.stderr
    assert "Did you mean 'learner.mini_batch_size'?" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_config_show_resolves_file_and_override(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("learner: {lr: 1.0e-5}\nstages: {run: [sft, rl]}\n")
    res = tidal("config", "show", path, "learner.lr=1e-6", "stages.rm.loss=ranking")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["learner"]["lr"] == 1e-6 and shown["stages"]["run"] == ["sft", "rl"]
    assert shown["stages"]["rm"]["loss"] == "ranking" and shown["learner"]["zero_stage"] == 2  # defaults filled in


def test_config_show_overrides_without_file():
    res = tidal("config", "show", "algorithm.name=grpo", "rollout.n_samples=4")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["algorithm"]["name"] == "grpo" and shown["rollout"]["n_samples"] == 4


def test_config_show_cross_field_error_exits_2():
    res = tidal("config", "show", "algorithm.name=grpo")
    assert res.returncode == 2 and "rollout.n_samples must be >= 2" in res.stderr


def test_config_show_doc():
    res = tidal("config", "show", "--doc")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("learner.lr = 1e-05  # Policy learning rate") for line in lines)
    assert any(line.startswith("reward.terms[].kind = ") for line in lines)
    assert all("  # " in line and line.split("  # ", 1)[1].strip() for line in lines)


def test_report_writes_pngs(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, LoggingConfig(wandb_mode="disabled")) as logger:
        for step in range(1, 5):
            logger.log(step, {"rl/reward_mean": 0.1 * step, "rl/kl": 0.02, "time/generate_s": 1.0}, stage="rl")
    res = tidal("report", run_dir)
    assert res.returncode == 0, res.stderr
    printed = [Path(p) for p in res.stdout.split()]
    assert sorted(p.name for p in printed) == ["rl_kl.png", "rl_reward.png", "rl_time.png"]
    for p in printed:
        assert p.is_file() and p.parent == run_dir / "plots" and p.read_bytes()[:4] == b"\x89PNG"


def test_report_on_empty_dir_is_a_clear_error(tmp_path):
    res = tidal("report", tmp_path)
    assert res.returncode == 2
    assert f"{tmp_path / 'metrics.jsonl'} not found" in res.stderr and "tidal train" in res.stderr
    assert "Traceback" not in res.stderr
