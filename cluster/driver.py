"""`tidal train`: the stage runner. Runs `stages.run` in order, each stage feeding the next:

    sft  fine-tunes model.policy on demonstrations      -> RUN/sft/   (HF folder)
    rm   trains a reward model (policy backbone + head)  -> RUN/reward_model/
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
from tidal.cluster.collect import WaitingForLabels
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


def train_from_cli(config_path: str | None, overrides: list[str], resume: str | None = None,
                   verbose: bool = False) -> int:
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
        run_pipeline(cfg, run_dir, resume=resume is not None, verbose=verbose)
    except WaitingForLabels as e:  # not an error: the run goes on once people have labeled
        print(f"tidal: {e}", flush=True)
        return 0
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


def stage_keys(run: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """(stage, key, round) of each entry of stages.run: the k-th occurrence of a stage is its
    round k, recorded under key 'rm', 'rm2', 'rm3', ... (run_state.json, metrics' stage field)."""
    seen: dict[str, int] = {}
    out = []
    for stage in run:
        seen[stage] = seen.get(stage, 0) + 1
        out.append((stage, stage if seen[stage] == 1 else f"{stage}{seen[stage]}", seen[stage]))
    return out


def rl_dir(run_dir: Path, round_: int) -> Path:
    """Where an rl round keeps its checkpoints, rollouts, samples and policy."""
    return run_dir if round_ == 1 else run_dir / f"round-{round_}"


def _forget_unfinished(cfg: TidalConfig, run_dir: Path) -> None:
    """Resume: drop log records of unfinished stages and of RL steps after the last checkpoint."""
    done = set(ck.read_run_state(run_dir)["stages"])
    rl_steps = {}  # unfinished rl key -> its newest checkpoint's step (-1: redo the whole stage)
    for stage, key, round_ in stage_keys(cfg.stages.run):
        if stage == "rl" and key not in done:
            latest = ck.latest_checkpoint(rl_dir(run_dir, round_))
            rl_steps[key] = int(latest.name.split("-")[1]) if latest is not None else -1
            ck.truncate_jsonl(rl_dir(run_dir, round_) / "rollouts.jsonl", lambda r, k=key: r["step"] <= rl_steps[k])
    ck.truncate_jsonl(run_dir / METRICS_FILE, lambda r: r.get("stage") in done or (
        r.get("stage") in rl_steps and r.get("step", 0) <= rl_steps[r["stage"]]))


@dataclass
class _Models:
    """What the stages so far produced: each stage starts from these."""

    policy: str  # the current policy (initial, after sft, after each rl round)
    reference: str  # the frozen reference and KL anchor (the initial policy after sft)
    reward_model: str | None
    feedback: dict | None = None  # the last collect round's record (its exports)


def run_pipeline(cfg: TidalConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> dict:
    """Run (or continue) every stage of `cfg` in `run_dir`; returns the RL summary ({} without rl)."""
    from tidal.actors.placement import plan_placement, role_counts
    from tidal.common.models import resolve_model

    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _forget_unfinished(cfg, run_dir)
    else:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = prepare_data(cfg)
    plan = plan_placement(cfg, role_counts(cfg, reference=True))
    if not verbose:
        quiet_libraries()
    conn = connect(cfg.cluster, min_cpus=plan.total_cpus, verbose=verbose)
    if not verbose and conn.temp_dir is not None:
        print(f"tidal: worker and engine logs go to {run_dir / 'logs' / 'ray'} (--verbose shows them here)", flush=True)
    logger = MetricsLogger(run_dir, cfg.logging, to_dict(cfg), total_steps=cfg.algorithm.steps, resume=resume)
    t0 = time.perf_counter()
    summary: dict = {}
    stops = StopRequests().__enter__()  # Ctrl-C / SIGTERM: stop at a safe point (tidal.cluster.interrupt)
    try:
        policy = str(resolve_model(cfg.model.policy))
        models = _Models(policy, policy, str(resolve_model(cfg.model.reward)) if cfg.model.reward else None)
        for stage, key, round_ in stage_keys(cfg.stages.run):
            done = ck.read_run_state(run_dir)["stages"]
            if key in done:
                print(f"tidal: stage {key} already finished ({done[key]['output']})", flush=True)
            else:
                ck.mark_stage_done(run_dir, key, _run_stage(cfg, run_dir, logger, data, models, stage, key, round_, stops))
            record = ck.read_run_state(run_dir)["stages"][key]
            if stage == "sft":
                models.policy = models.reference = record["output"]
            elif stage == "rm":
                models.reward_model = record["output"]
            elif stage == "collect":
                models.feedback = record
            else:
                models.policy = record["output"]
                summary = {**record.get("summary", {}), "rounds": {**summary.get("rounds", {}), key: record.get("summary", {})}}
    finally:
        logger.close()
        disconnect(conn, logs_to=run_dir / "logs" / "ray")
        stops.__exit__(None, None, None)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    _finish(run_dir, summary)
    return summary


def _run_stage(cfg: TidalConfig, run_dir: Path, logger: MetricsLogger, data, models: _Models, stage: str, key: str,
               round_: int, stops: StopRequests) -> dict:
    """Run one stage; returns its run_state record ({"output": ..., ...})."""
    from tidal.common.models import resolve_model

    if stage == "sft":
        from tidal.cluster.stages import run_sft

        return {"output": run_sft(cfg, run_dir, logger, data, models.policy)}
    if stage == "rm":
        from tidal.cluster.stages import run_rm

        if round_ > 1 and models.reward_model:  # refresh the previous reward model on the new labels
            base = models.reward_model
        else:
            base = str(resolve_model(cfg.stages.rm.base)) if cfg.stages.rm.base else models.policy
        out = "reward_model" if round_ == 1 else f"reward_model-{round_}"
        return {"output": run_rm(cfg, run_dir, logger, data, base, out_name=out, stage=key, feedback=models.feedback)}
    if stage == "collect":
        from tidal.cluster.collect import run_collect

        return run_collect(cfg, run_dir, logger, data, models.policy, round_, key)
    from tidal.cluster.rl_stage import run_rl

    where = rl_dir(run_dir, round_)
    summary = run_rl(cfg, where, logger, data, models.policy, models.reward_model, stops, reference=models.reference,
                     stage=key)
    return {"output": str(where / "policy"), "summary": summary}


def quiet_libraries() -> None:
    """Library chatter in the driver (model load reports, progress bars of transformers) off the
    console; tidal's own banners, progress bar, warnings and final table stay."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


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
