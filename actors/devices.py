"""The device plan: where each role computes, decided once, from the config and from the resources
Ray gives each actor - never from the driver's environment.

* An actor computes on CUDA exactly when its Ray request holds GPUs (`num_gpus > 0`). Its process
  starts with the environment `actor_env(num_gpus)` (ActorGroup adds it to every actor's
  runtime_env): DeepSpeed's accelerator (`DS_ACCELERATOR`, read once when deepspeed is imported)
  names that device, and a CPU actor sees no GPU at all (`CUDA_VISIBLE_DEVICES` empty: Ray 2.60
  leaves the variable alone for an actor without GPUs, which could otherwise pick up a GPU it never
  reserved on a GPU node). A GPU actor's `CUDA_VISIBLE_DEVICES` is Ray's to set: the GPUs of its
  bundle, so its device is always `cuda:0`.
* `enter_device(want_gpu, role)` is the first thing a role's actor does: it checks that Ray's
  assignment and the plan agree and returns the torch device.
* The dtype of every model is `model.dtype`, resolved when the config is built (`auto`: bf16 when
  the learners train on GPUs, common/config_schema.py); threads follow tidal.actors.threads.

`plan_devices(cfg)` is the whole plan for one config (what `tidal config show --check` and the
logical-GPU tests read); `check_devices(cfg, sizes)` refuses every combination that cannot work
before Ray starts, and `gpu_memory(cfg, sizes)` is the memory arithmetic it checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from tidal.common.config import ConfigError, TidalConfig

ROLES = ("learner", "reference", "reward", "rollout")


@dataclass(frozen=True)
class DevicePlan:
    """Where one role's actors compute."""

    role: str
    device: Literal["cuda", "cpu"]
    gpus: float  # Ray num_gpus of one actor of the role when it has its own bundle
    accelerator: Literal["cuda", "cpu"]  # DeepSpeed's accelerator (DS_ACCELERATOR) in its processes
    dtype: str  # model.dtype, resolved
    env: dict[str, str]  # what its processes start with (on top of driver/runtime.py's RUNTIME_ENV_VARS)


def role_gpus(cfg: TidalConfig, role: str) -> float:
    """GPUs an actor of `role` asks for: the rollout side's own, the learner side's for the rest."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return cfg.rollout.gpus_per_worker if role == "rollout" else cfg.learner.gpus_per_worker


def actor_env(num_gpus: float) -> dict[str, str]:
    """The device variables of an actor that Ray gives `num_gpus` GPUs."""
    if num_gpus > 0:
        return {"DS_ACCELERATOR": "cuda"}
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def with_device_env(options: dict) -> dict:
    """Ray actor options with the device variables of their num_gpus added to the runtime_env
    (a value the caller put there wins; Ray merges the job's env_vars under them)."""
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**actor_env(float(options.get("num_gpus") or 0.0)), **runtime_env.get("env_vars", {})}
    return {**options, "runtime_env": runtime_env}


def plan_devices(cfg: TidalConfig) -> dict[str, DevicePlan]:
    """Each role's device plan under this config."""
    plans = {}
    for role in ROLES:
        gpus = role_gpus(cfg, role)
        device = "cuda" if gpus > 0 else "cpu"
        plans[role] = DevicePlan(role, device, gpus, device, cfg.model.dtype, actor_env(gpus))
    return plans


def enter_device(want_gpu: bool, role: str):
    """In a role's process, before it builds a model: the torch device it computes on. Checks that
    what Ray gave the actor (its GPU ids) and the environment it started with match the plan, and
    sets DeepSpeed's accelerator where nothing set it (an in-process worker in local mode)."""
    import torch

    accelerator = "cuda" if want_gpu else "cpu"
    found = os.environ.setdefault("DS_ACCELERATOR", accelerator)
    if found != accelerator:
        raise RuntimeError(f"{role}: the device plan says {accelerator} but this process started with "
                           f"DS_ACCELERATOR={found}; DeepSpeed would build a {found} engine (set by hand? "
                           f"tidal sets it per actor, tidal.actors.devices.actor_env)")
    gpu_ids = _ray_gpu_ids()
    if gpu_ids is not None and bool(gpu_ids) != want_gpu:
        raise RuntimeError(f"{role}: the device plan says {accelerator} but Ray gave this actor GPUs {gpu_ids}")
    if not want_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{role}: the config gives it GPUs (*.gpus_per_worker > 0) but this process sees no CUDA "
                           f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set "
                           f"learner.gpus_per_worker / rollout.gpus_per_worker to 0 on a machine without GPUs")
    torch.cuda.set_device(0)  # Ray made the actor's own GPUs the only visible ones: its first is cuda:0
    return torch.device("cuda", 0)


