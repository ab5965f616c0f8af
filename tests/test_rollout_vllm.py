"""vLLM rollout workers in Ray actors: logprobs agree with the trainer's forward pass (with
temperature, top-k/top-p as documented in tidal.rollout.sampling), weight round trips, and a
tied-embedding model after an update (the case a greedy round trip does not catch)."""

import json
from pathlib import Path

import pytest
import torch

from tidal.common.config import load_config
from tidal.common.models import load_causal_lm, load_tokenizer, sequence_logprobs
from tidal.common.types import PromptBatch
from tidal.rollout.pool import RolloutPool
from tidal.rollout.sampling import Sampling, filtered_logprobs

pytestmark = pytest.mark.ray

TEXTS = ["the movie was", "I think the food is", "user: How was the city?\nassistant:",
         "Honestly, the weekend felt", "We all agree that the show is"]


def make_variant(src: Path, out: Path, tie: bool, head_scale: float) -> Path:
    """The tiny model with a sharper output head (logits spread over several nats, so a
    wrong temperature or a stale head shows up far above 1e-3), optionally tied."""
    from transformers import AutoTokenizer

    model = load_causal_lm(src)
    model.config.tie_word_embeddings = tie
    with torch.no_grad():
        if tie:
            model.lm_head.weight = model.model.embed_tokens.weight
            model.model.embed_tokens.weight.mul_(head_scale)
        else:
            model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def make_pool(path: Path, **overrides) -> RolloutPool:
    cfg = load_config(None, ["rollout.num_workers=1", "rollout.max_model_len=128", "cluster.sync_timeout_s=240",
                             *[f"{k}={v}" for k, v in overrides.items()]])
    return RolloutPool(cfg, path)


def prompts(path: Path) -> PromptBatch:
    tok = load_tokenizer(path)
    return PromptBatch(list(range(len(TEXTS))), TEXTS, [tok(t)["input_ids"] for t in TEXTS])


def trainer_logprobs(model, batch, row: int, temperature: float, top_k: int = -1, top_p: float = 1.0):
    """(R,) logprobs of one row's response: the trainer's sequence_logprobs, or the filtered
    distribution when top-k/top-p are set."""
    ids = torch.tensor([batch.prompt_ids[row] + batch.response_ids[row]])  # (1, T)
    R = len(batch.response_ids[row])
    with torch.no_grad():
        if top_k == -1 and top_p == 1.0:
            return sequence_logprobs(model, ids, torch.ones_like(ids), R, temperature)[0]
        logits = model(ids).logits[0, -R - 1:-1]  # (R, V)
        return filtered_logprobs(logits, ids[0, -R:], temperature, top_k, top_p)


def max_gap(model, batch, temperature, top_k=-1, top_p=1.0) -> float:
    return max((torch.tensor(batch.response_logprobs[r]) - trainer_logprobs(model, batch, r, temperature, top_k, top_p))
               .abs().max().item() for r in range(len(batch)))


@pytest.fixture(scope="module")
def sharp_model(tiny_model, tmp_path_factory):
    return make_variant(tiny_model, tmp_path_factory.mktemp("sharp"), tie=False, head_scale=8.0)


@pytest.fixture(scope="module")
def pool(ray_cluster, sharp_model):
    pool = make_pool(sharp_model)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def hf_model(sharp_model):
    return load_causal_lm(sharp_model)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_trainer_forward_pass(pool, hf_model, sharp_model, temperature):
    batch = pool.generate(prompts(sharp_model), Sampling(n=2, temperature=temperature, max_new_tokens=24, seed=1))
    assert len(batch) == 2 * len(TEXTS) and batch.prompt_index == sorted(batch.prompt_index)
    assert all(len(lp) == len(ids) > 0 for lp, ids in zip(batch.response_logprobs, batch.response_ids))
    assert max_gap(hf_model, batch, temperature) < 1e-3
    if temperature != 1.0:  # the check can fail: unscaled logprobs are far off
        assert max_gap(hf_model, batch, 1.0) > 1e-2
    eos = load_tokenizer(sharp_model).eos_token_id
    for ids, reason in zip(batch.response_ids, batch.finish_reason):  # cut after the first EOS
        assert eos not in ids[:-1] and (reason == "stop") == (ids[-1] == eos)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (-1, 0.8)])
def test_top_k_top_p_logprobs_are_those_of_the_filtered_distribution(pool, hf_model, sharp_model, top_k, top_p):
    batch = pool.generate(prompts(sharp_model), Sampling(n=2, temperature=0.8, top_k=top_k, top_p=top_p,
                                                         max_new_tokens=16, seed=2))
    assert max_gap(hf_model, batch, 0.8, top_k, top_p) < 1e-3
    # Renormalized over the kept tokens: never below the trainer's full-softmax logprob.
    lift = torch.cat([torch.tensor(batch.response_logprobs[r]) - trainer_logprobs(hf_model, batch, r, 0.8)
                      for r in range(len(batch))])
    assert lift.min() > -1e-4 and lift.max() > 1e-2


