"""Learner behaviour on real DeepSpeed engines, one rank in-process (world size 1, gloo, no Ray):
PPO / PPO-ptx / GRPO / RLOO / REINFORCE updates, the KL early stop, reward-model training,
LoRA, padding invariance, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidal.common.config import load_config
from tidal.common.data import ComparisonRecord, DemonstrationRecord, RankingRecord
from tidal.common.models import load_value_model, sequence_logprobs
from tidal.common.types import Experience, RolloutBatch, ScoredBatch
from tidal.learner.experience import assemble_experience, pad_prompt_response, usable_rows
from tidal.learner.group import LearnerGroup
from tidal.learner.pi_old import PiOldStep
from tidal.learner.reward_model import build_preference_batch, reward_micro_loss
from tidal.learner.sft import build_sft_batch

BASE = ["learner.num_workers=1", "learner.zero_stage=2", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
        "learner.lr=1e-3", "learner.critic_lr=1e-4", "learner.lr_schedule=constant", "algorithm.update_epochs=2"]


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    """The in-process rank joins a world-1 gloo group; tear it down so later tests in this
    pytest process (e.g. in-process vLLM engines) start clean."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def _cfg(*overrides):
    return load_config(None, BASE + list(overrides))


def _sequences(n=8, seed=0, pad_id=0):
    """Random prompts/responses of varied lengths (so both kinds of padding occur)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 400, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, 400, (6 - i % 3,), generator=g).tolist() for i in range(n)]
    return pad_prompt_response(prompts, responses, pad_id)


def _row_delta(group, exp: Experience, before: torch.Tensor) -> torch.Tensor:
    """Per-row mean change of the response-token logprobs since `before`. (B,)"""
    after = group.compute_logprobs(exp.input_ids, exp.attention_mask, exp.response_mask.shape[1], 1.0)
    m = exp.response_mask
    return ((after - before) * m).sum(-1) / m.sum(-1)


@pytest.fixture(scope="module")
def ppo_group(tiny_model):
    g = LearnerGroup(_cfg("algorithm.ptx_coef=1.0"), tiny_model, critic_path=tiny_model, reference_path=tiny_model, local=True)
    yield g
    g.shutdown()


def _ppo_experience(group, sign: torch.Tensor) -> Experience:
    ids, attn, rmask = _sequences(len(sign), pad_id=group.tokenizer.pad_token_id)
    R = rmask.shape[1]
    old = group.compute_logprobs(ids, attn, R, 1.0)
    values = group.compute_values(ids, attn, R)
    adv = sign[:, None] * rmask
    # returns one above the current values: the critic should raise every value
    return Experience(ids, attn, rmask, old, group.compute_ref_logprobs(ids, attn, R, 1.0), adv,
                      (values + 1.0) * rmask, values * rmask, sign)


def test_ppo_update_follows_the_advantage_sign(ppo_group):
    sign = torch.tensor([1.0, -1.0] * 4)
    exp = _ppo_experience(ppo_group, sign)
    ppo_group.compute_logprobs(exp.input_ids, exp.attention_mask, exp.response_mask.shape[1], 1.0)
    metrics = ppo_group.update_rl(exp).metrics
    delta = _row_delta(ppo_group, exp, exp.old_logprobs)
    assert (delta[sign > 0] > 0).all() and (delta[sign < 0] < 0).all(), delta
    assert metrics["update/early_stopped"] == 0
    assert metrics["update/minibatches"] == metrics["update/minibatches_planned"] == 4
    assert metrics["update/short_minibatch"] == 0 and metrics["update/rows_padding"] == 0
    for key in ("losses/policy", "losses/value", "policy/approx_kl", "policy/clipfrac", "policy/entropy"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    # the critic regresses toward the returns (values + 1), by at most the value clip per update
    v_after = ppo_group.compute_values(exp.input_ids, exp.attention_mask, exp.response_mask.shape[1])
    dv = ((v_after - exp.values) * exp.response_mask).sum(-1) / exp.response_mask.sum(-1)
    assert (dv > 0).all(), dv


def test_ppo_ptx_adds_the_sft_likelihood(ppo_group):
    tok = ppo_group.tokenizer
    demos = build_sft_batch(tok, [DemonstrationRecord(f"Review {i}:", "The movie was wonderful.") for i in range(4)],
                            32, 16, use_chat_template=False)
    exp = _ppo_experience(ppo_group, torch.zeros(8))  # zero advantages: only the ptx term pulls
    before = ppo_group.compute_logprobs(demos.input_ids, demos.attention_mask, demos.response_len, 1.0)
    metrics = ppo_group.update_rl(exp, ptx=demos).metrics
    after = ppo_group.compute_logprobs(demos.input_ids, demos.attention_mask, demos.response_len, 1.0)
    m = demos.response_mask
    assert ((after - before) * m).sum() / m.sum() > 0.05  # demonstrations became more likely
    assert metrics["losses/ptx"] > 0


def test_checkpoint_restores_weights_optimizer_and_counters(ppo_group, tmp_path):
    exp = _ppo_experience(ppo_group, torch.tensor([1.0, -1.0] * 4))
    ppo_group.checkpoint(tmp_path / "ckpt")
    saved = ppo_group.parameter_snapshots()[0]
    ppo_group.update_rl(exp)
    once = ppo_group.parameter_snapshots()[0]
    assert any(not torch.equal(saved[k], once[k]) for k in saved)
    ppo_group.load_checkpoint(tmp_path / "ckpt")
    restored = ppo_group.parameter_snapshots()[0]
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    ppo_group.update_rl(exp)  # same shuffle (counters restored) and same Adam moments -> same result
    again = ppo_group.parameter_snapshots()[0]
    assert all(torch.allclose(once[k], again[k], atol=1e-6) for k in once)


def test_kl_early_stop_triggers_with_a_tiny_target(tiny_model):
    g = LearnerGroup(_cfg("algorithm.early_stop_kl=1e-7", "algorithm.update_epochs=4"), tiny_model,
                     critic_path=tiny_model, reference_path=tiny_model, local=True)
    try:
        metrics = g.update_rl(_ppo_experience(g, torch.tensor([1.0, -1.0] * 4))).metrics
    finally:
        g.shutdown()
    assert metrics["update/early_stopped"] == 1.0
    assert 1 <= metrics["update/minibatches"] < metrics["update/minibatches_planned"] == 8


def test_critic_free_updates_follow_group_advantages(tiny_model):
    g = LearnerGroup(_cfg("algorithm.name=grpo", "rollout.n_samples=4", "algorithm.kl_coef=0.0"), tiny_model,
                     reference_path=tiny_model, local=True)
    try:
        ids, attn, rmask = _sequences(8, seed=1, pad_id=g.tokenizer.pad_token_id)
        prompts = [ids[i][attn[i].bool()][: 3 + i % 3].tolist() for i in range(8)]
        responses = [ids[i][attn[i].bool()][3 + i % 3:].tolist() for i in range(8)]
        rollout = RolloutBatch(list(range(8)), ["p"] * 8, prompts, ["r"] * 8, responses,
                               [[-1.0] * len(r) for r in responses], ["stop"] * 8, [0] * 8)
        scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.5, 1.0])
        kept, kept_scores = usable_rows(ScoredBatch(rollout, scores), g.algorithm, 4)
        fwd = g.forward(kept)  # the one experience path: forward, then assemble (GRPO)
        # pi_old from the engine (algorithm.old_logprobs): no rank forward, nothing left to compare
        eng = g.forward(kept, PiOldStep("engine"))
        assert eng.pi_old == "engine" and fwd.pi_old == "trainer" and eng.rollout_logprobs is None
        assert torch.equal(eng.old_logprobs, fwd.rollout_logprobs * fwd.response_mask)  # the engine's -1.0s
        assert torch.equal(eng.ref_logprobs, fwd.ref_logprobs) and eng.logprob_gap() is None
        assert fwd.logprob_gap() > 0.5  # the trainer's logprobs are not the fake -1.0s
        exp, _ = g.assemble(fwd, kept_scores, kl_coef=0.0)
        assert exp.values.abs().sum() == 0 and exp.rollout_logprobs is not None
        for algo in ("grpo", "rloo", "reinforce"):
            if algo != "grpo":
                old = g.compute_logprobs(exp.input_ids, exp.attention_mask, exp.response_mask.shape[1], 1.0)
                fwd = dataclasses.replace(fwd, old_logprobs=old)
                exp = assemble_experience(fwd, scores, algorithm=algo, group_size=4, kl_coef=0.0, kl_estimator="k1",
                                          gamma=1.0, lam=1.0, whiten=True)
            seq_adv = exp.advantages[:, 0]
            metrics = g.update_rl(exp).metrics
            assert "losses/value" not in metrics
            delta = _row_delta(g, exp, exp.old_logprobs)
            pos, neg = seq_adv > 0.1, seq_adv < -0.1
            assert pos.any() and neg.any()
            assert (delta[pos] > 0).all() and (delta[neg] < 0).all(), (algo, seq_adv, delta)
        with pytest.raises(RuntimeError, match="critic"):
            g.compute_values(exp.input_ids, exp.attention_mask, 2)
    finally:
        g.shutdown()


def test_entropy_bonus_raises_policy_entropy(tiny_model):
    g = LearnerGroup(_cfg("algorithm.name=reinforce", "algorithm.entropy_coef=1.0"), tiny_model, local=True)
    try:
        ids, attn, rmask = _sequences(8, seed=2, pad_id=g.tokenizer.pad_token_id)
        old = g.compute_logprobs(ids, attn, rmask.shape[1], 1.0)
        zeros = torch.zeros_like(rmask)  # no advantage: the entropy term alone drives the update
        exp = Experience(ids, attn, rmask, old, old, zeros, zeros, zeros, torch.zeros(8))
        first, second = g.update_rl(exp).metrics, g.update_rl(exp).metrics
        assert second["policy/entropy"] > first["policy/entropy"]
    finally:
        g.shutdown()


# ------------------------------------------------------------------ reward model

_SUBJECTS = ["the movie", "the food", "my day", "the show", "the hotel", "the game", "the book", "our trip",
             "the park", "the city", "this song", "the coffee"]
_GOOD = ["good", "great", "wonderful", "lovely", "amazing", "happy"]
_BAD = ["bad", "terrible", "awful", "boring", "sad", "horrible"]


def _comparisons(n, offset):
    out = []
    for i in range(offset, offset + n):
        s, good, bad = _SUBJECTS[i % 12], _GOOD[i % 6], _BAD[(i * 5) % 6]
        chosen, rejected = f"I think {s} was {good}.", f"I think {s} was {bad}."
        out.append(ComparisonRecord(f"Review {s}:", chosen, rejected) if i % 2 else
                   ComparisonRecord(f"Tell me about {s}.", chosen, rejected))
    return out


@pytest.fixture(scope="module")
def reward_group(tiny_model):
    g = LearnerGroup(_cfg("learner.mini_batch_size=8", "learner.micro_batch_size=4", "learner.lr=2e-3"),
                     tiny_model, role="reward", local=True)
    yield g
    g.shutdown()


def test_reward_model_learns_separable_preferences(reward_group, tmp_path):
    tok = reward_group.tokenizer
    train = build_preference_batch(tok, _comparisons(48, 0), 32, 16, False)
    held_out = build_preference_batch(tok, _comparisons(16, 100), 32, 16, False)
    assert reward_group.fits.evaluate_reward(held_out)["accuracy"] < 0.9  # not solved before training
    fit = reward_group.fit_reward(train, held_out, loss="pairwise", epochs=4)
    assert fit.history[-1]["losses/reward"] < fit.history[0]["losses/reward"]
    assert fit.eval_accuracy > 0.9, fit.eval_accuracy
    assert fit.reward_std > 0
    out = reward_group.save_pretrained(tmp_path / "rm")
    meta = json.loads((out / "value_model.json").read_text())
    assert meta["reward_mean"] == pytest.approx(fit.reward_mean) and meta["reward_std"] == pytest.approx(fit.reward_std)
    reloaded = load_value_model(out)
    with torch.no_grad():
        scores = reloaded.score(held_out.input_ids, held_out.attention_mask)
    assert torch.allclose(scores, reward_group.compute_scores(held_out.input_ids, held_out.attention_mask), atol=1e-5)


def test_reward_score_is_invariant_to_padding(reward_group):
    tok = reward_group.tokenizer
    one = build_preference_batch(tok, [ComparisonRecord("Hi", "It was good.", "It was bad.")], 32, 16, False)
    long_rec = ComparisonRecord("A much longer prompt about the movie and the food and the weather today",
                                "A long and lovely and wonderful answer indeed.", "No.")
    both = build_preference_batch(tok, [ComparisonRecord("Hi", "It was good.", "It was bad."), long_rec], 64, 32, False)
    assert both.input_ids.shape[1] > one.input_ids.shape[1] + 10  # the short pair got much more padding
    alone = reward_group.compute_scores(one.input_ids, one.attention_mask)
    padded = reward_group.compute_scores(both.input_ids, both.attention_mask)[:2]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_kwise_trainer_loss_is_the_mean_of_pairwise_terms(reward_group):
    tok = reward_group.tokenizer
    rankings = [RankingRecord(f"Review {s}:", [f"It was {g}.", "It was ok.", f"It was {b}."], [0, 1, 2])
                for s, g, b in zip(_SUBJECTS[:4], _GOOD, _BAD)]
    batch = build_preference_batch(tok, rankings, 32, 16, False)
    worker = reward_group.ranks.actor(0).obj
    loss, _ = reward_micro_loss(worker, batch, "ranking")
    with torch.no_grad():
        s = worker.reward_scores(batch.input_ids, batch.attention_mask).view(4, 3)
    pairs = [(0, 1), (0, 2), (1, 2)]  # (better, worse) under ranks [0, 1, 2]
    per_prompt = torch.stack([-torch.nn.functional.logsigmoid(s[:, i] - s[:, j]) for i, j in pairs], 1).mean(1)
    assert loss.item() == pytest.approx(per_prompt.mean().item(), rel=1e-5)
    reward_group.ranks.actor(0).obj.engine.zero_grad()  # the loss above was only inspected, never stepped


def test_values_are_invariant_to_padding(ppo_group):
    ids, attn, rmask = _sequences(8, seed=3, pad_id=ppo_group.tokenizer.pad_token_id)
    R = rmask.shape[1]
    together = ppo_group.compute_values(ids, attn, R)
    lengths = attn.sum(-1)
    shortest = int(lengths.argmin())
    row = attn[shortest].bool()
    alone_ids, alone_attn, alone_mask = pad_prompt_response(
        [ids[shortest][: ids.shape[1] - R][row[: ids.shape[1] - R]].tolist()],
        [ids[shortest][-R:][rmask[shortest].bool()].tolist()], ppo_group.tokenizer.pad_token_id)
    alone = ppo_group.compute_values(alone_ids, alone_attn, alone_mask.shape[1])
    n = int(alone_mask.sum())
    assert torch.allclose(alone[0, :n], together[shortest, :n], atol=1e-5)
    info = ppo_group.describe()[0]
    assert info["max_dropout"] == 0.0 and info["has_critic"]
    assert info["zero_stage"] == 0  # zero_stage=2 on one rank runs as stage 0 (engine.effective_zero_stage)
    # ...and skips DeepSpeed's gradient all-reduce, an identity on one rank (engine.make_engine)
    assert ppo_group.ranks.actor(0).obj.engine.enable_backward_allreduce is False


# ------------------------------------------------------------------ LoRA

def test_lora_trains_only_adapters_and_exports_merged_weights(tiny_model, tmp_path):
    g = LearnerGroup(_cfg("learner.lora_rank=4", "learner.lora_alpha=8", "learner.lr=5e-3"), tiny_model, local=True)
    try:
        info = g.describe()[0]
        assert 0 < info["trainable_params"] < info["params"] / 4
        before = g.parameter_snapshots()[0]
        demos = build_sft_batch(g.tokenizer, [DemonstrationRecord(f"Say {i}", "It was lovely.") for i in range(8)],
                                32, 16, False)
        history = g.fit_sft(demos, epochs=3)
        assert history[-1]["losses/sft"] < history[0]["losses/sft"]
        after = g.parameter_snapshots()[0]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all("lora_" in k for k in changed)
        assert {k for k in before if "lora_" in k} == changed  # every adapter matrix trained
        merged = dict(g.ranks.actor(0).obj.iter_named_weights())
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)
        original = {k: v.clone() for k, v in plain.state_dict().items()}
        assert set(merged) == set(original)  # plain HF names, no lora_A/B or base_layer
        plain.load_state_dict(merged, strict=True)
        assert not torch.equal(original["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.q_proj.weight"])
        R = demos.response_len
        ours = g.compute_logprobs(demos.input_ids, demos.attention_mask, R, 1.0)
        with torch.no_grad():
            theirs = sequence_logprobs(plain.eval(), demos.input_ids, demos.attention_mask, R)
        assert torch.allclose(ours, theirs, atol=1e-4)
        out = g.save_pretrained(tmp_path / "merged")
        loaded = AutoModelForCausalLM.from_pretrained(out)
        with torch.no_grad():
            assert torch.allclose(sequence_logprobs(loaded.eval(), demos.input_ids, demos.attention_mask, R), ours, atol=1e-4)
    finally:
        g.shutdown()


def test_kl_loss_term_pulls_the_policy_toward_the_reference(tiny_model):
    g = LearnerGroup(_cfg("algorithm.kl_loss=5.0", "algorithm.update_epochs=4"), tiny_model, critic_path=tiny_model,
                     reference_path=tiny_model, local=True)
    try:
        exp = _ppo_experience(g, torch.tensor([1.0, -1.0] * 4))
        exp = dataclasses.replace(exp, ref_logprobs=exp.old_logprobs - 1.0)  # a reference far from the policy
        metrics = g.update_rl(dataclasses.replace(exp, advantages=torch.zeros_like(exp.advantages))).metrics
        assert metrics["losses/kl"] > 0
        delta = _row_delta(g, exp, exp.old_logprobs)
        assert (delta < 0).all(), delta  # only the KL term pulls: toward the (lower) reference logprobs
    finally:
        g.shutdown()


def test_critic_from_the_reward_model_starts_on_the_normalised_reward(tiny_model, tmp_path):
    from reward_fixtures import make_reward_model, make_rollout

    from tidal.driver.rl_stage import critic_affine
    from tidal.common.config import RewardConfig, RewardTerm
    from tidal.reward_service.combine import build_reward

    rm = make_reward_model(tiny_model, tmp_path / "rm", extra={"reward_mean": 0.3, "reward_std": 2.0})
    reward = build_reward(RewardConfig(terms=(RewardTerm(kind="model", target=str(rm), weight=1.5),),
                                       normalize="reference"), policy_tokenizer=tiny_model, local=True)
    reward.calibrate(torch.tensor([0.1, 0.5, 0.9, -0.2]))  # the reference policy's raw scores
    g = LearnerGroup(_cfg(), tiny_model, critic_path=rm, reference_path=tiny_model, local=True,
                     critic_affine=critic_affine(reward, str(rm)))
    try:
        rollout = make_rollout(["How was it?", "Tell me:"], ["It was lovely", "bad"], tokenizer=g.tokenizer)
        want = reward.score(rollout).scores  # (B,) what the RL loop will see at the last token
        fwd = g.forward(rollout, with_values=False)
        critic = g.ranks.actor(0).obj.critic
        with torch.no_grad():
            values = critic(fwd.input_ids, fwd.attention_mask)  # (B, P+R)
        last = fwd.input_ids.shape[1] - fwd.response_len + fwd.response_mask.sum(-1).long() - 1
        got = values[torch.arange(len(last)), last]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, want * 0 + got.mean())  # a real, row-dependent check
    finally:
        g.shutdown()
