"""learner.autocast: the decision (pure logic), the config rules, and a real one-rank learner and
reference worker running their forward passes in bf16 with float32 weights."""

from __future__ import annotations

import logging

import pytest
import torch

from tidal.common import precision
from tidal.common.config import ConfigError, load_config
from tidal.learner.pi_old import check_config, engine_is_pi_old

CPU = torch.device("cpu")


@pytest.fixture
def caps(monkeypatch):
    """Pretend the CPU has (or lacks) native bf16: set caps["avx512_bf16"]."""
    fake: dict = {}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: fake)
    return fake


@pytest.mark.parametrize("native", [True, False])
def test_autocast_decision(caps, native, caplog):
    caps["avx512_bf16"] = native
    assert precision.bf16_native(CPU) is native
    assert precision.decide_autocast("none", torch.float32, [True]) is False
    assert precision.decide_autocast("auto", torch.float32, [native]) is native
    assert precision.decide_autocast("auto", torch.float32, [True, native]) is native  # every rank must be native
    with caplog.at_level(logging.WARNING, logger="tidal.precision"):
        assert precision.decide_autocast("bf16", torch.float32, [True, native]) is True  # asked for: on, even if emulated
    assert ("emulated" in caplog.text) is (not native)
    assert precision.decide_autocast("bf16", torch.bfloat16, [True]) is False  # a bf16 model is bf16 already


def test_amx_counts_as_native(caps):
    caps["amx_bf16"] = True
    assert precision.bf16_native(CPU) is True


def test_autocast_context_runs_matmuls_in_bf16():
    x = torch.randn(4, 8)
    with precision.autocast(True, CPU):
        assert (x @ x.T).dtype == torch.bfloat16
    with precision.autocast(False, CPU):
        assert (x @ x.T).dtype == torch.float32


def test_config_rules():
    with pytest.raises(ConfigError, match="learner.autocast=bf16 needs model.dtype=float32"):
        load_config(None, ["learner.autocast=bf16", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="old_logprobs=engine: with learner.autocast=auto"):
        check_config(load_config(None, ["learner.autocast=auto", "algorithm.old_logprobs=engine"]))  # preflight's
    sync = ["algorithm.mode=sync", "rollout.temperature=1.0"]
    assert engine_is_pi_old(load_config(None, sync))  # float32: the engine's log-probs are pi_old
    assert not engine_is_pi_old(load_config(None, sync + ["learner.autocast=auto"]))  # bf16: the trainer's


@pytest.fixture(scope="module")
def group_pair(tiny_model):
    """The same tiny policy as float32 and as bf16-autocast one-rank learners, each with a reference."""
    from tidal.learner.group import LearnerGroup

    base = ["learner.num_workers=1", "learner.mini_batch_size=4", "learner.micro_batch_size=2", "learner.lr=1e-3",
            "learner.lr_schedule=constant", "algorithm.name=grpo", "rollout.n_samples=2"]
    groups = {}
    try:
        for name in ("none", "bf16"):
            groups[name] = LearnerGroup(load_config(None, base + [f"learner.autocast={name}"]), tiny_model,
                                        reference_path=tiny_model, local=True)
        yield groups
    finally:
        for g in groups.values():
            g.shutdown()
        import torch.distributed as dist

        if dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


def _batch(group, n=4, seed=0):
    from tidal.learner.experience import pad_prompt_response

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 400, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, 400, (6 - i % 3,), generator=g).tolist() for i in range(n)]
    return pad_prompt_response(prompts, responses, group.tokenizer.pad_token_id)


def test_bf16_learner_and_reference(group_pair):
    from tidal.common.types import Experience

    fp32, bf16 = group_pair["none"], group_pair["bf16"]
    assert [d["autocast_bf16"] for d in bf16.describe()] == [True] and fp32.describe()[0]["autocast_bf16"] is False
    assert bf16.timings["autocast_bf16"] == 1.0
    ids, attn, rmask = _batch(bf16)
    R = rmask.shape[1]
    lp32 = fp32.compute_logprobs(ids, attn, R, 1.0)
    lp16 = bf16.compute_logprobs(ids, attn, R, 1.0)
    gap = ((lp16 - lp32).abs() * rmask).sum() / rmask.sum()
    assert lp16.dtype == torch.float32 and 0 < gap < 0.1, gap  # bf16 math: close, not identical
    # the reference runs in the policy's precision: KL to it is exactly 0 before any update
    assert torch.equal(bf16.compute_ref_logprobs(ids, attn, R, 1.0) * rmask, lp16 * rmask)
    assert torch.equal(fp32.compute_ref_logprobs(ids, attn, R, 1.0) * rmask, lp32 * rmask)
    # an update under autocast trains float32 weights in the advantage's direction
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    zeros = torch.zeros_like(lp16)
    exp = Experience(ids, attn, rmask, lp16, lp16, sign[:, None] * rmask, zeros, zeros, sign)
    bf16.update_rl(exp)
    after = bf16.compute_logprobs(ids, attn, R, 1.0)
    delta = ((after - lp16) * rmask).sum(-1) / rmask.sum(-1)
    assert (delta[sign > 0] > 0).all() and (delta[sign < 0] < 0).all(), delta
    # the live engine's weights and AdamW moments, not parameter_snapshot's float32 copies
    engine = bf16.ranks.actor(0).obj.engine
    assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    moments = [t for state in engine.optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_one_decision_for_learner_and_reference(tiny_model, caps, monkeypatch):
    """Mixed hardware: the learner rank's CPU multiplies bf16 natively, the reference worker's
    does not. learner.autocast=auto is decided once, by the group, and the reference obeys it
    whatever its own CPU says, so the KL to the reference is exactly 0 before any update."""
    from tidal.learner.group import LearnerGroup
    from tidal.learner.reference import ReferenceWorker

    built = ReferenceWorker.__init__

    def on_a_cpu_without_bf16(self, *args, **kwargs):
        caps.clear()  # from here on this (in-process) worker's CPU has no native bf16
        built(self, *args, **kwargs)

    caps["avx512_bf16"] = True
    monkeypatch.setattr(ReferenceWorker, "__init__", on_a_cpu_without_bf16)
    cfg = load_config(None, ["learner.num_workers=1", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
                             "algorithm.name=grpo", "rollout.n_samples=2", "learner.autocast=auto"])
    group = LearnerGroup(cfg, tiny_model, reference_path=tiny_model, local=True)
    try:
        assert not precision.bf16_native(CPU)  # the reference's hardware was "built" after the decision
        assert group.describe()[0]["autocast_bf16"] is True
        assert group.reference.actor(0).obj.describe()["autocast_bf16"] is True
        ids, attn, rmask = _batch(group)
        R = rmask.shape[1]
        lp = group.compute_logprobs(ids, attn, R, 1.0)
        assert torch.equal(group.compute_ref_logprobs(ids, attn, R, 1.0) * rmask, lp * rmask)
    finally:
        group.shutdown()
