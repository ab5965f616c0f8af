"""`tidal eval`'s reward-model columns (tidal.commands.eval_judges): which reward model judges a
run, its agreement with gold on (method, SFT) pairs, and its scores of the exploit probes, with
a real tiny reward model scored in-process."""

from __future__ import annotations

import json

import pytest
from reward_fixtures import make_reward_model
from tidal.commands.eval_judges import (
    final_reward_model,
    judge_columns,
    judges,
    pair_accuracy,
)
from tidal.commands.evaluate import format_table
from tidal.common.config import RewardConfig, RewardTerm, TidalConfig
from tidal.driver.fit_stages import EXPLOITS
from tidal.reward_service.combine import build_reward

PROMPTS = ["Today I", "The weather", "My friend said", "Hi", "Well", "So", "The film", "Dinner", "Extra"]
MINE = [" feel great", " is awful", " it was fine", " there", "!!!", ":)", " was long", " was good", " ok"]
SFT = [" am here", " is nice", " nothing", " you", " well", "", " bored me", " was cold", " no"]


def test_pair_accuracy_leaves_out_gold_ties_and_counts_judge_ties_half():
    # pairs: agree, disagree, gold tie (left out), judge tie (half), agree
    rm_a, rm_b = [2.0, 0.0, 5.0, 1.0, -1.0], [1.0, 1.0, 0.0, 1.0, -2.0]
    gold_a, gold_b = [0.5, 0.5, 0.3, 0.9, 0.2], [0.1, 0.1, 0.3, 0.1, 0.0]
    out = pair_accuracy(rm_a, rm_b, gold_a, gold_b)
    assert out == {"rm_accuracy": pytest.approx((1 + 0 + 0.5 + 1) / 4), "rm_pairs": 4}
    assert pair_accuracy([1.0], [2.0], [0.0], [0.0]) == {"rm_accuracy": None, "rm_pairs": 0}


def _finished_run(run, stages: dict[str, str]):
    """A run folder whose run_state.json records `stages` (key -> output folder) as finished."""
    run.mkdir(parents=True, exist_ok=True)
    for out in stages.values():
        (run / out).mkdir(parents=True, exist_ok=True)
        (run / out / "config.json").write_text("{}")
    state = {"stages": {k: {"output": str(run / out)} for k, out in stages.items()}}
    (run / "run_state.json").write_text(json.dumps(state))
    return run


def test_a_run_is_judged_by_its_newest_online_version_else_its_newest_rm_stage(tmp_path, tiny_model):
    rounds = _finished_run(tmp_path / "rounds", {"sft": "sft", "rm": "reward_model", "rl": "policy",
                                                  "rm2": "reward_model_2", "rl2": "policy_2"})
    assert final_reward_model(str(rounds)) == str(rounds / "reward_model_2")
    online = _finished_run(tmp_path / "online", {"rm": "reward_model", "rl": "policy"})
    for v in (0, 3, 12):
        (online / "reward_versions" / f"v{v}").mkdir(parents=True)
        (online / "reward_versions" / f"v{v}" / "config.json").write_text("{}")
    (online / "reward_versions" / "v40").mkdir()  # a version still being written: no config.json
    assert final_reward_model(str(online)) == str(online / "reward_versions" / "v12")
    assert final_reward_model(str(tiny_model)) is None  # an HF folder is no run
    assert judges([f"rounds={rounds}", f"online={online}", f"hf={tiny_model}"]) == {
        "rounds": str(rounds / "reward_model_2"), "online": str(online / "reward_versions" / "v12")}


@pytest.fixture(scope="module")
def two_judges(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("judges")
    return [make_reward_model(tiny_model, base / f"rm{seed}", seed=seed, extra={"reward_mean": 0.5, "reward_std": 2.0})
            for seed in (0, 1)]


def _direct(rm_dir, tiny_model, prompts, completions):
    reward = build_reward(RewardConfig(terms=(RewardTerm(kind="model"),)), reward_model=rm_dir,
                          policy_tokenizer=tiny_model, local=True)
    try:
        return reward.score_texts(prompts, completions)
    finally:
        reward.close()


def test_judge_columns_score_with_the_judge_given(two_judges, tiny_model):
    cfg = TidalConfig(reward=RewardConfig(terms=(RewardTerm(kind="model", weight=0.3),)))
    gold = [float(i % 3) for i in range(len(PROMPTS))]
    sft_gold = [1.0] * len(PROMPTS)
    cols = [judge_columns(cfg, str(j), str(tiny_model), PROMPTS, MINE, gold, SFT, sft_gold) for j in two_judges]
    for rm_dir, col in zip(two_judges, cols):
        mine, theirs = _direct(rm_dir, tiny_model, PROMPTS, MINE), _direct(rm_dir, tiny_model, PROMPTS, SFT)
        assert col["rm_judge"] == str(rm_dir)
        assert col["rm_accuracy"] == pytest.approx(pair_accuracy(mine, theirs, gold, sft_gold)["rm_accuracy"])
        assert col["rm_pairs"] == sum(g != 1.0 for g in gold)
        probes = {k: _direct(rm_dir, tiny_model, PROMPTS[:8], [v] * 8) for k, v in EXPLOITS.items()}
        for k, scores in probes.items():  # the model's normalised score at weight 1, not the term's 0.3
            assert col["probes"][k] == pytest.approx(sum(scores) / 8, abs=1e-5)
        assert col["probe_margin"] == pytest.approx(
            col["probes"]["plain"] - max(v for k, v in col["probes"].items() if k != "plain"))
    assert cols[0]["probes"] != cols[1]["probes"]  # each row is judged by its own reward model
    sft_row = judge_columns(cfg, str(two_judges[0]), str(tiny_model), PROMPTS, SFT, sft_gold, None, None)
    assert "rm_accuracy" not in sft_row and "probe_margin" in sft_row
    no_model = TidalConfig(reward=RewardConfig(terms=(RewardTerm(kind="sentiment"),)))
    assert judge_columns(no_model, str(two_judges[0]), str(tiny_model), PROMPTS, MINE, gold, SFT, sft_gold) == {}


def test_the_table_shows_the_judge_columns_only_when_a_row_has_them():
    row = {"method": "ppo", "win_rate": 0.6, "win_low": 0.5, "win_high": 0.7, "gold": 0.2, "proxy": 0.3, "kl": 1.0,
           "length": 15.0, "degenerate": 0.0}
    assert "RM acc" not in format_table([row])
    judged = format_table([{**row, "method": "sft", "rm_judge": "x", "probe_margin": 0.5},
                           {**row, "rm_judge": "x", "rm_accuracy": 0.75, "probe_margin": -1.25}])
    head, sft, ppo = judged.splitlines()
    assert head.endswith("RM acc  probe margin")
    assert sft.endswith("-         +0.50") and ppo.endswith("75.0%         -1.25")
