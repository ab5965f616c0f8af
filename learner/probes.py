"""What a learner rank reports about itself for tests, logs and benchmarks (LearnerWorker.describe,
LearnerWorker.parameter_snapshot): seeds, dropout, parameter counts, memory."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tidal.learner.worker import LearnerWorker


def parameter_snapshot(w: "LearnerWorker", trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full copies of the main engine's raw parameters (trainer names, LoRA factors included)
    on EVERY rank - under ZeRO-3 each rank gathers, so ranks can be compared (tests, debugging)."""
    from tidal.learner.export import _gathered

    named = [(n, p) for n, p in w.engine.module.named_parameters() if p.requires_grad or not trainable_only]
    with _gathered([p for _, p in named]):
        return {n: p.data.detach().float().cpu().clone() for n, p in named}


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): what a benchmark compares per actor."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe(w: "LearnerWorker") -> dict:
    """Facts tests and logs check: seeds, dropout, parameter counts (full sizes under ZeRO-3)."""
    module = w.engine.module
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    dropout = max([m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)] +
                  [v for k, v in vars(module.config).items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)], default=0.0)
    with torch.random.fork_rng(devices=[]):
        probe = torch.rand(1).item()  # differs between ranks iff their streams differ
    return {"rank": w.rank, "world_size": w.world_size, "seed": w.seed, "rng_probe": probe, "pid": os.getpid(),
            "max_dropout": dropout, "training": module.training, "zero_stage": w.engine.zero_optimization_stage(),
            "params": sum(numel(p) for p in module.parameters()),
            "trainable_params": sum(numel(p) for p in module.parameters() if p.requires_grad),
            "has_critic": w.critic is not None, "autocast_bf16": w.autocast,
            "num_threads": torch.get_num_threads(), "forward_threads": w.forward_threads,
            "peak_rss_mb": peak_rss_mb()}
