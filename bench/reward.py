"""Reward-model throughput: the RewardPool on Ray (1 and 2 workers) against the same worker
code called directly in this process. Writes bench/results/reward.json.

    python bench/reward.py [--samples 512] [--repeats 5] [--models tiny-random smollm2-135m-2l]

Every process runs torch with one thread (OMP_NUM_THREADS=1), so "direct" and "1 worker" use
the same compute and their ratio is the pool's overhead (serialization, object store, actor
calls); "2 workers" shows how well a batch split across workers scales. The three runners are
timed in interleaved rounds (after a warm-up call each) so they share the background load of a
busy machine; the headline figure is the best round, the median is recorded too. Models: tiny-random, and SmolLM2-135M cut to
2 layers when its package is installed, each turned into a reward model with a seeded head.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "reward.json"
WORDS = ("the day was good and bad but I think we will see a great movie tonight with friends "
         "rain sun happy sad love hate work home coffee music never always really very").split()


def make_batch(n: int, seed: int = 0):
    """n (prompt, completion) pairs of 6-10 and 20-40 words."""
    from tidal.reward_service.worker import RewardInput

    rng = random.Random(seed)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(6, 10))) for _ in range(n)]
    completions = [" " + " ".join(rng.choices(WORDS, k=rng.randint(20, 40))) for _ in range(n)]
    return RewardInput(prompts, completions)


def build_reward_model(name: str, out_dir: Path) -> Path:
    import torch

    from tidal.common.models import load_tokenizer, load_value_model, resolve_model, save_value_model

    base = resolve_model(name)
    torch.manual_seed(0)
    return save_value_model(load_value_model(base), out_dir, extra={"reward_mean": 0.0, "reward_std": 1.0},
                            tokenizer=load_tokenizer(base))


def timed(score, batch) -> float:
    start = time.perf_counter()
    score(batch)
    return time.perf_counter() - start


def bench_model(name: str, samples: int, repeats: int, micro_batch_size: int, tmp: Path) -> dict:
    import torch

    from tidal.reward_service.worker import RewardPool, RewardWorker

    rm_dir = build_reward_model(name, tmp / name)
    batch = make_batch(samples)
    direct = RewardWorker(str(rm_dir), micro_batch_size)
    reference = direct.score(batch)
    runners = {"direct": direct.score}
    pools = [RewardPool(rm_dir, num_workers=w, micro_batch_size=micro_batch_size, timeout_s=600) for w in (1, 2)]
    try:
        for pool in pools:
            # the pool must compute what the direct call computes, or its speed means nothing
            torch.testing.assert_close(pool.score(batch), reference, atol=1e-4, rtol=1e-4)
            runners[f"pool{pool.num_workers}"] = pool.score
        # Interleaved rounds: on a shared machine every runner sees the same background load.
        times = {k: [] for k in runners}
        for _ in range(repeats):
            for key, score in runners.items():
                times[key].append(timed(score, batch))
    finally:
        for pool in pools:
            pool.shutdown()
    result = {"samples": samples, "micro_batch_size": micro_batch_size,
              "mean_tokens": sum(map(len, direct.encode(batch))) / samples}
    for key, ts in times.items():
        result[f"{key}_samples_per_s"] = samples / min(ts)
        result[f"{key}_samples_per_s_median"] = samples / sorted(ts)[len(ts) // 2]
    for key in ("pool1", "pool2"):
        result[f"{key}_vs_direct"] = result[f"{key}_samples_per_s"] / result["direct_samples_per_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m-2l"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="tidal-bench-reward-"))
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
                                      "TRANSFORMERS_OFFLINE", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS")}
    if os.environ.get("TIDAL_CACHE"):
        env["TIDAL_CACHE"] = os.environ["TIDAL_CACHE"]
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp / "ray"), log_to_driver=False,
             runtime_env={"env_vars": env})
    load_before = os.getloadavg()[0]
    results = {}
    try:
        for name in args.models:
            try:
                results[name] = bench_model(name, args.samples, args.repeats, args.micro_batch_size, tmp)
            except (ImportError, FileNotFoundError, ValueError) as e:  # e.g. the SmolLM2 package missing
                results[name] = {"skipped": f"{type(e).__name__}: {e}"}
            print(name, json.dumps(results[name], indent=1), flush=True)
    finally:
        ray.shutdown()
    report = {
        "benchmark": "reward pool samples/s vs direct in-process scoring",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "ray": ray.__version__,
                    "load_avg_1min_before": load_before, "load_avg_1min_after": os.getloadavg()[0]},
        "threads_per_process": 1, "repeats": args.repeats, "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
