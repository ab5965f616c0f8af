"""The best-gold checkpoint of an RL run with algorithm.early_stop=gold_drop.

When the monitor sees a new best gold, the RL loop writes an ordinary checkpoint at that step
(tidal.driver.checkpoint.write_checkpoint) and publishes it here as

    checkpoints/best/           hard links of the files of checkpoints/step-N (a copy where the
                                file system has no hard links), plus
        best.json               {"step": N, "gold": mean gold on the selection prompts}

Hard links cost no disk while step-N exists, and keep its files when pruning (which keeps only
the two newest step-N folders) removes it. Publishing is atomic: the new folder is filled
under a temporary name and swapped in, so `best` is always a whole checkpoint. When the run
stops on gold_drop, the loop loads best/learner back into the learners; a resume reads the
monitor's best from its checkpoint and checks that `best` is that step (`usable_best`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tidal.driver.checkpoint import CHECKPOINTS, COMPLETE, checkpoint_problem, step_dir_name, warn

BEST = "best"
BEST_META = "best.json"


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / BEST


def _link_tree(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:  # no hard links on this file system (or across devices): a copy
            shutil.copy2(path, target)


def publish_best(run_dir: str | Path, ckpt: Path, step: int, gold: float) -> Path:
    """Make the complete checkpoint folder `ckpt` (step `step`) the run's best; returns `best`."""
    final = best_dir(run_dir)
    tmp = final.with_name(f".tmp-{BEST}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    _link_tree(ckpt, tmp)
    (tmp / BEST_META).write_text(json.dumps({"step": step, "gold": gold}))
    if final.exists():
        old = final.with_name(f".old-{BEST}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def read_best(run_dir: str | Path) -> dict | None:
    """best.json of a complete, readable `best` folder, else None."""
    d = best_dir(run_dir)
    if not (d / COMPLETE).is_file() or not (d / BEST_META).is_file():
        return None
    if checkpoint_problem(d) is not None:
        return None
    try:
        return json.loads((d / BEST_META).read_text())
    except ValueError:
        return None


def usable_best(run_dir: str | Path, step: int | None) -> bool:
    """Resume: whether `best` holds the monitor's best step `step`. When it does not (a crash
    between the checkpoint and its publication, or a best from steps the resume replays), the
    step's own checkpoint is published again if it is still there; else a warning says the best
    is forgotten and the monitor starts a new one."""
    if step is None:
        return False
    meta = read_best(run_dir)
    if meta is not None and meta["step"] == step:
        return True
    ckpt = Path(run_dir) / CHECKPOINTS / step_dir_name(step)
    if (ckpt / COMPLETE).is_file() and checkpoint_problem(ckpt) is None:
        gold = json.loads((ckpt / "driver_state.json").read_text())["extra"]["monitor"]["best_gold"]
        publish_best(run_dir, ckpt, step, gold)
        return True
    warn(f"the best-gold checkpoint of step {step} is not in {best_dir(run_dir)}; the monitor starts a new best "
         f"from the next evaluation.")
    return False


def restore_best(run_dir: str | Path, learners, pool, step: int) -> int | None:
    """Load `best` into the learners and push its weights to the pool (as version step + 1: pool
    versions only increase); returns the best step, or None when the run is already there or
    has no best."""
    meta = read_best(run_dir)
    if meta is None or meta["step"] == step:
        return None
    learners.load_checkpoint(best_dir(run_dir) / "learner")
    pool.load_weights(learners.export_weights(step + 1))
    print(f"tidal: early stop (gold_drop): the final policy is the best-gold one, step {meta['step']} (mean gold "
          f"{meta['gold']:.4f} on the selection prompts), not step {step}'s", flush=True)
    return meta["step"]