def test_weight_round_trip_restores_greedy_output_and_advances_version(pool, sharp_model, hf_model):
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=16)
    batch = prompts(sharp_model)
    before = pool.generate(batch, greedy)
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}

    v0 = pool.weight_version
    pool.load_weights(perturbed.items())
    assert pool.weight_version == v0 + 1
    changed = pool.generate(batch, greedy)
    assert changed.response_ids != before.response_ids
    assert set(changed.weight_version) == {v0 + 1}
    # The engine now matches a trainer holding the perturbed weights.
    hf_model.load_state_dict(perturbed)
    try:
        assert max_gap(hf_model, pool.generate(batch, Sampling(n=1, max_new_tokens=16)), 1.0) < 1e-3
    finally:
        hf_model.load_state_dict(original)

    pool.load_weights(original.items())
    after = pool.generate(batch, greedy)
    assert after.response_ids == before.response_ids
    assert set(after.weight_version) == {v0 + 2} and pool.weight_version == v0 + 2
    assert [i.weight_version for i in pool.worker_infos()] == [v0 + 2]
    with pytest.raises(ValueError, match="not newer"):
        pool.load_weights(pool.publish(original.items(), version=v0 + 1))


def test_tied_embeddings_logprobs_after_update(ray_cluster, tiny_model, tmp_path):
    path = make_variant(tiny_model, tmp_path / "tied", tie=True, head_scale=8.0)
    model = load_causal_lm(path)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(7)
    old_embed = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    update = [(k, v.detach().clone()) for k, v in model.named_parameters()]
    assert "lm_head.weight" not in dict(update)  # a tied head is exported once, as the embedding

    pool = make_pool(path)
    try:
        pool.load_weights(update)
        batch = pool.generate(prompts(path), Sampling(n=2, temperature=1.0, max_new_tokens=24, seed=3))
    finally:
        pool.shutdown()
    assert max_gap(model, batch, 1.0) < 1e-3
    # What an engine whose head kept the OLD embedding would report: far off, so the check above
    # can fail (docs/platform.md#p-vllm-tied-head measured 7e-2 before the re-tie fix).
    stale = []
    for r in range(len(batch)):
        ids = torch.tensor([batch.prompt_ids[r] + batch.response_ids[r]])  # (1, T)
        R = len(batch.response_ids[r])
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state[0, -R - 1:-1]  # (R, H), after the final norm
        logp = torch.log_softmax(hidden @ old_embed.T, -1).gather(-1, ids[0, -R:, None])[:, 0]
        stale.append((torch.tensor(batch.response_logprobs[r]) - logp).abs().max().item())
    assert max(stale) > 1e-2


def test_one_pool_samples_several_folders_as_fresh_pools_would(ray_cluster, tiny_model, tmp_path):
    """`tidal eval`'s PolicySampler: a second folder of the same model is loaded into the running
    engine (its samples' logprobs are that model's, by the trainer's forward pass), and back on
    the first folder the first samples come again, token for token: a load leaves nothing of the
    previous policy behind (prefix cache) and every request has its own seed, so each policy's
    samples are those a fresh pool would draw. One engine start; another model gets its own."""
    from tidal.driver.heldout import PolicySampler, Seeds, eval_sampling

    tie = load_causal_lm(tiny_model).config.tie_word_embeddings
    other = make_variant(tiny_model, tmp_path / "other", tie=tie, head_scale=8.0)
    cfg = load_config(None, ["rollout.num_workers=1", "rollout.max_model_len=128", "cluster.sync_timeout_s=240",
                             "rollout.max_new_tokens=12"])
    batch, sampling = prompts(tiny_model), eval_sampling(cfg, Seeds.REPORTING, n=2)
    with PolicySampler(cfg) as draw:
        first = draw(tiny_model, batch, sampling)
        loaded = draw(other, batch, sampling)
        again = draw(tiny_model, batch, sampling)
        assert draw.engine_starts == 1
        bigger = tmp_path / "bigger"
        bigger.mkdir()
        config = json.loads((Path(other) / "config.json").read_text())
        (bigger / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
        assert draw._same_model(Path(other)) and not draw._same_model(bigger)
    assert loaded.response_ids != first.response_ids and again.response_ids == first.response_ids
    assert max_gap(load_causal_lm(other), loaded, sampling.temperature) < 1e-3  # other's weights
    assert max_gap(load_causal_lm(tiny_model), again, sampling.temperature) < 1e-3
