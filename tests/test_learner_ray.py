"""LearnerGroup on the local Ray cluster: 2 DeepSpeed ranks (gloo) in a placement group, ZeRO-2
and ZeRO-3, plus the frozen reference worker. Training happens, ranks agree, exported weights
load into plain transformers, and failures name the rank."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidal.common.config import load_config
from tidal.common.data import DemonstrationRecord
from tidal.common.models import load_causal_lm, sequence_logprobs
from tidal.common.types import RolloutBatch
from tidal.learner.group import LearnerError, LearnerGroup
from tidal.learner.sft import build_sft_batch

pytestmark = pytest.mark.ray

CFG = ["learner.num_workers=2", "learner.mini_batch_size=4", "learner.micro_batch_size=2", "learner.lr=1e-3",
       "learner.critic_lr=1e-4", "learner.lr_schedule=constant", "cluster.sync_timeout_s=120"]


def _demos(tokenizer, n=16):
    words = ["wonderful", "lovely", "great", "amazing"]
    recs = [DemonstrationRecord(f"How was the show {i}?", f"It was {words[i % 4]}, thanks!") for i in range(n)]
    return build_sft_batch(tokenizer, recs, 32, 16, use_chat_template=False)


def _sft_learns_and_ranks_agree(group: LearnerGroup) -> torch.Tensor:
    """SFT: loss falls, every trainable tensor changes, both ranks hold identical weights."""
    before = group.parameter_snapshots(trainable_only=True)[0]
    demos = _demos(group.tokenizer)
    history = group.fit_sft(demos, epochs=2)
    assert len(history) == 8  # 16 demos / 2 ranks / 2 per rank per step = 4 steps per epoch
    losses = [h["losses/sft"] for h in history]
    assert losses[-1] < 0.7 * losses[0], losses
    rank0, rank1 = group.parameter_snapshots(trainable_only=True)
    assert rank0.keys() == rank1.keys() == before.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    unchanged = [k for k in before if torch.equal(before[k], rank0[k])]
    assert not unchanged, unchanged
    return demos


@pytest.fixture(scope="module")
def zero3(ray_cluster, tiny_model):
    t0 = time.perf_counter()
    g = LearnerGroup(load_config(None, CFG + ["learner.zero_stage=3"]), tiny_model, critic_path=tiny_model,
                     reference_path=tiny_model)
    print(f"\n[timing] 2 ZeRO-3 learners + critic + reference ready in {time.perf_counter() - t0:.1f} s: {g.timings}")
    yield g
    g.shutdown()


def test_zero3_sft_trains_and_exported_weights_load_in_transformers(zero3, tiny_model, tmp_path):
    import ray

    info = zero3.describe()
    assert [i["rank"] for i in info] == [0, 1] and info[0]["seed"] != info[1]["seed"]
    assert info[0]["rng_probe"] != info[1]["rng_probe"]  # different random streams per rank
    assert all(i["max_dropout"] == 0.0 and i["zero_stage"] == 3 for i in info)
    # loaded partitioned (zero.Init), the learners still start from exactly the checkpoint's weights
    demos = _demos(zero3.tokenizer)
    R = demos.response_len
    with torch.no_grad():
        initial = sequence_logprobs(load_causal_lm(tiny_model), demos.input_ids, demos.attention_mask, R)
    assert torch.allclose(zero3.compute_logprobs(demos.input_ids, demos.attention_mask, R, 1.0), initial, atol=1e-5)
    _sft_learns_and_ranks_agree(zero3)

    handle = zero3.export_weights(version=7, bucket_mb=0.5)
    assert handle.version == 7 and len(handle.bucket_refs) > 1  # several buckets of <= 0.5 MB
    exported = {n: t for ref in handle.bucket_refs for n, t in ray.get(ref, timeout=60).items()}
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert set(exported) == set(plain.state_dict())
    plain.load_state_dict(exported, strict=True)
    ours = zero3.compute_logprobs(demos.input_ids, demos.attention_mask, R, 1.0)
    with torch.no_grad():
        theirs = sequence_logprobs(plain.eval(), demos.input_ids, demos.attention_mask, R)
    assert torch.allclose(ours, theirs, atol=1e-5)

    saved = AutoModelForCausalLM.from_pretrained(zero3.save_pretrained(tmp_path / "policy"))
    assert (tmp_path / "policy" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(saved.eval(), demos.input_ids, demos.attention_mask, R), ours, atol=1e-5)


def test_zero3_ppo_step_from_a_scored_rollout(zero3, tiny_model, tmp_path):
    g = torch.Generator().manual_seed(0)
    B = 8
    prompts = [torch.randint(3, 400, (2 + i % 3,), generator=g).tolist() for i in range(B)]
    responses = [torch.randint(3, 400, (3 + i % 4,), generator=g).tolist() for i in range(B)]
    rollout = RolloutBatch(list(range(B)), ["p"] * B, prompts, ["r"] * B, responses,
                           [[-1.0] * len(r) for r in responses], ["length"] * B, [0] * B)
    scores = torch.tensor([1.0, -1.0] * 4)
    exp, metrics = zero3.assemble(zero3.forward(rollout), scores, kl_coef=0.05)
    kl = ((exp.old_logprobs - exp.ref_logprobs) * exp.response_mask).sum(-1).mean()  # k1, nats per sequence
    assert metrics["experience/kl_per_seq"] == pytest.approx(kl.item(), abs=1e-5)
    R = exp.response_mask.shape[1]
    # the reference is the frozen initial model; the critic gave values on response tokens only
    with torch.no_grad():
        ref = sequence_logprobs(load_causal_lm(tiny_model), exp.input_ids, exp.attention_mask, R)
    assert torch.allclose(exp.ref_logprobs * exp.response_mask, ref * exp.response_mask, atol=1e-5)
    assert exp.values.abs().sum() > 0 and torch.equal(exp.values * (1 - exp.response_mask), torch.zeros(B, R))
    zero3.checkpoint(tmp_path / "ckpt")
    metrics = zero3.update_rl(exp).metrics
    assert metrics["update/minibatches"] == 2 and metrics["learner/rows_unused"] == 0  # 4 rows per rank, 2 per step
    after = zero3.compute_logprobs(exp.input_ids, exp.attention_mask, R, 1.0)
    delta = ((after - exp.old_logprobs) * exp.response_mask).sum(-1) / exp.response_mask.sum(-1)
    adv = (exp.advantages * exp.response_mask).sum(-1)
    assert (delta[adv > 0].mean() > 0) and (delta[adv < 0].mean() < 0), (adv, delta)
    zero3.load_checkpoint(tmp_path / "ckpt")  # every rank restores its own ZeRO-3 partition
    restored = zero3.compute_logprobs(exp.input_ids, exp.attention_mask, R, 1.0)
    assert torch.allclose(restored * exp.response_mask, exp.old_logprobs, atol=1e-5)


def test_zero2_sft_trains_and_slow_or_dead_ranks_are_named(ray_cluster, tiny_model):
    import ray

    group = LearnerGroup(load_config(None, CFG + ["learner.zero_stage=2"]), tiny_model)
    try:
        demos = _sft_learns_and_ranks_agree(group)
        group.timeout = 0.01  # every wait has a deadline: a slow call is an error, not a hang
        with pytest.raises(LearnerError, match=r"fit_sft: learner rank 0/2, learner rank 1/2 did not answer"):
            group.fit_sft(demos, epochs=1)
        group.timeout = 120
        ray.kill(group.ranks.actor(1))
        with pytest.raises(LearnerError, match="learner rank 1/2"):
            group.describe()
    finally:
        group.shutdown()


def test_zero2_dpo_on_two_ranks_raises_the_chosen_margin_and_ranks_agree(ray_cluster, tiny_model):
    from tidal.common.data import ComparisonRecord
    from tidal.learner.dpo import build_dpo_batch, sequence_logps

    group = LearnerGroup(load_config(None, CFG + ["learner.zero_stage=2", "stages.dpo.beta=0.5"]), tiny_model)
    try:
        recs = [ComparisonRecord(f"Tell me about day {i}.", "eee see the eerie tree", "a dull grey cat sat")
                for i in range(16)]
        data = group.dpo_reference(build_dpo_batch(group.tokenizer, recs, 32, 16, False))
        history = group.fit_dpo(data, epochs=2)
        assert len(history) == 8  # 16 pairs / 2 ranks / 2 pairs per rank per step = 4 steps per epoch
        assert history[-1]["losses/dpo"] < history[0]["losses/dpo"]
        rank0, rank1 = group.parameter_snapshots(trainable_only=True)
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
        lp = sequence_logps(group.compute_logprobs(data.input_ids, data.attention_mask, data.response_len, 1.0),
                            data.response_mask) - data.ref_logps
        assert (lp[:16] - lp[16:]).min() > 0.5  # every pair's chosen log-ratio now beats its rejected one
    finally:
        group.shutdown()
