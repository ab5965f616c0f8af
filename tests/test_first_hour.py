"""The first hour of a new user, through the real CLI (issue 22): `tidal eval` finds a run's
reward model and fails before Ray on a config error; a hub id is checked before Ray and the
error says how to get the model; `config show --check` says what it checked; one console
policy (--verbose) for every command that starts Ray; collapse warnings; `--resume` extends a
finished run; the tiny configs' reward moves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_support import DATA_DIR, read_jsonl, rl_records
from test_cli_bad_input import TINY, assert_user_error, run_cli
from tidal.common.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_PPO = str(REPO / "configs" / "tiny_ppo.yaml")


@pytest.fixture
def scratch(tmp_path):
    """A user's folder, and the shared task data the configs point at (written once)."""
    from tidal.driver.job import prepare_data

    prepare_data(load_config(TINY, [f"data.data_dir={DATA_DIR}"]))
    (tmp_path / "runs").mkdir()
    return tmp_path


def _finished_run(root: Path, tiny_model, reward_model: bool) -> Path:
    """A run folder as `tidal train` leaves it: its policy (and reward model) recorded in run_state.json."""
    run = root / "runs" / "r"
    shutil.copytree(tiny_model, run / "policy")
    stages = {"rl": {"output": str(run / "policy")}}
    if reward_model:
        from tidal.common.models import load_tokenizer, load_value_model, save_value_model

        save_value_model(load_value_model(tiny_model), run / "reward_model", {"reward_mean": 0.0, "reward_std": 1.0},
                         tokenizer=load_tokenizer(tiny_model))
        stages = {"rm": {"output": str(run / "reward_model")}, **stages}
    (run / "run_state.json").write_text(json.dumps({"stages": stages}))
    return run


# ---------------------------------------------------------------------------- item 1: tidal eval


def test_eval_with_no_reward_model_anywhere_is_one_line_before_ray(scratch, tiny_model):
    """The README's eval on a run without an rm stage: refused in seconds, before Ray starts,
    naming the term and the fix, and no empty runs/eval/ left behind."""
    _finished_run(scratch, tiny_model, reward_model=False)
    assert_user_error(scratch, ["eval", TINY, "reward.terms=[{kind: model}]", f"data.data_dir={DATA_DIR}",
                                "--run", "ppo=runs/r", "--best-of", "4"], "reward.terms[0]", "model.reward=")
    assert not (scratch / "runs" / "eval").exists()
    (scratch / "board").write_text("mine")
    assert_user_error(scratch, ["eval", TINY, f"data.data_dir={DATA_DIR}", "--run", "ppo=runs/r", "--out",
                                "board/x"], "--out", "is a file")


def test_eval_scores_with_the_reward_model_the_run_trained(scratch, tiny_model, monkeypatch):
    """As `tidal generate` does: model.reward unset, the --run run's own rm output is the proxy's."""
    from tidal.commands.cli import parse_args
    from tidal.commands.evaluate import plan_eval

    run = _finished_run(scratch, tiny_model, reward_model=True)
    monkeypatch.chdir(scratch)
    _, _, args = parse_args(["eval", TINY, "reward.terms=[{kind: model}]", f"data.data_dir={DATA_DIR}",
                             "--run", "ppo=runs/r", "--best-of", "4"])
    plan = plan_eval(args)
    assert plan.reward_model == str(run / "reward_model") and plan.policies == {"ppo": str(run / "policy")}
    assert not (scratch / "runs" / "eval").exists()  # nothing written before the scoreboard is
    _, _, args = parse_args(["eval", TINY, "reward.terms=[{kind: model}]", f"data.data_dir={DATA_DIR}",
                             f"model.reward={tiny_model}", "--run", "ppo=runs/r"])
    assert plan_eval(args).reward_model == str(tiny_model)  # model.reward, when set, wins


# ---------------------------------------------------------------------------- item 4: hub ids


