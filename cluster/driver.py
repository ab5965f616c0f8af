"""`tidal train`: the stage runner. Runs `stages.run` in order, each stage feeding the next:

    sft  fine-tunes model.policy on demonstrations      -> RUN/sft/   (HF folder)
    rm   trains a reward model (policy backbone + head)  -> RUN/reward_model/
    dpo  DPO/IPO on preference pairs from the policy     -> RUN/policy_dpo/ (reference = the policy it starts from)
    rl   PPO / GRPO / RLOO / REINFORCE from the policy   -> RUN/policy/ (HF folder, vLLM-loadable)
         (SFT model = reference and initial policy; reward model = reward worker and critic init)
    collect  samples of the current policy, labeled      -> RUN/feedback-<k>/ (tidal.cluster.collect)
Stages may repeat (iterative RLHF: [sft, rm, rl, collect, rm, rl]); the k-th round of a stage is
recorded as 'rm2', 'rl2', ... and writes RUN/reward_model-<k>/, RUN/round-<k>/.

Run directory (logging.output_dir / logging.run_name): config.yaml, metrics.jsonl, wandb files,
run_state.json (finished stages), checkpoints/, rollouts.jsonl (prompt indices per step),
samples_before.jsonl / samples_after.jsonl (held-out completions with reward-model and VADER
scores), summary.json, dashboard.png (the first look), plots/ (every metric group).

Before Ray starts, `cluster.preflight` checks the config, every data row the stages read, the
models, user reward functions and (on resume) the checkpoint files; a user error stops there.

`tidal train --resume RUN [algorithm.steps=N logging.*=...]` re-reads RUN/config.yaml (a resume
may extend the steps or change logging; any other changed key is refused), says so and changes
nothing when every stage already finished, skips finished stages (their outputs are on disk),
and continues the RL stage from its newest complete checkpoint; log records written
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
from tidal.cluster.preflight import (TASK_MARKER, DataPaths, PreflightError, check_data, data_paths, preflight,
                                    task_folder_state, task_marker)
from tidal.cluster.runtime import connect, disconnect
from tidal.common.config import ConfigError, TidalConfig, load_config, to_dict, to_yaml
from tidal.common.metrics import METRICS_FILE, MetricsLogger


RESUMABLE_KEYS = ("algorithm.steps", "logging.")  # what a resume may change without breaking exactness


def train_from_cli(config_path: str | None, overrides: list[str], resume: str | None = None,
                   verbose: bool = False) -> int:
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
        if all(key in done for _, key, _ in stage_keys(cfg.stages.run)):
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
    try:
        run_pipeline(cfg, run_dir, resume=resume is not None, data=data, verbose=verbose)
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
            latest = ck.resume_checkpoint(rl_dir(run_dir, round_))  # the one RLLoop.restore loads
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


def run_pipeline(cfg: TidalConfig, run_dir: Path, resume: bool = False, data: DataPaths | None = None,
                 verbose: bool = True) -> dict:
    """Run (or continue) every stage of `cfg` in `run_dir`; returns the RL summary ({} without rl)."""
    from tidal.actors.placement import plan_placement, role_counts
    from tidal.common.models import resolve_model

    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        _forget_unfinished(cfg, run_dir)
    else:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    data = data or prepare_data(cfg)
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
            elif stage == "dpo":  # a later rl stage starts from (and is anchored to) the DPO policy
                models.policy = models.reference = record["output"]
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
    if stage == "dpo":
        from tidal.cluster.stages import run_dpo

        return {"output": run_dpo(cfg, run_dir, logger, data, models.policy)}
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
    import warnings

    # Tensors fetched zero-copy from Ray's object store are read-only views; tidal copies the ones
    # it writes to, so torch's one-time warning about non-writable arrays is noise on the console.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


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
