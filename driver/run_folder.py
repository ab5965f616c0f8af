"""The run folder: what a run directory holds and where to find it, in one place.

    RUN/run_state.json     the stages already finished and their outputs (written atomically)
    RUN/round-<k>/         an rl stage's round k > 1 (checkpoints, rollouts, samples, policy)
    RUN/sft/, RUN/policy/, RUN/policy_dpo/, RUN/reward_model[-k]/   stage outputs (HF folders)

Commands (`tidal eval`, `tidal generate`, `tidal label tasks`) look a run's policy, SFT model
and reward model up here, and the job records its stages here (tidal.driver.job).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tidal.common.config import ConfigError, TidalConfig
from tidal.driver.checkpoint import atomic_write_text

RUN_STATE = "run_state.json"
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
