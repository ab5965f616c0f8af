"""Run metrics: console progress, one JSONL file per run, wandb (offline by default), and plots.

The driver owns one `MetricsLogger` per run directory and calls
`log(step, {"rl/reward_mean": ..., "time/generate_s": ...}, stage="rl")` once per step.
Names are namespaced like CleanRL: `<stage>/...` for what a stage measures (`rl/kl`,
`rm/accuracy`, `sft/loss`), `losses/...` for optimizer losses, `time/...` for phase seconds.
`run_dir/metrics.jsonl` is the record of truth: one JSON object per `log` call, flushed at once,
appended on resume. wandb only mirrors it, so a wandb failure is a warning, never a crash.

`tidal report RUN_DIR` reads that file back (`read_metrics`) and draws the dashboard and one page
per question a user asks of a run (tidal.common.report, tidal.common.dashboard).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from tidal.common.config import LoggingConfig

log = logging.getLogger("tidal.metrics")

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
_RESERVED = ("step", "stage", "time")  # keys every JSONL record carries besides the metrics


class Timer:
    """Per-phase wall-clock seconds, accumulated by name.

        timer = Timer()
        with timer("generate"):
            ...
        logger.log(step, {**stats, **timer.metrics()}, stage="rl")   # {"time/generate_s": 1.8}
        timer.reset()

    Time is recorded even when the block raises. Entering the same name twice adds up.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.totals: dict[str, float] = {}
        self._clock = clock

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + self._clock() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """The totals as namespaced metrics: {"time/<name>_s": seconds}."""
        return {f"{prefix}{name}_s": secs for name, secs in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()


class MetricsLogger:
    """Console progress, `run_dir/metrics.jsonl` and wandb for one run.

    resume=False refuses a run_dir whose metrics.jsonl already has records (nothing is
    overwritten); resume=True appends to it. `stream` (default: sys.stderr at call time) and
    `clock` exist so tests can see the progress line and control its rate.
    """

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict | None = None,
                 total_steps: int | None = None, resume: bool = False, *,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.total_steps = total_steps
        self._stream = stream
        self._clock = clock
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if not resume and path.exists() and path.stat().st_size > 0:
            raise FileExistsError(
                f"{path} already holds metrics of an earlier run; resume that run (tidal train --resume "
                f"{self.run_dir}) or pick a new run directory (logging.run_name).")
        self._file = path.open("a", encoding="utf-8")
        if path.stat().st_size > 0 and not _ends_with_newline(path):
            self._file.write("\n")  # a crash mid-line must not glue the next record onto it
        self._wandb = self._init_wandb(config_dict, resume)
        self._bar_start: tuple[str, int | None, int, float] | None = None  # (stage, total, step0, t0)
        self._line_open = False  # a TTY progress line waits for its newline
        self._last_stage = ""

    # ------------------------------------------------------------------ wandb

    def _init_wandb(self, config_dict: dict | None, resume: bool) -> Any:
        if self.cfg.wandb_mode == "disabled":
            return None
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        try:
            import wandb

            run = wandb.init(
                mode=self.cfg.wandb_mode, project=self.cfg.wandb_project, dir=str(self.run_dir),
                config=config_dict, name=self.cfg.run_name or self.run_dir.name,
                id=run_id, resume="allow" if run_id else None, reinit="create_new",
                # console="off": wandb's stdout capture would fight the progress line.
                settings=wandb.Settings(console="off", silent=True))
            id_file.write_text(run.id)
            return run
        except Exception as e:  # noqa: BLE001 - wandb is a mirror; training goes on without it
            log.warning("wandb (mode=%s) failed to start, continuing with %s only: %s: %s",
                        self.cfg.wandb_mode, METRICS_FILE, type(e).__name__, e)
            return None

    def _wandb_log(self, step: int, stage: str, metrics: dict[str, float]) -> None:
        try:
            # Stages restart their step count and wandb's own step must only grow, so each
            # stage's step goes in as a metric (`rl/step`) to plot against.
            self._wandb.log({**metrics, f"{stage}/step": step})
        except Exception as e:  # noqa: BLE001
            log.warning("wandb log failed, wandb disabled for the rest of the run: %s: %s", type(e).__name__, e)
            self._finish_wandb()

    def _finish_wandb(self) -> None:
        run, self._wandb = self._wandb, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("wandb finish failed: %s: %s", type(e).__name__, e)

    # ------------------------------------------------------------------ records

    def log(self, step: int, metrics: dict[str, float], stage: str) -> None:
        """Append one record {step, stage, time, **metrics} to metrics.jsonl and mirror it to wandb."""
        clean = {}
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved for the record itself; namespace it, e.g. '{stage}/{key}'")
            try:
                clean[key] = float(value)  # also takes ints, bools, numpy and 0-d torch scalars
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from None
        record = {"step": int(step), "stage": stage, "time": round(time.time(), 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._last_stage = stage
        if self._wandb is not None:
            self._wandb_log(int(step), stage, clean)

    # ------------------------------------------------------------------ console

    def progress(self, step: int, total: int | None = None, *, stage: str | None = None, **scalars: float) -> None:
        """Show `step` of `total` (default: total_steps) with rate, ETA and a few scalars.

        On a TTY one line updates in place; otherwise each call prints one plain line, e.g.
        `[rl]  12/40 [###.......] 30% 2.1 s/step ETA 0:58 reward=0.41 kl=0.12`.
        `step` counts finished units. The rate is measured from the first call of a bar, so call
        `progress(start_step, total)` before the first unit to get a rate from the first step on.
        A new bar starts when the stage or total changes or the step goes back.
        """
        if not self.cfg.progress:
            return
        total = self.total_steps if total is None else total
        stage = self._last_stage if stage is None else stage
        now = self._clock()
        bar = self._bar_start
        if bar is None or bar[:2] != (stage, total) or step < bar[2]:
            self._end_line()
            self._bar_start = bar = (stage, total, step, now)
        line = format_progress(step, total, stage, now - bar[3], step - bar[2], scalars)
        stream = self._stream or sys.stderr
        if _isatty(stream):
            stream.write("\r" + line + "\x1b[K")
            self._line_open = True
            if total is not None and step >= total:
                self._end_line()
        else:
            stream.write(line + "\n")
        stream.flush()

    def _end_line(self) -> None:
        if self._line_open:
            (self._stream or sys.stderr).write("\n")
            self._line_open = False

    def close(self) -> None:
        """End the progress line, close metrics.jsonl, finish wandb. Safe to call twice."""
        self._end_line()
        if not self._file.closed:
            self._file.close()
        self._finish_wandb()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_progress(step: int, total: int | None, stage: str, elapsed_s: float, steps_done: int,
                    scalars: dict[str, float]) -> str:
    """One progress line; `steps_done` steps took `elapsed_s` seconds (the rate and ETA come from them)."""
    parts = [f"[{stage}]"] if stage else []
    sec_per_step = elapsed_s / steps_done if steps_done > 0 else None
    if total:
        frac = min(max(step / total, 0.0), 1.0)
        filled = int(frac * 10)
        parts.append(f"{step:>{len(str(total))}}/{total} [{'#' * filled}{'.' * (10 - filled)}] {int(frac * 100):3d}%")
    else:
        parts.append(f"{step}")
    if sec_per_step is None:
        parts.append("? s/step")
    elif sec_per_step >= 1.0 or sec_per_step == 0.0:
        parts.append(f"{sec_per_step:.1f} s/step")
    else:
        parts.append(f"{1.0 / sec_per_step:.1f} step/s")
    if total and step >= total:
        parts.append(f"in {_clock_time(elapsed_s)}")
    elif total:
        parts.append(f"ETA {_clock_time((total - step) * sec_per_step) if sec_per_step is not None else '?'}")
    parts += [f"{k}={_short(v)}" for k, v in scalars.items()]
    return " ".join(parts)


def _clock_time(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _short(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------- reading and plots


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of `run_dir/metrics.jsonl`, in file order.

    A line that is not JSON (a run killed mid-write) is skipped with a warning naming it.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `tidal report` reads the metrics.jsonl that `tidal train` writes into its run "
            f"directory (logging.output_dir/logging.run_name, e.g. runs/<name>). Pass such a directory.")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            log.warning("%s:%d: skipping a line that is not JSON (%s)", path, lineno, e)
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
        else:
            log.warning("%s:%d: skipping a record without a step", path, lineno)
    return records
