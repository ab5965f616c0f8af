"""Expert iteration (Anthony et al. 2017; best-of-n sampling, fine-tuning on the best, repeated):
from one step's scored samples keep the selected ones and turn them into an SFT batch.

Selection is `select_for_expert_iteration` (tidal.learner.selection): each prompt's
algorithm.ei_top_k best samples, and/or those scoring >= algorithm.ei_threshold. The best are
ranked by the raw reward (ScoredBatch.raw_scores, the weighted sum of the terms): the scores the
RL loop trains on are the same order after normalisation, but reward.clip ties samples at the
clip (the first would win, not the best) and reward.missing_eos_penalty replaces a truncated
sample's score. The threshold is on the trained scores (after normalisation and clipping).
Rows with an invalid reward are never kept, and with reward.missing_eos_penalty set (a response
without EOS declared bad) neither is a sample that did not end with EOS (cut at max_new_tokens).
The kept rows become demonstrations exactly as the rollout produced them: the prompt tokens, and
the response tokens up to and including the first EOS.
"""

from __future__ import annotations

import torch

from tidal.common.types import ScoredBatch
from tidal.learner.experience import pad_prompt_response, select_rollout, truncate_after_eos
from tidal.learner.selection import select_for_expert_iteration
from tidal.learner.sft import SFTBatch


def expert_rows(scored: ScoredBatch, group_size: int, top_k: int | None, threshold: float | None,
                keep_truncated: bool = True) -> torch.Tensor:
    """Flat row indices (ascending) of the samples to fine-tune on; may be empty.
    keep_truncated False: samples that did not end with EOS (finish_reason other than "stop")
    are never kept."""
    eligible = torch.ones(len(scored.rollout), dtype=torch.bool) if scored.valid is None else scored.valid.bool()
    if not keep_truncated:
        eligible = eligible & torch.tensor([f == "stop" for f in scored.rollout.finish_reason], dtype=torch.bool)
    rank_by = scored.raw_scores if scored.raw_scores is not None else scored.scores
    return select_for_expert_iteration(scored.scores.float(), group_size, top_k, threshold, eligible,
                                       rank_by=rank_by.float())


def expert_batch(scored: ScoredBatch, rows: torch.Tensor, pad_id: int, eos_id: int | None) -> SFTBatch:
    """The kept rows as an SFT batch (prompt masked out, response + EOS trained on)."""
    kept = select_rollout(scored.rollout, rows.tolist())
    responses = kept.response_ids if eos_id is None else truncate_after_eos(kept.response_ids, eos_id)
    return SFTBatch(*pad_prompt_response(kept.prompt_ids, responses, pad_id))


def fill_to_multiple(batch: SFTBatch, multiple: int) -> SFTBatch:
    """Repeat rows from the start until the row count is a multiple of `multiple` (one optimizer
    step needs a whole minibatch; a round may keep fewer or an odd number of samples). Each
    kept sample is then seen once or twice in the round, never dropped."""
    n = len(batch)
    target = -(-n // multiple) * multiple
    return batch if target == n else batch.select(torch.arange(target) % n)
