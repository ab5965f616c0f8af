"""Reward-model training data and losses: pairwise (Bradley-Terry) and K-wise rankings.

A prompt with K ranked responses becomes K rows [left-padded prompt | right-padded response +
EOS]; the K rows of one prompt are adjacent and always travel together (same rank, same
micro-batch), so all C(K, 2) pairs of a prompt are in the same batch (InstructGPT; docs/implementation.md#d11).
A comparison is the K = 2 case with ranks (0, 1), weighted by its `weight` (tidal.common.data:
the comparisons export gives each pair of a K-wise ranking 1 / C(K, 2), the weight the ranking
loss gives it); the loss is the weighted mean over prompts, exact for any micro-batch split
(`PreferenceBatch.loss_mass`). The score is the value head at the last real token
(docs/implementation.md#d1), which makes it independent of the amount of padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tidal.common.data import ComparisonRecord, RankingRecord
from tidal.common.prompts import render_prompt
from tidal.learner.experience import pad_prompt_response
from tidal.learner.losses import pairwise_reward_loss, ranking_reward_loss
from tidal.learner.sft import tokenize_prompt, tokenize_response

if TYPE_CHECKING:
    from tidal.learner.worker import LearnerWorker


@dataclass(frozen=True)
class PreferenceBatch:
    """N prompts x K responses; rows [i*K, (i+1)*K) are prompt i's responses."""

    input_ids: torch.Tensor  # (N*K, T) long, [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor  # (N*K, T) long
    ranks: torch.Tensor  # (N, K) long, rank of each response, 0 = best
    weight: torch.Tensor  # (N,) float, each prompt's weight in the loss (a comparison's weight; rankings 1)

    def __len__(self) -> int:
        return self.ranks.shape[0]

    @property
    def loss_mass(self) -> float:
        """The prompts' total weight, what the loss is a mean over (see LearnerWorker.run_step)."""
        return float(self.weight.sum())

    @property
    def group_size(self) -> int:
        return self.ranks.shape[1]

    def select(self, idx: torch.Tensor) -> "PreferenceBatch":
        """Prompts `idx` (N indices), each with all of its K rows."""
        K = self.group_size
        rows = (idx[:, None] * K + torch.arange(K)).flatten()
        return PreferenceBatch(self.input_ids[rows], self.attention_mask[rows], self.ranks[idx], self.weight[idx])


def build_preference_batch(tokenizer, records: list[ComparisonRecord | RankingRecord], max_prompt_tokens: int,
                           max_response_tokens: int, use_chat_template: bool) -> PreferenceBatch:
    """Tokenize comparisons (chosen ranked 0, rejected 1) or K-wise rankings; every record of a
    batch must have the same K."""
    prompts, responses, ranks, weights = [], [], [], []
    for i, rec in enumerate(records):
        if isinstance(rec, ComparisonRecord):
            texts, ranking, weight = [rec.chosen, rec.rejected], [0, 1], rec.weight
        else:
            texts, ranking, weight = list(rec.responses), list(rec.ranking), 1.0
        if ranks and len(ranking) != len(ranks[0]):
            raise ValueError(f"record {i} has {len(ranking)} responses but record 0 has {len(ranks[0])}; "
                             "a preference batch needs the same K for every prompt (split the file by K)")
        prompt = tokenize_prompt(tokenizer, render_prompt(tokenizer, rec.prompt, use_chat_template),
                                 max_prompt_tokens, use_chat_template)
        for text in texts:
            prompts.append(prompt)
            responses.append(tokenize_response(tokenizer, text, max_response_tokens))
        ranks.append(ranking)
        weights.append(weight)
    input_ids, attention_mask, _ = pad_prompt_response(prompts, responses, tokenizer.pad_token_id)
    return PreferenceBatch(input_ids, attention_mask, torch.tensor(ranks, dtype=torch.long),
                           torch.tensor(weights, dtype=torch.float32))


def preference_loss(scores: torch.Tensor, ranks: torch.Tensor, kind: str,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """scores (N, K), ranks (N, K), weights (N,) or None -> scalar. pairwise: Bradley-Terry on
    K = 2; ranking: the mean over prompts of 1/C(K,2) x the sum of the prompt's pairwise terms.
    Both means over prompts are weighted by `weights` when given."""
    if kind == "pairwise":
        if scores.shape[1] != 2:
            raise ValueError(f"rm loss 'pairwise' needs 2 responses per prompt, got {scores.shape[1]}; "
                             "use stages.rm.loss=ranking for K-wise data")
        chosen_first = ranks[:, 0] < ranks[:, 1]  # (N,)
        chosen = torch.where(chosen_first, scores[:, 0], scores[:, 1])
        rejected = torch.where(chosen_first, scores[:, 1], scores[:, 0])
        return pairwise_reward_loss(chosen, rejected, weights)
    if kind == "ranking":
        return ranking_reward_loss(scores, ranks, weights)
    raise ValueError(f"unknown reward-model loss {kind!r}; choose 'pairwise' or 'ranking'")


def pair_accuracy(scores: torch.Tensor, ranks: torch.Tensor) -> tuple[int, int]:
    """(correctly ordered pairs, all pairs) over every C(K, 2) pair of every prompt. (N, K) inputs."""
    better = ranks[:, :, None] < ranks[:, None, :]  # (N, K, K): i ranked above j
    correct = (scores[:, :, None] > scores[:, None, :]) & better
    return int(correct.sum()), int(better.sum())


def reward_micro_loss(worker: "LearnerWorker", batch: PreferenceBatch, kind: str
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Preference loss of one micro-batch of whole prompts (all K rows of each)."""
    scores = worker.reward_scores(batch.input_ids, batch.attention_mask)  # (N*K,)
    scores = scores.view(-1, batch.group_size)  # (N, K)
    ranks = batch.ranks.to(scores.device)
    loss = preference_loss(scores, ranks, kind, batch.weight)
    correct, pairs = pair_accuracy(scores.detach(), ranks)
    return loss, {"losses/reward": loss.item(), "reward/train_accuracy": correct / max(pairs, 1),
                  "reward/score_mean": scores.mean().item()}


class RewardRoleCalls:
    """The calls a reward-role LearnerWorker answers for online RLHF's reward learner (mixed into
    LearnerWorker): the trunk's features for the ensemble heads, and the weight publish the
    reward workers hot-swap to."""

    @torch.no_grad()
    def compute_features(self: "LearnerWorker", input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model trunk features (N, H) at each row's last real token (reward role)."""
        from tidal.common.precision import autocast

        self._need(self.spec.role == "reward", "compute_features", "a reward learner")
        with autocast(self.autocast, self.device):
            return torch.cat([self.engine.module.features(input_ids[s].to(self.device),
                                                          attention_mask[s].to(self.device)).float().cpu()
                              for s in self._micro(len(input_ids))])

    def export_reward_weights(self: "LearnerWorker", version: int, bucket_mb: float, transport):
        """Publish the value model (trunk + head, under the names a reward worker's model loads)
        as `version` through `transport`; rank 0 returns the handle, the others None."""
        from tidal.learner.export import iter_named_weights

        self._need(self.spec.role == "reward", "export_reward_weights", "a reward learner")
        named = iter_named_weights(self.engine.module, keep=self.rank == 0)
        if self.rank != 0:
            for _ in named:  # every rank gathers (ZeRO-3); rank 0 keeps
                pass
            return None
        return transport.publish(named, version, bucket_mb)
