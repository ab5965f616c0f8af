"""Rule rewards on hand-checked examples, and user functions loaded by import path."""

import math

import pytest

from tidal.reward_service.rules import RULES, exact_match, length, load_function, match, overlap_f1, sentiment


def test_registry_entries_share_the_rule_signature():
    for name, fn in RULES.items():
        out = fn(["p"], ["good"], references=["good"], target="overlap" if name == "match" else "1",
                 response_lengths=None)
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], float), name


def test_sentiment_is_vader_compound_of_the_completion():
    # VADER: compound = x / sqrt(x^2 + 15) with x the summed valence; "good" has valence 1.9.
    scores = sentiment(["ignored: terrible"], ["good"])
    assert scores[0] == pytest.approx(1.9 / math.sqrt(1.9 ** 2 + 15), abs=1e-4)  # 0.4404
    pos, neg, neutral, empty = sentiment(["", "", "", ""], ["I love this!", "This is terrible.", "The table is brown.", ""])
    assert pos > 0.5 and neg < -0.4 and neutral == 0.0 and empty == 0.0


@pytest.mark.parametrize("completion,reference,expected", [
    ("Paris", "Paris", 1.0),
    ("  paris. ", "Paris", 1.0),  # case, punctuation and surrounding spaces do not count
    ("Paris, France", "Paris", 0.0),
    ("", "", 1.0),
    ("", "Paris", 0.0),
])
def test_exact_match(completion, reference, expected):
    assert exact_match(completion, reference) == expected


@pytest.mark.parametrize("completion,reference,expected", [
    ("the cat sat", "the cat sat", 1.0),
    # 2 common words; precision 2/4, recall 2/3 -> F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    ("the cat sat down", "the cat ran", 4 / 7),
    # multiset overlap: "the the" shares one "the" with "the cat": P 1/2, R 1/2 -> 1/2
    ("the the", "the cat", 0.5),
    ("dog", "the cat", 0.0),
    ("", "the cat", 0.0),
    ("", "", 1.0),
])
def test_overlap_f1(completion, reference, expected):
    assert overlap_f1(completion, reference) == pytest.approx(expected)


def test_match_rule_modes_and_references():
    completions, refs = ["Paris.", "the cat sat down"], ["paris", "the cat ran"]
    assert match(["", ""], completions, references=refs) == [1.0, 0.0]  # default mode: exact
    assert match(["", ""], completions, references=refs, target="overlap") == pytest.approx([1.0, 4 / 7])
    with pytest.raises(ValueError, match="sample 1 has no reference"):
        match(["", ""], completions, references=["paris", None])
    with pytest.raises(ValueError, match="one reference answer per completion"):
        match(["", ""], completions, references=[])
    with pytest.raises(ValueError, match="'exact' or 'overlap'"):
        match(["", ""], completions, references=refs, target="bleu")


def test_length_penalty_from_tokens_or_words():
    # target 4: -|n - 4| / 4
    assert length(["", "", "", ""], ["", "", "", ""], target="4", response_lengths=[4, 0, 8, 6]) == [0.0, -1.0, -1.0, -0.5]
    # without token counts: whitespace words
    assert length(["", ""], ["one two three four", "one two"], target="4") == [0.0, -0.5]
    for bad in (None, "0", "abc", "-3"):
        with pytest.raises(ValueError, match="positive length"):
            length([""], [""], target=bad)


def test_user_function_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, **meta):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n"
        "NUMBER = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_function("my_rewards:brevity")
    assert fn(["p", "p"], ["", "abc"]) == [1.0, 0.25]
    assert load_function("reward_fixtures:shout")([""], ["ABcd"]) == [0.5]  # a module in tests/

    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_function("my_rewards:missing")
    with pytest.raises(ValueError, match="not a callable"):
        load_function("my_rewards:NUMBER")
    for bad in ("my_rewards.brevity", "my_rewards:", ":f", "a b:c"):
        with pytest.raises(ValueError, match="import path 'package.module:function'"):
            load_function(bad)
