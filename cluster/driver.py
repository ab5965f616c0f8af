"""`tidal train`: the stage runner. Runs `stages.run` in order, each stage feeding the next:

    sft  fine-tunes model.policy on demonstrations      -> RUN/sft/   (HF folder)
    rm   trains a reward model (policy backbone + head)  -> RUN/reward_model/
    dpo  DPO/IPO on preference pairs from the policy     -> RUN/policy_dpo/ (reference = the policy it starts from)
    rl   PPO / GRPO / RLOO / REINFORCE from the policy   -> RUN/policy/ (HF folder, vLLM-loadable)
         (SFT model = reference and initial policy; reward model = reward worker and critic init)

Run directory (logging.output_dir / logging.run_name): config.yaml, metrics.jsonl, wandb files,
run_state.json (finished stages), checkpoints/, rollouts.jsonl (prompt indices per step),
samples_before.jsonl / samples_after.jsonl (held-out completions with reward-model and VADER
scores), summary.json, plots/.

`tidal train --resume RUN` re-reads RUN/config.yaml, skips finished stages (their outputs are
on disk), and continues the RL stage from its newest complete checkpoint; log records written
after that checkpoint are dropped first, so the resumed run's records equal an uninterrupted
run's. A stage that was interrupted before finishing (sft, rm) restarts from its beginning.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tidal.cluster import checkpoint as ck
from tidal.cluster.interrupt import Interrupted, StopRequests
from tidal.cluster.runtime import connect, disconnect
from tidal.common.config import ConfigError, TidalConfig, load_config, to_dict, to_yaml
from tidal.common.metrics import METRICS_FILE, MetricsLogger


@dataclass(frozen=True)
class DataPaths:
    prompts: Path | None
    eval_prompts: Path | None
    demonstrations: Path | None
    comparisons: Path | None
    comparisons_heldout: Path | None
    rankings: Path | None
    rankings_heldout: Path | None
    ptx: Path | None = None  # PPO-ptx demonstrations (algorithm.ptx_coef > 0)


def train_from_cli(config_path: str | None, overrides: list[str], resume: str | None = None) -> int:
    """Entry point of `tidal train`; returns the exit status."""
    if resume is not None:
        if config_path is not None or overrides:
            raise ConfigError(f"--resume {resume} continues with {resume}/config.yaml; drop CONFIG and overrides "
                              f"(got {config_path!r} {overrides}).")
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; pass the run directory of an earlier `tidal train`.")
        cfg = load_config(run_dir / "config.yaml")
    else:
        cfg = load_config(config_path, overrides)
        run_dir = new_run_dir(cfg, config_path)
    try:
        run_pipeline(cfg, run_dir, resume=resume is not None)
    except (Interrupted, KeyboardInterrupt) as e:
        done = "; checkpoint written" if isinstance(e, Interrupted) and e.checkpointed else ""
        where = f"after rl step {e.step} of {e.total}" if isinstance(e, Interrupted) else "before its next checkpoint"
        print(f"tidal: interrupted ({e.signal_name if isinstance(e, Interrupted) else 'SIGINT'}) {where}{done}. "
              f"Resume with: tidal train --resume {run_dir}", file=sys.stderr, flush=True)
        return 130
    return 0


def new_run_dir(cfg: TidalConfig, config_path: str | None) -> Path:
    name = cfg.logging.run_name or f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.logging.output_dir) / name
    if (run_dir / METRICS_FILE).is_file() and (run_dir / METRICS_FILE).stat().st_size > 0:
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with `tidal train --resume {run_dir}` "
                          f"or choose another logging.run_name.")
    return run_dir


def prepare_data(cfg: TidalConfig) -> DataPaths:
    """Paths of every dataset; the built-in task's files are written to data.data_dir on first use."""
    d = cfg.data
    task: dict[str, Path] = {}
    if d.task == "sentiment":
        from tidal.common.sentiment import sentiment_paths, write_sentiment_task

        task = sentiment_paths(d.data_dir)
        marker = Path(d.data_dir) / "task.json"
        want = {"task": "sentiment", "seed": 0, "max_rows": d.max_rows}
        if all(p.is_file() for p in task.values()) and marker.is_file():
            if json.loads(marker.read_text()) != want:
                raise ConfigError(f"data.data_dir={d.data_dir} holds the task built with {marker.read_text().strip()}, "
                                  f"not {want}; point data.data_dir at another folder for this data.max_rows.")
        else:
            write_sentiment_task(d.data_dir, seed=0, max_per_split=d.max_rows)
            ck.atomic_write_text(marker, json.dumps(want))

    def pick(explicit: str | None, name: str) -> Path | None:
        if explicit is not None:
            if not Path(explicit).is_file():
                raise ConfigError(f"data file {explicit} does not exist (check the data.* paths).")
            return Path(explicit)
        return task.get(name)

    return DataPaths(pick(d.prompts, "prompts_train"), pick(d.eval_prompts, "prompts_heldout"),
                     pick(d.demonstrations, "demonstrations_train"), pick(d.comparisons, "comparisons_train"),
                     task.get("comparisons_heldout"), pick(d.rankings, "rankings_train"), task.get("rankings_heldout"),
                     pick(d.ptx or d.demonstrations, "demonstrations_train") if cfg.algorithm.ptx_coef > 0 else None)


