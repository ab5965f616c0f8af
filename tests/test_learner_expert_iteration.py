"""Expert iteration keeps exactly the selected samples and trains on them as demonstrations;
the algorithm table routes it to the SFT update; the config checks its selection fields."""

from __future__ import annotations

import pytest
import torch

from tidal.common.config import ConfigError, load_config
from tidal.common.types import RolloutBatch, ScoredBatch
from tidal.learner.algorithms import ALGORITHMS, algorithm_for
from tidal.learner.expert_iteration import expert_batch, expert_rows, fill_to_multiple

PAD, EOS = 0, 2


def _scored(scores: list[float], valid: list[bool] | None = None) -> ScoredBatch:
    """2 prompts x 3 samples; response of row i is [10 + i] * (i + 1), then EOS and junk after it."""
    n = len(scores)
    prompts = [[5, 6], [5, 6], [5, 6], [7], [7], [7]][:n]
    responses = [[10 + i] * (i % 3 + 1) + [EOS, 99] for i in range(n)]
    rollout = RolloutBatch(prompt_index=[i // 3 for i in range(n)], prompt_text=["p"] * n, prompt_ids=prompts,
                           response_text=["r"] * n, response_ids=responses, response_logprobs=[[] for _ in range(n)],
                           finish_reason=["stop"] * n, weight_version=[0] * n)
    return ScoredBatch(rollout, torch.tensor(scores), valid=None if valid is None else torch.tensor(valid))


def test_expert_iteration_keeps_exactly_the_selected_samples():
    scored = _scored([0.2, 0.9, 0.5, -1.0, -0.2, -0.7])
    assert expert_rows(scored, 3, top_k=1, threshold=None).tolist() == [1, 4]  # best of each prompt
    assert expert_rows(scored, 3, top_k=2, threshold=None).tolist() == [1, 2, 4, 5]
    assert expert_rows(scored, 3, top_k=None, threshold=0.3).tolist() == [1, 2]  # prompt 1: nothing good enough
    assert expert_rows(scored, 3, top_k=1, threshold=0.0).tolist() == [1]
    invalid = _scored([0.2, 0.9, 0.5, -1.0, -0.2, -0.7], valid=[True, False, True, True, True, True])
    assert expert_rows(invalid, 3, top_k=1, threshold=None).tolist() == [2, 4]  # an invalid best is never kept
    assert expert_rows(scored, 3, top_k=None, threshold=5.0).numel() == 0


def test_the_sft_batch_is_the_kept_prompts_and_responses_up_to_eos():
    scored = _scored([0.2, 0.9, 0.5, -1.0, -0.2, -0.7])
    batch = expert_batch(scored, torch.tensor([1, 4]), PAD, EOS)
    assert len(batch) == 2
    rows = []
    for ids, mask, resp in zip(batch.input_ids, batch.attention_mask, batch.response_mask):
        real = ids[mask.bool()].tolist()
        response = ids[-batch.response_len:][resp.bool()].tolist()
        rows.append((real, response))
    assert rows[0] == ([5, 6, 11, 11, EOS], [11, 11, EOS])  # row 1: junk after EOS cut
    assert rows[1] == ([7, 14, 14, EOS], [14, 14, EOS])  # row 4


def test_fill_to_multiple_repeats_rows_and_drops_none():
    scored = _scored([0.2, 0.9, 0.5, -1.0, -0.2, -0.7])
    batch = expert_batch(scored, torch.tensor([0, 1, 2]), PAD, EOS)
    filled = fill_to_multiple(batch, 4)
    assert len(filled) == 4 and torch.equal(filled.input_ids[3], batch.input_ids[0])
    assert fill_to_multiple(batch, 3) is batch


def test_the_table_routes_expert_iteration_to_the_sft_update():
    ei = algorithm_for("expert_iteration")
    assert ei.update == "sft" and not ei.uses_critic and ei.advantages is None
    assert {a.update for n, a in ALGORITHMS.items() if n != "expert_iteration"} == {"policy_gradient"}


def test_config_checks_the_selection_fields():
    cfg = load_config(None, ["algorithm.name=expert_iteration", "rollout.n_samples=4", "algorithm.ei_top_k=2"])
    assert cfg.algorithm.ei_top_k == 2 and cfg.algorithm.ei_threshold is None
    with pytest.raises(ConfigError, match="ei_top_k=5"):
        load_config(None, ["algorithm.name=expert_iteration", "rollout.n_samples=4", "algorithm.ei_top_k=5"])
    with pytest.raises(ConfigError, match="ei_threshold are both null"):
        load_config(None, ["algorithm.ei_top_k=null"])
