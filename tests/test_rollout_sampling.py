"""Sampling semantics: top-k/top-p filtering against brute force, EOS truncation, per-prompt
seeds, RolloutBatch assembly, and the transformers backend's logprobs (in-process)."""

import itertools

import pytest
import torch

from tidal.common.config import RolloutConfig
from tidal.common.types import PromptBatch
from tidal.rollout.sampling import Sampling, filter_logits, filtered_logprobs, truncate_at_eos
from tidal.rollout.worker import assemble, check_prompts


def _brute_force_keep(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Tokens kept by top-k then top-p, computed from the definitions on one row."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k > 0:
        kth = float(logits[order[top_k - 1]])
        order = [i for i in order if float(logits[i]) >= kth]
    probs = torch.softmax(torch.tensor([float(logits[i]) for i in order]), 0)
    kept, mass = [], 0.0
    for i, p in zip(order, probs.tolist()):
        kept.append(i)
        mass += p
        if mass >= top_p - 1e-9:
            break
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (3, 1.0), (-1, 0.7), (5, 0.5), (1, 1.0)])
def test_filter_logits_matches_definition(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 20)  # (B, V)
    out = filter_logits(logits, top_k, top_p)
    for row in range(6):
        kept = {i for i in range(20) if out[row, i] > float("-inf")}
        expected = set(range(20)) if top_k == -1 and top_p == 1.0 else _brute_force_keep(logits[row], top_k, top_p)
        assert kept == expected
        assert torch.equal(out[row][list(kept)], logits[row][list(kept)])  # kept logits untouched


def test_filtered_logprobs_temperature_and_renormalization():
    torch.manual_seed(1)
    logits, labels = torch.randn(4, 7, 30), torch.randint(0, 30, (4, 7))
    # No filter: exactly the trainer's log_softmax(logits / T).
    full = filtered_logprobs(logits, labels, 0.7)
    assert torch.allclose(full, torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None])[..., 0])
    # With top-k the kept tokens' logprobs rise by -log(kept mass) and sum to probability 1.
    top1 = logits.argmax(-1)
    lp = filtered_logprobs(logits, top1, 0.7, top_k=5)
    mass = torch.softmax(logits / 0.7, -1).topk(5, -1).values.sum(-1)
    assert torch.allclose(lp, filtered_logprobs(logits, top1, 0.7) - mass.log(), atol=1e-5)
    all_kept = filtered_logprobs(logits, logits.topk(5, -1).indices[..., 0], 0.7, top_k=5)
    assert (all_kept <= 0).all()
    # Greedy (temperature 0): unscaled log-softmax.
    assert torch.allclose(filtered_logprobs(logits, labels, 0.0), filtered_logprobs(logits, labels, 1.0))


def test_truncate_at_eos():
    assert truncate_at_eos([5, 6, 2, 7, 2], {2}) == ([5, 6, 2], True)
    assert truncate_at_eos([5, 6, 7], {2}) == ([5, 6, 7], False)
    assert truncate_at_eos([9, 5], {2, 9}) == ([9], True)
    assert truncate_at_eos([], {2}) == ([], False)


def test_prompt_seeds_are_distinct_and_stable():
    s = Sampling(n=4, seed=7)
    seeds = [s.prompt_seed(i) for i in range(1000)]
    # Sample k of prompt i uses seed_i + k: no two (prompt, sample) pairs may share a seed.
    used = {seed + k for seed, k in itertools.product(seeds, range(4))}
    assert len(used) == 4000 and all(0 <= x < 2**31 for x in seeds)
    assert Sampling(seed=7).prompt_seed(3) == s.prompt_seed(3) != Sampling(seed=8).prompt_seed(3)
    assert Sampling(seed=None).prompt_seed(3) is None


def test_sampling_validation_and_config():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=0)
    s = Sampling.from_config(RolloutConfig(n_samples=3, temperature=0.5, top_k=4, max_new_tokens=9), seed=2)
    assert (s.n, s.temperature, s.top_k, s.max_new_tokens, s.seed, s.filtered) == (3, 0.5, 4, 9, 2, True)