def _forget_unfinished(run_dir: Path) -> None:
    """Resume: drop log records of unfinished stages and of RL steps after the last checkpoint."""
    done = set(ck.read_run_state(run_dir)["stages"])
    latest = ck.latest_checkpoint(run_dir)
    rl_step = int(latest.name.split("-")[1]) if latest is not None else -1  # -1: redo the whole stage
    ck.truncate_jsonl(run_dir / METRICS_FILE,
                      lambda r: r.get("stage") in done or (r.get("stage") == "rl" and r.get("step", 0) <= rl_step))
    ck.truncate_jsonl(run_dir / "rollouts.jsonl", lambda r: "rl" in done or r["step"] <= rl_step)


def run_pipeline(cfg: TidalConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run (or continue) every stage of `cfg` in `run_dir`; returns the RL summary ({} without rl)."""
    from tidal.actors.placement import plan_placement, role_counts
    from tidal.common.models import resolve_model

    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _forget_unfinished(run_dir)
    else:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = prepare_data(cfg)
    plan = plan_placement(cfg, role_counts(cfg, reference=True))
    conn = connect(cfg.cluster, min_cpus=plan.total_cpus)
    logger = MetricsLogger(run_dir, cfg.logging, to_dict(cfg), total_steps=cfg.algorithm.steps, resume=resume)
    t0 = time.perf_counter()
    summary: dict = {}
    stops = StopRequests().__enter__()  # Ctrl-C / SIGTERM: stop at a safe point (tidal.cluster.interrupt)
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
            elif stage == "dpo":
                from tidal.cluster.stages import run_dpo

                ck.mark_stage_done(run_dir, "dpo", {"output": run_dpo(cfg, run_dir, logger, data, policy)})
            else:
                from tidal.cluster.rl_stage import run_rl

                summary = run_rl(cfg, run_dir, logger, data, policy, reward_model, stops)
                ck.mark_stage_done(run_dir, "rl", {"output": str(run_dir / "policy"), "summary": summary})
            done = ck.read_run_state(run_dir)["stages"]
            if stage == "sft":
                policy = done["sft"]["output"]
            elif stage == "rm":
                reward_model = done["rm"]["output"]
            elif stage == "dpo":  # a later rl stage starts from (and is anchored to) the DPO policy
                policy = done["dpo"]["output"]
            elif stage == "rl":
                summary = done["rl"].get("summary", summary)
    finally:
        logger.close()
        disconnect(conn, logs_to=run_dir / "logs" / "ray")
        stops.__exit__(None, None, None)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    _finish(run_dir, summary)
    return summary


def _finish(run_dir: Path, summary: dict) -> None:
    from tidal.common.metrics import plot_run

    ck.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    try:
        plot_run(run_dir)
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
