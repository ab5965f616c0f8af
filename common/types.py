"""Typed batches that cross actor boundaries.

Shapes use B = number of sequences (prompts x samples), P = padded prompt length,
R = padded response length. Sequence tensors are laid out as [prompt | response]:
prompts LEFT-padded to P, responses RIGHT-padded to R, so every response starts at column P.
Per-token response tensors (logprobs, values, advantages, ...) are (B, R) and aligned with the
response tokens: column t holds the quantity for response token t (predicted at position P+t-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class PromptBatch:
    """Prompts to generate from. `index` is a global prompt id, so a pool can account for
    every prompt exactly once even when a worker dies and its prompts are re-queued."""

    index: list[int]  # (N,) global prompt ids
    text: list[str]  # (N,) prompt text (chat template already applied)
    token_ids: list[list[int]]  # (N, *) prompt token ids, unpadded
    reference: list[str | None] = field(default_factory=list)  # (N,) optional reference answers

    def __len__(self) -> int:
        return len(self.index)

    def slice(self, start: int, stop: int) -> "PromptBatch":
        ref = self.reference[start:stop] if self.reference else []
        return PromptBatch(self.index[start:stop], self.text[start:stop], self.token_ids[start:stop], ref)


@dataclass(frozen=True)
class RolloutBatch:
    """Completions, n per prompt, grouped: rows [i*n, (i+1)*n) belong to the same prompt."""

    prompt_index: list[int]  # (B,) global prompt id of each sample
    prompt_text: list[str]  # (B,)
    prompt_ids: list[list[int]]  # (B, *) unpadded prompt token ids
    response_text: list[str]  # (B,)
    response_ids: list[list[int]]  # (B, *) unpadded response token ids (EOS included if emitted)
    response_logprobs: list[list[float]]  # (B, *) sampling logprob of each response token
    finish_reason: list[str]  # (B,) "stop" (EOS/stop string) or "length"
    weight_version: list[int]  # (B,) weight version that generated each sample
    reference: list[str | None] = field(default_factory=list)  # (B,) optional reference answers
    # (B, *) weight version that sampled each response token (rollout.partial: a continued response
    # spans versions); empty: every token has its row's weight_version
    token_versions: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_index)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        def cat(name: str) -> list:
            return [x for b in batches for x in getattr(b, name)]

        return RolloutBatch(
            cat("prompt_index"), cat("prompt_text"), cat("prompt_ids"), cat("response_text"),
            cat("response_ids"), cat("response_logprobs"), cat("finish_reason"),
            cat("weight_version"), cat("reference"),
            cat("token_versions") if all(b.token_versions or not len(b) for b in batches) else [],
        )


@dataclass(frozen=True)
class ScoredBatch:
    """A rollout with one scalar reward per sample and the reward terms that made it."""

    rollout: RolloutBatch
    scores: torch.Tensor  # (B,) float32, combined reward (normalized/clipped as configured)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,) raw term values
    valid: torch.Tensor | None = None  # (B,) bool; False rows were dropped for NaN/inf rewards
    # (B,) float32 weighted sum of the terms before normalization, clipping and the EOS penalty (0 where
    # invalid): what a sample scored, for ranking samples (expert iteration). None: not recorded
    raw_scores: torch.Tensor | None = None


@dataclass(frozen=True)
class Experience:
    """One RL training batch, padded to tensors (see module docstring for the layout)."""

    input_ids: torch.Tensor  # (B, P+R) long, [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor  # (B, P+R) long, 1 on real tokens
    response_mask: torch.Tensor  # (B, R) float, 1 on real response tokens
    old_logprobs: torch.Tensor | None  # (B, R) pi_old at collection; None: taken inside the update
    ref_logprobs: torch.Tensor  # (B, R) frozen reference policy logprobs
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R) value targets (zeros for critic-free algorithms)
    values: torch.Tensor  # (B, R) critic values at collection (zeros when no critic)
    scores: torch.Tensor  # (B,) sequence rewards
    rollout_logprobs: torch.Tensor | None = None  # (B, R) engine logprobs (off-policy IS correction)
    weight_version: torch.Tensor | None = None  # (B,) long
    # (B,) float: 1 where the row enters the policy loss, 0 where it is left out (overlong filtering);
    # None: every row. The row's KL and metrics still count.
    trains: torch.Tensor | None = None
    # (B, R) float: 1 on tokens young enough to train, 0 on tokens sampled more than
    # tidal.learner.experience.max_token_lag versions before the trained one (rollout.partial: a continued
    # response spans versions); None: every token
    token_trains: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows `idx` of every tensor (minibatching)."""
        return replace(self, **{
            k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
        })
