"""Partial rollouts (tidal.driver.partial), pure logic: the slice loop, the carry-over across a
weight push in continue and abort mode, its checkpoint, the per-token staleness mask of the loss
and the config error. The pool is a stand-in with the real pool's call (pure bookkeeping under
test); tests/test_e2e_partial.py runs the real engines."""

import pytest
import torch

from tidal.common.config import ConfigError, load_config
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.driver.partial import PartialRollouts, check_config, request_id, token_metrics
from tidal.learner.experience import ForwardPass, assemble_experience, pad_response_versions
from tidal.learner.rl import train_mask
from tidal.rollout.worker import order_by_prompt
from e2e_support import REPO

EOS = 0
SHORT = 3  # a short prompt's responses end with EOS as their 3rd token


class Prompts:
    """Prompt i has the one token i + 1: prompts divisible by 4 (after the +1: i % 4 == 3) never stop."""

    def __init__(self):
        self.taken = 0

    def next_batch(self, k):
        idx = list(range(self.taken, self.taken + k))
        self.taken += k
        return PromptBatch(idx, [f"p{i}" for i in idx], [[i + 1] for i in idx])


class Pool:
    """The pool's generate call: long prompts emit token 7 forever, short ones EOS at SHORT tokens;
    each token's engine log-prob names the version that sampled it."""

    def __init__(self):
        self.weight_version, self.calls = 0, []

    def generate(self, prompts, sampling):
        self.calls.append((list(prompts.index), sampling))
        rows = {k: [] for k in ("ids", "lp", "fr", "text")}
        for ids in prompts.token_ids:
            long, done = ids[0] % 4 == 0, len(ids) - 1
            out = [7] * sampling.max_new_tokens if long else \
                ([7] * min(sampling.max_new_tokens, SHORT - 1 - done) + [EOS])[:sampling.max_new_tokens]
            rows["ids"].append(out)
            rows["lp"].append([-0.1 * (self.weight_version + 1)] * len(out))
            rows["fr"].append("stop" if out[-1] == EOS else "length")
            rows["text"].append("x" * len(out))
        b = len(prompts)
        batch = RolloutBatch(list(prompts.index), list(prompts.text), [list(t) for t in prompts.token_ids],
                             rows["text"], rows["ids"], rows["lp"], rows["fr"], [self.weight_version] * b)
        return order_by_prompt(batch, prompts, 1)


def _cfg(mode="continue", *extra):
    return load_config(REPO / "configs" / "tiny_grpo.yaml", [
        "algorithm.mode=async", f"rollout.partial={mode}", "rollout.partial_tokens=4", "rollout.max_new_tokens=16",
        "rollout.n_samples=2", "algorithm.prompts_per_step=4", "rollout.partial_spare=2", *extra])


def _partial(mode="continue", *extra):
    return PartialRollouts(_cfg(mode, *extra), Prompts(), Pool())


def test_a_step_takes_the_first_groups_to_finish_and_carries_the_long_ones():
    p = _partial()
    batch = p.next_batch(p.pool.weight_version, 4)
    # 6 groups in flight (4 + spare 2): prompts 0..5; prompt 3 never stops, the others end in one slice
    assert sorted(set(batch.prompt_index)) == [0, 1, 2, 4] and len(batch) == 8
    assert batch.prompt_index == [0, 0, 1, 1, 2, 2, 4, 4]  # (finish slice, prompt order)
    assert all(r == [7, 7, EOS] for r in batch.response_ids) and set(batch.finish_reason) == {"stop"}
    assert [g.index for g in p.groups] == [3, 5]  # 5 finished but is the spare; 3 is half-way
    assert [len(s.tokens) for s in p.groups[0].seqs] == [4, 4]
    assert p.stats["rollout/partial_slices"] == 1 and p.stats["rollout/partial_carried"] == 2
    assert [len(c[0]) for c in p.pool.calls] == [12]  # one slice of 6 groups x 2 samples, 4 tokens each
    assert p.pool.calls[0][1].max_new_tokens == 4


def test_continue_goes_on_under_the_new_weights_with_per_token_versions_and_logprobs():
    p = _partial()
    p.next_batch(p.pool.weight_version, 4)
    p.pool.weight_version = 1  # a weight push between two steps
    batch = p.next_batch(p.pool.weight_version, 4)
    assert 3 not in batch.prompt_index  # still not done: 8 of 16 tokens
    p.pool.weight_version = 2
    batches = [p.next_batch(p.pool.weight_version, 4) for _ in range(2)]
    rows = [r for b in batches for r in range(len(b)) if b.prompt_index[r] == 3]
    b = next(b for b in batches if 3 in b.prompt_index)
    r = b.prompt_index.index(3)
    assert len(rows) == 2 and b.finish_reason[r] == "length" and len(b.response_ids[r]) == 16
    assert b.token_versions[r] == [0] * 4 + [1] * 4 + [2] * 8  # the version of every token
    # the engine's log-probs of each token are those of the version that sampled it
    assert b.response_logprobs[r] == pytest.approx([-0.1] * 4 + [-0.2] * 4 + [-0.3] * 8)
    assert b.weight_version[r] == 2  # a row's version: its newest token's
    assert b.response_text[r] == "x" * 16


