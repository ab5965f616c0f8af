"""The job: the stage runner behind `tidal train` (tidal.commands.train). Runs `stages.run` in order, each stage feeding the next:

    sft  fine-tunes model.policy on demonstrations      -> RUN/sft/   (HF folder)
    rm   trains a reward model (policy backbone + head)  -> RUN/reward_model/
    dpo  DPO/IPO on preference pairs from the policy     -> RUN/policy_dpo/ (reference = the policy it starts from)
    rl   PPO / GRPO / RLOO / REINFORCE from the policy   -> RUN/policy/ (HF folder, vLLM-loadable)
         (SFT model = reference and initial policy; reward model = reward worker and critic init)
    collect  samples of the current policy, labeled      -> RUN/feedback-<k>/ (tidal.driver.collect)
Stages may repeat (iterative RLHF: [sft, rm, rl, collect, rm, rl]); the k-th round of a stage is
recorded as 'rm2', 'rl2', ... and writes RUN/reward_model-<k>/, RUN/round-<k>/.

Run directory (logging.output_dir / logging.run_name): config.yaml, metrics.jsonl, wandb files,
run_state.json (finished stages), checkpoints/, rollouts.jsonl (prompt indices per step),
samples_before.jsonl / samples_after.jsonl (held-out completions with reward-model and VADER
scores), summary.json, dashboard.png (the first look), plots/ (every metric group),
placement.json (the node each role's actors run on).

Before Ray starts, `tidal.driver.preflight` checks the config, every data row the stages read, the
models, user reward functions and (on resume) the checkpoint files; a user error stops there.

A resume (tidal.commands.train) re-enters `run_pipeline` with resume=True: finished stages are
skipped, log records after the RL stage's newest checkpoint are dropped first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tidal.driver import checkpoint as ck
from tidal.driver.checks import reward_learner_cpus
from tidal.driver.interrupt import StopRequests
from tidal.driver.preflight import (TASK_MARKER, DataPaths, data_paths, task_folder_state, task_marker)
from tidal.driver.runtime import ray_session
from tidal.driver.stages import STAGES, Models, StageRun
from tidal.common.config import ConfigError, TidalConfig, to_dict, to_yaml
from tidal.common.metrics import METRICS_FILE, MetricsLogger
from tidal.driver.run_folder import (claim_run_dir, mark_stage_done, read_run_state, release_run_dir, rl_dir,
                                     stage_keys, start_run_state)


def prepare_data(cfg: TidalConfig) -> DataPaths:
    """Paths of every dataset. The built-in task is written only where that overwrites nothing:
    into a missing or empty data.data_dir, or (in a folder with tidal's task.json marker) as the
    files that are missing. A folder with files but no marker is the user's: used as it is."""
    state = task_folder_state(cfg)
    if state in ("generate", "owned"):
        from tidal.common.data import write_records
        from tidal.common.sentiment import build_sentiment_task, sentiment_paths

        paths = sentiment_paths(cfg.data.data_dir)
        missing = {name: p for name, p in paths.items() if not p.exists()}
        if missing:
            for name, records in build_sentiment_task(0).items():
                if name in missing:
                    write_records(missing[name], records[:cfg.data.max_rows])
        marker = Path(cfg.data.data_dir) / TASK_MARKER
        if not marker.exists():
            ck.atomic_write_text(marker, json.dumps(task_marker(cfg)))
    data = data_paths(cfg)
    for name in ("prompts", "eval_prompts", "demonstrations", "comparisons", "rankings"):
        explicit = getattr(cfg.data, name)
        if explicit is not None and not Path(explicit).is_file():
            raise ConfigError(f"data.{name}={explicit}: no such file (check the data.* paths).")
    return data


def _forget_unfinished(cfg: TidalConfig, run_dir: Path) -> None:
    """Resume: drop log records of unfinished stages and of RL steps after the last checkpoint."""
    done = set(read_run_state(run_dir)["stages"])
    rl_steps = {}  # unfinished rl key -> its newest checkpoint's step (-1: redo the whole stage)
    for stage, key, round_ in stage_keys(cfg.stages.run):
        if stage == "rl" and key not in done:
            latest = ck.resume_checkpoint(rl_dir(run_dir, round_))  # the one RLLoop.restore loads
            rl_steps[key] = int(latest.name.split("-")[1]) if latest is not None else -1
            ck.truncate_jsonl(rl_dir(run_dir, round_) / "rollouts.jsonl", lambda r, k=key: r["step"] <= rl_steps[k])
    ck.truncate_jsonl(run_dir / METRICS_FILE, lambda r: r.get("stage") in done or (
        r.get("stage") in rl_steps and r.get("step", 0) <= rl_steps[r["stage"]]))


def run_pipeline(cfg: TidalConfig, run_dir: Path, resume: bool = False, data: DataPaths | None = None,
                 verbose: bool = True) -> dict:
    """Run (or continue) every stage of `cfg` in `run_dir`; returns the RL summary ({} without rl).
    The folder is this process's while it runs (tidal.driver.run_folder.claim_run_dir): a new run
    needs a new or empty one, a resume one that tidal made."""
    claim_run_dir(run_dir, fresh=not resume)
    try:
        return _run_claimed(cfg, run_dir, resume, data, verbose)
    finally:
        release_run_dir(run_dir)


def _run_claimed(cfg: TidalConfig, run_dir: Path, resume: bool, data: DataPaths | None, verbose: bool) -> dict:
    from tidal.actors.placement import plan_placement, role_counts

    if resume:
        _forget_unfinished(cfg, run_dir)
    else:
        ck.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        start_run_state(run_dir, cfg)
    data = data or prepare_data(cfg)
    plan = plan_placement(cfg, role_counts(cfg, reference=True))
    t0 = time.perf_counter()
    summary: dict = {}
    with ray_session(cfg.cluster, min_cpus=plan.total_cpus + reward_learner_cpus(cfg), verbose=verbose,
                     logs_to=run_dir / "logs" / "ray"), \
            StopRequests(grace_s=cfg.logging.interrupt_grace_s) as stops:  # Ctrl-C / SIGTERM: stop at a safe point (tidal.driver.interrupt)
        logger = MetricsLogger(run_dir, cfg.logging, to_dict(cfg), total_steps=cfg.algorithm.steps, resume=resume)
        try:
            summary = _run_stages(StageRun(cfg, run_dir, logger, data, stops, resume=resume))
        finally:
            logger.close()
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    _finish(run_dir, summary)
    return summary


def _run_stages(job: StageRun) -> dict:
    """Every entry of stages.run in order (tidal.driver.stages): run it unless run_state.json
    says it finished, then hand its outputs on. Returns the summary of the rl rounds."""
    from tidal.common.models import resolve_model

    cfg, summary = job.cfg, {}
    policy = str(resolve_model(cfg.model.policy))
    models = Models(policy, policy, str(resolve_model(cfg.model.reward)) if cfg.model.reward else None)
    for stage, key, round_ in stage_keys(cfg.stages.run):
        done = read_run_state(job.run_dir)["stages"]
        if key in done:
            print(f"tidal: stage {key} already finished ({done[key]['output']})", flush=True)
        else:
            mark_stage_done(job.run_dir, key, STAGES[stage].run(job, models, key, round_))
        record = read_run_state(job.run_dir)["stages"][key]
        STAGES[stage].hand_on(models, record)
        if "summary" in record:  # an rl round: its before/after evaluation, by round
            summary = {**record["summary"], "rounds": {**summary.get("rounds", {}), key: record["summary"]}}
    return summary


def _finish(run_dir: Path, summary: dict) -> None:
    from tidal.common.dashboard import plot_dashboard, plot_run

    ck.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    try:
        plot_run(run_dir)  # every metric group, in plots/
        plot_dashboard(run_dir)  # the first look, dashboard.png
    except (FileNotFoundError, ValueError) as e:  # nothing to plot is not a failure of the run
        print(f"tidal: no plots: {e}", flush=True)
    print(format_summary(summary, run_dir), flush=True)


def format_summary(summary: dict, run_dir: Path) -> str:
    """The final table: held-out RM score, VADER and KL before and after RL."""
    lines = [f"tidal: run directory {run_dir}"]
    before, after = summary.get("before", {}), summary.get("after", {})
    if before or after:
        lines.append(f"{'held-out prompts':<22}{'before RL':>12}{'after RL':>12}")
        for key, label in (("rm_score", "reward-model score"), ("vader", "VADER sentiment"),
                           ("reward", "reward (raw)"), ("kl", "KL to reference"), ("response_len", "response tokens")):
            if key in before or key in after:
                b, a = before.get(key), after.get(key)
                fmt = lambda v: f"{v:12.3f}" if isinstance(v, (int, float)) else f"{'-':>12}"  # noqa: E731
                lines.append(f"{label:<22}{fmt(b)}{fmt(a)}")
    rounds = summary.get("rounds", {})
    if len(rounds) > 1:  # iterative RLHF: the proxy (reward model) and the gold judge, round by round
        lines.append(f"{'rl round':<10}{'RM before':>11}{'RM after':>10}{'VADER before':>14}{'VADER after':>13}{'KL':>8}")
        for name, r in rounds.items():
            b, a = r.get("before", {}), r.get("after", {})
            cell = lambda d, k, w: f"{d[k]:{w}.3f}" if isinstance(d.get(k), (int, float)) else f"{'-':>{w}}"  # noqa: E731
            lines.append(f"{name:<10}{cell(b, 'rm_score', 11)}{cell(a, 'rm_score', 10)}{cell(b, 'vader', 14)}"
                         f"{cell(a, 'vader', 13)}{cell(a, 'kl', 8)}")
    for key in ("train_kl_last", "kl_coef_last", "wall_time_s"):
        if key in summary:
            lines.append(f"{key:<22}{summary[key]:>12}")
    return "\n".join(lines)
