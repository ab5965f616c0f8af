"""The run folder: what a run directory holds and where to find it, in one place.

    RUN/run_state.json     the stages already finished and their outputs, and the config the run
                           started with (written atomically; its existence marks a folder tidal made)
    RUN/.lock              held (flock) by the one process that runs in the folder
    RUN/round-<k>/         an rl stage's round k > 1 (checkpoints, rollouts, samples, policy)
    RUN/sft/, RUN/policy/, RUN/policy_dpo/, RUN/reward_model[-k]/   stage outputs (HF folders)

Commands (`tidal eval`, `tidal generate`, `tidal label tasks`) look a run's policy, SFT model
and reward model up here, and the job records its stages here (tidal.driver.job).

One process per run folder: `claim_run_dir` creates a new run's folder with one atomic mkdir
(an automatic name that is taken, as by a run of a sweep started in the same second, moves on to
NAME-2, NAME-3, ...) and holds an exclusive flock on RUN/.lock until the process ends. The kernel
drops that lock with the process, kill -9 included, so it is never stale; a second process
pointed at the folder (the same run_name twice, two resumes) is refused with the holder's pid.
A new run needs a new or empty folder; a resume needs a folder tidal made (`is_run_folder`).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Optional

from tidal.common.config import ConfigError, TidalConfig, to_dict
from tidal.driver.checkpoint import CHECKPOINTS, atomic_write_text, latest_checkpoint

RUN_STATE = "run_state.json"
LOCK_FILE = ".lock"
# What a resume may change without breaking exactness: the length, the logging, and where the run
# runs (a node died: resume on the nodes left); generation is seeded per prompt, not per worker.
RESUMABLE_KEYS = ("algorithm.steps", "logging.", "cluster.")
POLICY_FOLDERS = ("policy", "policy_dpo")  # what a run directory's final policy is called, by stage
POLICY_STAGES = ("sft", "dpo", "rl")  # the stages whose output is a policy


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


def read_run_state(run_dir: str | Path) -> dict[str, Any]:
    """{'stages': {'sft': {'output': path, ...}, ...}} for a run, or an empty state."""
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def is_run_folder(run_dir: Path) -> bool:
    """A folder a `tidal train` made: it holds run_state.json (written when the run starts) or a
    complete checkpoint. A folder that merely holds a config.yaml (a user's project) is not."""
    return (run_dir / RUN_STATE).is_file() or latest_checkpoint(run_dir) is not None


# ----------------------------------------------------------------------------- one process per run

_HELD: dict[str, int] = {}  # resolved run folder -> descriptor of its flocked .lock (this process)


def lock_run_dir(run_dir: Path) -> None:
    """Hold RUN/.lock until the process ends (or `release_run_dir`); a folder held by another
    process is a ConfigError naming its pid. Holding it twice in one process is a no-op."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"run directory {run_dir} is in use by another tidal process (pid {holder}); wait for it "
                          f"to end, or give this run another logging.run_name.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def refuse_used_folder(run_dir: Path) -> None:
    """A new run's folder must be new or empty (but for our own lock file); names what is there."""
    found = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []
    if not found:
        return
    if is_run_folder(run_dir) or {"config.yaml", "metrics.jsonl", CHECKPOINTS} & set(found):
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with `tidal train --resume "
                          f"{run_dir}` or choose another logging.run_name.")
    raise ConfigError(f"run directory {run_dir} is not empty ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}) "
                      f"and tidal writes a new run only into a new or empty folder; choose another logging.run_name "
                      f"or logging.output_dir.")


def claim_run_dir(run_dir: Path, fresh: bool, numbered: bool = False) -> Path:
    """Lock the folder a process runs in and return it. fresh: a new run, in a folder created
    here (numbered: the first free one of NAME, NAME-2, ... by atomic mkdir) or an empty one;
    else a resume, of a folder tidal made."""
    run_dir = Path(run_dir)
    if not fresh:
        if not is_run_folder(run_dir):
            raise ConfigError(f"--resume {run_dir}: not a run folder tidal made (no {RUN_STATE}, no complete "
                              f"checkpoint); pass the run directory of an earlier `tidal train` "
                              f"(logging.output_dir/NAME).")
        lock_run_dir(run_dir)
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if numbered and str(run_dir.resolve()) not in _HELD:
        for k in itertools.count(1):
            candidate = run_dir if k == 1 else run_dir.with_name(f"{run_dir.name}-{k}")
            try:
                candidate.mkdir()
                run_dir = candidate
                break
            except FileExistsError:
                continue
    run_dir.mkdir(exist_ok=True)
    lock_run_dir(run_dir)
    try:
        refuse_used_folder(run_dir)
    except ConfigError:
        release_run_dir(run_dir)
        raise
    return run_dir


# ----------------------------------------------------------------------------- the config a run continues with


def config_record(cfg: TidalConfig) -> dict[str, Any]:
    """The settings a resume must find unchanged: every leaf key but RESUMABLE_KEYS, as JSON values."""
    def leaves(tree, prefix: str = "") -> dict:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}

    record = {k: v for k, v in leaves(to_dict(cfg)).items() if not k.startswith(RESUMABLE_KEYS)}
    return json.loads(json.dumps(record))


