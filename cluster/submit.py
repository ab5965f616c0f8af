"""`tidal submit CONFIG --address http://HOST:8265`: run `tidal train` as a Ray job.

The config is validated here first (a typo fails in a second, not after the job started).
The current directory is uploaded as the job's working directory (build outputs, virtual
environments and run folders excluded), the worker environment of `tidal.cluster.runtime`
travels in the job's runtime_env, and the entrypoint is the same `tidal train` a user runs
locally. With `follow` the job's logs stream to stdout and the exit status is the job's:
0 when it SUCCEEDED, 1 when it FAILED or was STOPPED.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from tidal.cluster.runtime import worker_env
from tidal.common.config import ConfigError, load_config

# Never uploaded with the working dir: big, machine-specific, or outputs.
UPLOAD_EXCLUDES = [".venv", "venv", ".git", "runs", "*.egg-info", "__pycache__", "bench/results", "*.pt", "*.safetensors"]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def build_entrypoint(config: str, overrides: list[str]) -> str:
    """The shell command the job runs: exactly what a user would type locally."""
    return " ".join(["tidal", "train", shlex.quote(config), *map(shlex.quote, overrides)])


def job_runtime_env(working_dir: Path) -> dict:
    return {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES), "env_vars": worker_env()}


def _relative_config(config: str, working_dir: Path) -> str:
    path = Path(config).resolve()
    try:
        return str(path.relative_to(working_dir))
    except ValueError:
        raise ConfigError(
            f"config {config} is outside the working directory {working_dir} that is uploaded to the "
            f"cluster; copy it under {working_dir} (e.g. configs/) or run `tidal submit` from its folder.") from None


def submit(config: str, overrides: list[str], address: str, follow: bool = True,
           working_dir: str | None = None) -> int:
    """Submit `tidal train config overrides` to the Ray cluster at `address`; see module doc."""
    from ray.job_submission import JobSubmissionClient

    load_config(config, overrides)  # fail fast, locally
    wd = Path(working_dir or os.getcwd()).resolve()
    entrypoint = build_entrypoint(_relative_config(config, wd), list(overrides))
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(wd))
    print(f"tidal: submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if not follow:
        return 0
    try:
        asyncio.run(_follow_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"tidal: stopped following; the job keeps running (ray job stop {job_id} to end it)", file=sys.stderr)
        return 130
    status = _wait_terminal(client, job_id)
    print(f"tidal: job {job_id} {status}", flush=True)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        if info.message:
            print(f"tidal: {info.message}", file=sys.stderr)
    return TERMINAL.get(status, 1)


async def _follow_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _wait_terminal(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The log stream ends when the job does; its status may lag by a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)
