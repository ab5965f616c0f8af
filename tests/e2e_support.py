"""Shared pieces of the end-to-end tests: a toy rule reward, tiny-model configs, log readers.

The reward is importable as `e2e_support:letter_rate` with tests/ on the path (pytest puts it
there; subprocess drivers get PYTHONPATH). It gives a dense signal that a tiny random policy
climbs within a few steps, so the tests can assert that learning happened.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
# The sentiment task (512 rows per file), written once and shared by every e2e test and process.
DATA_DIR = Path(os.environ.get("TIDAL_CACHE", Path.home() / ".cache" / "tidal")) / "test-data" / "sentiment-512"
LETTER_REWARD = '[{kind: function, target: "e2e_support:letter_rate"}]'
HALF_FLAT_REWARD = '[{kind: function, target: "e2e_support:letter_rate_half"}]'


def letter_rate(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """Share of the completion's characters that are the letter in `target` (default 'e'), x10."""
    letter = (meta.get("target") or "e")[0]
    return [10.0 * sum(ch == letter for ch in c) / max(len(c), 1) for c in completions]


def letter_rate_half(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """letter_rate on half of the prompts; 0 for every completion of the other half (those whose
    text has an even CRC-32, the same in every process): groups without signal, for dynamic sampling."""
    rates = letter_rate(prompts, completions, **meta)
    return [0.0 if zlib.crc32(p.encode()) % 2 == 0 else r for p, r in zip(prompts, rates)]


def letter_penalty(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """A gold judge that disagrees with letter_rate: minus it (the proxy is gameable by design)."""
    return [-r for r in letter_rate(prompts, completions, **meta)]


def tiny_overrides(tmp: Path, name: str, *extra: str) -> list[str]:
    """Overrides of configs/tiny_*.yaml for a test run under `tmp` (shared data dir per session)."""
    data_dir = Path(os.environ.get("TIDAL_TEST_DATA", DATA_DIR))
    return [f"logging.output_dir={tmp}", f"logging.run_name={name}", f"data.data_dir={data_dir}",
            "logging.wandb_mode=disabled", "logging.progress=false", f"reward.terms={LETTER_REWARD}", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rl_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["stage"] == "rl" and r["step"] > 0]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def uneven_model(folder: Path, stop_every: int = 16) -> Path:
    """The tiny random model (which never stops by itself) with every `stop_every`-th token id an
    extra EOS in its generation_config.json: its responses end at uneven, seeded lengths, a few at
    rollout.max_new_tokens. Written once into `folder`."""
    import shutil

    from tidal.common.models import resolve_model

    if not (folder / "config.json").is_file():
        shutil.copytree(resolve_model("tiny-random"), folder, dirs_exist_ok=True)
        gen = json.loads((folder / "generation_config.json").read_text())
        gen["eos_token_id"] = [gen["eos_token_id"], *range(stop_every, 512, stop_every)]
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder
