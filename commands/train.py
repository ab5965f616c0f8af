"""`tidal train`: a new run, or `--resume RUN` of an earlier one; the job itself is tidal.driver.job.

`tidal train --resume RUN [algorithm.steps=N logging.*=... cluster.*=...]` re-reads RUN/config.yaml
(a resume may extend the steps, change logging or where it runs; any other changed key is refused), says so and changes
nothing when every stage already finished (unless algorithm.steps grows: a run that ends in rl
goes on from its final checkpoint, `extension`), skips finished stages (their outputs are on disk),
and continues the RL stage from its newest complete checkpoint; log records written
after that checkpoint are dropped first, so the resumed run's records equal an uninterrupted
run's. A stage that was interrupted before finishing (sft, rm) restarts from its beginning.

A run folder belongs to one process (tidal.driver.run_folder): a new run gets a folder of its
own (an automatic name taken by a run started in the same second gets a -2 suffix), a resume
needs a folder tidal made, and a RUN/config.yaml edited since the run started (or since the
checkpoint the resume loads) is refused with the differences.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tidal.common.config import ConfigError, TidalConfig, load_config, to_yaml
from tidal.common.errors import UserError
from tidal.driver import checkpoint as ck
from tidal.driver.collect import WaitingForLabels
from tidal.driver.interrupt import Interrupted
from tidal.driver.job import prepare_data, run_pipeline
from tidal.driver.preflight import PreflightError, check_data, preflight
from tidal.driver.run_folder import (
    check_unchanged_config,
    claim_run_dir,
    config_record,
    forget_stage,
    is_run_folder,
    read_run_state,
    refuse_used_folder,
    rl_dir,
    stage_keys,
)
from tidal.rollout.pool import WorkersLost


def train_from_cli(config_path: str | None, overrides: list[str], resume: str | None = None,
                   verbose: bool = False) -> int:
    """Entry point of `tidal train`; returns the exit status. Every check that needs no cluster
    (config, data rows, models, reward functions, the checkpoint to resume) runs before Ray starts."""
    extend = None  # (rl round, its last step) a resume with more algorithm.steps reopens in a finished run
    if resume is not None:
        run_dir = Path(resume)
        cfg, extend = _resume_checks(run_dir, config_path, overrides)
        if cfg is None:
            return 0
    else:
        cfg = load_config(config_path, overrides)
        run_dir = new_run_dir(cfg, config_path)
    preflight(cfg, resume_dir=run_dir if resume is not None else None, files=False)  # before anything is written
    data = prepare_data(cfg)  # writes task files only where none exist
    check_data(cfg, data)  # every row the stages will read, still before Ray starts
    run_dir = claim_run_dir(run_dir, fresh=resume is None, numbered=resume is None and not cfg.logging.run_name)
    if extend is not None:  # the finished rl round goes on from its final checkpoint
        forget_stage(run_dir, extend[0])
        print(f"tidal: extending {run_dir}: {extend[0]} goes on from step {extend[1]} to {cfg.algorithm.steps}", flush=True)
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
        print(f"tidal: {_interrupted(e, run_dir)}", file=sys.stderr, flush=True)
        return 130
    except UserError as e:  # e.g. a reward function that failed: one line, and how to go on once it is fixed
        e.args = (f"{' '.join(str(e).split())} Once fixed: tidal train --resume {run_dir}",)
        raise
    except Exception as e:
        if not _worker_died(e):
            print(f"tidal: the run stopped on an error; resume with: tidal train --resume {run_dir}", file=sys.stderr)
            raise
        print(f"tidal: a worker process of the run died ({_first_line(e)}); its log is in {run_dir / 'logs'}. "
              f"Resume with: tidal train --resume {run_dir}", file=sys.stderr, flush=True)
        return 1
    return 0


def _resume_checks(run_dir: Path, config_path: str | None, overrides: list[str]
                   ) -> tuple[TidalConfig | None, tuple[str, int] | None]:
    """The config a resume continues with, after every check that writes nothing, and the rl round
    it extends with the step it ended at (a finished run with more algorithm.steps, `extension`);
    (None, None) when the run already finished and nothing is to be done (said on the console)."""
    if config_path is not None:
        raise ConfigError(f"--resume {run_dir} continues with {run_dir}/config.yaml; drop {config_path} "
                          f"(overrides of algorithm.steps, logging.* and cluster.* are allowed).")
    if not is_run_folder(run_dir):
        claim_run_dir(run_dir, fresh=False)  # raises: names what a run folder holds
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; pass the run directory of an earlier `tidal train`.")
    cfg = resume_config(run_dir, overrides)
    check_unchanged_config(run_dir, cfg)
    done = read_run_state(run_dir)["stages"]
    if all(key in done for _, key, _ in stage_keys(cfg.stages.run)):
        old_steps = load_config(run_dir / "config.yaml").algorithm.steps
        if cfg.algorithm.steps != old_steps:
            return cfg, (extension(run_dir, cfg, old_steps), old_steps)  # raises when the run cannot go on
        print(f"tidal: run {run_dir} already finished (stages {', '.join(done)}); nothing to do. "
              f"Its results: {run_dir / 'summary.json'}", flush=True)
        return None, None
    return cfg, None


def _interrupted(e: BaseException, run_dir: Path) -> str:
    """What a stop by Ctrl-C / SIGTERM kept, and how to go on: a checkpoint is promised only
    when one exists."""
    if isinstance(e, Interrupted):
        kept = "; checkpoint written" if e.checkpointed else ""
        return (f"interrupted ({e.signal_name}) after rl step {e.step} of {e.total}{kept}. "
                f"Resume with: tidal train --resume {run_dir}")
    name = str(e) if str(e).startswith("SIG") else "SIGINT"
    newest = max((p for p in run_dir.rglob("checkpoints/latest")), default=None, key=lambda p: p.stat().st_mtime)
    done = list(read_run_state(run_dir)["stages"])
    if newest is not None:
        kept = f"the newest checkpoint is {newest.parent / newest.read_text().strip()}"
    elif done:
        kept = f"stages {', '.join(done)} finished; the next one restarts"
    else:
        kept = "no stage finished and no checkpoint was written: the resumed run starts from its beginning"
    return f"interrupted ({name}) before the next checkpoint; {kept}. Resume with: tidal train --resume {run_dir}"


def _worker_died(e: BaseException | None) -> bool:
    """Whether an error is, or was caused by, a Ray actor's process ending (kill -9, out of memory)."""
    from tidal.actors.actor_group import is_actor_death

    while e is not None:
        if is_actor_death(e) and not getattr(e, "actor_init_failed", False):
            return True
        e = e.__cause__
    return False


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


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
    before, after = config_record(old), config_record(new)
    refused = [k for k in after if before.get(k) != after[k]]
    if refused:
        raise ConfigError(f"--resume {run_dir}: {refused[0]} cannot change on resume (the resumed run must continue "
                          f"the same way); only algorithm.steps and logging.* can. Start a new run to change it.")
    return new


def default_run_name(config_path: str | None) -> str:
    """The run directory's name when logging.run_name is unset: the config's name and the time."""
    return f"{Path(config_path).stem if config_path else 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(cfg: TidalConfig, config_path: str | None) -> Path:
    """Where a new run goes: logging.output_dir / (logging.run_name, or CONFIG-STEM-<time>). A named
    folder that is in use is refused here, before anything is written; the folder itself is
    created and locked later (claim_run_dir), when the checks have passed."""
    run_dir = Path(cfg.logging.output_dir) / (cfg.logging.run_name or default_run_name(config_path))
    if cfg.logging.run_name:
        refuse_used_folder(run_dir)
    return run_dir
