"""End-to-end alternatives to RL on the tiny random model (real Ray actors, DeepSpeed learners):
DPO as a pipeline stage raises the toy letter_rate reward of sampled completions."""

from __future__ import annotations

import statistics

import pytest
import torch

from e2e_support import REPO, letter_rate, read_jsonl, tiny_overrides
from tidal.driver.job import run_pipeline
from tidal.common.config import load_config
from tidal.common.data import ComparisonRecord, write_records

pytestmark = [pytest.mark.slow, pytest.mark.ray]
TOPICS = ("the film", "the book", "dinner", "the trip", "the show", "the game", "the song", "the park")


def write_letter_comparisons(path, n: int = 64):
    """Chosen completions are full of 'e', rejected ones have none: letter_rate's preference."""
    write_records(path, [ComparisonRecord(f"Tell me about {TOPICS[i % 8]} ({i}).", "eee see the eerie tree, ee",
                                          "a dull grey cat sat, calm") for i in range(n)])
    return path


def sampled_letter_rate(model_dir, prompts: list[str], seed: int = 0) -> float:
    """Mean letter_rate of 4 sampled completions per prompt (HF generate, fixed seed)."""
    from transformers import AutoModelForCausalLM

    from tidal.common.models import load_tokenizer

    tok, model = load_tokenizer(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rates = []
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, max_new_tokens=16, num_return_sequences=4,
                                 pad_token_id=tok.pad_token_id)
        rates += letter_rate([p] * 4, tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    return statistics.mean(rates)


def _dpo_run(tmp, name, *extra):
    data = write_letter_comparisons(tmp / "comparisons.jsonl")
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", tiny_overrides(
        tmp, name, "stages.run=[dpo]", f"data.comparisons={data}", "stages.dpo.beta=0.1",
        "stages.dpo.epochs=4", "stages.dpo.lr=2e-3", "learner.mini_batch_size=8", "learner.micro_batch_size=4", *extra))
    run_pipeline(cfg, tmp / name)
    return tmp / name


@pytest.fixture(scope="module")
def dpo_runs(ray_cluster, tmp_path_factory):
    """Two finished DPO runs (sigmoid, ipo) on the letter comparisons."""
    tmp = tmp_path_factory.mktemp("dpo")
    return {"dpo": _dpo_run(tmp, "dpo"), "ipo": _dpo_run(tmp, "ipo", "stages.dpo.loss=ipo", "stages.dpo.lr=3e-5")}


def test_dpo_stage_raises_the_letter_rate_of_samples(dpo_runs):
    import json

    run_dir = dpo_runs["dpo"]
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == "dpo"]
    assert len(recs) == 4 * 64 // 8
    assert recs[-1]["losses/dpo"] < recs[0]["losses/dpo"] - 0.3
    assert (run_dir / "policy_dpo" / "config.json").is_file()
    assert json.loads((run_dir / "run_state.json").read_text())["stages"]["dpo"]["output"].endswith("policy_dpo")
    prompts = [f"Tell me about {t} (held out)." for t in TOPICS]
    from tidal.common.models import resolve_model

    before = sampled_letter_rate(resolve_model("tiny-random"), prompts)
    after = sampled_letter_rate(run_dir / "policy_dpo", prompts)
    print(f"letter_rate of samples: before DPO {before:.3f}, after {after:.3f}")
    assert after > before + 0.5, f"letter_rate of samples: before DPO {before:.3f}, after {after:.3f}"