def _hub_env(cache: Path, **extra: str) -> dict[str, str]:
    """A user's plain shell: no HF_HUB_OFFLINE (tidal sets it for its runs), this HF cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HUB_CACHE": str(cache), "WANDB_MODE": "disabled", **extra}


def _cli(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    (cwd / "tmp").mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "tidal.commands.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**env, "TMPDIR": str(cwd / "tmp")})


def test_a_hub_id_not_in_the_cache_is_refused_before_ray_with_how_to_get_it(scratch):
    env = _hub_env(scratch / "hf-cache")
    for args in (["config", "show", TINY, "--check"], ["train", TINY]):
        res = _cli(scratch, env, *args, "model.policy=someorg/some-model", f"data.data_dir={DATA_DIR}")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert "model.policy=someorg/some-model" in lines[0] and "not in the Hugging Face cache" in lines[0]
        assert "hf download someorg/some-model" in lines[0] and "HF_HUB_OFFLINE=0" in lines[0]  # how to allow it
    assert not list((scratch / "tmp").glob("tidal-ray-*")) and list((scratch / "runs").iterdir()) == []
    res = _cli(scratch, {**env, "HF_HUB_OFFLINE": "0"}, "config", "show", TINY, "--check",
               "model.policy=someorg/some-model", f"data.data_dir={DATA_DIR}")  # the user allowed downloads
    assert res.returncode == 0 and "downloaded at first use" in res.stderr, res.stderr[-2000:]


def test_a_hub_id_in_the_cache_is_used_offline(scratch, tiny_model, monkeypatch):
    from tidal.common.models import resolve_model

    snapshot = scratch / "hf-cache" / "models--someorg--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    res = _cli(scratch, _hub_env(scratch / "hf-cache"), "config", "show", TINY, "--check",
               "model.policy=someorg/tiny", f"data.data_dir={DATA_DIR}")
    assert res.returncode == 0 and "model.policy=someorg/tiny (hub id, in the Hugging Face cache)" in res.stderr, \
        res.stderr[-2000:]
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(scratch / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a run's driver and workers have
    assert resolve_model("someorg/tiny") == snapshot


# ---------------------------------------------------------------------------- item 9: config show --check


def test_config_show_check_says_what_it_checked(scratch):
    res = run_cli(scratch, "config", "show", TINY, "--check", f"data.data_dir={DATA_DIR}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("seed: 0") and "preflight passed" not in res.stdout
    err = res.stderr
    assert err.startswith("tidal: preflight passed"), err
    for line in ("stages.run: rl", "algorithm.name=grpo: 20 steps", "reward.terms[0]: sentiment",
                 "model.policy=tiny-random (registry name)", "data.prompts: ", "512 rows of prompts (rl)"):
        assert line in err, (line, err)
    res = run_cli(scratch, "config", "show", TINY, "--check", f"data.data_dir={scratch / 'new'}")
    assert "data.prompts: the built-in sentiment task writes it into" in res.stderr, res.stderr  # nothing written yet
    assert not (scratch / "new").exists()


# ---------------------------------------------------------------------------- item 7: one console policy


def test_every_command_that_starts_ray_takes_verbose_and_is_quiet_without_it():
    import dataclasses

    from tidal.commands.cli import COMMANDS, parse_args

    for argv in (["train", TINY], ["eval", TINY], ["generate", TINY], ["label", "tasks", "fb", TINY]):
        quiet, loud = parse_args(argv)[2], parse_args([*argv, "--verbose"])[2]
        assert quiet.verbose is False and loud.verbose is True, argv
    with_verbose = {cmd.path for cmd in COMMANDS if "verbose" in {f.name for f in dataclasses.fields(cmd.args)}}
    assert with_verbose == {("train",), ("eval",), ("generate",), ("label", "tasks")}


@pytest.mark.ray
def test_ray_session_keeps_rays_own_warnings_off_the_console(tmp_path):
    """What every command's quiet session prints: one line saying where the logs went, no Ray
    token-auth warning, no worker output (a fresh process: Ray prints at its first init)."""
    code = ("import ray; from pathlib import Path; from tidal.driver.runtime import ray_session; "
            "from tidal.common.config import ClusterConfig\n"
            f"with ray_session(ClusterConfig(num_cpus=1), verbose=False, logs_to=Path({str(tmp_path / 'logs')!r})):\n"
            "    ray.get(ray.remote(lambda: print('worker chatter')).remote())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == [f"tidal: worker and engine logs go to {tmp_path / 'logs'} (--verbose shows "
                                       f"them here)"], res.stdout
    assert res.stderr == "", res.stderr[-2000:]
    assert "worker chatter" in "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").rglob("*.out"))


# ---------------------------------------------------------------------------- item 6: collapse warnings


def test_collapse_warnings_fire_once_at_their_settings():
    from tidal.driver.monitor import CollapseWatch

    cfg = load_config(TINY, ["logging.warn_degenerate=0.6", "logging.warn_kl=2.0"])
    watch = CollapseWatch.from_config(cfg)
    assert watch.observe(1, {"rollout/degenerate": 0.5, "rl/kl": 16.0, "rl/kl_per_token": 1.0}) == []
    first = watch.observe(2, {"rollout/degenerate": 1.0, "rl/kl": 97.0, "rl/kl_per_token": 6.1})
    assert len(first) == 2 and "100% of the batch's completions are degenerate" in first[0]
    assert "logging.warn_degenerate=0.6" in first[0] and "97 nats per sequence" in first[1]
    assert "logging.warn_kl=2" in first[1] and "learner.lr" in first[1]
    assert watch.observe(3, {"rollout/degenerate": 1.0, "rl/kl_per_token": 9.0}) == []  # once per run
    off = CollapseWatch.from_config(load_config(TINY, ["logging.warn_degenerate=0", "logging.warn_kl=0"]))
    assert off.observe(1, {"rollout/degenerate": 1.0, "rl/kl_per_token": 50.0}) == []


# ---------------------------------------------------------------------------- items 5, 6, 7 for real


@pytest.mark.slow
@pytest.mark.ray
def test_a_tiny_run_moves_warns_quietly_and_extends_after_it_finished(scratch):
    """`tidal train configs/tiny_ppo.yaml` as written (its own reward): the reward varies across
    samples (a reward that cannot move teaches nothing); a KL past logging.warn_kl is one warning
    on the console; Ray, vLLM and DeepSpeed stay off it; then `--resume RUN algorithm.steps=3`
    on the finished run goes on from its final checkpoint."""
    overrides = ["logging.output_dir=runs", "logging.run_name=r", f"data.data_dir={DATA_DIR}", "logging.eval_samples=4",
                 "algorithm.steps=2", "logging.warn_kl=1e-6"]
    res = run_cli(scratch, "train", TINY_PPO, *overrides, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "logging.warn_kl" in warnings[0] and "at rl step 2" in warnings[0], res.stderr
    noise = [ln for ln in res.stdout.splitlines() + res.stderr.splitlines()
             if not ln.startswith(("tidal", "[rl]", "held-out", "VADER", "reward", "KL", "response", "train_kl",
                                   "kl_coef", "wall_time"))]
    assert noise == [], noise  # tidal's own lines and its table only
    run = scratch / "runs" / "r"
    first = rl_records(run)
    assert first[0]["experience/score_std"] > 0  # the tiny config's own reward differs between samples
    res = run_cli(scratch, "train", "--resume", "runs/r", "algorithm.steps=3", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tidal: extending runs/r: rl goes on from step 2 to 3" in res.stdout
    records = rl_records(run)
    assert [r["step"] for r in records] == [1, 2, 3] and records[:2] == first  # steps 1-2 kept as they were
    state = json.loads((run / "run_state.json").read_text())["stages"]["rl"]
    assert state["summary"]["after"]["weight_version"] == 3.0  # the policy after the third step
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "eval"] == [3]
    assert load_config(run / "config.yaml").algorithm.steps == 3
