"""Connecting the driver to Ray: an embedded local cluster, or an existing one.

`cluster.address` None starts a private local Ray cluster inside the driver process (the
default on a laptop or CI machine); any other value (`auto`, `ray://host:10001`, `host:6379`)
connects to a running cluster. Either way every worker process gets the same environment
variables (`RUNTIME_ENV_VARS`, the values the test-suite uses) through the job's runtime_env,
so an actor behaves identically whether it was started by a test, by `tidal train` or by a
job submitted with `tidal submit`.

Nothing of an embedded cluster outlives its run: `disconnect` stops it, ends any of its
processes still alive (Ray's agents, which otherwise linger ~90 s) and removes its temp folder,
with Ctrl-C ignored meanwhile; a Ctrl-C while Ray starts undoes the half-started cluster; and a
watchdog process (tidal.driver.reaper) does the same when the driver dies without cleaning up
(kill -9). Workers' temporary files (e.g. vLLM's vllm_dist_* rendezvous files) go into the
cluster's temp folder (TMPDIR), so they go with it; torch's compile cache stays where torch puts
it (`inductor_cache_dir`), so a kernel compiled once serves every later run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tidal.common.config import RAY_TEMP_DIR_MAX, ClusterConfig

# Single-threaded math, in-process vLLM, offline hubs (docs/platform.md#p-runtime-env explains each).
# A value already set in the driver's environment wins, so a GPU machine can override them. Nothing
# about devices: DeepSpeed's accelerator and the visible GPUs are each actor's own, from what Ray
# gives it (tidal.actors.devices.actor_env); a job-wide value would reach GPU and CPU actors alike.
RUNTIME_ENV_VARS: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    # glibc malloc keeps freed memory for reuse instead of handing it back to the OS: each step
    # would otherwise fault in its activations afresh (GBs), which cost 30-40% of an update here
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(8 << 30),
}
# Passed through when set in the driver (model cache, code, compiled ops), and every variable whose
# name starts with a PASS_THROUGH_PREFIXES entry (NCCL's interface, transport and debug settings,
# which every learner rank and rollout worker of a GPU cluster needs alike). Never
# CUDA_VISIBLE_DEVICES: Ray sets it for each GPU actor from its own assignment; the submitter's
# value would pin every actor on every node to the submitter's devices.
PASS_THROUGH_VARS = ("TIDAL_CACHE", "PYTHONPATH", "HF_HOME", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR")
PASS_THROUGH_PREFIXES = ("NCCL_",)


def worker_env() -> dict[str, str]:
    """Environment of every Ray worker: RUNTIME_ENV_VARS, overridden by the driver's own values."""
    env = {k: os.environ.get(k, v) for k, v in RUNTIME_ENV_VARS.items()}
    env.update({k: v for k, v in os.environ.items() if k in PASS_THROUGH_VARS or k.startswith(PASS_THROUGH_PREFIXES)})
    return env


def inductor_cache_dir() -> str:
    """torch's compile cache as torch would place it for this user without tidal's TMPDIR:
    $TORCHINDUCTOR_CACHE_DIR, else <system temp>/torchinductor_<user>. It outlives the run, as
    torch means it to: a compiled kernel is built once per machine, not once per run."""
    import getpass

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + "".join("_" if c in '\\/:*?"<>|' else c for c in user))


