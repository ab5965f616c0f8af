"""Reward combination and hygiene on hand cases: weighted sum, normalization, clipping, the
missing-EOS penalty, checkpointable state, and a corpus of bad inputs with expected outcomes."""

import math

import pytest
import torch
from reward_fixtures import make_rollout

from tidal.common.config import ConfigError, RewardConfig, RewardTerm
from tidal.reward_service.combine import CombinedReward, InvalidRewardError, build_reward, clean_text
from tidal.reward_service.sandbox import RewardFunctionError

NUMBER = RewardTerm(kind="function", target="reward_fixtures:as_number")


def reward(*terms: RewardTerm, **cfg) -> CombinedReward:
    return build_reward(RewardConfig(terms=terms or (NUMBER,), **cfg))


def scores_of(r: CombinedReward, completions: list[str], **kw) -> torch.Tensor:
    return r.score(make_rollout(["p"] * len(completions), completions, **kw)).scores


def test_weighted_sum_of_terms():
    r = reward(RewardTerm(kind="length", target="4", weight=2.0),
               RewardTerm(kind="function", target="reward_fixtures:completion_length", weight=0.5))
    out = r.score(make_rollout(["p", "p"], ["a b c d", "a b"]))
    # length: -|n-4|/4 over tokens (one per word here) -> [0, -0.5]; chars -> [7, 3]
    assert out.terms["length"].tolist() == [0.0, -0.5]
    assert out.terms["function"].tolist() == [7.0, 3.0]
    assert out.scores.tolist() == [2 * 0.0 + 0.5 * 7, 2 * -0.5 + 0.5 * 3]  # [3.5, 0.5]
    assert out.scores.dtype == torch.float32 and out.valid.all()
    assert r.last_metrics["reward/term/function"] == 5.0


def test_duplicate_kinds_get_indexed_names():
    r = reward(NUMBER, RewardTerm(kind="function", target="reward_fixtures:completion_length", weight=-1.0))
    out = r.score(make_rollout(["p"], ["12"]))
    assert set(out.terms) == {"function[0]", "function[1]"}
    assert out.scores.tolist() == [12.0 - 2.0]


def test_running_normalization_matches_statistics_of_all_scores_so_far():
    r = reward(normalize="running")
    first = scores_of(r, ["1", "3"])
    # mean 2, sample std sqrt(2) -> (x - 2) / sqrt(2)
    assert first.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-6)
    second = scores_of(r, ["2", "10", "4"])
    seen = torch.tensor([1.0, 3.0, 2.0, 10.0, 4.0], dtype=torch.float64)
    expect = (torch.tensor([2.0, 10.0, 4.0], dtype=torch.float64) - seen.mean()) / seen.std()
    assert second.tolist() == pytest.approx(expect.tolist(), abs=1e-6)


def test_reference_normalization_needs_calibration():
    r = reward(normalize="reference")
    with pytest.raises(RuntimeError, match="call calibrate"):
        scores_of(r, ["1"])
    raw = r.score(make_rollout(["p"] * 5, ["1", "2", "3", "4", "5"]), raw=True)
    assert raw.scores.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    stats = r.calibrate(raw.scores[raw.valid])
    std = math.sqrt(2.5)  # sample std of 1..5
    assert stats == pytest.approx({"reward/ref_mean": 3.0, "reward/ref_std": std})
    # the reference samples themselves now score mean 0, std 1
    again = scores_of(r, ["1", "2", "3", "4", "5"])
    assert again.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert again.std().item() == pytest.approx(1.0, abs=1e-6)
    assert scores_of(r, [str(3 + std)]).tolist() == pytest.approx([1.0], abs=1e-6)
    # given the ScoredBatch, dropped samples (score 0) stay out of the calibration
    dropping = reward(RewardTerm(kind="function", target="reward_fixtures:nan_on_marker"),
                      NUMBER, normalize="reference", on_invalid="drop")
    raw = dropping.score(make_rollout(["p"] * 3, ["1", "3", "NAN"]), raw=True)
    assert raw.valid.tolist() == [True, True, False]
    assert dropping.calibrate(raw) == pytest.approx({"reward/ref_mean": 1 + 2.0, "reward/ref_std": math.sqrt(2)})
    with pytest.warns(UserWarning, match="no spread"):
        r.calibrate(torch.tensor([2.0, 2.0, float("nan")]))
    assert scores_of(r, ["5"]).tolist() == [3.0]  # shift only


