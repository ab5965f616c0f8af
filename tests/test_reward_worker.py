"""The reward-model worker and pool: padding-invariant scores equal to a direct forward pass,
the saved normalization, bad inputs, and a real Ray pool (split batches, dead/hung workers)."""

import pytest
import torch
from reward_fixtures import make_reward_model, make_rollout

from tidal.common.config import RewardConfig, RewardTerm
from tidal.common.models import load_tokenizer, load_value_model
from tidal.reward_service.combine import ModelReward, build_reward
from tidal.reward_service.worker import RewardInput, RewardPool, RewardWorker, RewardWorkerError

MEAN, STD = 0.5, 2.0
PROMPTS = ["Today I", "The weather", "My friend said that the movie was", "Hi", "Well"]
COMPLETIONS = [" feel great", " is awful and cold, as it was yesterday and the day before", "", " there", " ok then"]


@pytest.fixture(scope="module")
def rm_dir(tiny_model, tmp_path_factory):
    return make_reward_model(tiny_model, tmp_path_factory.mktemp("rm"), seed=0,
                             extra={"reward_mean": MEAN, "reward_std": STD})


@pytest.fixture(scope="module")
def direct(rm_dir):
    """Reference: ValueModel.score on each unpadded sequence alone, normalized by hand."""
    model = load_value_model(rm_dir)
    tokenizer = load_tokenizer(rm_dir)

    @torch.inference_mode()
    def score(ids: list[int]) -> float:
        x = torch.tensor([ids])  # (1, T), no padding at all
        return ((model.score(x, torch.ones_like(x)) - MEAN) / STD).item()

    def encode(prompt: str, completion: str, ended: bool = True) -> list[int]:
        """As the rm stage trains it: [prompt | response + EOS] (no EOS when the response was cut)."""
        eos = [tokenizer.eos_token_id] if ended else []
        return tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"] + eos

    return score, encode, tokenizer


def test_scores_ignore_padding_and_equal_a_direct_forward_pass(rm_dir, direct):
    score, encode, _ = direct
    expected = torch.tensor([score(encode(p, c)) for p, c in zip(PROMPTS, COMPLETIONS)])
    batch = RewardInput(PROMPTS, COMPLETIONS)
    padded = RewardWorker(str(rm_dir), micro_batch_size=16).score(batch)  # one micro-batch, heavy padding
    alone = RewardWorker(str(rm_dir), micro_batch_size=1).score(batch)  # no padding at all
    mixed = RewardWorker(str(rm_dir), micro_batch_size=2).score(batch)
    torch.testing.assert_close(padded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 1e-3  # the samples really score differently


def test_model_dtype_names_map_to_the_one_dtype_table(rm_dir):
    """The reward worker reads the dtype name as every role does (common/precision.torch_dtype):
    bfloat16 loads bf16, and a name outside model.dtype is refused, not looked up on torch."""
    assert RewardWorker(str(rm_dir), dtype="bfloat16").model.value_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"model.dtype 'float64' is not one of \['bfloat16', 'float32'\]"):
        RewardWorker(str(rm_dir), dtype="float64")


def test_saved_normalization_is_applied(tiny_model, rm_dir, tmp_path, direct):
    score, encode, _ = direct
    plain = make_reward_model(tiny_model, tmp_path / "plain", seed=0)  # same head, no metadata
    raw = RewardWorker(str(plain)).score(RewardInput(PROMPTS[:2], COMPLETIONS[:2]))
    normalized = RewardWorker(str(rm_dir)).score(RewardInput(PROMPTS[:2], COMPLETIONS[:2]))
    torch.testing.assert_close(normalized, (raw - MEAN) / STD)
    bad = make_reward_model(tiny_model, tmp_path / "bad", extra={"reward_mean": 0.0, "reward_std": 0.0})
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        RewardWorker(str(bad))
    with pytest.raises(FileNotFoundError, match="not a reward-model folder"):
        RewardWorker(str(tiny_model))  # a plain LM folder has no trained head


