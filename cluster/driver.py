"""`tidal train`: the stage runner. Runs `stages.run` in order, each stage feeding the next:

    sft  fine-tunes model.policy on demonstrations      -> RUN/sft/   (HF folder)
    rm   trains a reward model (policy backbone + head)  -> RUN/reward_model/
    rl   PPO / GRPO / RLOO / REINFORCE from the policy   -> RUN/policy/ (HF folder, vLLM-loadable)
         (SFT model = reference and initial policy; reward model = reward worker and critic init)

Run directory (logging.output_dir / logging.run_name): config.yaml, metrics.jsonl, wandb files,
run_state.json (finished stages), checkpoints/, rollouts.jsonl (prompt indices per step),
samples_before.jsonl / samples_after.jsonl (held-out completions with reward-model and VADER
scores), summary.json, dashboard.png (the first look), plots/ (every metric group).

Before Ray starts, `cluster.preflight` checks the config, every data row the stages read, the
models, user reward functions and (on resume) the checkpoint files; a user error stops there.

`tidal train --resume RUN [algorithm.steps=N logging.*=...]` re-reads RUN/config.yaml (a resume
may extend the steps or change logging; any other changed key is refused), says so and changes
nothing when every stage already finished, skips finished stages (their outputs are on disk), and continues the RL stage from its newest complete checkpoint; log records written
after that checkpoint are dropped first, so the resumed run's records equal an uninterrupted
run's. A stage that was interrupted before finishing (sft, rm) restarts from its beginning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tidal.cluster import checkpoint as ck
from tidal.cluster.preflight import (TASK_MARKER, DataPaths, PreflightError, check_data, data_paths, preflight,
                                    task_folder_state, task_marker)
from tidal.cluster.runtime import connect, disconnect
from tidal.common.config import ConfigError, TidalConfig, load_config, to_dict, to_yaml
from tidal.common.metrics import METRICS_FILE, MetricsLogger


RESUMABLE_KEYS = ("algorithm.steps", "logging.")  # what a resume may change without breaking exactness


def train_from_cli(config_path: str | None, overrides: list[str], resume: str | None = None) -> int:
    """Entry point of `tidal train`; returns the exit status. Every check that needs no cluster
    (config, data rows, models, reward functions, the checkpoint to resume) runs before Ray starts."""
    if resume is not None:
        if config_path is not None:
            raise ConfigError(f"--resume {resume} continues with {resume}/config.yaml; drop {config_path} "
                              f"(overrides of algorithm.steps and logging.* are allowed).")
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; pass the run directory of an earlier `tidal train`.")
        cfg = resume_config(run_dir, overrides)
        done = ck.read_run_state(run_dir)["stages"]
        if all(stage in done for stage in cfg.stages.run):
            if "rl" in done and cfg.algorithm.steps != load_config(run_dir / "config.yaml").algorithm.steps:
                raise PreflightError(f"--resume {run_dir}: the run finished its rl stage, whose learning-rate schedule has "
                                     f"ended; extend a run before it finishes, or start a new one from it with "
                                     f"model.policy={run_dir / 'policy'}.")
            print(f"tidal: run {run_dir} already finished (stages {', '.join(done)}); nothing to do. "
                  f"Its results: {run_dir / 'summary.json'}", flush=True)
            return 0
    else:
        cfg = load_config(config_path, overrides)
        run_dir = new_run_dir(cfg, config_path)
    preflight(cfg, resume_dir=run_dir if resume is not None else None, files=False)  # before anything is written
    data = prepare_data(cfg)  # writes task files only where none exist
    check_data(cfg, data)  # every row the stages will read, still before Ray starts
    if resume is not None and overrides:
        ck.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))  # a later resume continues with these
    run_pipeline(cfg, run_dir, resume=resume is not None, data=data)
    return 0


def resume_config(run_dir: Path, overrides: list[str]) -> TidalConfig:
    """RUN/config.yaml with the overrides a resume allows; any other changed key is refused by name."""
    old = load_config(run_dir / "config.yaml")
    new = load_config(run_dir / "config.yaml", overrides)
    changed = [k for k, v in _leaves(to_dict(new)).items() if _leaves(to_dict(old)).get(k) != v]
    refused = [k for k in changed if not k.startswith(RESUMABLE_KEYS)]
    if refused:
        raise ConfigError(f"--resume {run_dir}: {refused[0]} cannot change on resume (the resumed run must continue "
                          f"the same way); only algorithm.steps and logging.* can. Start a new run to change it.")
    return new


def _leaves(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def new_run_dir(cfg: TidalConfig, config_path: str | None) -> Path:
    name = cfg.logging.run_name or f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.output_dir) / name
    if (run_dir / METRICS_FILE).is_file() and (run_dir / METRICS_FILE).stat().st_size > 0:
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with `tidal train --resume {run_dir}` "
                          f"or choose another logging.run_name.")
    return run_dir


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


def _forget_unfinished(run_dir: Path) -> None:
    """Resume: drop log records of unfinished stages and of RL steps after the last checkpoint."""
    done = set(ck.read_run_state(run_dir)["stages"])
    latest = ck.latest_checkpoint(run_dir)
    rl_step = int(latest.name.split("-")[1]) if latest is not None else -1  # -1: redo the whole stage
    ck.truncate_jsonl(run_dir / METRICS_FILE,
                      lambda r: r.get("stage") in done or (r.get("stage") == "rl" and r.get("step", 0) <= rl_step))
    ck.truncate_jsonl(run_dir / "rollouts.jsonl", lambda r: "rl" in done or r["step"] <= rl_step)


def run_pipeline(cfg: TidalConfig, run_dir: Path, resume: bool = False, data: DataPaths | None = None) -> dict:
    """Run (or continue) every stage of `cfg` in `run_dir`; returns the RL summary ({} without rl)."""
    from tidal.cluster.placement import plan_placement, role_counts
    from tidal.common.models import resolve_model

    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _forget_unfinished(run_dir)
    else:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = data or prepare_data(cfg)
    plan = plan_placement(cfg, role_counts(cfg, reference=True, reward_model=False))
    conn = connect(cfg.cluster, min_cpus=plan.total_cpus + cfg.reward.num_workers)
    logger = MetricsLogger(run_dir, cfg.logging, to_dict(cfg), total_steps=cfg.algorithm.steps, resume=resume)
    t0 = time.perf_counter()
    summary: dict = {}
    try:
        done = ck.read_run_state(run_dir)["stages"]
        policy = str(resolve_model(cfg.model.policy))
        reward_model = str(resolve_model(cfg.model.reward)) if cfg.model.reward else None
        for stage in cfg.stages.run:
            if stage in done:
                print(f"tidal: stage {stage} already finished ({done[stage]['output']})", flush=True)
            elif stage == "sft":
                from tidal.cluster.stages import run_sft

                ck.mark_stage_done(run_dir, "sft", {"output": run_sft(cfg, run_dir, logger, data, policy)})
            elif stage == "rm":
                from tidal.cluster.stages import run_rm

                base = str(resolve_model(cfg.stages.rm.base)) if cfg.stages.rm.base else policy
                ck.mark_stage_done(run_dir, "rm", {"output": run_rm(cfg, run_dir, logger, data, base)})
            else:
                from tidal.cluster.rl_stage import run_rl

                summary = run_rl(cfg, run_dir, logger, data, policy, reward_model)
                ck.mark_stage_done(run_dir, "rl", {"output": str(run_dir / "policy"), "summary": summary})
            done = ck.read_run_state(run_dir)["stages"]
            if stage == "sft":
                policy = done["sft"]["output"]
            elif stage == "rm":
                reward_model = done["rm"]["output"]
            elif stage == "rl":
                summary = done["rl"].get("summary", summary)
    finally:
        logger.close()
        disconnect(conn)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    _finish(run_dir, summary)
    return summary


def _finish(run_dir: Path, summary: dict) -> None:
    from tidal.common.dashboard import plot_dashboard
    from tidal.common.metrics import plot_run

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
    for key in ("train_kl_last", "kl_coef_last", "wall_time_s"):
        if key in summary:
            lines.append(f"{key:<22}{summary[key]:>12}")
    return "\n".join(lines)