def test_clip_then_missing_eos_penalty():
    r = reward(clip=1.0, missing_eos_penalty=-2.0)
    out = scores_of(r, ["-5", "0.5", "5", "0.25"], finish=["stop", "stop", "stop", "length"])
    # clipped to [-1, 1]; the un-terminated sample gets the penalty as its final score
    assert out.tolist() == [-1.0, 0.5, 1.0, -2.0]
    assert r.last_metrics["reward/missing_eos"] == 1.0
    assert reward().score(make_rollout(["p"], ["0.25"], finish=["length"])).scores.tolist() == [0.25]


def test_state_dict_round_trip_continues_running_statistics():
    r = reward(normalize="running")
    scores_of(r, ["1", "3", "8"])
    r.calibrate(torch.tensor([0.0, 2.0]))
    restored = reward(normalize="running")
    restored.load_state_dict(r.state_dict())
    assert scores_of(restored, ["4", "5"]).tolist() == scores_of(r, ["4", "5"]).tolist()
    assert restored.reference == r.reference
    with pytest.raises(KeyError, match="missing"):
        restored.load_state_dict({"running": {}})


def test_config_errors_name_the_term():
    with pytest.raises(ConfigError, match=r"reward.terms\[0\].*import path"):
        reward(RewardTerm(kind="function"))
    with pytest.raises(ConfigError, match=r"reward.terms\[1\].*no reward model"):
        reward(NUMBER, RewardTerm(kind="model"))
    with pytest.raises(ConfigError, match="URLs"):
        reward(RewardTerm(kind="remote"))
    with pytest.raises(ConfigError, match="'ftp://host' must look like http://HOST:PORT"):
        reward(RewardTerm(kind="remote", target="http://127.0.0.1:9, ftp://host"))
    with pytest.raises(ConfigError, match="TIDAL_NO_SUCH_TOKEN"):
        reward(RewardTerm(kind="remote", target="http://127.0.0.1:9", token_env="TIDAL_NO_SUCH_TOKEN"))


BAD = "caf\xe9 good".encode("latin-1").decode("utf-8", "surrogateescape")  # a non-UTF-8 byte, as decoded
HUGE = "good " * 100_000


def _rollout(completions, **kw):
    return make_rollout(["p"] * len(completions), completions, **kw)


