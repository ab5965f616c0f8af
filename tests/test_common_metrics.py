"""MetricsLogger: JSONL record of truth, progress line, wandb mirror (offline, never fatal), plots."""

import io
import json
import logging
import re
import time

import pytest

from tidal.common.config import LoggingConfig
from tidal.common.metrics import MetricsLogger, Timer, format_progress, metric_group, plot_run, read_metrics

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


def test_metric_groups():
    assert metric_group("rl/reward_mean") == metric_group("rl/reward_std") == "rl/reward"
    assert metric_group("rl/kl") == metric_group("rl/kl_coef") == "rl/kl"
    assert metric_group("rl/response_length_mean") == "rl/response"
    assert metric_group("time/generate_s") == metric_group("time/update_s") == "time"
    assert metric_group("losses/policy") == metric_group("losses/value") == "losses"
    assert metric_group("loss") == "misc"


def write_run(run_dir, steps=6):
    with MetricsLogger(run_dir, OFF) as logger:
        for step in range(1, 4):
            logger.log(step, {"sft/loss": 2.0 / step, "time/update_s": 0.1}, stage="sft")
        for step in range(1, steps + 1):
            logger.log(step, {"rl/reward_mean": 0.1 * step, "rl/reward_std": 0.3, "rl/kl": 0.01 * step,
                              "rl/response_length": 20.0 + step, "losses/policy": -0.1, "losses/value": 1.0 / step,
                              "time/generate_s": 1.0, "time/update_s": 0.5}, stage="rl")


def test_plot_run_one_png_per_group(tmp_path):
    write_run(tmp_path)
    paths = plot_run(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["rl_kl.png", "rl_losses.png", "rl_response.png", "rl_reward.png", "rl_time.png",
                     "sft_loss.png", "sft_time.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots"
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(tmp_path / 'metrics.jsonl'))} not found.*tidal train"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_run(tmp_path)


def test_dashboard_is_one_png_with_the_first_panels(tmp_path):
    from tidal.common.dashboard import PANELS, plot_dashboard

    with MetricsLogger(tmp_path, LoggingConfig(wandb_mode="disabled")) as logger:
        for step in range(1, 5):
            logger.log(step, {"rl/score_mean": 0.1 * step, "rl/kl": 0.01 * step, "experience/response_len": 9.0,
                              "losses/policy": -0.1, "time/generate_s": 1.0, "time/update_s": 0.5,
                              "time/step_s": 1.6, "idle/rollout": 0.4, "idle/learner": 0.6}, stage="rl")
        logger.log(4, {"eval/reward_before": 0.0, "eval/reward_after": 0.5, "eval/vader_before": 0.1,
                       "eval/vader_after": 0.3}, stage="eval")
    path = plot_dashboard(tmp_path)
    assert path == tmp_path / "dashboard.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots").exists()  # the detailed plots are plot_run's, in plots/
    assert [title for title, _ in PANELS][:3] == ["reward (training batch)", "KL to the reference (nats / sequence)",
                                                  "response length (tokens)"]
    # a run that logged none of them (an sft-only run) still gets the same page, panels saying so
    other = tmp_path / "sft"
    with MetricsLogger(other, LoggingConfig(wandb_mode="disabled")) as logger:
        logger.log(1, {"sft/loss": 2.0}, stage="sft")
    assert plot_dashboard(other).stat().st_size > 5000
