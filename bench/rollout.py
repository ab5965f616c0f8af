"""Rollout throughput: the RolloutPool (vLLM workers in Ray actors) against a raw vllm.LLM in
this process, on the same batch. Writes bench/results/rollout.json.

    .venv/bin/python bench/rollout.py [--model tiny-random] [--prompts 64] [--n 4] [--tokens 32]

Generated tokens per second. The raw engine and the pool run with the same settings (fp32,
eager, same sampling, same per-prompt seeds, and the same threads: the raw engine uses every
core of the machine, as does the pool's one worker, whose thread count tidal sets by itself
(tidal.actors.threads); two workers get half the cores each) and are timed in interleaved
rounds after a warm-up each, so they share the background load of a busy machine.
The figure is pool / raw: with 1 worker it is the pool's overhead (chunking, ray.put, actor
calls, result transfer); with 2 workers it also shows how the batch splits over two engines. chunks_per_worker 1 (default: one engine batch per worker) and 4 (finer
balancing and re-queueing, smaller engine batches) are both measured.
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

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"


def make_prompts(path, n: int):
    from tidal.common.models import load_tokenizer
    from tidal.common.types import PromptBatch

    tok = load_tokenizer(path)
    subjects = ["the movie", "my day", "the food", "this song", "the weekend", "the book", "our trip", "the city"]
    texts = [f"Everyone said {subjects[i % len(subjects)]} number {i} was" for i in range(n)]
    return PromptBatch(list(range(n)), texts, [tok(t)["input_ids"] for t in texts])


def raw_generate(llm, prompts, sampling) -> int:
    """The same requests the pool's workers send, straight to one engine; returns tokens."""
    from vllm import SamplingParams

    params = [SamplingParams(n=sampling.n, temperature=sampling.temperature, max_tokens=sampling.max_new_tokens,
                             logprobs=0, seed=sampling.prompt_seed(i)) for i in prompts.index]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts.token_ids], params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def pool_generate(pool, prompts, sampling) -> int:
    batch = pool.generate(prompts, sampling)
    return sum(len(r) for r in batch.response_ids)


def rate(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        out.append(tokens / (time.perf_counter() - start))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from vllm import LLM

    from tidal.common.config import ClusterConfig, load_config
    from tidal.common.models import resolve_model
    from tidal.driver.runtime import ray_session
    from tidal.rollout.pool import RolloutPool
    from tidal.rollout.sampling import Sampling
    from tidal.rollout.worker import WEIGHT_LOADER_EXT

    import torch

    from tidal.actors.threads import machine_cores

    path = resolve_model(args.model)
    sampling = Sampling(n=args.n, temperature=1.0, max_new_tokens=args.tokens, seed=0)
    prompts = make_prompts(path, args.prompts)
    with ray_session(ClusterConfig(num_cpus=8)):
        cores = machine_cores()
        torch.set_num_threads(cores)  # the raw engine: the whole machine (vLLM freezes it at start)
        llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                  worker_extension_cls=WEIGHT_LOADER_EXT, logprobs_mode="processed_logprobs")
        results = {"model": args.model, "prompts": args.prompts, "n": args.n, "max_new_tokens": args.tokens,
                   "rounds": args.rounds, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "load_avg_before": os.getloadavg(), "raw_threads": torch.get_num_threads(), "configs": []}
        pool = None
        try:
            for workers, chunks in [(1, 1), (1, 4), (2, 1), (2, 4)]:
                if pool is None or pool.num_workers != workers:  # threads are set as a worker starts
                    if pool is not None:
                        pool.shutdown()
                    cfg = load_config(None, [f"rollout.num_workers={workers}", "rollout.max_model_len=256",
                                             "cluster.sync_timeout_s=600"])
                    pool = RolloutPool(cfg, path)
                pool.chunks_per_worker = chunks
                raw_generate(llm, prompts, sampling), pool_generate(pool, prompts, sampling)  # warm-up
                raw, pooled = [], []
                for _ in range(args.rounds):  # interleaved: both see the same background load
                    raw += rate(lambda: raw_generate(llm, prompts, sampling), 1)
                    pooled += rate(lambda: pool_generate(pool, prompts, sampling), 1)
                entry = {
                    "workers": workers, "chunks_per_worker": chunks, "threads_per_worker": pool.num_threads,
                    "raw_tokens_per_s": {"best": max(raw), "median": statistics.median(raw)},
                    "pool_tokens_per_s": {"best": max(pooled), "median": statistics.median(pooled)},
                    "ratio_best": max(pooled) / max(raw), "ratio_median": statistics.median(pooled) / statistics.median(raw),
                }
                results["configs"].append(entry)
                print(f"workers={workers} chunks/worker={chunks}: raw {entry['raw_tokens_per_s']['median']:.0f} tok/s, "
                      f"pool {entry['pool_tokens_per_s']['median']:.0f} tok/s, pool/raw median "
                      f"{entry['ratio_median']:.3f} (best {entry['ratio_best']:.3f})", flush=True)
        finally:
            if pool is not None:
                pool.shutdown()
    results["load_avg_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
