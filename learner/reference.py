"""The frozen reference policy: per-token logprobs for the KL penalty (docs/implementation.md#d5).

Plain torch, no optimizer and no process group: it never trains, so there is nothing to shard
on CPU. A plain class; `LearnerGroup` runs it as one Ray actor next to the learner ranks.
"""

from __future__ import annotations

import os

import torch

from tidal.actors.devices import enter_device
from tidal.actors.threads import apply_threads
from tidal.common.config import TidalConfig
from tidal.common.models import load_causal_lm, sequence_logprobs
from tidal.common.precision import autocast, torch_dtype


class ReferenceWorker:
    def __init__(self, cfg: TidalConfig, model_path: str, num_threads: int = 0, autocast_bf16: bool = False):
        self.num_threads = apply_threads(num_threads)  # tidal.actors.threads
        self.use_gpu = cfg.learner.gpus_per_worker > 0
        self.device = enter_device(self.use_gpu, "reference worker")  # tidal.actors.devices
        dtype = torch_dtype(cfg.model.dtype)
        self.model = load_causal_lm(model_path, dtype).to(self.device).requires_grad_(False)
        # the policy's precision, as its group decided it (precision.decide_autocast), whatever this
        # process's hardware would choose: the KL to the reference must be 0 at the start
        self.autocast = autocast_bf16
        self.micro_batch_size = cfg.learner.micro_batch_size

    @torch.no_grad()
    def compute_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                         temperature: float) -> torch.Tensor:
        """(B, P+R) inputs -> (B, R) reference logprobs of the response tokens, with the same
        logits / temperature and mask-derived position ids as the policy (docs/implementation.md#d2, #d3)."""
        t = temperature if temperature > 0 else 1.0
        out = []
        for i in range(0, len(input_ids), self.micro_batch_size):
            ids = input_ids[i:i + self.micro_batch_size].to(self.device)
            mask = attention_mask[i:i + self.micro_batch_size].to(self.device)
            with autocast(self.autocast, self.device):
                out.append(sequence_logprobs(self.model, ids, mask, response_len, t).float().cpu())
        return torch.cat(out)

    def ready(self) -> bool:
        return True

    def describe(self) -> dict:
        return {"pid": os.getpid(), "num_threads": torch.get_num_threads(), "autocast_bf16": self.autocast}
