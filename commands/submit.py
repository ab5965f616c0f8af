"""`tidal submit CONFIG [overrides] --address http://HOST:8265`: run `tidal train` as a Ray job
(`--resume RUN` instead of CONFIG continues a run from its newest checkpoint).

Everything that can fail without the job is checked here first, each a one-line error (exit 2)
in seconds: the address (the dashboard's http://HOST:8265, not the GCS port), the config,
reward functions, models and data files (preflight), `logging.output_dir` (absolute, see
below), and the cluster itself: its nodes' resources (the dashboard's state API) against what
the job's placement plan asks for (tidal.actors.placement.plan_shortfall), so a cluster too
small for the job says so at once instead of the job waiting cluster.sync_timeout_s for
placement groups that never schedule. Right after `ray start` the job agent may not be up yet:
the submission is retried for up to AGENT_WAIT_S seconds, with a note.

The current directory is uploaded as the job's working directory (build outputs, virtual
environments and run folders excluded, and any link that points back into it, which Ray's
upload would follow round and round), the worker environment of `tidal.driver.runtime` travels
in the job's runtime_env, and the entrypoint is `python -m tidal.commands.cli train ...`: the
job's shell has the cluster's PATH, not the caller's, so it does not look for a `tidal` script;
the folder of the Python running this command goes first on the job's PATH, which finds the
same venv on a cluster started from it (or from the same image) without activating it, and
falls back to the cluster's own `python` elsewhere. With `follow` the job's logs stream to
stdout and the exit status is the job's: 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED.

Outputs: the job's working directory is a temporary copy that Ray deletes, so a relative
`logging.output_dir` would put the run where nobody finds it. `tidal submit` requires an
absolute one (storage the head and the learner nodes share: they write the checkpoints), names
the run when `logging.run_name` is unset, and prints the run directory before the job starts.

Authentication: Ray >= 2.5x starts clusters with token authentication. Like `ray start`, the
client turns it on when RAY_AUTH_MODE is unset and a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); a cluster that refuses the token is a one-line
error saying what to set.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from tidal.driver.runtime import worker_env
from tidal.common.config import ConfigError, TidalConfig, load_config

AUTH_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (print it on the head with `ray get-auth-token`), or "
             "RAY_AUTH_TOKEN_PATH to a file holding it; a cluster started with RAY_AUTH_MODE=disabled needs the same here")

# Never uploaded with the working dir: big, machine-specific, or outputs.
UPLOAD_EXCLUDES = [".venv", "venv", ".git", "runs", "*.egg-info", "__pycache__", "bench/results", "*.pt", "*.safetensors"]
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
AGENT_WAIT_S = 30.0  # how long a submission waits for a job agent that is still starting
NODES_TIMEOUT_S = 10  # the cluster-resources query (the whole check stays well under 15 s)


def build_entrypoint(config: str | None, overrides: list[str], resume: str | None = None) -> str:
    """The shell command the job runs: `tidal train` through the job's Python, not a script on PATH."""
    what = ["--resume", shlex.quote(resume)] if resume is not None else [shlex.quote(config)]
    return " ".join(["python", "-m", "tidal.commands.cli", "train", *what, *map(shlex.quote, overrides)])


def job_runtime_env(working_dir: Path) -> dict:
    env = worker_env()
    env["PATH"] = f"{Path(sys.executable).parent}:${{PATH}}"  # Ray expands ${PATH} to the cluster's own
    return {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES + link_loops(working_dir), "env_vars": env}


def _excluded_by(rel: Path) -> str | None:
    """The UPLOAD_EXCLUDES pattern that leaves `rel` (relative to the working dir) out, if any."""
    parts = rel.parts
    return next((pat for pat in UPLOAD_EXCLUDES for i in range(1, len(parts) + 1)
                 if fnmatch.fnmatch(str(Path(*parts[:i])), pat)), None)


