"""Pure-tensor experience building and learner batch tokenization (no DeepSpeed, no Ray)."""

from __future__ import annotations

import pytest
import torch

from tidal.common.data import ComparisonRecord, DemonstrationRecord, RankingRecord
from tidal.common.models import load_tokenizer
from tidal.common.types import RolloutBatch, ScoredBatch
from tidal.learner.advantages import grpo_advantages, kl_penalty_to_go
from tidal.learner.experience import (ForwardPass, assemble_experience, pad_prompt_response, pad_response_floats,
                                      pad_rollout, select_rollout, valid_rows)
from tidal.learner.reward_model import build_preference_batch, pair_accuracy, preference_loss
from tidal.learner.sft import build_sft_batch


def _rollout(prompts, responses, logprobs=None) -> RolloutBatch:
    n = len(prompts)
    return RolloutBatch(list(range(n)), ["p"] * n, prompts, ["r"] * n, responses,
                        logprobs or [[-1.0] * len(r) for r in responses], ["stop"] * n, [0] * n)


def test_pad_layout_left_prompt_right_response():
    ids, attn, rmask = pad_prompt_response([[1, 2], [3]], [[4], [5, 6, 7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 0, 0], [0, 3, 5, 6, 7]]
    assert attn.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert rmask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert ids.dtype == torch.long and rmask.dtype == torch.float32


def test_pad_rejects_empty_rows_by_number():
    with pytest.raises(ValueError, match="row 1: empty response"):
        pad_prompt_response([[1], [2]], [[3], []], pad_id=0)
    with pytest.raises(ValueError, match="row 0: empty prompt"):
        pad_prompt_response([[]], [[3]], pad_id=0)


def test_pad_rollout_cuts_after_first_eos_and_pads_engine_logprobs():
    rollout = _rollout([[1, 2]], [[5, 9, 6, 9, 7]], [[-0.1, -0.2, -0.3, -0.4, -0.5]])
    ids, attn, rmask = pad_rollout(rollout, pad_id=0, eos_id=9)
    assert ids.tolist() == [[1, 2, 5, 9]] and rmask.tolist() == [[1, 1]]
    lp = pad_response_floats([[-0.1], [-0.2, -0.3]], 3)
    assert torch.allclose(lp, torch.tensor([[-0.1, 0, 0], [-0.2, -0.3, 0]]))
    picked = select_rollout(_rollout([[1], [2], [3]], [[4], [5], [6]]), [2, 0])
    assert picked.prompt_ids == [[3], [1]] and picked.response_ids == [[6], [4]]


def test_valid_rows_drops_whole_groups_for_group_baselines():
    rollout = _rollout([[1]] * 4, [[2]] * 4)
    scored = ScoredBatch(rollout, torch.zeros(4), valid=torch.tensor([True, False, True, True]))
    assert valid_rows(scored, 2, whole_groups=False).tolist() == [0, 2, 3]
    assert valid_rows(scored, 2, whole_groups=True).tolist() == [2, 3]
    assert valid_rows(ScoredBatch(rollout, torch.zeros(4)), 2, True).tolist() == [0, 1, 2, 3]


def _batch(B=4, P=3, R=4):
    g = torch.Generator().manual_seed(0)
    lengths = [4, 2, 3, 1][:B]
    rmask = torch.zeros(B, R)
    for i, n in enumerate(lengths):
        rmask[i, :n] = 1
    ids = torch.randint(3, 100, (B, P + R), generator=g)
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), rmask.long()], 1)
    old = -torch.rand(B, R, generator=g)
    ref = -torch.rand(B, R, generator=g)
    return ids, attn, rmask, old, ref


def test_ppo_assembly_rewards_kl_and_score_at_last_token():
    ids, attn, rmask, old, ref = _batch()
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    values = torch.zeros(4, 4)
    exp = assemble_experience(ForwardPass(ids, attn, rmask, old, ref, values), scores, algorithm="ppo", group_size=1,
                              kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0, whiten=False)
    # gamma = lam = 1 and V = 0: the advantage is the reward-to-go, which at t = 0 sums every reward.
    expected_first = scores - 0.1 * ((old - ref) * rmask).sum(-1)
    assert exp.advantages[:, 0].tolist() == pytest.approx(expected_first.tolist(), abs=1e-5)
    pad = 1 - rmask
    for t in (exp.advantages, exp.old_logprobs, exp.ref_logprobs, exp.values, exp.returns):
        assert torch.equal(t * pad, torch.zeros(4, 4))  # nothing leaks out of the padding
    assert torch.allclose(exp.returns, exp.advantages)  # returns = A + V with V = 0
    whitened = assemble_experience(ForwardPass(ids, attn, rmask, old, ref, values), scores, algorithm="ppo", group_size=1,
                                   kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=0.95, whiten=True)
    real = rmask.bool()
    assert whitened.advantages[real].mean().abs() < 1e-5 and abs(whitened.advantages[real].std() - 1) < 1e-3
    with pytest.raises(ValueError, match="critic"):
        assemble_experience(ForwardPass(ids, attn, rmask, old, ref, None), scores, algorithm="ppo", group_size=1,
                            kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0, whiten=False)


