"""One CPU rollout engine's start, with torch's compile stance as vLLM leaves it (its sampler
compiles its log-prob gather on the first generate) against the `force_eager` stance tidal's
rollout worker sets on CPU (rollout/worker.py). Writes bench/results/engine_start.json.

    .venv/bin/python bench/engine_start.py [--model smollm2-135m] [--prompts 32] [--tokens 48] [--rounds 3]

Each arm runs in a fresh process (the compile happens once per process), alternating, `--rounds`
times: the engine's construction, the first generate (where the compile falls), and the tokens
per second of the generates after it (the same requests: logprobs of the sampled tokens, one seed
per prompt, as the pool sends them). The figure is eager / compiled for each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "engine_start.json"
ARMS = ("compiled", "eager")


def one_engine(arm: str, model: str, prompts: int, tokens: int) -> dict:
    """In this process: build the engine, time its first generate and three more."""
    from tidal.driver.runtime import RUNTIME_ENV_VARS  # imports no torch

    for key, value in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(key, value)
    import torch

    from tidal.actors.threads import machine_cores
    from tidal.rollout.worker import ENGINE_ENV

    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    from tidal.common.models import resolve_model

    torch.set_num_threads(machine_cores())  # as the pool's one worker gets (vLLM freezes it at start)
    if arm == "eager":
        torch.compiler.set_stance("force_eager")
    path = str(resolve_model(model))
    start = time.perf_counter()
    llm = LLM(model=path, dtype=torch.float32, enforce_eager=True, max_model_len=256, seed=0,
              logprobs_mode="processed_logprobs")
    built = time.perf_counter() - start
    inputs = [{"prompt_token_ids": [1 + (7 * i + j) % 500 for j in range(12)]} for i in range(prompts)]

    def generate() -> tuple[float, int]:
        params = [SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0, seed=i)
                  for i in range(prompts)]
        t = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - t, sum(len(c.token_ids) for o in outs for c in o.outputs)

    first, _ = generate()
    steady = [n / s for s, n in (generate() for _ in range(3))]
    return {"build_s": built, "first_generate_s": first, "tokens_per_s": statistics.median(steady)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one engine, in a child process
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(one_engine(args.arm, args.model, args.prompts, args.tokens)))
        return
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--arm", arm, "--model", args.model, "--prompts", str(args.prompts),
                   "--tokens", str(args.tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[arm].append(json.loads(out.strip().splitlines()[-1]))
            print(arm, runs[arm][-1], flush=True)
    median = {arm: {k: statistics.median(r[k] for r in runs[arm]) for k in runs[arm][0]} for arm in ARMS}
    ratio = {k: median["eager"][k] / median["compiled"][k] for k in median["eager"]}
    results = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.tokens, "rounds": args.rounds,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_before": load_before,
               "load_avg_after": os.getloadavg(), "median": median, "eager_over_compiled": ratio, "runs": runs}
    for k, v in ratio.items():
        print(f"{k:18} compiled {median['compiled'][k]:9.2f}  eager {median['eager'][k]:9.2f}  eager/compiled {v:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
