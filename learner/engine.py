"""Building a learner rank's DeepSpeed engines: process group, models, ZeRO config, optimizer.

Facts behind the choices (docs/platform.md#p-deepspeed-cpu): gloo on CPU (nccl on GPU); the shared-memory comm op
is skipped (it compiles for ~70 s); torch AdamW rather than the compiled DeepSpeedCPUAdam;
transformers model code is imported before any ZeRO-3 partitioning.
"""

from __future__ import annotations

import os
import random
import socket
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from tidal.common.config import LearnerConfig, TidalConfig
from tidal.common.lora import spec_from_config
from tidal.common.precision import torch_dtype


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def effective_zero_stage(lc: LearnerConfig, world_size: int) -> int:
    """The ZeRO stage a rank runs. With one rank, stages 1 and 2 partition nothing: they only add
    a flat fp32 master copy of the weights and gradient-bucket copies around the same AdamW step
    (the update took 9.2 s instead of 7.5 s in bench/peer_trl.py, docs/performance.md), so they
    run as stage 0, the same math. Offload needs ZeRO, and stage 3 is kept so a one-rank run
    takes the partitioned paths a multi-rank one does."""
    if world_size == 1 and lc.zero_stage in (1, 2) and not lc.offload:
        return 0
    return lc.zero_stage


def ds_config(lc: LearnerConfig, world_size: int, bf16: bool) -> dict:
    """DeepSpeed config: ZeRO stage, micro-batches and gradient accumulation from LearnerConfig."""
    gas = lc.mini_batch_size // (lc.micro_batch_size * world_size)
    zero: dict = {"stage": effective_zero_stage(lc, world_size)}
    if lc.zero_stage == 3:
        # Partition every parameter, however small: a tiny test model then takes the same
        # gather paths as a large one; small tensors are a negligible share of the traffic.
        zero["stage3_param_persistence_threshold"] = 0
    if lc.offload and lc.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": lc.micro_batch_size * gas * world_size,
        "gradient_clipping": lc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW, not the compiled DeepSpeedCPUAdam
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def linear_lr(base_lr: float, step: int, total: int, schedule: str) -> float:
    """LR of optimizer step `step` (0-based): constant, or linear decay to 0 at `total` (docs/implementation.md#d9)."""
    if schedule == "constant":
        return base_lr
    return base_lr * max(0.0, 1.0 - step / max(total, 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def model_dtype(cfg: TidalConfig) -> torch.dtype:
    return torch_dtype(cfg.model.dtype)


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, use_gpu: bool) -> None:
    """Join the learners' process group (a no-op when this process is already in one), on the device
    of the rank's plan (tidal.actors.devices): DeepSpeed's accelerator must be the same, and it is
    fixed once deepspeed is imported, so a process that imported it for another device is refused."""
    accelerator = "cuda" if use_gpu else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", accelerator)  # an actor has it from its runtime_env already
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")  # Ray gives each rank its own device 0
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != accelerator:
        raise RuntimeError(f"learner rank {rank} trains on {accelerator} but DeepSpeed's accelerator in this process is "
                           f"{get_accelerator().device_name()} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}); "
                           "DeepSpeed fixes it at import: run each rank in its own process (tidal.actors.devices)")
    # The shared-memory comm op compiles with g++ for ~70 s at init; gloo does not need it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        # Someone else (e.g. an in-process vLLM engine) may have destroyed an earlier group with
        # torch's API; DeepSpeed would otherwise keep using its cached, dead subgroups.
        from deepspeed.utils import groups

        if hasattr(groups, "_release_process_group_references"):
            groups._release_process_group_references(None)
    if use_gpu:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    import torch.distributed as dist

    if dist.get_world_size() != world_size:
        raise RuntimeError(f"this process already belongs to a process group of size {dist.get_world_size()}, "
                           f"not {world_size}; run each learner rank in its own process")


@contextmanager
def zero3_construction(cfg: TidalConfig, world_size: int) -> Iterator[None]:
    """Under ZeRO-3, models built inside this block are partitioned as they load: transformers
    sees a live HfDeepSpeedConfig and loads each rank's slice under zero.Init, so no rank ever
    holds the whole model. The config is dropped on exit so later plain loads stay plain.
    transformers' model code must be imported before zero.Init patches module construction."""
    if cfg.learner.zero_stage != 3:
        yield
        return
    import transformers.modeling_utils  # noqa: F401 - import model code before zero.Init (docs/platform.md#p-zero3-init)
    from transformers.integrations import HfDeepSpeedConfig

    live = HfDeepSpeedConfig(ds_config(cfg.learner, world_size, model_dtype(cfg) == torch.bfloat16))
    try:
        yield
    finally:
        del live  # transformers holds it by weak reference only


def build_policy(cfg: TidalConfig, path: str, world_size: int) -> torch.nn.Module:
    """The causal LM, dropout off, optionally with gradient checkpointing and LoRA adapters."""
    from tidal.common.models import load_causal_lm

    lc = cfg.learner
    with zero3_construction(cfg, world_size):
        model = load_causal_lm(path, model_dtype(cfg))
    if lc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = spec_from_config(cfg)
    if lora is not None:  # learner.lora_target_modules (tidal.common.lora)
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config())
    return model.train()