def _job_env_vars() -> set[str]:
    """The variables the Ray job this driver runs in already sets (its runtime_env's env_vars):
    ray.init inside a job merges its own runtime_env with the job's and refuses a key set twice."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}))


def apply_driver_env() -> None:
    """Set RUNTIME_ENV_VARS in the driver process too (it loads tokenizers and small models)."""
    for k, v in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(k, v)


@dataclass
class RayConnection:
    """What `connect` did, so `disconnect` undoes exactly that."""

    started_here: bool  # we called ray.init (False: the caller already had Ray up)
    embedded: bool  # a local cluster was started inside this process
    address: str
    temp_dir: str | None = None  # the embedded cluster's temp folder, when tidal made it (removed at disconnect)
    watchdog: subprocess.Popen | None = None  # tidal.driver.reaper, for a driver that dies without disconnect


def connect(cfg: ClusterConfig, min_cpus: float = 0, verbose: bool = True, logs_to: Path | None = None) -> RayConnection:
    """Start or join Ray for a run. Reuses an already initialised Ray (tests, `ray job` entrypoints).
    An embedded cluster gets cluster.num_cpus logical CPUs, or else enough for `min_cpus` (what the
    run's placement needs; logical CPUs only schedule actors, they do not pin cores), and
    cluster.num_gpus GPUs (None: the ones Ray detects; logical ones on a machine without GPUs).
    verbose=False: workers' and engines' output stays in their log files (Ray's session logs,
    copied to the run folder by `disconnect`) instead of reaching the console."""
    import ray

    apply_driver_env()
    if ray.is_initialized():
        return RayConnection(started_here=False, embedded=False, address="existing")
    runtime_env = {"env_vars": worker_env()}
    if cfg.address is None and "RAY_ADDRESS" not in os.environ:
        temp_dir = os.path.abspath(cfg.ray_temp_dir or _embedded_temp_dir())
        num_cpus = cfg.num_cpus or max(math.ceil(min_cpus), os.cpu_count() or 1)
        conn = RayConnection(started_here=True, embedded=True, address="local",
                             temp_dir=None if cfg.ray_temp_dir else temp_dir)
        if conn.temp_dir is not None:
            conn.watchdog = _start_watchdog(conn.temp_dir, logs_to)
            workers_tmp = os.path.join(conn.temp_dir, "tmp")
            os.makedirs(workers_tmp, exist_ok=True)
            runtime_env["env_vars"]["TMPDIR"] = workers_tmp
            # ...but not torch's compile cache, which defaults to TMPDIR/torchinductor_USER: vLLM's
            # sampler compiles its log-prob gather on the first generate (12-30 s on 2 cores without
            # the cache; a GPU engine's case now, the CPU worker runs eagerly: rollout/worker.py). The
            # precompiled header stays in TMPDIR whatever the cache folder (torch's _HEADER_DIR): off.
            runtime_env["env_vars"].setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
            runtime_env["env_vars"].setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS",
                                               os.environ.get("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0"))
        try:
            ray.init(num_cpus=num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False, _temp_dir=temp_dir, runtime_env=runtime_env,
                     log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
        except BaseException:  # e.g. Ctrl-C while Ray starts: undo the half-started cluster
            disconnect(conn, logs_to=logs_to)
            raise
        return conn
    # A job (`tidal submit`, a KubeRay RayJob, `ray job submit`) runs with RAY_ADDRESS set; joining
    # keeps its runtime_env (working dir, its env_vars) and adds the worker variables it lacks: a
    # RayJob manifest names a few, and a worker without e.g. the vLLM or malloc settings would not
    # behave as under `tidal train` (the accelerator is each actor's own: tidal.actors.devices).
    address = cfg.address or os.environ["RAY_ADDRESS"]
    if cfg.address is None:
        job_has = _job_env_vars()
        runtime_env = {"env_vars": {k: v for k, v in worker_env().items() if k not in job_has}}
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.ERROR)
    return RayConnection(started_here=True, embedded=False, address=address)


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig | None = None, min_cpus: float = 0, verbose: bool = True,
                logs_to: Path | None = None) -> Iterator[RayConnection]:
    """The one way tidal starts or joins Ray: `connect` on entry, `disconnect` on exit (the
    embedded cluster stopped, its temp folder removed, its logs copied to `logs_to`). Commands,
    the job, the benchmarks and the test fixtures all use it. cfg None: an embedded cluster with
    Ray's defaults (or cluster.* of the defaults).

    The console policy of every command that starts Ray (train, eval, generate, label tasks):
    verbose=False (their default; `--verbose` turns it on) keeps Ray's own warnings, worker and
    engine output and the libraries' load reports and progress bars off the console, where
    tidal's banners, progress line, warnings and results stay; one line says where the logs went."""
    if not verbose:
        quiet_libraries()
    conn = connect(cfg or ClusterConfig(), min_cpus=min_cpus, verbose=verbose, logs_to=logs_to)
    if not verbose and logs_to is not None and conn.temp_dir is not None:
        print(f"tidal: worker and engine logs go to {logs_to} (--verbose shows them here)", flush=True)
    try:
        yield conn
    finally:
        disconnect(conn, logs_to=logs_to)


def quiet_libraries() -> None:
    """Library chatter in the driver (model load reports, progress bars of transformers, the hub
    and tqdm) off the console; tidal's own output stays. (Ray's own INFO/WARNING lines, its
    token-auth warning among them, are `connect`'s: logging_level=ERROR.)"""
    import warnings

    # Tensors fetched zero-copy from Ray's object store are read-only views; tidal copies the ones
    # it writes to, so torch's one-time warning about non-writable arrays is noise on the console.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    # Ray's reminder, at every first tensor it pickles, that zero-copy tensors must be read-only:
    # tidal turns zero-copy on itself (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS, docs/platform.md#p-runtime-env)
    # and never writes to a tensor after handing it to Ray. Ray's import installs its own "once"
    # filter for it, which would go in front of this one: import it first.
    import ray  # noqa: F401

    warnings.filterwarnings("ignore", message="Zero-copy tensor serialization is enabled")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # vLLM's and datasets' bars in the driver process
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _embedded_temp_dir() -> str:
    """A fresh folder for the embedded cluster: under the system temp folder, or under /tmp when
    that one's path is so long that Ray's socket paths would pass the unix limit (a long TMPDIR,
    as macOS and pytest give, otherwise fails inside Ray with no word of why)."""
    parent = tempfile.gettempdir()
    if len(os.path.join(os.path.abspath(parent), "tidal-ray-xxxxxxxx")) > RAY_TEMP_DIR_MAX and os.path.isdir("/tmp"):
        parent = "/tmp"
    return tempfile.mkdtemp(prefix="tidal-ray-", dir=parent)


def disconnect(conn: RayConnection, logs_to: Path | None = None) -> None:
    """Shut down what `connect` started. An embedded cluster's worker and engine logs are copied
    to `logs_to` (e.g. RUN/logs/ray), any of its processes still alive are ended, and the temp
    folder tidal made for it is removed. Ctrl-C cannot cut this short (it is ignored meanwhile)."""
    import ray

    with _no_interrupts():
        if conn.started_here:  # also after an ray.init cut short, which may leave is_initialized() False
            ray.shutdown()
        if conn.temp_dir is not None:
            from tidal.driver.reaper import copy_logs, end_session

            end_session(conn.temp_dir)
            if logs_to is not None:
                copy_logs(conn.temp_dir, str(logs_to))
            shutil.rmtree(conn.temp_dir, ignore_errors=True)
        if conn.watchdog is not None:
            conn.watchdog.stdin.close()  # it finds nothing left to do and exits
            conn.watchdog = None


def _start_watchdog(temp_dir: str, logs_to: Path | None) -> subprocess.Popen:
    """tidal.driver.reaper for `temp_dir`: in a session of its own, so a signal to the driver's
    process group does not reach it; it acts when its stdin (held by this process) closes."""
    import sys

    args = [sys.executable, "-m", "tidal.driver.reaper", temp_dir] + ([str(logs_to)] if logs_to is not None else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, env=env)


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """SIGINT ignored in the main thread for the block (clean-up that must not be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
