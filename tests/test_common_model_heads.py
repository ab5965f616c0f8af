"""Dropout off after every load (issue 10 item 4) and folding reward normalisation into a
critic's value head (issue 10 item 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tidal.common.models import (
    ValueModel, compose_affine, disable_dropout, fold_affine_into_value_head, load_causal_lm, load_tokenizer,
    load_value_model, read_value_model_meta, reward_head_affine, save_value_model,
)


# ---------------------------------------------------------------------------- dropout

@pytest.fixture(scope="module")
def gpt2_pdrop(tmp_path_factory):
    """A 1-layer GPT-2 whose only dropout settings are `*_pdrop` keys (and summary_*_dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                        resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def _two_passes(model: nn.Module, fn) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    ids = torch.arange(1, 17).view(2, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return fn(model, ids, mask), fn(model, ids, mask)


def _lm_logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def test_gpt2_pdrop_dropout_is_on_without_disable_dropout(gpt2_pdrop):
    # The control: the plain HF load keeps p=0.5, so two train-mode passes differ. Without it
    # the assertions below would prove nothing.
    from transformers import GPT2LMHeadModel

    a, b = _two_passes(GPT2LMHeadModel.from_pretrained(gpt2_pdrop), _lm_logits)
    assert not torch.allclose(a, b)


def test_disable_dropout_makes_train_mode_deterministic(gpt2_pdrop):
    from transformers import GPT2LMHeadModel

    model = disable_dropout(GPT2LMHeadModel.from_pretrained(gpt2_pdrop))
    a, b = _two_passes(model, _lm_logits)
    assert torch.equal(a, b)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.0, 0.0, 0.0)


def test_disable_dropout_zeroes_float_attributes_read_at_forward():
    # Llama-style attention keeps its probability as a float attribute, not a module.
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_dropout = 0.3
            self.scaling = 0.125  # not a dropout: must stay
            self.drop = nn.Dropout1d(0.2)  # a _DropoutNd that is not nn.Dropout

    model = disable_dropout(nn.Sequential(Attn(), nn.AlphaDropout(0.4)))
    assert model[0].attention_dropout == 0.0 and model[0].scaling == 0.125
    assert model[0].drop.p == 0.0 and model[1].p == 0.0


def test_tidal_loaders_disable_pdrop_dropout(gpt2_pdrop):
    a, b = _two_passes(load_causal_lm(gpt2_pdrop), _lm_logits)
    assert torch.equal(a, b)
    value = load_value_model(gpt2_pdrop)
    a, b = _two_passes(value, lambda m, ids, mask: m(ids, mask))
    assert torch.equal(a, b)
    assert max(m.p for m in value.modules() if isinstance(m, nn.Dropout)) == 0.0


# ---------------------------------------------------------------------------- affine maps

def test_compose_affine_hand_computation():
    assert compose_affine() == (0.0, 1.0)
    assert compose_affine((2.0, 4.0)) == (2.0, 4.0)
    # ((x - 2) / 4 - 1) / 0.5 = (x - 6) / 2
    shift, scale = compose_affine((2.0, 4.0), (1.0, 0.5))
    assert (shift, scale) == (6.0, 2.0)
    for x in (-3.0, 0.0, 7.5):
        assert math.isclose((x - shift) / scale, ((x - 2.0) / 4.0 - 1.0) / 0.5)
    with pytest.raises(ValueError, match="scale"):
        compose_affine((0.0, 0.0))


def test_reward_head_affine_matches_the_reward_path():
    meta = {"reward_mean": 0.3, "reward_std": 2.0}
    reference = (-0.4, 0.25)
    shift, scale = reward_head_affine(meta, reference, weight=1.5)
    for raw in (-1.0, 0.3, 2.2):
        service = (raw - 0.3) / 2.0  # reward_service/worker.py
        combined = 1.5 * service  # CombinedReward: weight * term
        expected = (combined - reference[0]) / reference[1]  # normalize: reference
        assert math.isclose((raw - shift) / scale, expected, rel_tol=1e-12)
    assert reward_head_affine({}) == (0.0, 1.0)  # a folder without normalisation metadata
    with pytest.raises(ValueError, match="reward_std"):
        reward_head_affine({"reward_std": 0.0})


@pytest.fixture(scope="module")
def rm_folder(tiny_model, tmp_path_factory):
    """A reward-model folder on the tiny model with a non-trivial head and stored mean/std."""
    torch.manual_seed(1)
    model = load_value_model(tiny_model)
    with torch.no_grad():
        model.value_head.bias.fill_(0.7)
    return save_value_model(model, tmp_path_factory.mktemp("rm"), extra={"reward_mean": 0.45, "reward_std": 1.7},
                            tokenizer=load_tokenizer(tiny_model))


def _batch(tokenizer):
    enc = tokenizer(["the movie was great", "awful", "it was fine I guess"], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_folded_critic_scores_the_normalised_reward(rm_folder):
    ids, mask = _batch(load_tokenizer(rm_folder))
    original = load_value_model(rm_folder)
    raw = original.score(ids, mask)
    shift, scale = reward_head_affine(read_value_model_meta(rm_folder), reference=(0.2, 0.6))
    critic = fold_affine_into_value_head(load_value_model(rm_folder), shift, scale)
    expected = ((raw - 0.45) / 1.7 - 0.2) / 0.6
    torch.testing.assert_close(critic.score(ids, mask), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(raw, expected, atol=1e-2)  # the fold changed something real
    # Every token's value is mapped the same way, not only the last one.
    torch.testing.assert_close(critic(ids, mask), (original(ids, mask) - shift) / scale, atol=1e-5, rtol=0)


def test_fold_adds_a_bias_to_a_bias_free_head(rm_folder):
    ids, mask = _batch(load_tokenizer(rm_folder))
    base = load_value_model(rm_folder)
    head = nn.Linear(base.config.hidden_size, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(base.value_head.weight)
    model = ValueModel(base.backbone, head)
    raw = model.score(ids, mask)
    fold_affine_into_value_head(model, shift=-0.5, scale=4.0)
    assert model.value_head.bias is not None and model.value_head.weight.requires_grad
    torch.testing.assert_close(model.score(ids, mask), (raw + 0.5) / 4.0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scale"):
        fold_affine_into_value_head(model, 0.0, float("inf"))


def test_folded_critic_matches_the_reward_service(rm_folder):
    # The number the RL loop actually receives: RewardWorker's normalised score of token ids
    # [prompt | response + EOS], then the reference calibration. The folded critic's value at
    # the last token of the same (left-padded) sequences must equal it.
    from tidal.reward_service.worker import RewardInput, RewardWorker

    tok = load_tokenizer(rm_folder)
    seqs = [tok("a review:")["input_ids"] + tok(" lovely film", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
            tok("rate it")["input_ids"] + tok(" bad", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    service = RewardWorker(str(rm_folder), device="cpu").score(RewardInput(["", ""], ["", ""], token_ids=seqs))
    reference = (0.1, 0.8)
    expected = (service - reference[0]) / reference[1]

    critic = fold_affine_into_value_head(
        load_value_model(rm_folder), *reward_head_affine(read_value_model_meta(rm_folder), reference))
    width = max(map(len, seqs))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    torch.testing.assert_close(critic.score(ids, mask), expected, atol=1e-5, rtol=0)