# (case id, terms, config, rollout, expected outcome: an exception type + message, or a check)
CORPUS = [
    ("nan-error", ("reward_fixtures:nan_on_marker",), {}, _rollout(["ok", "NAN"]),
     (InvalidRewardError, r"term 'function' gave nan for sample 1 \(prompt index 1\)")),
    ("inf-error", ("reward_fixtures:nan_on_marker",), {}, _rollout(["INF", "ok"]),
     (InvalidRewardError, "term 'function' gave inf for sample 0")),
    ("overflow-error", ("reward_fixtures:as_number",), {}, _rollout(["1e308", "1e308"]),
     None),  # weight 10 below: finite terms, infinite sum
    ("nan-drop", ("reward_fixtures:nan_on_marker",), {"on_invalid": "drop"}, _rollout(["ok", "NAN", "INF", "ok"]),
     {"valid": [True, False, False, True], "scores": [1.0, 0.0, 0.0, 1.0], "dropped": 2}),
    ("drop-excluded-from-running-stats", ("reward_fixtures:nan_on_marker",), {"on_invalid": "drop", "normalize": "running"},
     _rollout(["ok", "NAN"]), {"valid": [True, False], "scores": [0.0, 0.0], "dropped": 1}),
    ("wrong-count", ("reward_fixtures:one_too_few",), {}, _rollout(["a", "b"]),
     (ValueError, "term 'function' returned 1 scores for 2 samples")),
    ("not-numbers", ("reward_fixtures:strings",), {}, _rollout(["a"]),
     (RewardFunctionError, r"term 'function' returned 'high' \(str\) for sample 0 \(prompt index 0\)")),
    ("rollout-rows-mismatch", ("reward_fixtures:as_number",), {},
     _rollout(["1", "2"]).__class__(**{**_rollout(["1", "2"]).__dict__, "response_text": ["1"]}),
     (ValueError, "RolloutBatch.response_text has 1 rows")),
    ("references-mismatch", ("reward_fixtures:as_number",), {}, _rollout(["1", "2"], references=["a"]),
     (ValueError, "RolloutBatch.reference has 1 rows")),
    ("empty-completions", ("sentiment", "length", "reward_fixtures:completion_length"), {}, _rollout(["", ""]),
     {"valid": [True, True], "scores": [-1.0, -1.0], "dropped": 0}),  # sentiment 0, length -1, chars 0
    ("empty-batch", ("sentiment",), {}, _rollout([]), {"valid": [], "scores": [], "dropped": 0}),
    ("non-utf8-bytes", ("sentiment", "reward_fixtures:saw_replacement_char"), {}, _rollout([BAD]),
     {"valid": [True], "scores": [pytest.approx(0.4404 + 1.0, abs=1e-4)], "dropped": 0}),
    ("huge-string", ("sentiment", "reward_fixtures:completion_length"), {}, _rollout([HUGE]),
     {"valid": [True], "scores": [pytest.approx(1.0 + len(HUGE), abs=1e-3)], "dropped": 0}),
]


def _terms(names):
    kinds = {"sentiment": RewardTerm(kind="sentiment"), "length": RewardTerm(kind="length", target="4")}
    return tuple(kinds.get(n) or RewardTerm(kind="function", target=n, weight=10.0 if "as_number" in n else 1.0)
                 for n in names)


@pytest.mark.parametrize("case,names,cfg,rollout,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_corpus(case, names, cfg, rollout, expected):
    r = build_reward(RewardConfig(terms=_terms(names), **cfg))
    if case == "overflow-error":
        with pytest.raises(InvalidRewardError, match="term 'weighted sum' gave inf for sample 0"):
            r.score(rollout)
        return
    if isinstance(expected, tuple):
        with pytest.raises(expected[0], match=expected[1]):
            r.score(rollout)
        return
    out = r.score(rollout)
    assert out.valid.tolist() == expected["valid"]
    assert out.scores.tolist() == expected["scores"]
    assert torch.isfinite(out.scores).all()  # nothing non-finite reaches training
    assert r.last_metrics["reward/dropped"] == expected["dropped"]
    assert r.last_metrics["reward/dropped_total"] == expected["dropped"]


def test_clean_text_replaces_lone_surrogates_only():
    assert clean_text(BAD) == "caf\ufffd good"
    assert clean_text("\ud800x").encode("utf-8")  # any lone surrogate, not only surrogateescape's
    assert clean_text("héllo 😀") == "héllo 😀"


def test_score_texts_is_the_plain_weighted_sum():
    r = reward(NUMBER, RewardTerm(kind="match", target="exact", weight=3.0), normalize="running", clip=0.1)
    assert r.score_texts(["p", "p"], ["1", "2"], ["1", "x"]) == [1.0 + 3.0, 2.0]
    with pytest.raises(InvalidRewardError, match="sample 1"):
        r.score_texts(["p", "p"], ["1", "nan"], ["1", "x"])
    with pytest.raises(ValueError, match="same length"):
        r.score_texts(["p"], ["1", "2"])
