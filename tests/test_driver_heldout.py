"""The held-out evaluation service's pure pieces (tidal.driver.heldout): the reporting/selection
prompt split, the one PromptDataset builder, the named seeds and the one gold-judge builder."""

from __future__ import annotations

import pytest

from test_common_data import make_tokenizer
from tidal.common.config import ConfigError, load_config
from tidal.common.data import PromptRecord, write_records
from tidal.driver import heldout


@pytest.fixture
def held_file(tmp_path):
    path = tmp_path / "held.jsonl"
    write_records(path, [PromptRecord(f"w{i} w{i + 1} w{i + 2}") for i in range(30)])
    return path


def test_reporting_and_selection_prompts_are_disjoint_and_in_file_order(held_file):
    cfg = load_config(None, ["logging.eval_samples=8", "logging.gold_samples=12", "logging.gold_every=2"])
    split = heldout.heldout_prompts(cfg, held_file, make_tokenizer(), selection=True)
    assert split.reporting.index == list(range(8))  # the first eval_samples rows
    assert split.selection.index == list(range(8, 20))  # the next gold_samples rows
    assert split.selection.text[0] == "w8 w9 w10"
    again = heldout.heldout_prompts(cfg, held_file, make_tokenizer(), selection=True)
    assert again.selection.token_ids == split.selection.token_ids  # deterministic
    no_monitor = heldout.heldout_prompts(cfg, held_file, make_tokenizer())
    assert no_monitor.reporting.index == list(range(8)) and no_monitor.selection is None


def test_a_file_too_small_for_both_sets_is_refused_in_one_line(held_file):
    cfg = load_config(None, ["logging.eval_samples=16", "logging.gold_samples=16", "logging.gold_every=2"])
    with pytest.raises(ConfigError) as e:
        heldout.heldout_prompts(cfg, held_file, make_tokenizer(), selection=True)
    assert "has 30 prompts" in str(e.value) and "needs 32" in str(e.value) and "\n" not in str(e.value)
    # Without the monitor only the reporting set is needed, and a short file gives what it has.
    assert heldout.split_rows(cfg, 10, "x", selection=False) == (range(10), range(0))
    assert heldout.split_rows(cfg, 32, "x", selection=True) == (range(16), range(16, 32))
    with pytest.raises(ConfigError, match="data.eval_prompts"):
        heldout.heldout_prompts(cfg, None, make_tokenizer(), selection=True)
    assert heldout.heldout_prompts(cfg, None, make_tokenizer()) == heldout.HeldOutPrompts(None, None)


def test_prompt_dataset_from_config_renders_and_cuts_as_data_says(tmp_path):
    from tidal.common.prompts import PromptDataset

    path = tmp_path / "long.jsonl"
    write_records(path, [PromptRecord(" ".join(f"w{i}" for i in range(20)))])
    tok = make_tokenizer()
    plain = PromptDataset.from_config(path, tok, load_config(None, ["data.max_prompt_tokens=5"]).data)
    assert plain.next_batch(1).text[0] == "w15 w16 w17 w18 w19"
    chat = PromptDataset.from_config(path, tok, load_config(None, ["data.max_prompt_tokens=3",
                                                                   "data.chat_template=true"]).data, seed=4)
    assert tok.convert_ids_to_tokens(chat.next_batch(1).token_ids[0]) == ["w19", "<|end|>", "<|assistant|>"]
    assert chat.seed == 4


def test_every_sampling_use_has_its_named_seed():
    seeds = heldout.Seeds(5)
    fixed = [heldout.Seeds.REPORTING, heldout.Seeds.CALIBRATION, heldout.Seeds.SELECTION]
    assert fixed == [heldout.EVAL_SEED, heldout.EVAL_SEED + 1, heldout.EVAL_SEED + 2]  # the seeds runs always used
    assert (seeds.calibration_order, seeds.generate, seeds.label_order) == (6, 5, 5)
    assert seeds.collect(2) == (5 + 2 * 7_919, 7) and seeds.label_sampling(3) == 8
    sampling = heldout.eval_sampling(load_config(None, ["rollout.temperature=0.5"]), heldout.Seeds.SELECTION, n=3)
    assert (sampling.seed, sampling.n, sampling.temperature) == (heldout.Seeds.SELECTION, 3, 0.5)


def test_one_gold_builder_for_the_monitor_and_the_simulated_labeler():
    from tidal.driver.collect import gold_judge
    from tidal.reward_service.rules import RULES

    texts = ["a lovely, wonderful day", "awful", "six words is what we want"]
    cfg = load_config(None, ["logging.gold_term=length:6", "feedback.gold=length", "feedback.gold_target='6'"])
    monitor = heldout.build_gold(cfg, heldout.gold_term(cfg.logging.gold_term))
    expected = RULES["length"]([""] * 3, texts, target="6")
    assert monitor.score_texts([""] * 3, texts) == pytest.approx(expected)
    assert gold_judge(cfg)([""] * 3, texts) == pytest.approx(expected)
    assert heldout.feedback_gold_term(load_config(None, ["feedback.gold=e2e_support:letter_penalty"])).kind == "function"
    with pytest.raises(ConfigError, match="logging.gold_term"):
        heldout.gold_term("remote:http://x")
