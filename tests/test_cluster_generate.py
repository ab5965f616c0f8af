"""`tidal generate` and the best-of-n wrapper it shares with `tidal eval`.

Unit tests: the wrapper picks each prompt's argmax under a real CombinedReward (the pool is a
stand-in that returns fixed completions: selection is pure logic); prompt reading; run folders.
CLI tests: bad input fails in seconds with one line, exit 2, before Ray (a subprocess, as a user
runs it). The slow test runs `tidal generate --best-of 2` on the tiny model through the real
rollout pool (vLLM) on the session's Ray cluster."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest

from e2e_support import REPO, letter_rate, read_jsonl, tiny_overrides
from test_cli_bad_input import TINY, assert_user_error
from tidal.driver.best_of import BestOfN, NoValidSample
from tidal.common.config import RewardConfig, RewardTerm
from tidal.common.data import DataError, read_prompt_lines
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.rollout.sampling import Sampling

# 3 prompts x 3 samples; letter_rate scores the share of 'e' (x10).
SAMPLES = [["dog", "eel", "eee cat"],     # best: "eel" (6.67)
           ["xx", "ee", "e"],             # tie "ee" / "e" at 10.0 -> the first, "ee"
           ["nope", "abc", "zzz"]]        # best: "nope" (2.5)


def e_rate_nan_on_x(prompts, completions, **meta):
    """letter_rate, but NaN for completions containing 'x' (an invalid reward)."""
    return [math.nan if "x" in c else r for c, r in zip(completions, letter_rate(prompts, completions))]


class FixedPool:
    """A stand-in for RolloutPool.generate: the completions of SAMPLES, in the pool's layout."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts: PromptBatch, sampling: Sampling) -> RolloutBatch:
        self.calls.append(sampling)
        rows = [(i, text) for i in prompts.index for text in SAMPLES[i][:sampling.n]]
        return RolloutBatch([i for i, _ in rows], [prompts.text[i] for i, _ in rows], [[1] for _ in rows],
                            [t for _, t in rows], [[2, 3] for _ in rows], [[-1.0, -1.0] for _ in rows],
                            ["stop"] * len(rows), [0] * len(rows))


def _reward(target: str, on_invalid: str = "error"):
    from tidal.reward_service.combine import build_reward

    return build_reward(RewardConfig(terms=(RewardTerm(kind="function", target=target),), normalize="running",
                                     clip=0.1, on_invalid=on_invalid), local=True)


def _prompts(n: int = 3) -> PromptBatch:
    return PromptBatch(list(range(n)), [f"p{i}" for i in range(n)], [[1]] * n)


def test_best_of_n_picks_the_argmax_and_records_its_raw_score():
    pool, reward = FixedPool(), _reward("e2e_support:letter_rate")
    best = BestOfN(pool, reward, Sampling(n=7, seed=5), 3).generate(_prompts())
    assert pool.calls[0].n == 3 and pool.calls[0].seed == 5  # n replaced, the rest kept
    assert best.chosen.response_text == ["eel", "ee", "nope"]
    assert best.chosen.prompt_index == [0, 1, 2]
    # Raw weighted sum: neither the running normalisation nor clip=0.1 touches what a user reads.
    assert best.scores == pytest.approx([20 / 3, 10.0, 2.5])
    for i, group in enumerate(SAMPLES):
        texts = [c for c, _ in best.candidates_of(i)]
        scores = [s for _, s in best.candidates_of(i)]
        assert texts == group and scores == pytest.approx(letter_rate([], group))
        assert best.scores[i] == max(scores)
    one = BestOfN(FixedPool(), reward, Sampling(), 1).generate(_prompts())
    assert one.chosen.response_text == ["dog", "xx", "nope"]  # n = 1: the only sample


def test_best_of_n_never_picks_an_invalid_sample():
    best = BestOfN(FixedPool(), _reward(f"{__name__}:e_rate_nan_on_x", "drop"), Sampling(), 3).generate(_prompts(2))
    assert best.chosen.response_text == ["eel", "ee"]
    assert [s for _, s in best.candidates_of(1)][0] is None  # "xx" scored NaN: recorded as no score
    samples = [["x1", "x2"]]
    pool = FixedPool()
    pool.generate = lambda prompts, sampling: RolloutBatch([0, 0], ["p", "p"], [[1], [1]], samples[0], [[2], [2]],
                                                           [[-1.0], [-1.0]], ["stop"] * 2, [0, 0])
    with pytest.raises(NoValidSample, match=r"prompts \[0\]"):
        BestOfN(pool, _reward(f"{__name__}:e_rate_nan_on_x", "drop"), Sampling(), 2).generate(_prompts(1))
    with pytest.raises(ValueError, match="n >= 1"):
        BestOfN(pool, None, Sampling(), 0)