def build_value(cfg: TidalConfig, path: str, world_size: int,
                affine: tuple[float, float] | None = None) -> torch.nn.Module:
    """Value model (critic or reward model): LM backbone + scalar head, from a reward-model
    folder (head included, docs/implementation.md#d9) or a plain LM folder (fresh head). `affine` = (shift,
    scale): the head is rewritten to output (raw - shift) / scale, so a critic initialised from
    a reward model starts on the scale of the normalised rewards it must predict."""
    from tidal.common.models import load_value_model

    with zero3_construction(cfg, world_size):
        model = load_value_model(path, model_dtype(cfg))
    if affine is not None:
        fold_head(model, *affine, partitioned=cfg.learner.zero_stage == 3)
    if cfg.learner.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@torch.no_grad()
def fold_head(model: torch.nn.Module, shift: float, scale: float, partitioned: bool) -> None:
    """value_head(x) -> (value_head(x) - shift) / scale, in place. Under ZeRO-3 the head's
    partitions are gathered, changed on rank 0 and scattered back (every rank must call this)."""
    from contextlib import nullcontext

    from tidal.common.models import fold_affine_into_value_head

    if not partitioned:
        fold_affine_into_value_head(model, shift, scale)
        return
    import deepspeed

    head = model.value_head
    with deepspeed.zero.GatheredParameters([head.weight, head.bias], modifier_rank=0) if partitioned else nullcontext():
        head.weight.data.copy_((head.weight.data.double() / scale).to(head.weight.dtype))
        head.bias.data.copy_(((head.bias.data.double() - shift) / scale).to(head.bias.dtype))


def make_engine(cfg: TidalConfig, module: torch.nn.Module, lr: float, world_size: int):
    """deepspeed.initialize with torch AdamW, fused where the device has the kernel (eps from config,
    docs/implementation.md#d9), over the trainable parameters only (LoRA: the adapters)."""
    import deepspeed

    lc = cfg.learner
    params = [p for p in module.parameters() if p.requires_grad]
    try:  # torch's fused kernel: one pass over each tensor (0.05 s vs 0.2-0.3 s per step at 135M on CPU)
        optimizer = torch.optim.AdamW(params, lr=lr, eps=lc.adam_eps, weight_decay=lc.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        optimizer = torch.optim.AdamW(params, lr=lr, eps=lc.adam_eps, weight_decay=lc.weight_decay)
    config = ds_config(lc, world_size, model_dtype(cfg) == torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if world_size == 1 and config["zero_optimization"]["stage"] == 0:
        # One rank: the gradient all-reduce is an identity, yet DeepSpeed flattens every gradient
        # into a buffer, all-reduces it and copies it back (docs/performance.md).
        engine.enable_backward_allreduce = False
    return engine