def test_rollout_token_ids_are_read_when_the_policy_tokenizer_is_shared(tiny_model, rm_dir, direct):
    score, encode, tokenizer = direct
    cfg = RewardConfig(terms=(RewardTerm(kind="model"),), normalize="none")
    finish = ["stop", "stop", "length", "stop", "length"]
    rollout = make_rollout(PROMPTS, COMPLETIONS, finish=finish, tokenizer=tokenizer)
    # where the policy emitted EOS its response ids end with it; the response text never does
    rollout = rollout.__class__(**{**rollout.__dict__, "response_ids": [
        r + [tokenizer.eos_token_id] if f == "stop" else r for r, f in zip(rollout.response_ids, finish)]})
    shared = build_reward(cfg, reward_model=rm_dir, policy_tokenizer=tiny_model, local=True)
    assert shared.terms[0].fn.use_token_ids
    ids = [p + r for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
    torch.testing.assert_close(shared.score(rollout).scores, torch.tensor([score(s) for s in ids]), atol=1e-5, rtol=1e-5)
    text_only = build_reward(cfg, reward_model=rm_dir, local=True)
    assert not text_only.terms[0].fn.use_token_ids
    texts = [encode(p, c, f == "stop") for p, c, f in zip(PROMPTS, COMPLETIONS, finish)]
    assert texts == ids  # re-tokenizing the text gives the policy's ids here: both paths agree
    torch.testing.assert_close(text_only.score(rollout).scores, torch.tensor([score(s) for s in texts]), atol=1e-5, rtol=1e-5)


BAD_BYTES = b"nice \xff\xfe day".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("prompt,completion,finish,expect_ids", [
    ("Hello", "", "stop", lambda enc, tok: enc("Hello", "")),  # empty completion: prompt + EOS
    ("", "", "stop", lambda enc, tok: [tok.eos_token_id]),  # nothing but the EOS
    ("", "", "length", lambda enc, tok: [tok.eos_token_id]),  # no token at all: read at a lone EOS
    ("Hi", BAD_BYTES, "stop", lambda enc, tok: enc("Hi", "nice \ufffd\ufffd day")),  # undecodable bytes -> U+FFFD
    ("Hi", "good " * 2000, "length", lambda enc, tok: enc("Hi", "good " * 2000, False)[-512:]),  # last 512 tokens
], ids=["empty-completion", "empty-both", "no-tokens", "non-utf8", "huge"])
def test_bad_inputs_reach_the_model_well_defined(rm_dir, direct, prompt, completion, finish, expect_ids):
    score, encode, tokenizer = direct
    r = build_reward(RewardConfig(terms=(RewardTerm(kind="model", target=str(rm_dir)),), normalize="none"), local=True)
    out = r.score(make_rollout([prompt], [completion], finish=[finish]))
    assert out.valid.all()
    assert out.scores.tolist() == pytest.approx([score(expect_ids(encode, tokenizer))], abs=1e-5)


@pytest.mark.ray
def test_pool_splits_batches_across_ray_workers(ray_cluster, rm_dir):
    local = RewardWorker(str(rm_dir), micro_batch_size=2)
    # the model term of the combined reward runs on a pool of 2 Ray workers
    reward = build_reward(RewardConfig(terms=(RewardTerm(kind="model", weight=2.0),), micro_batch_size=2, num_workers=2,
                                       normalize="none"),
                          reward_model=rm_dir, worker_timeout_s=120)
    try:
        assert isinstance(reward.terms[0].fn, ModelReward)
        pool = reward.terms[0].fn.pool
        assert pool.num_workers == 2
        scored = reward.score(make_rollout(PROMPTS, COMPLETIONS))
        torch.testing.assert_close(scored.scores, 2 * local.score(RewardInput(PROMPTS, COMPLETIONS)), atol=1e-5, rtol=1e-5)
        batch = RewardInput(PROMPTS * 2, COMPLETIONS * 2)
        torch.testing.assert_close(pool.score(batch), local.score(batch), atol=1e-5, rtol=1e-5)
        one = batch.slice(3, 4)  # fewer samples than workers
        torch.testing.assert_close(pool.score(one), local.score(one), atol=1e-5, rtol=1e-5)
        assert pool.score(batch.slice(0, 0)).shape == (0,)
    finally:
        reward.close()


@pytest.mark.ray
def test_hung_or_dead_worker_is_an_error_naming_it(ray_cluster, rm_dir, tmp_path):
    pool = RewardPool(rm_dir, num_workers=1, timeout_s=120, max_restarts=1)
    try:
        pool.timeout_s = 0.01  # far too short for 200 samples: the worker counts as hung, twice
        with pytest.raises(RewardWorkerError, match=r"did not answer within 0 s in 2 rounds of restarts"):
            pool.score(RewardInput(["x " * 100] * 200, ["y"] * 200))
    finally:
        pool.shutdown()
    with pytest.raises(RewardWorkerError, match=r"no-such-model: start: reward worker 0 failed: "):
        RewardPool(tmp_path / "no-such-model", num_workers=1, timeout_s=120)


def test_auto_normalization_is_reference_with_a_reward_model_term_else_none(rm_dir):
    with_model = build_reward(RewardConfig(terms=(RewardTerm(kind="model", target=str(rm_dir)),)), local=True)
    rules_only = build_reward(RewardConfig(terms=(RewardTerm(kind="sentiment"),)), local=True)
    assert with_model.normalize == "reference" and rules_only.normalize == "none"
    with pytest.raises(RuntimeError, match="calibrate"):  # reference normalization needs its calibration first
        with_model.score(make_rollout(["a", "b"], ["x", "y"]))
    explicit = build_reward(RewardConfig(terms=(RewardTerm(kind="model", target=str(rm_dir)),), normalize="none"),
                            local=True)
    assert explicit.normalize == "none"
