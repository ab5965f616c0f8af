"""Atomic checkpoints and the run-level state that `tidal train --resume` reads.

Layout under a run directory:

    run_state.json              stages already finished and their outputs (written atomically)
    checkpoints/
        step-000004/            a complete RL checkpoint
            COMPLETE            marker, written last: the step and every file's size (the manifest)
            driver_state.json   step, weight version, KL controller, reward normalizer, data position
            rng.pt              python / numpy / torch RNG states of the driver
            learner/ ...        LearnerGroup.checkpoint output (model + optimizer + scheduler)
        latest                  name of the newest complete checkpoint

A checkpoint is written into `checkpoints/.tmp-step-N-<pid>`, read back (quick structural
checks), completed with the COMPLETE marker, fsynced, then renamed into place in one
`os.replace`; only then does `latest` move
(itself replaced atomically) and are older checkpoints pruned, keeping the two newest. A crash
at any moment leaves either the previous checkpoint or the new one complete, never a
half-written one in use.

A complete checkpoint can still be unreadable later (a disk that filled up, a copy cut short,
a file edited by hand). `resume_checkpoint` picks the newest one whose files match the
manifest and read back (CRC of every torch archive entry), printing one warning line that names
the unreadable file (or the unfinished write it passed over); what it skipped stays where it is. When the resumed run reaches that step again, the unreadable folder is
renamed aside to `step-N.corrupt-<time>` (with a warning) rather than replaced.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tidal.common.config import ConfigError

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
KEEP = 2  # complete checkpoints kept: when the newest turns out unreadable, a resume falls back one
# What every RL checkpoint holds (DriverState.save and LearnerGroup.checkpoint); missing = unreadable.
REQUIRED = ("driver_state.json", "rng.pt", "learner")
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(ConfigError):
    """No checkpoint of a run can be read; the message names each one's bad file."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so readers see either the old or the new content. A failed write (a
    full disk) leaves no temporary file, and its error names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a write's error names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    _fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a file's written data to the disk (a no-op for a missing file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_checkpoint(run_dir: str | Path, step: int, write: Callable[[Path], None], keep: int = KEEP,
                     logs: tuple[Path, ...] = ()) -> Path:
    """Have `write(tmp_dir)` fill a fresh directory, then publish it atomically as step `step`.

    `logs`: append-only files whose records up to this step a resume keeps (metrics.jsonl,
    rollouts.jsonl); they are fsynced before the checkpoint is published, so after a power cut a
    published checkpoint never points past a record that was lost (which no resume would refill).

    The COMPLETE marker lists every file with its size (the manifest a resume checks against),
    and is written only after each file reads back (`file_problem`, the quick checks). Keeps the
    `keep` newest complete checkpoints up to `step`; older ones are pruned only after the new
    one is published. A folder already at this step that is not a readable checkpoint is renamed
    aside (`step-N.corrupt-<time>`, with a warning), never replaced. Returns the published folder."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    for rel in files:
        problem = file_problem(tmp / rel, deep=False)
        if problem:  # never publish it: the previous checkpoints stay as they are
            raise OSError(f"checkpoint of step {step}: {tmp / rel} does not read back ({problem}); the earlier "
                          f"checkpoints in {root} are kept.")
    (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    for log in logs:
        fsync_file(log)
    _fsync_tree(tmp)
    final = root / step_dir_name(step)
    if final.exists():
        problem = (final / COMPLETE, "missing") if not (final / COMPLETE).is_file() else checkpoint_problem(final)
        if problem is not None:  # e.g. the one a resume skipped: the user's data, kept under another name
            aside = root / f"{final.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(final, aside)
            warn(f"checkpoint file {problem[0]}: {problem[1]}; that checkpoint is kept as {aside.name}, the new "
                 f"{final.name} takes its place.")
    if final.exists():  # re-checkpointing a step (e.g. resumed at the last step): move the old one aside first
        stale = root / f".old-{step_dir_name(step)}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, final.name)
    _prune(root, keep, step)
    return final


def warn(message: str) -> None:
    print(f"tidal: warning: {message}", file=sys.stderr, flush=True)


def _step_of(d: Path) -> int:
    return int(_STEP_DIR.fullmatch(d.name).group(1))


def _complete_steps(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders set aside as `step-N.corrupt-*` are not)."""
    dirs = [d for d in root.glob("step-*") if _STEP_DIR.fullmatch(d.name) and d.is_dir() and (d / COMPLETE).is_file()]
    return sorted(dirs, key=_step_of)


def _prune(root: Path, keep: int, step: int) -> None:
    # Only checkpoints up to the one just written count: a newer one is left from before a resume
    # that skipped it as unreadable, and stays until this run reaches its step (write_checkpoint).
    for d in [d for d in _complete_steps(root) if _step_of(d) <= step][:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # leftovers of crashed writers (ours was renamed)
        if not _writer_alive(d.name):
            shutil.rmtree(d, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    """Whether the process that named a `.tmp-step-N-PID` / `.old-step-N-PID` folder still runs
    (not this one): a folder another live process is writing is left alone."""
    m = re.fullmatch(r"\.(?:tmp|old)-step-\d+-(\d+)", name)
    if m is None or int(m.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run, or None. Trusts `latest` only if its target is complete."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if _STEP_DIR.fullmatch(cand.name) and (cand / COMPLETE).is_file():
            return cand
    complete = _complete_steps(root)
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------- readability


def file_problem(path: Path, deep: bool = True) -> str | None:
    """Why a checkpoint file cannot be read, or None. Structural checks: a torch zip's central
    directory (deep: and every entry's CRC), a safetensors header and length, JSON parsing."""
    try:
        if path.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip() if deep else None
            return f"entry {bad} is corrupt" if bad else None
        if path.suffix in (".pt", ".pth", ".bin"):
            return "not a torch archive (truncated or overwritten)" if path.stat().st_size > 0 else "empty file"
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return "truncated" if path.stat().st_size < 8 + n + end else None
        if path.suffix == ".json":
            json.loads(path.read_text())
    except (OSError, ValueError, struct.error, zipfile.BadZipFile, KeyError, TypeError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


# A CRC pass over a real model's optimizer state takes seconds, and preflight, the driver and the
# RL loop each ask about the same files in one resume: answer each (file, size, mtime) once.
_FILE_PROBLEMS: dict[tuple[str, int, int], str | None] = {}
_WARNED: set[str] = set()  # warnings this process already printed


def _cached_file_problem(path: Path) -> str | None:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_PROBLEMS:
        _FILE_PROBLEMS[key] = file_problem(path)
    return _FILE_PROBLEMS[key]


def checkpoint_problem(ckpt: Path, required: tuple[str, ...] = REQUIRED) -> tuple[Path, str] | None:
    """(file, why) of the first file of a complete checkpoint folder that cannot be read, or None.
    The files and sizes its COMPLETE manifest lists must all be there; a checkpoint written before
    manifests existed must hold `required`."""
    try:
        listed = json.loads((ckpt / COMPLETE).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as e:
        return ckpt / COMPLETE, f"unreadable ({type(e).__name__}: {e})"
    if listed is None:
        for name in required:
            if not (ckpt / name).exists():
                return ckpt / name, "missing"
    else:
        for rel, size in listed.items():
            path = ckpt / rel
            if not path.is_file():
                return path, "missing"
            if path.stat().st_size != size:
                return path, f"{path.stat().st_size} bytes where {size} were written (truncated or overwritten)"
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        problem = _cached_file_problem(path)
        if problem:
            return path, problem
    return None


@dataclass(frozen=True)
class ResumePoint:
    """Where a resume continues: the newest readable complete checkpoint (None: none complete),
    the newer complete ones that were skipped, each with its bad file and the reason, and the
    newer writes that never finished (a process killed mid-write)."""

    checkpoint: Path | None
    skipped: tuple[tuple[Path, Path, str], ...] = ()  # (checkpoint, file, why), newest first
    unfinished: tuple[Path, ...] = ()


def resume_point(run_dir: str | Path, required: tuple[str, ...] = REQUIRED) -> ResumePoint:
    """Candidates newest first: the `latest` pointer's target, then the older complete ones (a
    newer folder than `latest` is one an earlier resume already skipped)."""
    newest = latest_checkpoint(run_dir)
    root = Path(run_dir) / CHECKPOINTS
    candidates = [] if newest is None else [newest] + [
        d for d in reversed(_complete_steps(root)) if _step_of(d) < _step_of(newest)]
    chosen, skipped = None, []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt, required)
        if problem is None:
            chosen = ckpt
            break
        skipped.append((ckpt, *problem))
    after = -1 if chosen is None else _step_of(chosen)
    unfinished = [] if not root.is_dir() else [  # folders of a write cut short, newer than the one used
        d for d in root.iterdir() if d.is_dir() and not (d / COMPLETE).is_file()
        and (m := re.fullmatch(r"(?:\.tmp-)?step-(\d+)(?:-\d+)?", d.name)) and int(m.group(1)) > after]
    return ResumePoint(chosen, tuple(skipped), tuple(sorted(unfinished, key=lambda d: d.name, reverse=True)))


def resume_checkpoint(run_dir: str | Path, required: tuple[str, ...] = REQUIRED) -> Path | None:
    """The checkpoint a resume loads, or None when the run has no complete checkpoint. Passing
    over a newer unreadable or unfinished one prints one warning line (once per process) naming
    it; when complete checkpoints exist but none reads back, raises CheckpointError naming each."""
    point = resume_point(run_dir, required)
    if point.skipped and point.checkpoint is None:
        bad = "; ".join(f"{f}: {why}" for _, f, why in point.skipped)
        raise CheckpointError(f"--resume {run_dir}: no checkpoint can be read ({bad}); restore the files from a "
                              f"copy, or start a new run.")
    passed = [f"checkpoint file {f}: {why}" for _, f, why in point.skipped]
    passed += [f"{d} is an unfinished checkpoint write (no {COMPLETE} marker)" for d in point.unfinished]
    if passed:
        where = (f"resuming from the earlier checkpoint {point.checkpoint}" if point.checkpoint is not None
                 else "no earlier checkpoint: the stage starts from its beginning")
        message = f"{'; '.join(passed)}; {where} (the skipped files are left as they are)."
        if message not in _WARNED:
            _WARNED.add(message)
            warn(message)
    return point.checkpoint


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
