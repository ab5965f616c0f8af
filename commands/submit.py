"""`tidal submit CONFIG [overrides] --address http://HOST:8265`: run `tidal train` as a Ray job.

The config, reward functions, models and any data files already on disk are checked here
first (preflight: a typo fails in a second, not after the job started). The current directory
is uploaded as the job's working directory (build outputs, virtual environments and run
folders excluded), the worker environment of `tidal.driver.runtime` travels in the job's
runtime_env, and the entrypoint is `python -m tidal.commands.cli train ...`: the job's shell
has the cluster's PATH, not the caller's, so it does not look for a `tidal` script; the folder
of the Python running this command goes first on the job's PATH, which finds the same venv on
a cluster started from it (or from the same image) without activating it, and falls back to
the cluster's own `python` elsewhere. With `follow` the job's logs stream to stdout and the
exit status is the job's: 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED.

Authentication: Ray >= 2.5x starts clusters with token authentication. Like `ray start`, the
client turns it on when RAY_AUTH_MODE is unset and a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); a cluster that refuses the token is a one-line
error saying what to set.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import shlex
import sys
import time
from pathlib import Path

from tidal.driver.runtime import worker_env
from tidal.common.config import ConfigError, load_config

AUTH_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (print it on the head with `ray get-auth-token`), or "
             "RAY_AUTH_TOKEN_PATH to a file holding it; a cluster started with RAY_AUTH_MODE=disabled needs the same here")

# Never uploaded with the working dir: big, machine-specific, or outputs.
UPLOAD_EXCLUDES = [".venv", "venv", ".git", "runs", "*.egg-info", "__pycache__", "bench/results", "*.pt", "*.safetensors"]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def build_entrypoint(config: str, overrides: list[str]) -> str:
    """The shell command the job runs: `tidal train` through the job's Python, not a script on PATH."""
    return " ".join(["python", "-m", "tidal.commands.cli", "train", shlex.quote(config), *map(shlex.quote, overrides)])


def job_runtime_env(working_dir: Path) -> dict:
    env = worker_env()
    env["PATH"] = f"{Path(sys.executable).parent}:${{PATH}}"  # Ray expands ${PATH} to the cluster's own
    return {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env}


def _enable_token_auth_if_available() -> None:
    """What `ray start` does for itself: token mode when RAY_AUTH_MODE is unset and a token exists."""
    if "RAY_AUTH_MODE" in os.environ:
        return  # the user's explicit choice
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _relative_config(config: str, working_dir: Path) -> str:
    path = Path(config).resolve()
    try:
        return str(path.relative_to(working_dir))
    except ValueError:
        raise ConfigError(
            f"config {config} is outside the working directory {working_dir} that is uploaded to the "
            f"cluster; copy it under {working_dir} (e.g. configs/) or run `tidal submit` from its folder.") from None


def check_uploaded(cfg, working_dir: Path) -> None:
    """Data the job reads from the working dir must be in what is uploaded: a file under runs/
    (or another excluded folder) exists here but not in the job, which would fail there or,
    for the built-in task's folder, silently rebuild the task instead of reading the user's."""
    from tidal.driver.preflight import task_folder_state

    d = cfg.data
    paths = [(f"data.{n}", getattr(d, n)) for n in ("prompts", "eval_prompts", "demonstrations", "comparisons", "rankings")]
    if task_folder_state(cfg) == "user":
        paths.append(("data.data_dir", d.data_dir))
    for key, value in paths:
        if value is None or Path(value).is_absolute():
            continue  # an absolute path is the cluster's business (a shared filesystem)
        parts = Path(value).parts
        hit = next((pat for pat in UPLOAD_EXCLUDES for i in range(1, len(parts) + 1)
                    if fnmatch.fnmatch(str(Path(*parts[:i])), pat)), None)
        if hit is not None:
            raise ConfigError(f"{key}={value} is under {hit}, which `tidal submit` does not upload (excluded: "
                              f"{', '.join(UPLOAD_EXCLUDES)}); move it to a folder that is uploaded, e.g. data/.")


def submit(config: str, overrides: list[str], address: str, follow: bool = True,
           working_dir: str | None = None) -> int:
    """Submit `tidal train config overrides` to the Ray cluster at `address`; see module doc."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from tidal.driver.preflight import preflight

    wd = Path(working_dir or os.getcwd()).resolve()
    cfg = load_config(config, overrides)  # fail fast, locally
    entrypoint = build_entrypoint(_relative_config(config, wd), list(overrides))
    preflight(cfg)
    check_uploaded(cfg, wd)
    _enable_token_auth_if_available()
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(wd))
    except AuthenticationError:
        raise ConfigError(f"the Ray cluster at {address} refused this client: {AUTH_HELP}.") from None
    except ConnectionError as e:
        raise ConfigError(f"no Ray job server at {address} ({' '.join(str(e).split())[:200]}); check --address "
                          f"(the dashboard address, http://HEAD:8265) and that the cluster is up.") from None
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
