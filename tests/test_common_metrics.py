"""MetricsLogger: JSONL record of truth, progress line, wandb mirror (offline, never fatal); the
dashboard and report pages drawn from it (the data behind each panel, then the PNGs)."""

import io
import json
import logging
import re
import time

import pytest

from tidal.common.config import LoggingConfig
from tidal.common.config import load_config, to_yaml
from tidal.common.dashboard import plot_dashboard, plot_run
from tidal.common.metrics import MetricsLogger, Timer, format_progress, read_metrics
from tidal.common.report import (RunMetrics, fit_losses, heldout_gold, kl, online_feedback, other_panels, phase_times,
                                 reward_model, rl_losses, rl_reward, version_bands)

OFF = LoggingConfig(wandb_mode="disabled")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_jsonl_one_flushed_record_per_log(tmp_path):
    logger = MetricsLogger(tmp_path, OFF)
    logger.log(1, {"rl/reward_mean": 0.5, "rl/kl": 0.01}, stage="rl")
    # flushed: readable before close
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["step"] == 1 and rec["stage"] == "rl" and rec["rl/reward_mean"] == 0.5 and rec["rl/kl"] == 0.01
    assert isinstance(rec["time"], float) and rec["time"] > 1.6e9  # wall time (unix seconds)
    logger.log(2, {"rl/reward_mean": 1, "rl/flag": True}, stage="rl")
    logger.close()
    logger.close()  # idempotent
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path)[1]["rl/reward_mean"] == 1.0 and read_metrics(tmp_path)[1]["rl/flag"] == 1.0