def link_loops(working_dir: Path) -> list[str]:
    """Links under the working dir to it or to a folder above it (e.g. a link to the checkout
    kept for PYTHONPATH), as upload excludes: Ray's upload follows links, so each would copy
    the folder into itself again and again until paths hit the length limit."""
    root, loops = working_dir.resolve(), []
    for folder, dirs, _ in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if _excluded_by(rel / d) is None]
        for d in dirs:
            path = Path(folder) / d
            if path.is_symlink() and root.is_relative_to(path.resolve()):
                loops.append(f"/{(rel / d).as_posix()}")  # anchored: just this link
    return loops


def _enable_token_auth_if_available() -> None:
    """What `ray start` does for itself: token mode when RAY_AUTH_MODE is unset and a token exists."""
    if "RAY_AUTH_MODE" in os.environ:
        return  # the user's explicit choice
    try:
        from ray._private.authentication import authentication_token_setup as setup
    except ImportError:  # a Ray without token authentication
        return
    level = setup.logger.level  # its note that token mode is on would be a second line before any error
    setup.logger.setLevel(logging.ERROR)
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        setup.logger.setLevel(level)


def _relative_config(config: str, working_dir: Path) -> str:
    path = Path(config).resolve()
    try:
        return str(path.relative_to(working_dir))
    except ValueError:
        raise ConfigError(
            f"config {config} is outside the working directory {working_dir} that is uploaded to the "
            f"cluster; copy it under {working_dir} (e.g. configs/) or run `tidal submit` from its folder.") from None


def check_address(address: str) -> None:
    """The job server is the dashboard's HTTP address; a bare HOST:PORT is Ray's GCS address
    form, which the job client would try to reach through a local Ray for most of a minute."""
    if not address.startswith(("http://", "https://")):
        host = address.split("://")[-1].split(":")[0] or "HEAD"
        raise ConfigError(f"--address {address}: `tidal submit` talks to the cluster's job server, the dashboard "
                          f"address with its scheme, e.g. --address http://{host}:8265 (`ray start --head` prints "
                          f"it; 6379 is the GCS port, not the dashboard's).")


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
        hit = _excluded_by(Path(value))
        if hit is not None:
            raise ConfigError(f"{key}={value} is under {hit}, which `tidal submit` does not upload (excluded: "
                              f"{', '.join(UPLOAD_EXCLUDES)}); move it to a folder that is uploaded, e.g. data/.")


