"""Atomic checkpoints and the run-level state that `tidal train --resume` reads.

Layout under a run directory:

    run_state.json              stages already finished and their outputs (written atomically)
    checkpoints/
        step-000004/            a complete RL checkpoint
            COMPLETE            marker, written last
            driver_state.json   step, weight version, KL controller, reward normalizer, data position
            rng.pt              python / numpy / torch RNG states of the driver
            learner/ ...        LearnerGroup.checkpoint output (model + optimizer + scheduler)
        latest                  name of the newest complete checkpoint

A checkpoint is written into `checkpoints/.tmp-step-N-<pid>`, completed with the COMPLETE
marker, fsynced, then renamed into place in one `os.replace`; only then does `latest` move
(itself replaced atomically) and are older checkpoints pruned. A crash at any moment leaves
either the previous checkpoint or the new one complete, never a half-written one in use.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
RUN_STATE = "run_state.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so readers see either the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def write_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = 2) -> Path:
    """Have `write(tmp_dir)` fill a fresh directory, then publish it atomically as step `step`.

    Keeps the `keep` newest complete checkpoints (the previous one survives until the new one
    is complete). Returns the published directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    (tmp / COMPLETE).write_text(json.dumps({"step": step}))
    _fsync_tree(tmp)
    final = root / step_dir_name(step)
    if final.exists():  # re-checkpointing a step (e.g. after a resume): move the old one aside first
        stale = root / f".old-{step_dir_name(step)}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name)
    _prune(root, keep)
    return final


def _complete_steps(root: Path) -> list[Path]:
    dirs = [d for d in root.glob("step-*") if d.is_dir() and (d / COMPLETE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def _prune(root: Path, keep: int) -> None:
    for d in _complete_steps(root)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-*"):  # leftovers of crashed writers (never our own: it was renamed)
        shutil.rmtree(d, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run, or None. Trusts `latest` only if its target is complete."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / COMPLETE).is_file():
            return cand
    complete = _complete_steps(root)
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------- driver state


@dataclass
class DriverState:
    """Everything the RL loop needs, besides learner/optimizer tensors, to continue exactly."""

    step: int  # RL steps completed
    weight_version: int  # version of the weights the rollout pool holds
    kl_controller: dict[str, float]
    reward_state: dict[str, Any]  # reward normalizer state (build_reward(...).state_dict())
    data_state: dict[str, Any]  # PromptDataset.state
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the idle-time accumulators

    def save(self, ckpt_dir: Path) -> None:
        (Path(ckpt_dir) / "driver_state.json").write_text(json.dumps(asdict(self), indent=2, default=_jsonable))
        torch.save(capture_rng(), Path(ckpt_dir) / "rng.pt")

    @staticmethod
    def load(ckpt_dir: Path, restore_rng: bool = True) -> "DriverState":
        d = json.loads((Path(ckpt_dir) / "driver_state.json").read_text())
        if restore_rng:
            restore_rng_state(torch.load(Path(ckpt_dir) / "rng.pt", weights_only=False))
        return DriverState(**d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"driver state holds a {type(x).__name__} that cannot be written as JSON: {x!r}")


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------- run state


def read_run_state(run_dir: str | Path) -> dict[str, Any]:
    """{'stages': {'sft': {'output': path, ...}, ...}} for a run, or an empty state."""
    path = Path(run_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def mark_stage_done(run_dir: str | Path, stage: str, info: dict[str, Any]) -> None:
    state = read_run_state(run_dir)
    state["stages"][stage] = info
    atomic_write_text(Path(run_dir) / RUN_STATE, json.dumps(state, indent=2))


def truncate_jsonl(path: str | Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite a JSONL log keeping only the records `keep` accepts (resume: forget what came after
    the checkpoint, so replayed steps are not logged twice). Torn last lines are dropped.
    Returns the number of records removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, removed = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            removed += 1
            continue
        if keep(rec):
            kept.append(json.dumps(rec))
        else:
            removed += 1
    atomic_write_text(path, "".join(r + "\n" for r in kept))
    return removed