def test_resume_appends_and_fresh_run_refuses_to_overwrite(tmp_path):
    with MetricsLogger(tmp_path, OFF) as logger:
        for step in range(1, 4):
            logger.log(step, {"sft/loss": 1.0 / step}, stage="sft")
    with pytest.raises(FileExistsError, match=r"metrics\.jsonl already holds metrics.*--resume"):
        MetricsLogger(tmp_path, OFF)
    # a crash mid-write left half a line: resume must not glue the next record onto it
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "stage": "sf')
    with MetricsLogger(tmp_path, OFF, resume=True) as logger:
        logger.log(4, {"sft/loss": 0.2}, stage="sft")
        logger.log(1, {"rl/reward_mean": 0.0}, stage="rl")
    records = read_metrics(tmp_path)
    assert [(r["stage"], r["step"]) for r in records] == [("sft", 1), ("sft", 2), ("sft", 3), ("sft", 4), ("rl", 1)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6  # the broken line is kept, not dropped


def test_log_rejects_bad_values(tmp_path):
    with MetricsLogger(tmp_path, OFF) as logger:
        with pytest.raises(TypeError, match=r"metric 'rl/text' must be a number, got str"):
            logger.log(1, {"rl/text": "abc"}, stage="rl")
        with pytest.raises(ValueError, match=r"'step' is reserved.*'rl/step'"):
            logger.log(1, {"step": 3}, stage="rl")


def test_progress_plain_lines_with_rate_and_eta(tmp_path):
    stream, clock = io.StringIO(), FakeClock()
    with MetricsLogger(tmp_path, OFF, total_steps=40, stream=stream, clock=clock) as logger:
        logger.progress(10, stage="rl")
        clock.now += 4.2
        logger.progress(12, stage="rl", reward=0.41, kl=0.12)
        clock.now += 0.2
        logger.progress(13, stage="rl")
        clock.now += 0.1
        logger.progress(20, 40, stage="rl")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4  # not a TTY: one plain line per update
    assert lines[0] == "[rl] 10/40 [##........]  25% ? s/step ETA ?"
    # 2 steps in 4.2 s -> 2.1 s/step; 28 steps left -> 58.8 s
    assert lines[1] == "[rl] 12/40 [###.......]  30% 2.1 s/step ETA 0:59 reward=0.41 kl=0.12"
    # the rate averages over the bar: 3 steps in 4.4 s; faster than 1 s/step reads as step/s
    assert lines[2] == "[rl] 13/40 [###.......]  32% 1.5 s/step ETA 0:40"
    assert lines[3] == "[rl] 20/40 [#####.....]  50% 2.2 step/s ETA 0:09"  # 10 steps in 4.5 s


def test_progress_tty_updates_one_line(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream, clock = Tty(), FakeClock()
    with MetricsLogger(tmp_path, OFF, stream=stream, clock=clock) as logger:
        for step in range(0, 4):
            logger.progress(step, 3, stage="rm", acc=0.5)
            clock.now += 3.0
        assert stream.getvalue().count("\n") == 1  # the finished bar ends its line
        logger.progress(1, 5, stage="rl")
    out = stream.getvalue()
    assert out.count("\r") == 5 and out.endswith("\n")  # close() ends the open line
    assert "\r[rm] 3/3 [##########] 100% 3.0 s/step in 0:09 acc=0.5" in out


def test_progress_off_prints_nothing(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path, LoggingConfig(wandb_mode="disabled", progress=False), stream=stream) as logger:
        logger.progress(1, 10)
    assert stream.getvalue() == ""


def test_format_progress_without_total_and_long_eta():
    assert format_progress(7, None, "", 14.0, 7, {}) == "7 2.0 s/step"
    assert "ETA 2:46:40" in format_progress(0, 1000, "rl", 10.0, 1, {})


def test_timer_accumulates_and_survives_errors():
    ticks = iter([0.0, 1.5, 2.0, 2.25, 10.0, 13.0])
    timer = Timer(clock=lambda: next(ticks))
    with timer("generate"):
        pass
    with timer("generate"):
        pass
    with pytest.raises(RuntimeError):
        with timer("update"):
            raise RuntimeError("boom")
    assert timer.totals == {"generate": 1.75, "update": 3.0}
    assert timer.metrics() == {"time/generate_s": 1.75, "time/update_s": 3.0}
    timer.reset()
    assert timer.metrics() == {}


def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    cfg = LoggingConfig(wandb_mode="offline", wandb_project="tidal-test", run_name="unit")
    with MetricsLogger(tmp_path, cfg, config_dict={"learner": {"lr": 1e-6}}) as logger:
        assert logger._wandb is not None, "wandb did not start (see the warning in the log)"
        for step in range(1, 4):
            logger.log(step, {"rl/reward_mean": 0.1 * step}, stage="rl")
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert len(read_metrics(tmp_path)) == 3
    # resume continues the same wandb run id. wandb names an offline run's folder by its start
    # second, so a resume that starts within the same second as the first run (possible only in a
    # test this fast) would share its folder: wait for the next second.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    with MetricsLogger(tmp_path, cfg, resume=True) as logger:
        logger.log(4, {"rl/reward_mean": 0.4}, stage="rl")
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_failures_are_warnings(tmp_path, monkeypatch, caplog):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="tidal.metrics"):
        with MetricsLogger(tmp_path / "a", LoggingConfig(wandb_mode="online")) as logger:
            logger.log(1, {"rl/kl": 0.1}, stage="rl")
    assert "wandb (mode=online) failed to start" in caplog.text and "no wandb today" in caplog.text
    assert len(read_metrics(tmp_path / "a")) == 1

    class BrokenRun:
        id = "x"
        finished = False

        def log(self, data):
            raise OSError("disk full")

        def finish(self):
            self.finished = True

    run = BrokenRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tidal.metrics"):
        with MetricsLogger(tmp_path / "b", LoggingConfig(wandb_mode="offline")) as logger:
            logger.log(1, {"rl/kl": 0.1}, stage="rl")
            logger.log(2, {"rl/kl": 0.2}, stage="rl")  # wandb is off by now; JSONL goes on
    assert caplog.text.count("wandb log failed") == 1 and "disk full" in caplog.text and run.finished
    assert len(read_metrics(tmp_path / "b")) == 2


def write_demo_like_run(run_dir, rl_steps: int = 30, rm_steps: int = 300):
    """What `make demo` logs, in shape: 6 SFT steps, 300 RM steps (the final RM record at step
    300), a step-0 calibration record, 30 sync-mode RL steps and the before/after evaluation."""
    cfg = load_config(None, ["algorithm.adaptive_kl=true", "algorithm.kl_target=4.0", f"algorithm.steps={rl_steps}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with MetricsLogger(run_dir, OFF) as logger:
        for step in range(1, 7):
            logger.log(step, {"losses/sft": 5.5 - 0.1 * step, "sft/tokens": 300.0}, stage="sft")
        for step in range(1, rm_steps + 1):
            logger.log(step, {"losses/reward": 0.7 - step / 1000, "reward/train_accuracy": 0.5 + step / 1000}, stage="rm")
        logger.log(rm_steps, {"rm/reward_mean": 1.2, "rm/reward_std": 0.8, "rm/eval_accuracy": 0.87}, stage="rm")
        logger.log(0, {"reward/ref_mean": 0.1}, stage="rl")
        for step in range(1, rl_steps + 1):
            wait, fwd, adv, upd, sync = 4.0, 1.0, 0.1, 6.0, 0.5  # sync mode: the learner waits out generate + score
            logger.log(step, {"rl/score_mean": 0.02 * step, "rl/kl": 0.2 * step, "experience/kl_per_seq": 0.2 * step,
                              "rl/kl_coef": 0.3 - 0.005 * step, "losses/policy": -0.01, "losses/value": 0.3 / step,
                              "experience/response_len": 16.0, "rollout/degenerate": 0.0,
                              "time/generate_s": 3.6, "time/score_s": 0.4, "time/wait_rollout_s": wait,
                              "time/forward_s": fwd, "time/advantages_s": adv, "time/update_s": upd, "time/sync_s": sync,
                              "time/load_weights_s": 0.3, "time/step_s": wait + fwd + adv + upd + sync + 0.2,
                              "idle/rollout": 0.6, "idle/learner": 0.3, "update/early_stopped": float(step % 7 == 0)},
                       stage="rl")
        logger.log(rl_steps, {"eval/reward_before": -0.16, "eval/reward_after": 0.89, "eval/vader_before": 0.07,
                              "eval/vader_after": 0.34, "eval/rm_score_before": -0.15, "eval/rm_score_after": 0.9},
                   stage="eval")
    return run_dir


def test_each_dashboard_panel_shows_its_own_stage_scale_and_sum(tmp_path):
    """The data behind the panels of a demo-shaped run: RL on its own x axis (not the reward
    model's 300 steps), losses on their own scales, phases adding up to the wall time, KL once
    with its target and coefficient."""
    m = RunMetrics.of_run(write_demo_like_run(tmp_path))
    reward = rl_reward(m)
    assert reward.xlabel == "RL step" and [ln.label for ln in reward.lines] == ["reward"]
    assert reward.lines[0].x == list(range(1, 31))  # not the rm stage's steps, not the step-0 calibration record
    losses = rl_losses(m)
    assert [(ln.label, ln.right) for ln in losses.lines] == [("policy loss", False), ("value loss", True)]
    sft = fit_losses(m)
    assert sft.xlabel == "SFT step" and [ln.label for ln in sft.lines] == ["SFT loss"] and max(sft.lines[0].x) == 6
    rm = reward_model(m)
    assert rm.xlabel == "RM step" and max(rm.line("loss").x) == 300 and rm.line("train pair accuracy").right
    assert rm.line("held-out pair accuracy").y == [0.87]
    k = kl(m)
    assert [ln.label for ln in k.lines] == ["KL", "kl_coef"] and k.line("kl_coef").right  # experience/kl_per_seq: not again
    assert k.hlines == [("kl_target (adaptive)", 4.0)]
    times = phase_times(m)
    assert [s.label for s in times.stack] == ["wait_rollout", "forward", "advantages", "update", "sync", "other (untimed)"]
    wall = times.line("step wall time")
    for i, total in enumerate(wall.y):  # the stack's top is the step's wall time: nothing counted twice
        assert sum(s.y[i] for s in times.stack) == pytest.approx(total)
    assert times.line("rollout thread busy (generate + score)").y[0] == pytest.approx(4.0)  # a line, not stacked


def test_later_rounds_continue_the_x_axis(tmp_path):
    with MetricsLogger(tmp_path, OFF) as logger:
        for stage in ("rl", "rl2"):
            for step in (1, 2, 3):
                logger.log(step, {"rl/score_mean": float(step)}, stage=stage)
    lines = rl_reward(RunMetrics.of_run(tmp_path)).lines
    assert [(ln.label, ln.x) for ln in lines] == [("reward (rl)", [1, 2, 3]), ("reward (rl2)", [4, 5, 6])]


def test_report_pages_answer_questions_and_the_rest_is_one_page(tmp_path):
    run = write_demo_like_run(tmp_path / "run", rl_steps=5, rm_steps=20)
    paths = plot_run(run)
    assert [p.name for p in paths] == ["learning.png", "overoptimisation.png", "time.png", "reward_model.png",
                                       "update.png", "other.png"]
    for p in paths:
        assert p.parent == run / "plots" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = RunMetrics.of_run(run)
    plot_dashboard(run)  # the dashboard's panels and the pages ask for the metrics they show
    for builder in (rl_reward, kl, phase_times, rl_losses, fit_losses, reward_model):
        builder(m)
    rest = {p.title: p for p in other_panels(m)}
    assert "rl: rl/kl" not in rest and "sft: sft/tokens" in rest and "rl: time/update_s" not in rest
    assert rest["rl: update/early_stopped"].lines[0].flag  # a 0/1 switch is drawn as one, not a curve


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path / 'metrics.jsonl'))} not found.*tidal train"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_run(tmp_path)