def test_abort_restarts_an_unfinished_response_under_the_new_weights():
    p = _partial("abort")
    p.next_batch(p.pool.weight_version, 4)
    p.pool.weight_version = 1
    p.next_batch(p.pool.weight_version, 4)
    assert p.stats["rollout/partial_aborted_tokens"] == 8  # prompt 3: 2 samples x 4 tokens of version 0
    long = next(g for g in p.groups if g.index == 3)
    assert all(s.attempt == 1 and set(s.versions) == {1} for s in long.seqs)  # restarted, one version
    # the restarted slice asks for other seeds (ids) than the first attempt did
    first = {i for i in p.pool.calls[0][0] if i // 4096 // 1024 // 2 == long.serial}
    again = {i for c in p.pool.calls[1:] for i in c[0] if i // 4096 // 1024 // 2 == long.serial}
    assert first and again and not first & again


def test_partial_tokens_and_spare_set_the_slices_and_the_groups_in_flight():
    p = _partial("continue", "rollout.partial_tokens=2", "rollout.partial_spare=0")
    batch = p.next_batch(p.pool.weight_version, 4)
    # no spare group: the step waits for prompt 3's whole 16 tokens, in 8 slices of 2
    assert sorted(set(batch.prompt_index)) == [0, 1, 2, 3] and batch.finish_reason[6:] == ["length"] * 2
    assert p.pool.calls[0][1].max_new_tokens == 2 and len(p.pool.calls[0][0]) == 8  # 4 groups, no spare
    assert p.stats["rollout/partial_slices"] == 8 and p.dataset.taken == 4


def test_the_last_slice_asks_only_for_what_is_left():
    p = _partial("continue", "rollout.partial_tokens=6")
    for version in range(1, 4):
        p.next_batch(p.pool.weight_version, 4)
        p.pool.weight_version = version
    budgets = [c[1].max_new_tokens for c in p.pool.calls if any(i % 4096 == 2 for i in c[0])]
    assert budgets == [4]  # the third slice of 16 tokens in slices of 6


def test_a_restored_state_goes_on_exactly_as_the_uninterrupted_one():
    def run(p, steps):
        out = []
        for s in steps:
            p.pool.weight_version = s
            b = p.next_batch(p.pool.weight_version, 4)
            out.append((b.prompt_index, b.response_ids, b.token_versions))
        return out

    ref = run(_partial(), range(5))
    a = _partial()
    head = run(a, range(2))
    b = _partial()
    b.load_state_dict(a.state_dict())
    b.dataset.taken = a.dataset.taken  # the data position is the checkpoint's too
    assert head + run(b, range(2, 5)) == ref


def test_request_ids_are_unique_per_sample_attempt_and_slice():
    ids = {request_id(s, k, 4, a, sl) for s in range(20) for k in range(4) for a in range(3) for sl in range(8)}
    assert len(ids) == 20 * 4 * 3 * 8


def test_stale_tokens_are_left_out_of_the_loss_and_counted_per_lag():
    rollout = RolloutBatch([0, 0], ["p", "p"], [[1], [1]], ["", ""], [[5, 6, 7], [5, 6]], [[0.0] * 3, [0.0] * 2],
                           ["stop", "stop"], [3, 3], [], [[1, 2, 3], [3, 3]])
    versions = pad_response_versions(rollout, 3)
    assert versions.tolist() == [[1, 2, 3], [3, 3, 3]]
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    fwd = ForwardPass(ids, torch.ones_like(ids), mask, torch.zeros(2, 3), torch.zeros(2, 3), token_versions=versions)
    # step 4 with max_staleness 1 trains versions 3 and 4: the first two tokens of row 0 are too old
    exp = assemble_experience(fwd, torch.tensor([1.0, 0.0]), "grpo", 2, kl_coef=0.0, kl_estimator="k1", gamma=1.0,
                              lam=1.0, whiten=False, oldest_version=3)
    assert train_mask(exp).tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    plain = assemble_experience(fwd, torch.tensor([1.0, 0.0]), "grpo", 2, kl_coef=0.0, kl_estimator="k1", gamma=1.0,
                                lam=1.0, whiten=False)
    assert train_mask(plain).tolist() == mask.tolist()
    m = token_metrics(4, rollout, max_lag=1)
    assert m == pytest.approx({"rl/token_lag/1": 0.6, "rl/token_lag/2": 0.2, "rl/token_lag/3": 0.2,
                               "rl/tokens_stale": 0.4, "rl/response_len_max": 3})


def test_partial_needs_async_mode_and_says_so_in_one_line():
    with pytest.raises(ConfigError, match=r"rollout.partial=abort .*algorithm.mode=async") as e:
        check_config(_cfg("abort", "algorithm.mode=sync"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="max_staleness"):
        check_config(_cfg("continue", "algorithm.max_staleness=0"))
    check_config(_cfg("continue"))
    check_config(_cfg("off", "algorithm.mode=sync"))


def test_a_bare_off_in_yaml_is_the_off_setting(tmp_path):
    """YAML 1.1 reads `partial: off` as false; the config takes it as 'off' (rollout.weight_delta too)."""
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  partial: off\n  weight_delta: off\n")
    cfg = load_config(path)
    assert cfg.rollout.partial == "off" and cfg.rollout.weight_delta == "off"


def test_a_sequence_whose_newest_token_is_too_stale_starts_again_in_either_mode():
    """max_staleness 1 (a token may lag 2): at step 3, what version 0 sampled (a spare group done but
    not taken, the long one half-way) could not train at all; both start again rather than stall the step."""
    p = _partial("continue")
    p.next_batch(0, 4)
    p.pool.weight_version = 3  # three pushes
    batch = p.next_batch(3, 4)
    assert p.stats["rollout/partial_aborted_tokens"] == 2 * 3 + 2 * 4  # group 5 (done), group 3 (half-way)
    assert min(batch.weight_version) == 3 and 5 in batch.prompt_index
    q = _partial("continue", "rollout.partial_max_lag=3")  # the setting moves the bound
    q.next_batch(0, 4)
    q.pool.weight_version = 3
    q.next_batch(3, 4)
    assert q.stats["rollout/partial_aborted_tokens"] == 0
