"""Sampling parameters and what they do to logprobs.

Logprob consistency (docs/implementation.md#c5). A rollout engine reports, for every sampled token,
the log-probability under the distribution it actually sampled from:

    temperature T, no top-k/top-p:  log softmax(logits / T)[token]
        == what the trainer computes (`sequence_logprobs(..., temperature=T)`), so the
        importance ratio pi_trainer / pi_rollout is 1 for identical weights;
    with top_k > 0 and/or top_p < 1: log softmax(mask(logits / T))[token], where `mask` sets
        every token outside the top-k / nucleus to -inf (`filtered_logprobs` below). This is
        the true behaviour-policy probability, renormalized over the kept tokens, so it is
        >= the trainer's full-softmax logprob by -log(kept probability mass). The trainer
        does not apply the filter: use top_k/top_p only knowingly with IS corrections.
    temperature 0 (greedy): log softmax(logits) of the argmax token (no scaling).

vLLM gives exactly these with `LLM(logprobs_mode="processed_logprobs")` (its default,
"raw_logprobs", ignores temperature and filtering); the transformers backend computes them
with `filtered_logprobs`. tests/test_rollout_logprobs.py checks both against a forward pass.

Seeds: each prompt gets its own seed, derived from the pool seed and the prompt's global
index, and vLLM gives the k-th sample seed + k. So a prompt's samples do not depend on which
worker or chunk it lands in (a re-queued prompt is sampled the same way), and samples of
different prompts are not correlated (a shared SamplingParams(seed) makes the k-th sample of
every prompt nearly identical, docs/platform.md#p-vllm-seeds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tidal.common.config import RolloutConfig

_SEED_MASK = 2**31 - 1


@dataclass(frozen=True)
class Sampling:
    """How to sample one batch."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass (1: off)
    top_k: int = -1  # -1: off
    max_new_tokens: int = 32
    seed: Optional[int] = 0  # base of the per-prompt seeds; None: unseeded (engine RNG)

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "-1 (off) or >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"Sampling.{name}={getattr(self, name)!r}: expected {expected}.")

    @staticmethod
    def from_config(rollout: RolloutConfig, seed: Optional[int] = 0) -> "Sampling":
        return Sampling(rollout.n_samples, rollout.temperature, rollout.top_p, rollout.top_k,
                        rollout.max_new_tokens, seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Whether top-k/top-p change the distribution (and therefore the logprobs)."""
        return self.top_k > 0 or self.top_p < 1.0

    def prompt_seed(self, prompt_index: int) -> Optional[int]:
        """Seed of one prompt's samples (sample k uses seed + k)."""
        if self.seed is None:
            return None
        return _mix(self.seed, prompt_index) & _SEED_MASK


def _mix(a: int, b: int) -> int:
    """A splitmix64-style hash of two ints (decorrelates neighbouring prompt indices)."""
    x = (a * 0x9E3779B97F4A7C15 + b + 0x632BE59BD9B4E019) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 31)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top-k and the top-p nucleus set to -inf.
    (..., V) -> (..., V). Ties at the k-th value are kept; the nucleus is the smallest set of
    highest-probability tokens whose mass reaches top_p (the most likely token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - top_p  # the low tail whose total mass is <= 1 - p
        drop[..., -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def filtered_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                      top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Logprob of `labels` under the distribution a sampler with these settings draws from.
    logits (..., V), labels (...) -> (...). temperature 0 means greedy: no scaling."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    return F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def truncate_at_eos(token_ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS (docs/implementation.md#d4); whether one was found."""
    for i, t in enumerate(token_ids):
        if t in eos_ids:
            return token_ids[: i + 1], True
    return token_ids, False