def test_dashboard_is_one_png_with_every_panel_even_an_empty_one(tmp_path):
    path = plot_dashboard(write_demo_like_run(tmp_path, rl_steps=4, rm_steps=10))
    assert path == tmp_path / "dashboard.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots").exists()  # the pages are plot_run's, in plots/
    other = tmp_path / "sft"  # a run that logged none of the RL panels still gets the same page
    with MetricsLogger(other, OFF) as logger:
        logger.log(1, {"losses/sft": 2.0}, stage="sft")
    assert plot_dashboard(other).stat().st_size > 5000


def test_online_rlhf_draws_reward_model_versions_as_bands_with_label_arrival_and_accuracy(tmp_path):
    """feedback.mode=online: the steps each reward-model version scored are bands on the reward,
    KL and gold panels; the online page shows labels per step and the online accuracy."""
    versions, labels = [0, 0, 0, 1, 1, 2], [0, 2, 5, 9, 12, 16]
    with MetricsLogger(tmp_path, OFF) as logger:
        for step, (v, n) in enumerate(zip(versions, labels), start=1):
            rec = {"rl/score_mean": 0.1 * step, "rl/kl": 0.2 * step, "online/reward_version": float(v),
                   "online/labels": float(n), "eval/proxy": 0.1, "eval/gold": 0.2}
            if v:
                rec["online/online_accuracy"] = 0.5 + 0.1 * v
            logger.log(step, rec, stage="rl")
    m = RunMetrics.of_run(tmp_path)
    bands = [(0.5, 3.5, "RM v0"), (3.5, 5.5, "RM v1"), (5.5, 6.5, "RM v2")]
    assert version_bands(m) == bands
    assert rl_reward(m).bands == kl(m).bands == heldout_gold(m).bands == bands
    p = online_feedback(m)
    assert p.line("new labels per step").y == [0, 2, 3, 4, 3, 4] and p.line("online accuracy").right
    assert p.line("online accuracy").x == [4, 5, 6] and p.bands == bands
    assert "reward_model.png" in [x.name for x in plot_run(tmp_path)] and plot_dashboard(tmp_path).is_file()
    with MetricsLogger(tmp_path / "static", OFF) as logger:  # one version throughout: no bands
        logger.log(1, {"rl/score_mean": 0.1, "online/reward_version": 0.0}, stage="rl")
    assert version_bands(RunMetrics.of_run(tmp_path / "static")) == []