def test_assemble_groups_rows_and_cuts_after_eos():
    prompts = PromptBatch([10, 11], ["a", "b"], [[1, 2], [3]], ["ra", "rb"])
    responses = [[[4, 2, 5], [4, 4]], [[2], [6, 7, 8]]]
    logprobs = [[[-1.0, -2.0, -3.0], [-1.0, -1.5]], [[-0.5], [-1.0, -2.0, -3.0]]]
    texts = [["x", "y"], ["z", "w"]]
    b = assemble(prompts, Sampling(n=2), responses, logprobs, texts, {2}, weight_version=3)
    assert b.prompt_index == [10, 10, 11, 11]
    assert b.response_ids == [[4, 2], [4, 4], [2], [6, 7, 8]]
    assert b.response_logprobs == [[-1.0, -2.0], [-1.0, -1.5], [-0.5], [-1.0, -2.0, -3.0]]
    assert b.finish_reason == ["stop", "length", "stop", "length"]
    assert b.weight_version == [3] * 4 and b.reference == ["ra", "ra", "rb", "rb"]
    assert b.prompt_ids == [[1, 2], [1, 2], [3], [3]]


def test_check_prompts_names_the_bad_prompt():
    with pytest.raises(ValueError, match="prompt 7 has no tokens"):
        check_prompts(PromptBatch([7], ["x"], [[]]), 64, 8)
    with pytest.raises(ValueError, match="prompt 8 has 60 tokens.*rollout.max_model_len=64"):
        check_prompts(PromptBatch([8], ["x"], [[1] * 60]), 64, 8)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0), (0.7, 5, 1.0), (1.0, -1, 0.8)])
def test_hf_backend_logprobs_match_forward_pass(tiny_model, temperature, top_k, top_p):
    from tidal.common.models import load_tokenizer
    from tidal.rollout.hf_backend import HFRolloutWorker

    worker = HFRolloutWorker(str(tiny_model), RolloutConfig(max_model_len=128))
    tok = load_tokenizer(tiny_model)
    texts = ["the movie was", "I think the food is good and"]
    prompts = PromptBatch([0, 1], texts, [tok(t)["input_ids"] for t in texts])
    sampling = Sampling(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=12, seed=3)
    batch = worker.generate(prompts, sampling)
    assert batch.prompt_index == [0, 0, 1, 1]
    for row in range(len(batch)):
        ids = torch.tensor([batch.prompt_ids[row] + batch.response_ids[row]])  # (1, T)
        with torch.no_grad():
            logits = worker.model(ids).logits[0, len(batch.prompt_ids[row]) - 1:-1]  # (R, V)
        ref = filtered_logprobs(logits, ids[0, len(batch.prompt_ids[row]):], temperature, top_k, top_p)
        assert torch.allclose(torch.tensor(batch.response_logprobs[row]), ref, atol=1e-4)
    assert batch.response_ids != worker.generate(prompts, Sampling(n=2, max_new_tokens=12, seed=4)).response_ids


def test_order_by_prompt_sorts_and_checks_counts():
    from tidal.common.types import RolloutBatch
    from tidal.rollout.worker import order_by_prompt

    def batch(idx):
        n = len(idx)
        return RolloutBatch(idx, ["p"] * n, [[1]] * n, [str(i) for i in range(n)], [[i] for i in range(n)],
                            [[-1.0]] * n, ["length"] * n, [0] * n)

    prompts = PromptBatch([5, 3], ["a", "b"], [[1], [2]])
    out = order_by_prompt(batch([5, 5, 3, 3]), prompts, 2)
    assert out.prompt_index == [3, 3, 5, 5] and out.response_text == ["2", "3", "0", "1"]  # stable
    with pytest.raises(RuntimeError, match="wrong number of times"):
        order_by_prompt(batch([5, 5, 3, 3, 3]), prompts, 2)  # a duplicate answer
    with pytest.raises(RuntimeError, match="wrong number of times"):
        order_by_prompt(batch([5, 5]), prompts, 2)  # a lost prompt


def test_only_the_tied_head_reload_warning_is_filtered():
    import logging

    from tidal.rollout.vllm_ext import _TiedHeadReloadFilter

    def record(layer):
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, "%s: Failed to load weights", (layer,), None)

    f = _TiedHeadReloadFilter()
    assert not f.filter(record("ParallelLMHead"))  # the tied head is rebuilt from the embedding: harmless
    assert f.filter(record("QKVParallelLinear"))  # any other layer that failed to load still warns