def _ray_gpu_ids() -> list | None:
    """The GPU ids Ray assigned to this actor, or None outside a Ray actor."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return None
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: not an actor
        return None


def check_devices(cfg: TidalConfig) -> None:
    """Every device combination that cannot work, refused with a ConfigError naming the keys and the fix."""
    lc, r, colocated = cfg.learner, cfg.rollout, cfg.cluster.placement == "colocated"
    learner_gpu, rollout_gpu = lc.gpus_per_worker > 0, r.gpus_per_worker > 0
    if learner_gpu and lc.gpus_per_worker != 1:
        raise ConfigError(f"learner.gpus_per_worker={lc.gpus_per_worker:g}: a DeepSpeed rank drives exactly one GPU (a "
                          "fraction lets Ray put two ranks on one device, which NCCL refuses; more are never used); "
                          "set it to 1 (or 0 on CPU) and use learner.num_workers for more GPUs.")
    if rollout_gpu and r.gpus_per_worker != r.tensor_parallel_size:
        raise ConfigError(f"rollout.gpus_per_worker={r.gpus_per_worker:g}: a vLLM engine owns whole GPUs, "
                          f"rollout.tensor_parallel_size={r.tensor_parallel_size} of them; set rollout.gpus_per_worker="
                          f"{r.tensor_parallel_size} (colocated placement shares them with the learner ranks by itself).")
    if r.tensor_parallel_size > 1 and not (rollout_gpu and r.backend == "vllm" and not colocated):
        raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs vLLM engines on GPUs "
                          f"(rollout.backend=vllm, rollout.gpus_per_worker={r.tensor_parallel_size}) with "
                          "cluster.placement=disaggregated: a colocated bundle holds one GPU.")
    if r.sleep and not (rollout_gpu and r.backend == "vllm"):
        raise ConfigError("rollout.sleep=true is vLLM's GPU sleep mode: it needs rollout.backend=vllm and "
                          "rollout.gpus_per_worker > 0; set rollout.sleep=false (or null).")
    if r.sleep and cfg.algorithm.mode != "sync":
        raise ConfigError("rollout.sleep=true frees the engines' GPU memory while the learners update, so they cannot "
                          "generate meanwhile: set algorithm.mode=sync, or rollout.sleep=false with "
                          "cluster.placement=disaggregated for async.")
    _check_transport(cfg, learner_gpu, rollout_gpu, colocated)


def _check_transport(cfg: TidalConfig, learner_gpu: bool, rollout_gpu: bool, colocated: bool) -> None:
    r, lc = cfg.rollout, cfg.learner
    if r.weight_transport == "collective" and learner_gpu:
        if not rollout_gpu:
            raise ConfigError("rollout.weight_transport=collective with learners on GPU broadcasts over NCCL, which needs "
                              "the rollout workers on GPUs too (rollout.gpus_per_worker > 0); or use object_store.")
        if colocated:
            raise ConfigError("rollout.weight_transport=collective with cluster.placement=colocated puts learner rank 0 "
                              "and rollout worker 0 on one GPU, and NCCL refuses a group with two ranks on one device; "
                              "use rollout.weight_transport=ipc (same GPU) or object_store, or "
                              "cluster.placement=disaggregated.")
    if r.weight_transport == "ipc":
        if not (learner_gpu and rollout_gpu and colocated):
            raise ConfigError("rollout.weight_transport=ipc shares GPU memory between a learner rank and the rollout "
                              "worker on the same GPU: it needs cluster.placement=colocated with learner.gpus_per_worker "
                              "and rollout.gpus_per_worker > 0; use collective or object_store otherwise.")
        if r.num_workers != lc.num_workers:
            raise ConfigError(f"rollout.weight_transport=ipc: rollout worker k loads from learner rank k on its GPU, so "
                              f"rollout.num_workers ({r.num_workers}) must equal learner.num_workers ({lc.num_workers}).")
        if cfg.algorithm.mode != "sync":
            raise ConfigError("rollout.weight_transport=ipc sends the learners' live weights (no staged copy), so the "
                              "learners must not update meanwhile: set algorithm.mode=sync.")
