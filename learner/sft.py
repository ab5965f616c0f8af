"""Supervised fine-tuning on demonstrations: the batch, its tokenization, and the loss.

A demonstration is rendered to (prompt_text, response_text) by `tidal.common.data`; the prompt
is tokenized like an RL prompt (left-truncated), the response gets EOS appended so the model
learns to stop. The batch uses the Experience layout [left-padded prompt | right-padded
response]; only response tokens enter the loss (the prompt is masked out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tidal.common.data import DemonstrationRecord
from tidal.common.prompts import render_demonstration
from tidal.learner.experience import pad_prompt_response
from tidal.learner.losses import sft_loss

if TYPE_CHECKING:
    from tidal.learner.worker import LearnerWorker


@dataclass(frozen=True)
class SFTBatch:
    """Demonstrations padded to tensors (also the PPO-ptx batch)."""

    input_ids: torch.Tensor  # (N, P+R) long, [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor  # (N, P+R) long
    response_mask: torch.Tensor  # (N, R) float, 1 on response tokens (EOS included)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def select(self, idx: torch.Tensor) -> "SFTBatch":
        return SFTBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx])


def tokenize_prompt(tokenizer, prompt_text: str, max_prompt_tokens: int, use_chat_template: bool) -> list[int]:
    """Prompt ids as the RL prompt dataset makes them: a chat template writes its own special
    tokens, a plain prompt gets the tokenizer's; too-long prompts keep their END (left cut)."""
    ids = tokenizer(prompt_text, add_special_tokens=not use_chat_template)["input_ids"]
    return ids[-max_prompt_tokens:] if len(ids) > max_prompt_tokens else ids


def tokenize_response(tokenizer, response_text: str, max_response_tokens: int) -> list[int]:
    """Response ids with EOS appended, then cut to max_response_tokens (a cut response has no EOS:
    it did not end there)."""
    ids = tokenizer(response_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_response_tokens]


def build_sft_batch(tokenizer, records: list[DemonstrationRecord], max_prompt_tokens: int,
                    max_response_tokens: int, use_chat_template: bool) -> SFTBatch:
    """Tokenize and pad demonstrations (prompt + response, or a chat whose last turn is the answer)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; SFT appends EOS to every response")
    prompts, responses = [], []
    for rec in records:
        prompt_text, response_text = render_demonstration(tokenizer, rec, use_chat_template)
        prompts.append(tokenize_prompt(tokenizer, prompt_text, max_prompt_tokens, use_chat_template))
        responses.append(tokenize_response(tokenizer, response_text, max_response_tokens))
    input_ids, attention_mask, response_mask = pad_prompt_response(prompts, responses, tokenizer.pad_token_id)
    return SFTBatch(input_ids, attention_mask, response_mask)


def sft_micro_loss(worker: "LearnerWorker", batch: SFTBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the response tokens of one micro-batch."""
    logprobs, _ = worker.policy_logprobs(batch.input_ids, batch.attention_mask, batch.response_len, 1.0)
    mask = batch.response_mask.to(logprobs.device)
    loss = sft_loss(logprobs, mask)  # (,)
    return loss, {"losses/sft": loss.item(), "sft/tokens": mask.sum().item()}


class PtxSource:
    """PPO-ptx data (Ouyang et al. 2022): each RL step draws rows of the demonstrations, a
    function of (seed, step) only, so a resumed run draws the same rows as an uninterrupted one."""

    def __init__(self, batch: SFTBatch, seed: int):
        if len(batch) == 0:
            raise ValueError("PPO-ptx data is empty; point data.ptx at a file with demonstrations")
        self.batch, self.seed = batch, seed

    def for_step(self, step: int, n: int) -> SFTBatch:
        """n rows (with repeats when the data is smaller than n) for RL step `step`."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = torch.cat([torch.randperm(len(self.batch), generator=gen) for _ in range(-(-n // len(self.batch)))])
        return self.batch.select(rows[:n])