def test_critic_free_assembly_broadcasts_group_advantage_plus_kl_to_go():
    ids, attn, rmask, old, ref = _batch()
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0])
    exp = assemble_experience(ForwardPass(ids, attn, rmask, old, ref, None), scores, algorithm="grpo", group_size=2,
                              kl_coef=0.0, kl_estimator="k1", gamma=1.0, lam=1.0, whiten=True)
    # GRPO advantages are already group-normalized: never whitened a second time.
    assert torch.allclose(exp.advantages, grpo_advantages(scores, 2)[:, None] * rmask)
    assert torch.equal(exp.values, torch.zeros(4, 4)) and torch.equal(exp.returns, torch.zeros(4, 4))
    kl = (old - ref) * rmask
    shaped = assemble_experience(ForwardPass(ids, attn, rmask, old, ref, None), scores, algorithm="rloo", group_size=2,
                                 kl_coef=0.5, kl_estimator="k1", gamma=1.0, lam=1.0, whiten=False)
    loo = torch.tensor([1.0, -1.0, -3.0, 3.0])  # r_i minus the other sample of its pair
    to_go = -0.5 * kl.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(shaped.advantages, (loo[:, None] + to_go) * rmask, atol=1e-6)
    assert torch.allclose(kl_penalty_to_go(kl, rmask, 0.5), to_go * rmask)
    with pytest.raises(ValueError, match="unknown algorithm"):
        assemble_experience(ForwardPass(ids, attn, rmask, old, ref, None), scores, algorithm="a2c", group_size=2,
                            kl_coef=0.0, kl_estimator="k1", gamma=1.0, lam=1.0, whiten=False)


def test_sft_batch_masks_prompt_and_appends_eos(tiny_model):
    tok = load_tokenizer(tiny_model)
    recs = [DemonstrationRecord("How was the movie?", "It was great."),
            DemonstrationRecord([{"role": "user", "content": "Hi"}], "Hello there, the food was good.")]
    batch = build_sft_batch(tok, recs, max_prompt_tokens=64, max_response_tokens=64, use_chat_template=False)
    P = batch.input_ids.shape[1] - batch.response_len
    for i, rec in enumerate(recs):
        n = int(batch.response_mask[i].sum())
        response = batch.input_ids[i, P:P + n].tolist()
        assert response[-1] == tok.eos_token_id  # EOS appended, and it is trained on
        assert tok.decode(response[:-1]) == rec.response
        prompt = batch.input_ids[i, :P][batch.attention_mask[i, :P].bool()].tolist()
        assert tok.decode(prompt) == (rec.prompt if isinstance(rec.prompt, str) else "Hi")
    short = build_sft_batch(tok, recs[:1], max_prompt_tokens=2, max_response_tokens=2, use_chat_template=False)
    assert short.input_ids.shape == (1, 4) and tok.eos_token_id not in short.input_ids[0, 2:].tolist()
    chat = build_sft_batch(tok, recs[:1], 64, 64, use_chat_template=True)
    assert tok.decode(chat.input_ids[0][chat.attention_mask[0].bool()]).startswith("user: How was the movie?\nassistant:")


def test_preference_batch_groups_and_losses(tiny_model):
    tok = load_tokenizer(tiny_model)
    comps = [ComparisonRecord("Review:", "It was good.", "It was bad."),
             ComparisonRecord("Another review:", "Lovely day.", "Awful day.")]
    batch = build_preference_batch(tok, comps, 32, 16, use_chat_template=False)
    assert batch.input_ids.shape[0] == 4 and batch.ranks.tolist() == [[0, 1], [0, 1]]
    sub = batch.select(torch.tensor([1]))
    assert torch.equal(sub.input_ids, batch.input_ids[2:4]) and sub.ranks.tolist() == [[0, 1]]
    last = batch.attention_mask.shape[1] - 1
    assert (batch.input_ids[batch.attention_mask[:, last].bool(), last] == tok.eos_token_id).all()
    ranked = [RankingRecord("Rank these:", ["a b", "c", "d e f"], [2, 0, 1])]
    kbatch = build_preference_batch(tok, ranked, 32, 16, use_chat_template=False)
    assert kbatch.group_size == 3 and kbatch.ranks.tolist() == [[2, 0, 1]]
    with pytest.raises(ValueError, match="same K"):
        build_preference_batch(tok, comps[:1] + ranked, 32, 16, use_chat_template=False)
    # pairwise loss respects which response is chosen, whatever its column
    s = torch.tensor([[2.0, -1.0]])
    assert preference_loss(s, torch.tensor([[0, 1]]), "pairwise") < preference_loss(s, torch.tensor([[1, 0]]), "pairwise")
    with pytest.raises(ValueError, match="ranking"):
        preference_loss(torch.zeros(1, 3), torch.tensor([[0, 1, 2]]), "pairwise")
    assert pair_accuracy(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[0, 2, 1]])) == (3, 3)
    assert pair_accuracy(torch.tensor([[2.5, 3.0, 1.0]]), torch.tensor([[0, 2, 1]])) == (1, 3)
