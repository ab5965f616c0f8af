"""LoRA against full fine-tuning in a real RL run (docs/rollout.md#lora): GRPO on SmolLM2-135M's
sentiment task, the same base, steps and seed, one run after the other. Writes
bench/results/lora_train.json.

    .venv/bin/python bench/lora_train.py BASE [--steps 20] [--out runs/lora-bench]

BASE holds `sft/` and `reward_model/`: `make compare`'s runs/compare-*/base, or a run of
`tidal train configs/demo.yaml "stages.run=[sft,rm]"`. Each arm is `tidal train configs/demo.yaml`
with only its RL stage, as `make compare` runs GRPO (rollout.n_samples=4, 8 prompts per step);
the LoRA arm adds learner.lora_rank=8 and lr 1e-3 (`--lora-lr`; ten times full fine-tuning's
8e-5, as LoRA usually needs: at 1e-4 its policy barely moved in 20 steps, KL 0.015 nats). While an arm runs, the resident memory of
every Ray actor process the run started is read from /proc each second; the peak per role is reported (a role
that has no process, like the reference of a LoRA run, is absent).

Reported per arm: median s/step (time/step_s), MiB pushed per step (rollout/push_mb), the
held-out VADER and proxy reward before and after, the KL to the reference, peak RSS per role.
The script fails unless the LoRA run pushed adapters only (under a tenth of the full push) and
ran without a reference worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "lora_train.json"
ROLES = ("LearnerWorker", "ReferenceWorker", "RolloutWorker", "RewardWorker")
ARMS = ("full", "lora")


def _parents() -> dict[int, int]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:  # /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces
            out[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def role_rss_mb(root: int) -> dict[str, float]:
    """Summed RSS (MiB) of the live processes of each Ray actor role (ray::ROLE[.method]) that
    descend from `root` (the run's `tidal train`, whose embedded cluster starts them): actors of
    anything else on the machine are not counted."""
    parents, out = _parents(), {}
    for pid in parents:
        p = pid
        while p not in (root, 0, 1) and p in parents:
            p = parents[p]
        if p != root:
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            role = next((r for r in ROLES if title.startswith(f"ray::{r}")), None)
            if role is None:
                continue
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue  # the process ended meanwhile
        out[role] = out.get(role, 0.0) + rss / 1024
    return out


def run_arm(name: str, base: Path, out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [str(Path(sys.executable).parent / "tidal"), "train", str(REPO / "configs" / "demo.yaml"),
           f"logging.output_dir={out}", f"logging.run_name={name}", f"model.policy={base / 'sft'}",
           f"model.reward={base / 'reward_model'}", "stages.run=[rl]", f"algorithm.steps={steps}",
           "rollout.n_samples=4", "algorithm.prompts_per_step=8", "algorithm.name=grpo",
           "logging.progress=false", *extra]
    peak: dict[str, float] = {}
    done = threading.Event()

    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0, load0 = time.time(), os.getloadavg()
    proc = subprocess.Popen(cmd, cwd=REPO)

    def sample() -> None:
        while not done.wait(1.0):
            for role, mb in role_rss_mb(proc.pid).items():
                peak[role] = max(peak.get(role, 0.0), mb)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if proc.wait() != 0:
            raise SystemExit(f"bench/lora_train.py: the {name} run failed (exit code {proc.returncode})")
    finally:
        done.set()
        sampler.join()
    recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rl = [r for r in recs if r.get("stage") == "rl" and r.get("step", 0) > 0 and "time/step_s" in r]
    summary = json.loads((out / name / "summary.json").read_text())
    return {"wall_s": round(time.time() - t0, 1), "load_before": [round(x, 2) for x in load0],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "s_per_step": round(statistics.median(r["time/step_s"] for r in rl), 3),
            "update_s": round(statistics.median(r["time/update_s"] for r in rl), 3),
            "push_mb": round(statistics.median(r.get("rollout/push_mb", 0.0) for r in rl), 2),
            "vader": [round(summary["before"]["vader"], 4), round(summary["after"]["vader"], 4)],
            "reward": [round(summary["before"]["reward"], 4), round(summary["after"]["reward"], 4)],
            "kl_after": round(summary["after"]["kl"], 3),
            "peak_rss_mb": {k: round(v) for k, v in sorted(peak.items())}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="a folder with sft/ and reward_model/")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                    help="run these arms only; the others' figures come from the results file")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / f"lora-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args()
    base = args.base.resolve()
    if not (base / "sft").is_dir() or not (base / "reward_model").is_dir():
        print(f"bench/lora_train.py: {base} lacks sft/ or reward_model/ (see the docstring)", file=sys.stderr)
        return 2
    extra = {"full": [], "lora": ["learner.lora_rank=8", f"learner.lr={args.lora_lr}"]}
    arms = json.loads(RESULTS.read_text())["arms"] if RESULTS.is_file() and set(args.arms) != set(ARMS) else {}
    for name in args.arms:
        arms[name] = {**run_arm(name, base, args.out, args.steps, extra[name]), "overrides": extra[name]}
    missing = [a for a in ARMS if a not in arms]
    if missing:
        print(f"bench/lora_train.py: {RESULTS} has no {' or '.join(missing)} arm; run it with --arms {' '.join(missing)}",
              file=sys.stderr)
        return 2
    full, lora = arms["full"], arms["lora"]
    ratios = {"push_mb_lora_over_full": round(lora["push_mb"] / full["push_mb"], 4),
              "s_per_step_lora_over_full": round(lora["s_per_step"] / full["s_per_step"], 3),
              "learner_rss_lora_over_full": round(lora["peak_rss_mb"]["LearnerWorker"]
                                                  / full["peak_rss_mb"]["LearnerWorker"], 3)}
    result = {"what": "GRPO on SmolLM2-135M from one sft/rm base: full fine-tuning vs LoRA r=8",
              "base": str(base), "steps": args.steps, "cpus": os.cpu_count(), "arms": arms, "ratios": ratios}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert lora["push_mb"] < full["push_mb"] / 10, "the LoRA run pushed more than adapters"
    assert "ReferenceWorker" not in lora["peak_rss_mb"], "the LoRA run started a reference worker"
    return 0


if __name__ == "__main__":
    sys.exit(main())
