"""`tidal train`: a new run, or `--resume RUN` of an earlier one; the job itself is tidal.driver.job.

`tidal train --resume RUN [algorithm.steps=N logging.*=... cluster.*=...]` re-reads RUN/config.yaml
(a resume may extend the steps, change logging or where it runs; any other changed key is refused), says so and changes
nothing when every stage already finished (unless algorithm.steps grows: a run that ends in rl
goes on from its final checkpoint, `extension`), skips finished stages (their outputs are on disk),
and continues the RL stage from its newest complete checkpoint; log records written
after that checkpoint are dropped first, so the resumed run's records equal an uninterrupted
run's. A stage that was interrupted before finishing (sft, rm) restarts from its beginning.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tidal.common.config import ConfigError, TidalConfig, load_config, to_dict, to_yaml
from tidal.common.metrics import METRICS_FILE
from tidal.driver import checkpoint as ck
from tidal.driver.collect import WaitingForLabels
from tidal.driver.interrupt import Interrupted
from tidal.driver.job import prepare_data, run_pipeline
from tidal.driver.preflight import PreflightError, check_data, preflight
from tidal.driver.run_folder import forget_stage, read_run_state, rl_dir, stage_keys
from tidal.rollout.pool import WorkersLost

# What a resume may change without breaking exactness: the length, the logging, and where the run
# runs (a node died: resume on the nodes left); generation is seeded per prompt, not per worker.
RESUMABLE_KEYS = ("algorithm.steps", "logging.", "cluster.")


def train_from_cli(config_path: str | None, overrides: list[str], resume: str | None = None,
                   verbose: bool = False) -> int:
    """Entry point of `tidal train`; returns the exit status. Every check that needs no cluster
    (config, data rows, models, reward functions, the checkpoint to resume) runs before Ray starts."""
    extend = None  # the rl round a resume with more algorithm.steps reopens in a finished run
    if resume is not None:
        if config_path is not None:
            raise ConfigError(f"--resume {resume} continues with {resume}/config.yaml; drop {config_path} "
                              f"(overrides of algorithm.steps, logging.* and cluster.* are allowed).")
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; pass the run directory of an earlier `tidal train`.")
        cfg = resume_config(run_dir, overrides)
        done = read_run_state(run_dir)["stages"]
        old_steps = load_config(run_dir / "config.yaml").algorithm.steps
        if all(key in done for _, key, _ in stage_keys(cfg.stages.run)):
            if cfg.algorithm.steps == old_steps:
                print(f"tidal: run {run_dir} already finished (stages {', '.join(done)}); nothing to do. "
                      f"Its results: {run_dir / 'summary.json'}", flush=True)
                return 0
            extend = extension(run_dir, cfg, old_steps)  # raises when the run cannot go on
    else:
        cfg = load_config(config_path, overrides)
        run_dir = new_run_dir(cfg, config_path)
    preflight(cfg, resume_dir=run_dir if resume is not None else None, files=False)  # before anything is written
    data = prepare_data(cfg)  # writes task files only where none exist
    check_data(cfg, data)  # every row the stages will read, still before Ray starts
    if extend is not None:  # the finished rl round goes on from its final checkpoint
        forget_stage(run_dir, extend)
        print(f"tidal: extending {run_dir}: {extend} goes on from step {old_steps} to {cfg.algorithm.steps}", flush=True)
    if resume is not None and overrides:
        ck.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))  # a later resume continues with these
    try:
        run_pipeline(cfg, run_dir, resume=resume is not None, data=data, verbose=verbose)
    except WaitingForLabels as e:  # not an error: the run goes on once people have labeled
        print(f"tidal: {e}", flush=True)
        return 0
    except WorkersLost as e:  # not the user's input, nor a bug: the cluster lost the nodes of a role
        ckpt = ck.latest_checkpoint(run_dir)
        how = (f"tidal submit --resume {run_dir.absolute()} --address http://HEAD:8265" if os.environ.get(
            "RAY_JOB_CONFIG_JSON_ENV_VAR") else f"tidal train --resume {run_dir}")  # a Ray job, or not
        print(f"tidal: error: {e}. The run stopped{f' (newest checkpoint {ckpt})' if ckpt else ''}. Once the cluster "
              f"has room for them again (or with cluster.* overrides that fit the nodes left), continue with: {how}",
              file=sys.stderr, flush=True)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        done = "; checkpoint written" if isinstance(e, Interrupted) and e.checkpointed else ""
        where = f"after rl step {e.step} of {e.total}" if isinstance(e, Interrupted) else "before its next checkpoint"
        print(f"tidal: interrupted ({e.signal_name if isinstance(e, Interrupted) else 'SIGINT'}) {where}{done}. "
              f"Resume with: tidal train --resume {run_dir}", file=sys.stderr, flush=True)
        return 130
    return 0


def extension(run_dir: Path, cfg: TidalConfig, old_steps: int) -> str:
    """The rl round that `--resume RUN algorithm.steps=N` reopens in a finished run: the run's
    last stage, ended at its final checkpoint (step `old_steps`), from which it continues as an
    unfinished run would. Refused (one line) where continuing would not be the same run going on."""
    why = f"--resume {run_dir} algorithm.steps={cfg.algorithm.steps}"
    stage, key, round_ = stage_keys(cfg.stages.run)[-1]
    record = read_run_state(run_dir)["stages"][key]
    if stage != "rl":
        raise PreflightError(f"{why}: the run's last stage is {key}, not rl; only a run that ends in rl can be "
                             f"extended. Start a new run from it with model.policy={run_dir / 'policy'}.")
    if cfg.algorithm.steps < old_steps:
        raise PreflightError(f"{why}: the run already finished {old_steps} steps; extend it with algorithm.steps > "
                             f"{old_steps}.")
    if record.get("summary", {}).get("early_stop"):
        raise PreflightError(f"{why}: {key} stopped early ({record['summary']['early_stop']['reason']}, "
                             f"algorithm.early_stop) and its policy is not its last step's; start a new run from it.")
    latest = ck.resume_checkpoint(rl_dir(run_dir, round_))
    if latest is None or int(latest.name.split("-")[1]) != old_steps:
        raise PreflightError(f"{why}: {key} has no checkpoint of its final step {old_steps} to continue from; start a "
                             f"new run from it with model.policy={run_dir / 'policy'}.")
    if cfg.learner.lr_schedule == "linear":  # the decay's horizon moves to the new end (learner.engine.linear_lr)
        print(f"tidal: note: learner.lr_schedule=linear: the learning rate goes on at "
              f"{1 - old_steps / cfg.algorithm.steps:.2f} x learner.lr and decays to 0 at step {cfg.algorithm.steps}",
              flush=True)
    return key


def resume_config(run_dir: Path, overrides: list[str]) -> TidalConfig:
    """RUN/config.yaml with the overrides a resume allows; any other changed key is refused by name."""
    old = load_config(run_dir / "config.yaml")
    new = load_config(run_dir / "config.yaml", overrides)
    changed = [k for k, v in _leaves(to_dict(new)).items() if _leaves(to_dict(old)).get(k) != v]
    refused = [k for k in changed if not k.startswith(RESUMABLE_KEYS)]
    if refused:
        raise ConfigError(f"--resume {run_dir}: {refused[0]} cannot change on resume (the resumed run must continue "
                          f"the same way); only algorithm.steps, logging.* and cluster.* can. Start a new run to change it.")
    return new


def _leaves(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def default_run_name(config_path: str | None) -> str:
    """The run directory's name when logging.run_name is unset: the config's name and the time."""
    return f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(cfg: TidalConfig, config_path: str | None) -> Path:
    name = cfg.logging.run_name or default_run_name(config_path)
    run_dir = Path(cfg.logging.output_dir) / name
    if (run_dir / METRICS_FILE).is_file() and (run_dir / METRICS_FILE).stat().st_size > 0:
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with `tidal train --resume {run_dir}` "
                          f"or choose another logging.run_name.")
    return run_dir
