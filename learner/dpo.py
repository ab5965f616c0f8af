"""DPO data: comparisons and K-wise rankings -> (chosen, rejected) pairs -> one padded batch.

The same files the reward-model stage reads feed DPO. A comparison is one pair; a ranking of K
responses gives all C(K, 2) pairs of its prompt, the better-ranked response as `chosen`, each
weighing 1 / C(K, 2) (the pairwise decomposition and weighting the InstructGPT reward model
uses, here applied to the policy): a ranking weighs as much as one comparison, not C(K, 2) of
them. A comparison row's own `weight` (tidal.common.data; the comparisons export writes
1 / C(K, 2)) is kept. The loss is the weighted mean over a minibatch's pairs, exact for any
micro-batch split and rank count (`DPOBatch.loss_mass`, LearnerWorker.run_step).
Tokenization is exactly `build_preference_batch`'s (tidal.learner.reward_model): the prompt
like an RL prompt (left cut), each response with EOS appended and cut to max_response_tokens, so
a DPO policy and a reward model trained on one file see the same token sequences.

The batch stacks chosen rows over rejected rows ([0, N) chosen, [N, 2N) rejected), padded
together, so one forward pass (`sequence_logprobs`) gives the token log-probs of both; sum them
under `response_mask` with `sequence_logps` and hand the halves to `dpo_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from tidal.common.data import ComparisonRecord, RankingRecord
from tidal.common.prompts import render_prompt
from tidal.learner.experience import pad_prompt_response
from tidal.learner.losses import dpo_loss
from tidal.learner.sft import tokenize_prompt, tokenize_response


DPO_LOSSES = ("sigmoid", "ipo", "ipo_mean")  # stages.dpo.loss


def ranking_pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """The (better, worse) index pairs of one ranking (ranking[i] = rank of response i, 0 = best):
    all C(K, 2) pairs but the tied ones (equal ranks prefer neither), ordered by the better
    response's rank, then the worse one's, so the output does not depend on the order the
    responses were listed in."""
    by_rank = sorted(range(len(ranking)), key=lambda i: ranking[i])  # indices best first
    return [(by_rank[a], by_rank[b]) for a in range(len(by_rank)) for b in range(a + 1, len(by_rank))
            if ranking[by_rank[a]] < ranking[by_rank[b]]]


def preference_pairs(records: list[ComparisonRecord | RankingRecord]) -> tuple[list[ComparisonRecord], list[int]]:
    """Every record as comparisons: a comparison as is (with its weight), a ranking as its
    C(K, 2) pairs (better first), each of weight 1 / C(K, 2). Returns (pairs, source) with
    source[j] = index of the record pair j came from."""
    pairs, source = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, ComparisonRecord):
            pairs.append(rec)
            source.append(i)
        elif isinstance(rec, RankingRecord):
            weight = 1.0 / math.comb(len(rec.responses), 2)
            for better, worse in ranking_pairs(rec.ranking):
                pairs.append(ComparisonRecord(rec.prompt, rec.responses[better], rec.responses[worse], weight))
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
    weight: torch.Tensor  # (N,) float, each pair's weight in the loss's weighted mean
    ref_logps: torch.Tensor | None = None  # (2N,) float, reference sequence log-probs, once known

    def __len__(self) -> int:
        return self.source.shape[0]

    @property
    def loss_mass(self) -> float:
        """What this batch's loss is a mean over, its pairs' total weight: run_step weighs each
        micro-batch's loss by it, so a minibatch's loss is its pairs' weighted mean however it is split."""
        return float(self.weight.sum())

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
                        self.source[idx], self.weight[idx], ref)

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
    return DPOBatch(input_ids, attention_mask, response_mask, torch.tensor(source, dtype=torch.long),
                    torch.tensor([p.weight for p in pairs], dtype=torch.float32))


def sequence_logps(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token log-probs and mask -> (B,) log-prob of each whole response: the sum
    over real tokens (a sum, not a mean: DPO's ratio is of sequence probabilities). Padded
    positions are zeroed with torch.where, so garbage there cannot leak in."""
    return torch.where(response_mask.bool(), token_logprobs, 0.0).sum(-1)


def dpo_batch_loss(policy_token_logprobs: torch.Tensor, batch: DPOBatch, beta: float, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO/IPO loss of one (micro-)batch from the policy's token log-probs of its 2N rows,
    `sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_len)`: the
    weighted mean over its pairs (`batch.weight`). The batch must carry reference log-probs
    (`with_reference`). loss_type: sigmoid (DPO) or ipo on summed sequence log-probs, or
    ipo_mean: IPO on per-token mean log-probs (policy and reference both divided by each
    response's token count), TRL's length-normalised IPO, whose beta is comparable with TRL's."""
    if batch.ref_logps is None:
        raise ValueError("DPOBatch has no reference log-probs; compute them with the frozen SFT model "
                         "and attach them with batch.with_reference(...) before training")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSSES)}")
    n = len(batch)
    mask = batch.response_mask.to(policy_token_logprobs.device)
    logps = sequence_logps(policy_token_logprobs, mask)  # (2N,)
    ref = batch.ref_logps.to(logps.device, logps.dtype)  # (2N,)
    if loss_type == "ipo_mean":
        lengths = mask.sum(-1).clamp(min=1.0).to(logps.dtype)  # (2N,) response tokens, EOS included
        logps, ref, loss_type = logps / lengths, ref / lengths, "ipo"
    loss, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type, label_smoothing,
                             weights=batch.weight)
    out = {"losses/dpo": loss.item(), **{f"dpo/{k}": v.item() for k, v in metrics.items()}}
    out["dpo/pairs"] = float(n)
    return loss, out


def pairs_per_record(record: ComparisonRecord | RankingRecord) -> int:
    """How many DPO pairs a record gives (1, or C(K, 2) less the tied pairs); for sizing epochs and logs."""
    return 1 if isinstance(record, ComparisonRecord) else len(ranking_pairs(record.ranking))
