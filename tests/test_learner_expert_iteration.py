"""Expert iteration keeps exactly the selected samples and trains on them as demonstrations; it
ranks them by the raw reward (not the clipped or EOS-penalised one) and, with the EOS penalty,
never keeps a truncated sample; the algorithm table routes it to its select + SFT update and
refuses selection settings that would keep every sample."""

from __future__ import annotations

import pytest
import torch

from reward_fixtures import make_rollout

from tidal.common.config import ConfigError, RewardConfig, RewardTerm, load_config
from tidal.common.types import RolloutBatch, ScoredBatch
from tidal.learner.algorithms import ALGORITHMS, algorithm_for, check_config
from tidal.learner.expert_iteration import expert_batch, expert_rows, fill_to_multiple
from tidal.learner.updates import expert_iteration_update, policy_gradient_update
from tidal.reward_service.combine import build_reward

NUMBER = RewardTerm(kind="function", target="reward_fixtures:as_number")  # the completion text as a number

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


def test_samples_tied_at_the_reward_clip_rank_by_their_raw_reward():
    scored = build_reward(RewardConfig(terms=(NUMBER,), clip=1.0)).score(
        make_rollout(["p"] * 6, ["0.5", "3", "7", "-2", "2", "-0.5"]))  # 2 prompts x 3 samples
    assert scored.scores.tolist() == [0.5, 1.0, 1.0, -1.0, 1.0, -0.5]  # 3 and 7 tie at the clip
    assert expert_rows(scored, 3, top_k=1, threshold=None).tolist() == [2, 4]  # 7, not the first of the tie
    assert expert_rows(scored, 3, top_k=None, threshold=1.0).tolist() == [1, 2, 4]  # the bar: on the trained scores


def test_with_the_eos_penalty_a_truncated_sample_is_never_kept():
    scored = build_reward(RewardConfig(terms=(NUMBER,), missing_eos_penalty=0.0)).score(
        make_rollout(["p"] * 3, ["-1", "5", "-3"], finish=["stop", "length", "stop"]))
    assert scored.scores.tolist() == [-1.0, 0.0, -3.0]  # the penalty (0) beats the complete samples
    assert expert_rows(scored, 3, top_k=1, threshold=None, keep_truncated=False).tolist() == [0]
    assert expert_rows(scored, 3, top_k=None, threshold=-5.0, keep_truncated=False).tolist() == [0, 2]
    # without the penalty a truncated sample competes on what it scored (tests/test_e2e_alternatives.py:
    # the tiny model never ends within max_new_tokens)
    assert expert_rows(scored, 3, top_k=1, threshold=None).tolist() == [1]


def test_the_table_routes_expert_iteration_to_its_select_and_sft_update():
    ei = algorithm_for("expert_iteration")
    assert ei.update is expert_iteration_update and not ei.uses_critic and ei.advantages is None
    assert not ei.ratio and ei.selects  # no ratio: pi_old is never taken inside its update
    others = [a for n, a in ALGORITHMS.items() if n != "expert_iteration"]
    assert all(a.update is policy_gradient_update and a.ratio and not a.selects for a in others)


EI = ["algorithm.name=expert_iteration"]


@pytest.mark.parametrize("overrides, match", [
    (["rollout.n_samples=4", "algorithm.ei_top_k=5"], "ei_top_k=5"),
    (["rollout.n_samples=4", "algorithm.ei_top_k=null"], "ei_threshold are both null"),
    ([], r"ei_top_k=1 of rollout\.n_samples=1 and no algorithm\.ei_threshold keeps every sample"),
    (["rollout.n_samples=4", "algorithm.ei_top_k=4"], "keeps every sample"),
])
def test_selection_settings_that_keep_every_sample_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, EI + overrides))


def test_selection_settings_that_select():
    for overrides in (["rollout.n_samples=4", "algorithm.ei_top_k=2"], ["algorithm.ei_threshold=0.5"],
                      ["rollout.n_samples=4", "algorithm.ei_top_k=4", "algorithm.ei_threshold=0.5"]):
        check_config(load_config(None, EI + overrides))
    check_config(load_config(None, ["algorithm.ei_top_k=null"]))  # not expert iteration: its fields are unused


def test_the_update_trains_only_complete_samples_under_the_eos_penalty():
    """The update's selection (pure logic; the group is a stand-in that records what it is asked to
    fine-tune on, tests/test_e2e_alternatives.py trains for real)."""
    from types import SimpleNamespace

    from tidal.common.metrics import Timer
    from tidal.learner.experience import ForwardPass, pad_prompt_response
    from tidal.learner.updates import StepBatch

    def run(*overrides):
        cfg = load_config(None, EI + ["rollout.n_samples=3", "learner.mini_batch_size=4", "learner.micro_batch_size=4",
                                      *overrides])
        reward = build_reward(RewardConfig(terms=(NUMBER,), missing_eos_penalty=cfg.reward.missing_eos_penalty))
        scored = reward.score(make_rollout(["p"] * 3, ["-1", "5", "-3"], finish=["stop", "length", "stop"]))
        ids, attn, mask = pad_prompt_response(scored.rollout.prompt_ids, scored.rollout.response_ids, PAD)
        trained = []
        group = SimpleNamespace(cfg=cfg, tokenizer=SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS),
                                update_sft=lambda batch, epochs, lr: trained.append(batch) or {"losses/sft": 1.0})
        fwd = ForwardPass(ids, attn, mask, -mask, -2 * mask)
        out = expert_iteration_update(group, StepBatch(0, scored, scored.scores, fwd, 0.0), Timer())
        return out, trained[0]

    out, batch = run("reward.missing_eos_penalty=0.0")
    assert out.metrics["ei/kept"] == 1 and out.metrics["ei/kept_score_mean"] == -1.0  # row 0, not the penalised row 1
    assert out.kl_per_seq == pytest.approx(1.0)  # one token, log pi_old - log pi_ref = -1 - -2
    assert batch.response_mask.sum(-1).tolist() == [1.0] * 4  # row 0 filled to the minibatch, never row 1
    out, batch = run()  # no penalty: the truncated sample competes on its raw score and wins
    assert out.metrics["ei/kept"] == 1 and out.metrics["ei/kept_score_mean"] == 5.0
