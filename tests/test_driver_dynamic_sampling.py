"""The rollout side of a step (RLLoop._produce) with stand-in dataset, pool and reward: DAPO's
dynamic sampling fills every step with informative groups, in data order, logs what it dropped
and how many rounds it took, stops at its round cap; the soft overlong punishment shapes the
scores it looks at. The real-run versions are in tests/test_e2e_algorithms.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tidal.common.config import load_config
from tidal.common.types import PromptBatch, RolloutBatch, ScoredBatch
from tidal.driver.rl_loop import RLLoop, RLParts, step_sampling

N = 4  # samples per prompt


class Dataset:
    """Prompts 0, 1, 2, ... in order (the real PromptDataset's order is tested elsewhere)."""

    def __init__(self):
        self.position = 0

    def next_batch(self, n):
        idx = list(range(self.position, self.position + n))
        self.position += n
        return PromptBatch(idx, [f"p{i}" for i in idx], [[1, 2] for _ in idx])


@dataclass
class Stats:
    requeued_chunks: int = 0
    restarted_workers: list = field(default_factory=list)


class Pool:
    """Sample k of prompt i has i % 5 + k + 1 tokens (EOS-free when it reaches the budget)."""

    def __init__(self, budget=8):
        self.seeds, self.budget, self.last_stats = [], budget, Stats(requeued_chunks=1)

    def generate(self, batch, sampling):
        self.seeds.append(sampling.seed)
        rows = [(i, k) for i in batch.index for k in range(sampling.n)]
        resp = [[7] * min(self.budget, i % 5 + k + 1) for i, k in rows]
        return RolloutBatch([i for i, _ in rows], ["p"] * len(rows), [[1, 2]] * len(rows), ["r"] * len(rows), resp,
                            [[-1.0] * len(r) for r in resp], ["length" if len(r) == self.budget else "stop" for r in resp],
                            [0] * len(rows))


class Reward:
    """Prompts in `flat` score 1.0 on every sample (a group without signal); the others score
    prompt + sample / 10. Prompts in `invalid` get an invalid reward on their first sample."""

    def __init__(self, flat, invalid=()):
        self.flat, self.invalid, self.last_metrics = flat, set(invalid), {}

    def score(self, rollout):
        s = torch.tensor([1.0 if i in self.flat else i + k / 10 for i, k in
                          zip(rollout.prompt_index, [j % N for j in range(len(rollout))])])
        valid = torch.tensor([not (i in self.invalid and j % N == 0) for j, i in enumerate(rollout.prompt_index)])
        self.last_metrics = {"reward/mean": s.mean().item(), "reward/dropped": float((~valid).sum()),
                             "reward/dropped_total": 0.0, "reward/missing_eos": 0.0}
        return ScoredBatch(rollout, s, {"x": s.clone()}, valid)


def _loop(tmp_path, reward, *overrides, pool=None):
    cfg = load_config(None, ["algorithm.name=grpo", f"rollout.n_samples={N}", "algorithm.prompts_per_step=8",
                             "rollout.max_new_tokens=8", *overrides])
    parts = RLParts(learners=None, pool=pool or Pool(), reward=reward, dataset=Dataset())
    return RLLoop(cfg, tmp_path, parts, logger=None)


def _groups(produced):
    return produced.batch.rollout.prompt_index[::N]


def test_half_flat_groups_still_give_full_batches_of_informative_groups_in_data_order(tmp_path):
    loop = _loop(tmp_path, Reward(flat=set(range(0, 1000, 2))), "algorithm.dynamic_sampling=true")
    p = loop._produce(0)
    groups = _groups(p)
    assert len(p.batch.rollout) == 8 * N and groups == list(range(1, 17, 2))  # the odd prompts, in order
    m = p.metrics
    assert m["sampling/rounds"] >= 2 and m["sampling/groups_dropped"] == m["sampling/prompts"] - 8 - m[
        "sampling/groups_surplus"]
    assert m["sampling/dropped_share"] == pytest.approx(0.5, abs=0.1) and m["sampling/groups_refilled"] == 0
    assert loop.parts.pool.seeds[0] == step_sampling(loop.cfg, 0).seed  # round 0 is the step's usual sampling
    assert len(set(loop.parts.pool.seeds)) == len(loop.parts.pool.seeds)  # every round its own seed
    assert m["rollout/requeued_chunks"] == m["sampling/rounds"]  # the rollout counts add up over rounds
    q = loop._produce(1)  # the next step goes on where the data left off
    assert min(_groups(q)) > max(groups)


def test_a_step_short_after_the_round_cap_is_filled_with_dropped_groups(tmp_path):
    loop = _loop(tmp_path, Reward(flat=set(range(0, 1000)) - {3, 5}), "algorithm.dynamic_sampling=true",
                 "algorithm.dynamic_sampling_max_rounds=1")
    p = loop._produce(0)
    assert p.metrics["sampling/rounds"] == 2 and p.metrics["sampling/groups_refilled"] == 6
    assert _groups(p) == [0, 1, 2, 3, 4, 5, 6, 7]  # 3 and 5 kept, the first dropped ones refill; sampling order


def test_invalid_groups_are_dropped_and_the_reward_metrics_cover_every_round(tmp_path):
    loop = _loop(tmp_path, Reward(flat=set(), invalid={0, 1}), "algorithm.dynamic_sampling=true")
    p = loop._produce(0)
    assert _groups(p) == list(range(2, 10)) and p.metrics["sampling/groups_dropped"] == 2
    assert p.metrics["reward/dropped"] == 2  # summed over the rounds


def test_without_dynamic_sampling_one_round_is_the_step(tmp_path):
    loop = _loop(tmp_path, Reward(flat=set(range(0, 1000, 2))))
    p = loop._produce(3)
    assert _groups(p) == list(range(8)) and not any(k.startswith("sampling/") for k in p.metrics)
    cfg = loop.cfg
    assert loop.parts.pool.seeds == [(cfg.seed * 1_000_003 + 3 * 7_919 + 1) & 0x7FFFFFFF]  # as before rounds existed


def test_soft_overlong_punishment_shapes_the_scores_dynamic_sampling_sees(tmp_path):
    """Budget 8, buffer 4, penalty 0.5: a flat group whose samples reach the buffer is no longer
    flat; sample lengths are i % 5 + k + 1."""
    loop = _loop(tmp_path, Reward(flat=set(range(1000))), "algorithm.overlong_buffer=4", "algorithm.overlong_penalty=0.5")
    p = loop._produce(0)
    lengths = torch.tensor([len(r) for r in p.batch.rollout.response_ids], dtype=torch.float32)
    want = 1.0 - 0.5 * (lengths - 4).clamp(min=0, max=4) / 4
    torch.testing.assert_close(p.batch.scores, want)
    assert p.metrics["reward/overlong_penalty"] == pytest.approx((want - 1).mean().item())
    dyn = _loop(tmp_path, Reward(flat=set(range(1000))), "algorithm.overlong_buffer=4", "algorithm.dynamic_sampling=true")
    assert dyn._produce(0).metrics["sampling/groups_dropped"] < 8  # shaped groups carry signal now