def test_prompt_lines_txt_and_jsonl():
    lines = [b"first prompt\n", b"\n", b"  \r\n", b"second\r\n", b"third"]
    assert [r.prompt for r in read_prompt_lines(lines, "p.txt", "txt")] == ["first prompt", "second", "third"]
    rows = [b'{"prompt": "a"}\n', b'{"messages": [{"role": "user", "content": "b"}]}\n']
    recs = read_prompt_lines(rows, "<stdin>", "jsonl")
    assert recs[0].prompt == "a" and recs[1].prompt[0]["content"] == "b"
    with pytest.raises(DataError, match=r"<stdin>:2: .*'prompt'"):
        read_prompt_lines([b'{"prompt": "a"}\n', b'{"text": "b"}\n'], "<stdin>", "jsonl")
    with pytest.raises(DataError, match=r"p.txt:2: not UTF-8"):
        read_prompt_lines([b"ok\n", b"\xff\xfe\n"], "p.txt", "txt")


def test_plain_output_keeps_one_completion_per_line():
    import codecs

    from tidal.commands.generate import plain_line

    text = "a\\b\nc\rd\ve\ff\x1cg\x1dh\x1ei\x85j\u2028k\u2029l\tm"
    line = plain_line(text)
    assert line.splitlines() == [line] and "\t" in line  # a tab is not a line break
    assert codecs.decode(line, "unicode_escape") == text  # and nothing is lost


def test_a_run_folder_resolves_to_its_newest_policy(tmp_path, tiny_model):
    import shutil

    from tidal.driver.run_folder import policy_folder, run_output

    run = tmp_path / "run"
    for sub in ("sft", "policy", "round-2/policy", "reward_model"):
        shutil.copytree(tiny_model, run / sub)
    stages = {"sft": str(run / "sft"), "rm": str(run / "reward_model"), "rl": str(run / "policy"),
              "rl2": f"elsewhere/{run.name}/round-2/policy"}  # recorded relative to another working directory
    (run / "run_state.json").write_text(json.dumps({"stages": {k: {"output": v} for k, v in stages.items()}}))
    assert policy_folder(str(run), "--model") == str(run / "round-2" / "policy")
    assert run_output(run, ("rm",)) == str(run / "reward_model")
    assert policy_folder(str(run / "sft"), "--model") == str(run / "sft")  # an HF folder is itself


# ------------------------------------------------------------------ the CLI, bad input

@pytest.fixture
def prompts_dir(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n')
    (tmp_path / "done.jsonl").write_text("earlier output\n")
    return tmp_path


@pytest.mark.parametrize("args,names", [
    (["--in", "missing.txt"], ["--in missing.txt", "no such file"]),
    (["--in", "p.jsonl", "--best-of", "0"], ["--best-of 0", ">= 1"]),
    (["--in", "p.jsonl", "--best-of", "two"], ["--best-of two"]),
    (["--in", "p.jsonl", "--out", "done.jsonl"], ["--out done.jsonl", "exists"]),
    (["--in", "p.jsonl", "--all"], ["--all", "--best-of"]),
    (["--in", "p.jsonl", "--best-of", "2", "reward.terms=[]"], ["--best-of 2", "reward.terms"]),
    (["--in", "p.jsonl", "--model", "./nowhere"], ["--model ./nowhere"]),
])
def test_generate_user_errors_are_one_line_before_ray(prompts_dir, args, names):
    assert_user_error(prompts_dir, ["generate", TINY, *args], *names)


def test_generate_bad_prompt_row_names_the_line(prompts_dir):
    (prompts_dir / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    assert_user_error(prompts_dir, ["generate", TINY, "--in", "bad.jsonl"], "bad.jsonl:2", "prompt")


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
@pytest.mark.ray
def test_generate_best_of_2_writes_the_best_completion_and_its_score(ray_cluster, tmp_path, capsys, monkeypatch):
    from tidal.commands.cli import main

    prompts = ["Tell me about the film.", "The book was", "Dinner tonight is", "We went to the park and"]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out" / "best.jsonl"
    args = ["generate", str(REPO / "configs" / "tiny_ppo.yaml"), *tiny_overrides(tmp_path, "gen")]
    assert main([*args, "--in", str(src), "--best-of", "2", "--all", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == prompts
    for r in rows:
        cands = r["candidates"]
        assert len(cands) == 2 and all(isinstance(c["score"], float) for c in cands)
        top = max(c["score"] for c in cands)
        assert r["score"] == top and r["completion"] == next(c["completion"] for c in cands if c["score"] == top)
        assert r["score"] == pytest.approx(letter_rate([], [r["completion"]])[0], rel=1e-5)  # the config's reward
    assert any(c["completion"] != r["completion"] for r in rows for c in r["candidates"])  # two distinct samples
    assert capsys.readouterr().out == ""  # with --out, stdout stays empty
    before = out.read_bytes()
    assert main([*args, "--in", str(src), "--best-of", "2", "--out", str(out)]) == 2  # never overwritten
    assert out.read_bytes() == before
    assert "exists" in capsys.readouterr().err

    # stdin, one prompt per line; stdout: one completion per line (the pool's hf backend)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(prompts).encode())))
    assert main([*args, "rollout.backend=hf"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(prompts) and all("\n" not in line for line in lines)