def test_tidal_eval_on_two_runs_fills_every_column(dpo_runs, tmp_path, capsys):
    import json
    import math

    from e2e_support import LETTER_REWARD
    from tidal.commands.cli import main
    from tidal.commands.evaluate import COLUMNS

    overrides = [o for o in tiny_overrides(tmp_path, "eval") if not o.startswith("reward.terms")]
    rc = main(["eval", str(REPO / "configs" / "tiny_ppo.yaml"), *overrides, f"reward.terms={LETTER_REWARD}",
               "logging.eval_samples=8", "--run", f"dpo={dpo_runs['dpo']}", "--run", f"ipo={dpo_runs['ipo']}",
               "--best-of", "4", "--out", str(tmp_path / "board")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert all(c in printed for c in COLUMNS[:7])
    assert "RM acc" not in printed  # the letter_rate proxy has no reward model to judge with
    board = json.loads((tmp_path / "board" / "eval.json").read_text())
    rows = {r["method"]: r for r in board["rows"]}
    assert list(rows) == ["sft", "dpo", "ipo", "best-of-4"]
    for r in rows.values():
        for key in ("win_rate", "win_low", "win_high", "gold", "proxy", "kl", "length", "degenerate"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["method"], key, r[key])
        assert r["win_low"] <= r["win_rate"] <= r["win_high"] and r["n"] == 8
    assert rows["sft"]["win_rate"] == 0.5 and rows["sft"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert rows["dpo"]["proxy"] > rows["sft"]["proxy"]  # the letter_rate proxy DPO's data prefers
    assert rows["dpo"]["kl"] > 0.1
    assert rows["best-of-4"]["proxy"] >= rows["sft"]["proxy"]  # argmax of 4 samples incl. the seed's first
    assert rows["best-of-4"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert (tmp_path / "board" / "eval.png").stat().st_size > 0
    assert main(["eval", str(REPO / "configs" / "tiny_ppo.yaml"), *overrides, "--run", f"dpo={dpo_runs['dpo']}",
                 "--out", str(tmp_path / "board")]) == 2  # an existing scoreboard is never overwritten


def test_expert_iteration_raises_the_letter_rate(ray_cluster, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", tiny_overrides(
        tmp_path, "ei", "algorithm.name=expert_iteration", "rollout.n_samples=8", "algorithm.ei_top_k=1",
        "algorithm.steps=12", "algorithm.update_epochs=4"))
    run_pipeline(cfg, tmp_path / "ei")
    recs = [r for r in read_jsonl(tmp_path / "ei" / "metrics.jsonl") if r["stage"] == "rl" and r["step"] > 0]
    assert [r["ei/kept"] for r in recs] == [16.0] * 12  # best-of-8: one sample per prompt, every step
    assert all("losses/sft" in r and "rl/kl" in r for r in recs)
    first = statistics.mean(r["reward/term/function"] for r in recs[:3])
    last = statistics.mean(r["reward/term/function"] for r in recs[-3:])
    print(f"expert iteration letter_rate: first steps {first:.3f}, last steps {last:.3f}")
    assert last > first + 0.25, f"reward did not rise: first steps {first:.3f}, last steps {last:.3f}"
    assert recs[-1]["rl/kl"] > 0  # the policy moved away from the reference


def test_overoptimisation_monitor_warns_and_stops_a_run_that_games_its_proxy(ray_cluster, tmp_path, capfd):
    """letter_rate is the proxy PPO climbs; the gold judge is its negation, so gold falls as
    the proxy rises: the monitor must warn once and, with early_stop=gold_drop, end the run on
    the best-gold policy it saw."""
    import json

    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", tiny_overrides(
        tmp_path, "gamed", "algorithm.steps=16", "logging.gold_every=2", "logging.gold_window=3",
        "logging.gold_term=function:e2e_support:letter_penalty", "algorithm.early_stop=gold_drop",
        "logging.eval_samples=8", "logging.gold_samples=16"))
    summary = run_pipeline(cfg, tmp_path / "gamed")
    printed = capfd.readouterr()
    assert printed.err.count("warning: over-optimisation") == 1, printed.err[-2000:]
    assert summary["overoptimisation_warned"] is True
    stop = summary["early_stop"]["step"]
    assert summary["early_stop"]["reason"] == "gold_drop" and stop < 16
    recs = [r for r in read_jsonl(tmp_path / "gamed" / "metrics.jsonl") if r["stage"] == "rl" and "eval/gold" in r]
    assert [r["step"] for r in recs] == list(range(2, stop + 1, 2))
    assert all(r["eval/gold"] == pytest.approx(-r["eval/proxy"]) for r in recs)  # gold = -proxy by construction
    assert recs[-1]["eval/gold_p"] <= cfg.logging.gold_alpha and recs[-1]["eval/overoptimisation"] == 1.0
    best = max(recs, key=lambda r: r["eval/gold"])
    assert summary["best_gold"] == {"step": best["step"], "gold": pytest.approx(best["eval/gold"], abs=1e-5),
                                    "last_step": stop, "last_gold": pytest.approx(recs[-1]["eval/gold"], abs=1e-5),
                                    "policy": "best"}
    assert f"the final policy is the best-gold one, step {best['step']}" in printed.out
    best_dir = tmp_path / "gamed" / "checkpoints" / "best"
    assert json.loads((best_dir / "best.json").read_text())["step"] == best["step"]
    # RUN/policy and samples_after.jsonl are the best-gold policy's, not the stopped one's: it
    # sits much closer to the reference than the policy at the stop.
    after = read_jsonl(tmp_path / "gamed" / "samples_after.jsonl")
    assert [r["prompt_index"] for r in after] == list(range(8))  # the reporting prompts, not the monitor's
    after_kl = statistics.mean(r["kl"] for r in after)
    print(f"KL to the reference: best step {best['step']} {best['eval/kl']:.3f}, stop step {stop} "
          f"{recs[-1]['eval/kl']:.3f}, samples_after {after_kl:.3f}")
    assert after_kl < 0.5 * recs[-1]["eval/kl"]
    assert (tmp_path / "gamed" / "plots" / "overoptimisation.png").is_file()
    assert json.loads((tmp_path / "gamed" / "run_state.json").read_text())["stages"]["rl"]
