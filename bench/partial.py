"""Partial rollouts (rollout.partial, docs/rollout.md#partial-rollouts): how long the learner waits
for rollouts when response lengths are uneven, off against continue and abort.

    python bench/partial.py [--steps 12] [--out bench/results/partial.json]

The tiny random model never stops by itself; a copy of it gets every 16th token id as an extra
EOS (generation_config.json), so its responses end at uneven, seeded lengths, a few at the
32-token cap. Each case is the real `tidal train` RL stage in async mode (GRPO, 8 prompts x 2
samples per step, one update epoch so that generation is the bottleneck, max_staleness 1,
configs/tiny_grpo.yaml's VADER reward, which leaves the lengths alone) on one embedded Ray cluster,
with the same seed; partial cases cut generation into 8-token slices with 8 spare groups in
flight. Figures are means over the steps after the first (warm-up): the learner's wait for
rollouts (time/wait_rollout_s), the step time, the engine's decode steps per step (off: the
longest response of the step; partial: 8 x slices) and the share of tokens sampled by an older
version. Ratios are against `off`, run in the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {"off": [], "continue": ["rollout.partial=continue"], "abort": ["rollout.partial=abort"]}
PARTIAL = ["rollout.partial_tokens=8", "rollout.partial_spare=8"]


def uneven_model(folder: Path, stop_every: int = 16) -> Path:
    from tidal.common.models import resolve_model

    shutil.copytree(resolve_model("tiny-random"), folder, dirs_exist_ok=True)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], *range(stop_every, 512, stop_every)]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def overrides(name: str, model: Path, steps: int, out: Path, extra: list[str]) -> list[str]:
    return [f"logging.output_dir={out}", f"logging.run_name={name}", "logging.wandb_mode=disabled",
            "logging.progress=false", "logging.eval_samples=0", f"algorithm.steps={steps}",
            f"model.policy={model}", f"data.data_dir={out / 'data'}",
            "algorithm.mode=async", "algorithm.max_staleness=1", "rollout.max_new_tokens=32", "rollout.n_samples=2",
            "algorithm.prompts_per_step=8", "algorithm.update_epochs=1", "learner.mini_batch_size=16",
            "learner.micro_batch_size=16",
            *(PARTIAL if extra else []), *extra]


def summarize(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["stage"] == "rl" and r["step"] > 1]  # step 1 includes warm-up
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in recs)
    decode = [r["rollout/partial_slices"] * 8 if "rollout/partial_slices" in r else r["rl/response_len_max"]
              for r in recs]
    return {"steps_measured": len(recs), "wait_rollout_s": round(mean("time/wait_rollout_s"), 4),
            "step_s": round(mean("time/step_s"), 4), "generate_s": round(mean("time/generate_s"), 4),
            "decode_steps_per_step": round(statistics.mean(decode), 1),
            "stale_token_share": round(mean("rl/tokens_stale"), 4),
            "response_len": round(mean("experience/response_len"), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "partial.json"))
    args = ap.parse_args()

    from tidal.common.config import load_config
    from tidal.driver.job import run_pipeline
    from tidal.driver.runtime import ray_session

    tmp = Path(tempfile.mkdtemp(prefix="tidal-bench-partial-"))
    model = uneven_model(tmp / "uneven")
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                           "load_avg_start": os.getloadavg()[0]},
               "config": "configs/tiny_grpo.yaml + overrides (see the docstring)", "cases": {}}
    first = load_config(REPO / "configs" / "tiny_grpo.yaml", overrides("x", model, 1, tmp, []))
    with ray_session(first.cluster, min_cpus=8):  # one cluster for all cases
        for name, extra in CASES.items():
            run = f"partial-{name}"  # a bare `off` would read as YAML's false
            cfg = load_config(REPO / "configs" / "tiny_grpo.yaml", overrides(run, model, args.steps, tmp, extra))
            t0 = time.perf_counter()
            run_pipeline(cfg, tmp / run)
            res = summarize(tmp / run)
            res["pipeline_wall_s"] = round(time.perf_counter() - t0, 1)
            results["cases"][name] = res
            print(f"{name}: {json.dumps(res)}", flush=True)
    off = results["cases"]["off"]
    for name in ("continue", "abort"):
        case = results["cases"][name]
        case["wait_rollout_vs_off"] = round(case["wait_rollout_s"] / off["wait_rollout_s"], 3)
        case["step_time_vs_off"] = round(case["step_s"] / off["step_s"], 3)
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
