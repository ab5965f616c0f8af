"""Corrections for the gap between the rollout engine's probabilities and the trainer's pi_old
(algorithm.mismatch_correction, docs/algorithms.md#mismatch).

The engine samples from pi_engine; the loss takes its ratio against pi_old, the trainer's
log-probs of the same weights (or, in async mode, of newer weights). Off-policy lag, top-k/top-p
sampling and bf16 numerics (engine and trainer kernels round differently) make pi_engine differ
from pi_old, and an uncorrected policy gradient is then biased. Every correction here is a
per-token weight, treated as a constant, that multiplies each token's policy loss before the
aggregation (the normaliser stays: a masked token adds nothing and takes no share):

  tis       truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework
            Secretly Brings You Off-Policy RL Training"; IMPALA's V-trace truncation):
            w_t = min(pi_old(y_t) / pi_engine(y_t), C)
  seq_mask  sequence-level masking (Liu et al. 2025, "When Speed Kills Stability: Demystifying RL
            Collapse from the Training-Inference Mismatch", sequence-level MIS): w_it = 1 when
            the sequence ratio rho_i = prod_t pi_old(y_it) / pi_engine(y_it) lies in [1/C, C], else 0
  icepop    IcePop (Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for
            Trillion-Scale Thinking Model", Ring-1T): w_t = 1 when pi_old(y_t) / pi_engine(y_t)
            lies in [1/C, C], else 0

C = algorithm.mismatch_threshold. Each reports what it touched: `token_share` (real tokens
truncated or masked) and `seq_share` (responses with at least one such token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tidal.common.ops import masked_mean
from tidal.learner.losses import truncated_is_weights

if TYPE_CHECKING:
    from tidal.common.config import TidalConfig

KINDS = ("tis", "seq_mask", "icepop")


def icepop_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                   k: float) -> torch.Tensor:
    """IcePop's token mask: 1 where pi_old / pi_engine is in [1/k, k], 0 elsewhere and on
    padding. (B, T) each -> (B, T), detached."""
    real = mask.bool()
    log_ratio = torch.where(real, old_logprobs - engine_logprobs, 0.0)
    keep = log_ratio.abs() <= math.log(k)
    return torch.where(real & keep, 1.0, 0.0).detach()


def sequence_mask_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                          c: float) -> torch.Tensor:
    """Sequence-level masking: 1 on every real token of a response whose ratio
    prod_t pi_old / pi_engine is in [1/c, c], 0 on the others and on padding. (B, T) -> (B, T)."""
    real = mask.bool()
    seq_log_ratio = torch.where(real, old_logprobs - engine_logprobs, 0.0).sum(-1)  # (B,) log rho_i
    keep = (seq_log_ratio.abs() <= math.log(c))[:, None]
    return torch.where(real & keep, 1.0, 0.0).detach()


@dataclass(frozen=True)
class Correction:
    """One configured correction: its kind (KINDS) and threshold C (module doc)."""

    kind: str
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown mismatch correction {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.threshold > 1.0:
            raise ValueError(f"mismatch threshold must be > 1, got {self.threshold}")

    def weights(self, old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token weights (B, T) of the policy loss and what they touched: token_share, the
        share of real tokens truncated or masked, and seq_share, the share of responses (with a
        real token) holding one."""
        real = mask.bool()
        if self.kind == "tis":
            w = truncated_is_weights(old_logprobs, engine_logprobs, mask, self.threshold)
            touched = real & (torch.where(real, old_logprobs - engine_logprobs, 0.0) > math.log(self.threshold))
        else:
            fn = icepop_weights if self.kind == "icepop" else sequence_mask_weights
            w = fn(old_logprobs, engine_logprobs, mask, self.threshold)
            touched = real & (w == 0)
        rows = real.any(-1)
        with torch.no_grad():
            stats = {"token_share": masked_mean(touched.float(), mask),
                     "seq_share": (touched.any(-1) & rows).float().sum() / rows.float().sum().clamp(min=1.0)}
        return w, stats


def correction_for(cfg: "TidalConfig", off_policy: bool) -> Correction | None:
    """The run's correction: algorithm.mismatch_correction, where `auto` is tis for `off_policy`
    samples (async mode, top-k/top-p sampling: the driver decides) and none otherwise."""
    a = cfg.algorithm
    kind = a.mismatch_correction
    if kind == "auto":
        kind = "tis" if off_policy else "none"
    return None if kind == "none" else Correction(kind, a.mismatch_threshold)
