"""DPO data: comparisons and K-wise rankings -> (chosen, rejected) pairs -> one padded batch.

The same files the reward-model stage reads feed DPO. A comparison is one pair; a ranking of K
responses gives all C(K, 2) pairs of its prompt, the better-ranked response as `chosen`
(the pairwise decomposition the InstructGPT reward model uses, here applied to the policy).
Tokenization is exactly `build_preference_batch`'s (tidal.learner.reward_model): the prompt
like an RL prompt (left cut), each response with EOS appended and cut to max_response_tokens, so
a DPO policy and a reward model trained on one file see the same token sequences.

The batch stacks chosen rows over rejected rows ([0, N) chosen, [N, 2N) rejected), padded
together, so one forward pass (`sequence_logprobs`) gives the token log-probs of both; sum them
under `response_mask` with `sequence_logps` and hand the halves to `dpo_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from tidal.common.data import ComparisonRecord, RankingRecord, render_prompt
from tidal.learner.experience import pad_prompt_response
from tidal.learner.losses import dpo_loss
from tidal.learner.sft import tokenize_prompt, tokenize_response


def ranking_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """The (better, worse) index pairs of one ranking (ranking[i] = rank of response i, 0 = best):
    all C(K, 2) pairs but the tied ones (equal ranks prefer neither), ordered by the better
    response's rank, then the worse one's, so the output does not depend on the order the
    responses were listed in."""
    by_rank = sorted(range(len(ranking)), key=lambda i: ranking[i])  # indices best first
    return [(by_rank[a], by_rank[b]) for a in range(len(by_rank)) for b in range(a + 1, len(by_rank))
            if ranking[by_rank[a]] < ranking[by_rank[b]]]


def preference_pairs(records: list[ComparisonRecord | RankingRecord]) -> tuple[list[ComparisonRecord], list[int]]:
    """Every record as comparisons: a comparison as is, a ranking as its C(K, 2) pairs (better
    first). Returns (pairs, source) with source[j] = index of the record pair j came from."""
    pairs, source = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, ComparisonRecord):
            pairs.append(rec)
            source.append(i)
        elif isinstance(rec, RankingRecord):
            for better, worse in ranking_pairs(rec.ranking):
                pairs.append(ComparisonRecord(rec.prompt, rec.responses[better], rec.responses[worse]))
                source.append(i)
        else:
            raise TypeError(f"record {i} is a {type(rec).__name__}; DPO needs comparisons or rankings")
    return pairs, source


@dataclass(frozen=True)
class DPOBatch:
    """N preference pairs; rows [0, N) are [prompt | chosen], rows [N, 2N) [prompt | rejected]
    (row i and row N + i share a prompt)."""

    input_ids: torch.Tensor  # (2N, P+R) long, [left-padded prompt | right-padded response + EOS]
    attention_mask: torch.Tensor  # (2N, P+R) long
    response_mask: torch.Tensor  # (2N, R) float, 1 on response tokens (EOS included)
    source: torch.Tensor  # (N,) long, index of the input record each pair came from
    ref_logps: torch.Tensor | None = None  # (2N,) float, reference sequence log-probs, once known
    token_mean_loss: ClassVar[bool] = False  # the loss is a mean over pairs: run_step must not token-scale it

    def __len__(self) -> int:
        return self.source.shape[0]

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Row indices (2n,) of pairs `idx` (n,): their chosen rows, then their rejected rows."""
        return torch.cat([idx, idx + len(self)])

    def select(self, idx: torch.Tensor) -> "DPOBatch":
        """Pairs `idx`, each with its chosen and its rejected row (a micro-batch of whole pairs)."""
        rows = self.rows(idx)
        ref = None if self.ref_logps is None else self.ref_logps[rows]
        return DPOBatch(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows],
                        self.source[idx], ref)

    def with_reference(self, ref_logps: torch.Tensor) -> "DPOBatch":
        """The batch carrying the frozen reference model's sequence log-probs (2N,), computed
        once before training (`sequence_logps` over the reference's token log-probs)."""
        if tuple(ref_logps.shape) != (2 * len(self),):
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}; need ({2 * len(self)},), one per row")
        return replace(self, ref_logps=ref_logps.detach().float().cpu())


def build_dpo_batch(tokenizer, records: list[ComparisonRecord | RankingRecord], max_prompt_tokens: int,
                    max_response_tokens: int, use_chat_template: bool) -> DPOBatch:
    """Tokenize comparisons and rankings (mixed K allowed: each record becomes its own pairs)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; DPO appends EOS to every response, as SFT does")
    pairs, source = preference_pairs(records)
    if not pairs:
        raise ValueError("no preference pairs: the comparisons/rankings data is empty")
    prompts, chosen, rejected = [], [], []
    for rec in pairs:
        prompt = tokenize_prompt(tokenizer, render_prompt(tokenizer, rec.prompt, use_chat_template),
                                 max_prompt_tokens, use_chat_template)
        prompts.append(prompt)
        chosen.append(tokenize_response(tokenizer, rec.chosen, max_response_tokens))
        rejected.append(tokenize_response(tokenizer, rec.rejected, max_response_tokens))
    input_ids, attention_mask, response_mask = pad_prompt_response(prompts + prompts, chosen + rejected,
                                                                   tokenizer.pad_token_id)
    return DPOBatch(input_ids, attention_mask, response_mask, torch.tensor(source, dtype=torch.long))


def sequence_logps(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token log-probs and mask -> (B,) log-prob of each whole response: the sum
    over real tokens (a sum, not a mean: DPO's ratio is of sequence probabilities). Padded
    positions are zeroed with torch.where, so garbage there cannot leak in."""
    return torch.where(response_mask.bool(), token_logprobs, 0.0).sum(-1)


def dpo_batch_loss(policy_token_logprobs: torch.Tensor, batch: DPOBatch, beta: float, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO/IPO loss of one (micro-)batch from the policy's token log-probs of its 2N rows,
    `sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_len)`.
    The batch must carry reference log-probs (`with_reference`)."""
    if batch.ref_logps is None:
        raise ValueError("DPOBatch has no reference log-probs; compute them with the frozen SFT model "
                         "and attach them with batch.with_reference(...) before training")
    n = len(batch)
    logps = sequence_logps(policy_token_logprobs, batch.response_mask.to(policy_token_logprobs.device))  # (2N,)
    ref = batch.ref_logps.to(logps.device, logps.dtype)
    loss, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type, label_smoothing)
    out = {"losses/dpo": loss.item(), **{f"dpo/{k}": v.item() for k, v in metrics.items()}}
    out["dpo/pairs"] = float(n)
    return loss, out


def pairs_per_record(record: ComparisonRecord | RankingRecord) -> int:
    """How many DPO pairs a record gives (1, or C(K, 2) less the tied pairs); for sizing epochs and logs."""
    return 1 if isinstance(record, ComparisonRecord) else len(ranking_pairs(record.ranking))