def run_directory(cfg: TidalConfig, config: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """The absolute run directory the job will write, and the overrides that fix its name
    (a timestamped logging.run_name is chosen here, so it can be printed before the job runs)."""
    from tidal.commands.train import default_run_name

    out = cfg.logging.output_dir
    if not Path(out).is_absolute():
        raise ConfigError(
            f"logging.output_dir={out} is relative: a submitted job runs in a temporary copy of this folder that "
            f"Ray deletes, so its run would vanish with it; pass an absolute path the head and learner nodes share, "
            f"e.g. logging.output_dir={Path(out).resolve()} (a cluster on this machine) or /data/runs (a shared mount).")
    if cfg.logging.run_name is None:
        name = default_run_name(config)
        return Path(out) / name, [*overrides, f"logging.run_name={name}"]
    return Path(out) / cfg.logging.run_name, overrides


def job_plan(cfg: TidalConfig):
    """The placement the job's largest stage asks for: the RL stage's (tidal.driver.job sizes the
    cluster by it too); without rl or collect no rollout worker starts."""
    from tidal.actors.placement import plan_placement, role_counts

    counts = role_counts(cfg, reference=True)
    if not {"rl", "collect"} & set(cfg.stages.run):
        counts["rollout"] = 0
    return plan_placement(cfg, counts)


def check_cluster(address: str, cfg: TidalConfig) -> None:
    """Compare the job's placement plan with the resources of the cluster's live nodes (totals,
    not what is free now: other jobs come and go); a shortfall is a one-line ConfigError."""
    from ray.util.state import list_nodes

    from tidal.actors.placement import plan_shortfall

    try:
        nodes = [n.resources_total for n in list_nodes(address=address, detail=True, timeout=NODES_TIMEOUT_S)
                 if n.state == "ALIVE"]
    except Exception as e:  # noqa: BLE001 - an older or restricted dashboard: the job still runs
        print(f"tidal: could not read the cluster's resources ({type(e).__name__}); submitting without "
              f"checking them", file=sys.stderr, flush=True)
        return
    missing = plan_shortfall(job_plan(cfg), nodes)
    if missing:
        raise ConfigError(f"the Ray cluster at {address} cannot place this job: {missing[0]}.")


def submit_job(client, entrypoint: str, runtime_env: dict, wait_s: float | None = None) -> str:
    """submit_job, retried for up to `wait_s` (AGENT_WAIT_S) seconds while the cluster's job
    agent is still starting (just after `ray start`)."""
    wait_s = AGENT_WAIT_S if wait_s is None else wait_s
    deadline, noted = time.monotonic() + wait_s, False
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise ConfigError(f"the cluster's job agent did not come up within {wait_s:.0f} s; check the head "
                                  f"with `ray status` and its logs (session_latest/logs/dashboard_agent.log).") from None
            if not noted:
                print(f"tidal: the cluster's job agent is not up yet (a cluster that just started); retrying for up "
                      f"to {wait_s:.0f} s", file=sys.stderr, flush=True)
                noted = True
            time.sleep(1.0)


def _job_config(config: str | None, overrides: list[str], resume: str | None) -> TidalConfig | None:
    """The job's config, checked here: CONFIG with overrides, or (--resume) RUN/config.yaml with
    the overrides a resume allows when RUN is visible from this machine; None when it is not."""
    from tidal.commands.train import resume_config
    from tidal.driver.preflight import preflight

    if resume is None:
        if config is None:
            raise ConfigError("`tidal submit` needs a CONFIG, or --resume RUN_DIR to continue a run.")
        cfg = load_config(config, overrides)
        preflight(cfg)
        return cfg
    if config is not None:
        raise ConfigError(f"--resume {resume} continues with {resume}/config.yaml; drop {config}.")
    if not Path(resume).is_absolute():
        raise ConfigError(f"--resume {resume}: pass the run's absolute directory on the cluster's storage "
                          f"(the job runs in a temporary folder, where a relative path means nothing).")
    if not (Path(resume) / "config.yaml").is_file():
        print(f"tidal: {resume} is not visible from here; the job checks it on the cluster", flush=True)
        return None
    cfg = resume_config(Path(resume), overrides)
    preflight(cfg, resume_dir=Path(resume), files=False)
    return cfg


def submit(config: str | None, overrides: list[str], address: str, follow: bool = True,
           working_dir: str | None = None, resume: str | None = None) -> int:
    """Submit `tidal train config overrides` (or `--resume RUN`) to the Ray cluster at `address`; see module doc."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    check_address(address)
    wd = Path(working_dir or os.getcwd()).resolve()
    cfg = _job_config(config, list(overrides), resume)  # fail fast, locally
    if resume is None:
        run_dir, overrides = run_directory(cfg, config, list(overrides))
        config = _relative_config(config, wd)
    else:
        run_dir = Path(resume)
    if cfg is not None:
        check_uploaded(cfg, wd)
    entrypoint = build_entrypoint(config, list(overrides), resume)
    _enable_token_auth_if_available()
    try:
        client = JobSubmissionClient(address)
        if cfg is not None:
            check_cluster(address, cfg)
        job_id = submit_job(client, entrypoint, job_runtime_env(wd))
    except AuthenticationError:
        raise ConfigError(f"the Ray cluster at {address} refused this client: {AUTH_HELP}.") from None
    except ConnectionError as e:
        raise ConfigError(f"no Ray job server at {address} ({' '.join(str(e).split())[:200]}); check --address "
                          f"(the dashboard address, http://HEAD:8265) and that the cluster is up.") from None
    print(f"tidal: submitted job {job_id} to {address}: {entrypoint}", flush=True)
    print(f"tidal: run directory {run_dir} (on the cluster's storage)", flush=True)
    return _follow(client, job_id) if follow else 0


def _follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; its exit status (TERMINAL)."""
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