def config_fingerprint(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each setting that differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_unchanged_config(run_dir: Path, cfg: TidalConfig) -> None:
    """A resume continues with exactly the settings the run started with: `cfg` (RUN/config.yaml,
    perhaps edited by hand, with the resume's overrides) is compared with the record in
    run_state.json and with the one in the checkpoint each unfinished rl round continues from.
    A difference outside RESUMABLE_KEYS is a ConfigError listing it (a hand-edited learning rate
    would take effect while the KL controller came back from the checkpoint: half applied)."""
    from tidal.driver.checkpoint import resume_checkpoint

    now = config_record(cfg)
    recorded = [("the run started", read_run_state(run_dir).get("config"))]
    done = read_run_state(run_dir)["stages"]
    for stage, key, round_ in stage_keys(cfg.stages.run):
        ckpt = resume_checkpoint(rl_dir(run_dir, round_)) if stage == "rl" and key not in done else None
        if ckpt is not None:
            extra = json.loads((ckpt / "driver_state.json").read_text()).get("extra", {})
            recorded.append((f"its checkpoint {ckpt.relative_to(run_dir)} was written", extra.get("config")))
    for when, old in recorded:
        changes = config_changes(old, now) if old is not None else []
        if changes:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise ConfigError(f"--resume {run_dir}: {run_dir / 'config.yaml'} differs from the config {when} with "
                              f"({shown}). A resumed run continues exactly as it started: put those values back "
                              f"(only algorithm.steps and logging.* may change on resume), or start a new run.")


def start_run_state(run_dir: Path, cfg: TidalConfig) -> None:
    """A new run's run_state.json: no stage finished yet, and the config it starts with."""
    state = read_run_state(run_dir)
    state["config"] = config_record(cfg)
    atomic_write_text(Path(run_dir) / RUN_STATE, json.dumps(state, indent=2))


def mark_stage_done(run_dir: str | Path, stage: str, info: dict[str, Any]) -> None:
    state = read_run_state(run_dir)
    state["stages"][stage] = info
    atomic_write_text(Path(run_dir) / RUN_STATE, json.dumps(state, indent=2))


def forget_stage(run_dir: str | Path, stage: str) -> None:
    """Mark a finished stage unfinished again (a finished rl round that a resume extends)."""
    state = read_run_state(run_dir)
    state["stages"].pop(stage, None)
    atomic_write_text(Path(run_dir) / RUN_STATE, json.dumps(state, indent=2))


def policy_folder(path: str, what: str) -> str:
    """The HF folder `path`, or the current policy of the run directory `path`: the newest sft,
    dpo or rl output its run_state.json records (else its policy/ or policy_dpo/). `what`
    names the option in the error."""
    p = Path(path)
    if (p / "config.json").is_file():
        return str(p)
    latest = run_output(p, POLICY_STAGES)
    if latest is not None:
        return latest
    for folder in POLICY_FOLDERS:
        if (p / folder / "config.json").is_file():
            return str(p / folder)
    raise ConfigError(f"{what}: {path} is neither an HF folder nor a run directory with a finished sft, dpo or rl "
                      f"stage ({' or '.join(f + '/' for f in POLICY_FOLDERS)}); pass a finished run.")


def run_output(run_dir: Path, stages: tuple[str, ...]) -> str | None:
    """The newest output folder (an HF folder still on disk) of the stages named `stages` that
    RUN/run_state.json records as finished; later rounds (rl2, rm2, ...) count as their stage."""
    found = None
    for key, record in read_run_state(run_dir)["stages"].items():  # in the order they finished
        if key.rstrip("0123456789") in stages and record.get("output"):
            found = _on_disk(run_dir, record["output"]) or found
    return found


def _on_disk(run_dir: Path, output: str) -> str | None:
    """A recorded output folder, also when it was recorded relative to another working directory
    or the run folder was moved: then it is looked up under `run_dir` by its path below the run."""
    p = Path(output)
    if (p / "config.json").is_file():
        return str(p)
    if run_dir.name in p.parts:
        parts = p.parts
        below = parts[len(parts) - parts[::-1].index(run_dir.name):]
        if below and (run_dir.joinpath(*below) / "config.json").is_file():
            return str(run_dir.joinpath(*below))
    return None


def sft_of(runs: list[str], sft: str | None, cfg: TidalConfig) -> str:
    """--sft, else the sft stage output recorded by a run, else model.policy."""
    from tidal.common.models import resolve_model

    if sft is not None:
        return str(resolve_model(sft))
    for spec in runs:
        run_dir = Path(spec.partition("=")[2])
        if (run_dir / "run_state.json").is_file():
            out = read_run_state(run_dir)["stages"].get("sft", {}).get("output")
            if out:
                return out
    return str(resolve_model(cfg.model.policy))


def reward_model_of(cfg: TidalConfig, model: Optional[str]) -> Optional[str]:
    """model.reward, else (when --model is a run directory) the newest reward model its rm stage
    trained: the one that run's RL optimised."""
    if cfg.model.reward:
        return cfg.model.reward
    if model is not None and Path(model).is_dir():
        return run_output(Path(model), ("rm",))
    return None
