"""LoRA on the rollout workers (rollout.lora_load, docs/rollout.md#lora): a vLLM LoRA adapter
against the merge into the worker's own base copy, against full weights. Writes
bench/results/lora_load.json.

    .venv/bin/python bench/lora_load.py [--models tiny-random smollm2-135m] [--rounds 3]

For each model and load kind, one real vLLM rollout worker (a RolloutPool of one) is started and
timed on:
  push      RolloutPool.load_weights of what the learner pushes: the adapter (peft, r=8, all linear
            layers; adapter, merge) or the merged full model (full: learner.lora_rank=0), bytes too;
  generate  the same prompts (8, 64 new tokens, temperature 1, fixed seeds), tokens per second.
Rounds are interleaved with nothing else; the machine is shared, so its load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from tidal.driver.runtime import RUNTIME_ENV_VARS

for _k, _v in RUNTIME_ENV_VARS.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lora_load.json"
PROMPTS = ["The movie was", "I think the food is", "Tell me about the city.", "Honestly, the weekend felt",
           "We all agree that the show is", "My favourite book", "The weather today", "Our team played"]


def adapter_and_merged(path, seed: int = 0):
    """(peft adapter tensors, the merged model's tensors) with random A and B (r=8, all-linear)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from tidal.common.models import load_causal_lm

    model = get_peft_model(load_causal_lm(path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    adapter = list(get_peft_model_state_dict(model).items())
    merged = [(n, p.detach().contiguous()) for n, p in model.merge_and_unload().named_parameters()]
    return adapter, merged


def bench_load(path, load: str, adapter: list, merged: list, rounds: int) -> dict:
    from tidal.common.config import load_config
    from tidal.common.types import PromptBatch
    from tidal.common.models import load_tokenizer
    from tidal.rollout.pool import RolloutPool

    lora = [] if load == "full" else ["learner.lora_rank=8", "learner.lora_alpha=16", f"rollout.lora_load={load}"]
    cfg = load_config(None, ["rollout.num_workers=1", "rollout.max_model_len=256", "rollout.max_new_tokens=64",
                             "rollout.temperature=1.0", "cluster.sync_timeout_s=600", *lora])
    weights = merged if load == "full" else adapter
    tok = load_tokenizer(path)
    batch = PromptBatch(list(range(len(PROMPTS))), PROMPTS, [tok(t)["input_ids"] for t in PROMPTS])
    start = time.perf_counter()
    pool = RolloutPool(cfg, path)
    started = time.perf_counter() - start
    pushes, speeds = [], []
    try:
        for r in range(rounds + 1):  # the first round warms up
            t0 = time.perf_counter()
            pool.load_weights(weights, r + 1)
            t1 = time.perf_counter()
            out = pool.generate(batch)
            t2 = time.perf_counter()
            if r:
                pushes.append(t1 - t0)
                speeds.append(sum(len(x) for x in out.response_ids) / (t2 - t1))
    finally:
        pool.shutdown()
    row = {"load": load, "engine_start_s": started, "push_bytes": sum(t.numel() * t.element_size() for _, t in weights),
           "push_s_median": statistics.median(pushes), "generate_tokens_per_s_median": statistics.median(speeds)}
    print(f"  {load}: push {row['push_bytes'] / 2**20:.2f} MiB in {row['push_s_median'] * 1e3:.0f} ms, "
          f"generate {row['generate_tokens_per_s_median']:.0f} tokens/s, engine start {started:.0f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from tidal.common.config import ClusterConfig
    from tidal.common.models import resolve_model
    from tidal.driver.runtime import ray_session

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rounds": args.rounds,
               "load_avg_before": os.getloadavg(), "models": []}
    with ray_session(ClusterConfig(num_cpus=8)):
        for name in args.models:
            path = resolve_model(name)
            adapter, merged = adapter_and_merged(path)
            print(name, flush=True)
            results["models"].append({"model": name, "rows": [bench_load(path, load, adapter, merged, args.rounds)
                                                              for load in ("adapter", "merge", "full")]})
    results["load_avg_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
