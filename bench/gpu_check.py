"""The one prepared GPU check: what the CPU tests cannot prove, on the first GPU a session gets.

    python bench/gpu_check.py                      # every part, results to bench/results/gpu.json
    python bench/gpu_check.py --wheels bench/wheels --steps 4 --out bench/results/gpu.json

Made for one H100 and under 10 minutes, on a machine that may have no registry access and lack
ray, deepspeed and vllm: wheels (and split wheels, `NAME.whl.part-aa`, `-ab`, ... joined first)
found in --wheels are installed with pip --no-index into a folder of their own that every process
of the check (Ray workers too) imports from. Each part runs in a subprocess of its own (a clean GPU
and a clean CUDA context), and each is recorded as ok, failed (with the error) or skipped (with the
reason, e.g. a package that does not import) - never passed silently. Exit 1 when a part failed.

Parts:
  env      python, torch, CUDA, the GPU, and the versions of transformers, ray, deepspeed, vllm
  ipc      tidal.actors.ipc between two processes on the GPU: a bucket packed by one, mapped from
           its CUDA IPC handle by the other, checksums equal (rollout.weight_transport=ipc's path)
  learner  a one-rank ZeRO-3 bf16 update on CUDA through tidal's own engine build (init_distributed,
           ds_config, make_engine) of a ~0.45 B random model: s/step, tokens/s, MFU, peak memory
  vllm     (needs vllm) a GPU RolloutWorker in sleep mode: generates, loads pushed weights into a
           tied-head model, and its log-probs match an HF forward of the same weights
  grpo     (needs ray, deepspeed) configs/tiny_grpo.yaml end to end on the GPU, colocated, weights
           over CUDA IPC, vLLM with sleep mode where it imports (else rollout.backend=hf): s/step,
           tokens/s, peak GPU memory of each actor (nvidia-smi, by process)
docs/benchmarks.md#gpu-check says how to bring the wheels and run it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("env", "ipc", "learner", "vllm", "grpo")
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (NVIDIA's datasheet): the MFU denominator
PART_TIMEOUT_S = {"env": 120, "ipc": 120, "learner": 240, "vllm": 240, "grpo": 420}


class Skip(Exception):
    """A part that cannot run here; the message is the reason recorded."""


def need(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - missing, or broken against this torch
        raise Skip(f"{module} does not import: {type(e).__name__}: {e}") from None


def version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        return f"missing ({type(e).__name__}: {str(e)[:120]})"


# ----------------------------------------------------------------------------- setup (parent process)


def setup_paths(wheels: Path, work: Path) -> dict:
    """tidal importable as `tidal` (a link to the repo), the wheels installed into work/site;
    both on PYTHONPATH, which tidal passes on to every Ray worker."""
    pkg = work / "pkg"
    pkg.mkdir(parents=True, exist_ok=True)
    if not (pkg / "tidal").exists():
        (pkg / "tidal").symlink_to(REPO, target_is_directory=True)
    site, installed = work / "site", {}
    if wheels.is_dir():
        for first in sorted(wheels.glob("*.part-aa")):  # carried in pieces: join them once
            whole = wheels / first.name[:-len(".part-aa")]
            if not whole.exists():
                with open(whole, "wb") as out:
                    for piece in sorted(wheels.glob(whole.name + ".part-*")):
                        out.write(piece.read_bytes())
        files = sorted(str(p) for p in wheels.iterdir() if p.name.endswith((".whl", ".tar.gz")))
        if files:
            res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                                  "--target", str(site), *files], capture_output=True, text=True, timeout=300)
            installed = {"files": [Path(f).name for f in files], "rc": res.returncode, "log_tail": res.stderr[-1500:]}
    paths = [str(pkg), str(site), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return installed


def run_part(name: str, args) -> dict:
    """One part in a subprocess; its JSON result, or failed with the output's tail."""
    out = Path(tempfile.mkstemp(prefix=f"gpu-check-{name}-", suffix=".json")[1])
    cmd = [sys.executable, __file__, "--part", name, "--part-out", str(out), "--steps", str(args.steps),
           "--work", str(args.work)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=PART_TIMEOUT_S[name])
        tail = (res.stdout + res.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "reason": f"over {PART_TIMEOUT_S[name]} s", "log_tail": str(e.stdout)[-2000:]}
    result = json.loads(out.read_text()) if out.stat().st_size else {"status": "failed", "reason": "no result",
                                                                        "log_tail": tail}
    if result["status"] == "failed":
        result.setdefault("log_tail", tail)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


# ----------------------------------------------------------------------------- parts (subprocesses)


def part_env(args) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           **{m: version(m) for m in ("transformers", "ray", "deepspeed", "vllm")}}
    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
    p = torch.cuda.get_device_properties(0)
    return {**out, "gpu": p.name, "gpu_memory_gb": round(p.total_memory / 1e9, 1), "gpus": torch.cuda.device_count(),
            "bf16": torch.cuda.is_bf16_supported()}


def _ipc_child(bucket, queue) -> None:
    from tidal.actors.ipc import opened

    with opened(bucket) as named:
        queue.put({n: float(t.double().sum()) for n, t in named})


def part_ipc(args) -> dict:
    import torch
    import torch.multiprocessing as mp

    from tidal.actors.ipc import IpcSender
    from tidal.actors.weights import iter_buckets

    g = torch.Generator(device="cuda").manual_seed(0)
    named = [(f"w{i}", torch.randn(512, 1024, device="cuda", generator=g).to(torch.bfloat16)) for i in range(8)]
    sender = IpcSender()
    sender.open(1, iter_buckets(named, 2, torch.device("cuda")), torch.device("cuda"))
    ctx, got = mp.get_context("spawn"), {}
    while (bucket := sender.next()) is not None:
        queue = ctx.Queue()
        child = ctx.Process(target=_ipc_child, args=(bucket, queue))
        child.start()
        got.update(queue.get(timeout=60))
        child.join(60)
    want = {n: float(t.double().sum()) for n, t in named}
    if got != want:
        raise RuntimeError(f"checksums differ: {got} vs {want}")
    return {"buckets": len(list(iter_buckets(named, 2))), "tensors": len(got)}


def bench_model(work: Path, hidden: int = 1536, layers: int = 16) -> tuple[Path, int]:
    """A random Llama-shaped model of ~0.45 B parameters with the tiny tokenizer (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidal.common.models import load_tokenizer, resolve_model

    folder, tok = work / f"bench-{hidden}x{layers}", load_tokenizer(resolve_model("tiny-random"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    if not (folder / "config.json").is_file():
        with torch.device("cuda"):  # random init on the GPU: seconds, not minutes on the CPU
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder, params


def part_learner(args) -> dict:
    need("deepspeed")
    import torch

    from tidal.common.config import load_config
    from tidal.learner.engine import free_port
    from tidal.learner.worker import LearnerWorker, WorkerSpec

    folder, params = bench_model(args.work)
    batch, seq = 8, 1024
    cfg = load_config(None, [f"model.policy={folder}", "learner.gpus_per_worker=1", "learner.zero_stage=3",
                             f"learner.micro_batch_size={batch}", f"learner.mini_batch_size={batch}",
                             "learner.gradient_checkpointing=true", "algorithm.name=grpo", "rollout.n_samples=2"])
    rank = LearnerWorker(cfg, 0, 1)
    rank.setup(WorkerSpec("policy", str(folder)), "127.0.0.1", free_port())
    info = rank.describe()
    ids = torch.randint(3, 1000, (batch, seq), device="cuda")
    times, losses = [], []
    for _ in range(args.steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = rank.engine(input_ids=ids, labels=ids).loss
        rank.engine.backward(loss)
        rank.engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s = sum(times[1:]) / len(times[1:])  # the first includes warm-up
    tokens_s = batch * seq / step_s
    exported = sum(1 for _ in rank.iter_named_weights())
    return {"params": params, "zero_stage": info["zero_stage"], "dtype": str(next(rank.engine.module.parameters()).dtype),
            "accelerator": os.environ.get("DS_ACCELERATOR"), "step_s": round(step_s, 3), "tokens_per_s": round(tokens_s),
            "mfu": round(6 * params * tokens_s / (H100_BF16_TFLOPS * 1e12), 4),  # 8 x params with recompute; 6 counted
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "loss_first_last": [losses[0], losses[-1]],
            "loss_falls": losses[-1] < losses[0], "exported_tensors": exported}


def part_vllm(args) -> dict:
    need("vllm")
    import torch
    from transformers import AutoModelForCausalLM

    from tidal.common.config import load_config
    from tidal.common.models import load_tokenizer, resolve_model, sequence_logprobs
    from tidal.common.types import PromptBatch
    from tidal.rollout.sampling import Sampling
    from tidal.rollout.worker import RolloutWorker

    tied = args.work / "tiny-tied"
    if not (tied / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random"), tie_word_embeddings=True)
        model.save_pretrained(tied)
        load_tokenizer(resolve_model("tiny-random")).save_pretrained(tied)
    cfg = load_config(None, ["learner.gpus_per_worker=1", "rollout.gpus_per_worker=1", "rollout.sleep=true",
                             "rollout.gpu_memory_utilization=0.3", "rollout.max_model_len=128"])
    worker = RolloutWorker(str(tied), cfg.rollout, "float32", seed=0)
    free_asleep = torch.cuda.mem_get_info()[0]
    hf = AutoModelForCausalLM.from_pretrained(tied).cuda()
    with torch.no_grad():  # the pushed weights: the tied embedding (and so the head) perturbed
        hf.model.embed_tokens.weight.add_(0.05 * torch.randn_like(hf.model.embed_tokens.weight))
    worker.load_named_tensors(((n, p.detach()) for n, p in hf.state_dict().items() if n != "lm_head.weight"), 1)
    tok = worker.tokenizer
    ids = [tok("hello world")["input_ids"], tok("the weather is")["input_ids"]]
    out = worker.generate(PromptBatch([0, 1], ["a", "b"], ids), Sampling(n=2, max_new_tokens=16, seed=3))
    gaps = []
    for p, r, lps in zip(out.prompt_ids, out.response_ids, out.response_logprobs):
        seq = torch.tensor([p + r], device="cuda")
        ref = sequence_logprobs(hf, seq, torch.ones_like(seq), len(r), 1.0)[0]
        gaps.append(float((ref.float().cpu() - torch.tensor(lps)).abs().max()))
    if max(gaps) > 1e-3:
        raise RuntimeError(f"vLLM log-probs after the push differ from HF's by up to {max(gaps):.2e} (tied head)")
    return {"weight_version": out.weight_version[0], "max_logprob_gap": max(gaps), "asleep_after": worker.asleep,
            "free_gb_while_asleep": round(free_asleep / 1e9, 1)}


def _watch_gpu(peaks: dict, stop: threading.Event) -> None:
    """Peak GPU memory (MB) of each process, by its Ray actor name (ray::LearnerWorker, ...)."""
    while not stop.wait(0.5):
        try:
            rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return
        for row in rows:
            pid, used = (x.strip() for x in row.split(","))
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() or pid
            except OSError:
                name = pid
            peaks[name] = max(peaks.get(name, 0), int(used))


def part_grpo(args) -> dict:
    need("ray")
    need("deepspeed")
    from tidal.common.config import load_config
    from tidal.driver.job import run_pipeline

    backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
    run = args.work / "grpo"
    cfg = load_config(REPO / "configs" / "tiny_grpo.yaml", [
        "learner.gpus_per_worker=1", "rollout.gpus_per_worker=1", f"rollout.backend={backend}",
        "rollout.weight_transport=ipc", "rollout.gpu_memory_utilization=0.3", f"algorithm.steps={args.steps}",
        f"logging.output_dir={run}", "logging.run_name=run", f"data.data_dir={args.work / 'data'}",
        "logging.wandb_mode=disabled", "logging.progress=false", "logging.eval_samples=4"])
    peaks, stop = {}, threading.Event()
    watcher = threading.Thread(target=_watch_gpu, args=(peaks, stop), daemon=True)
    watcher.start()
    try:
        run_pipeline(cfg, run / "run")
    finally:
        stop.set()
    recs = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r.get("stage") == "rl" and r.get("step", 0) > 1]
    mean = lambda k: round(sum(r.get(k, 0.0) for r in rl) / max(len(rl), 1), 3)  # noqa: E731
    return {"backend": backend, "sleep": cfg.rollout.sleep, "dtype": cfg.model.dtype, "steps_measured": len(rl),
            "s_per_step": mean("time/step_s"), "tokens_per_s": mean("rl/tokens_per_s"),
            "update_s": mean("time/update_s"), "generate_s": mean("time/generate_s"), "sync_s": mean("time/sync_s"),
            "peak_gpu_memory_mb": {k: v for k, v in peaks.items() if "ray::" in k or k.isdigit()}}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=REPO / "bench" / "wheels")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tidal-gpu-check")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:  # inside a part's subprocess
        sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        try:
            result = {"status": "ok", **globals()[f"part_{args.part}"](args)}
        except Skip as e:
            result = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - recorded, with the traceback
            result = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        args.part_out.write_text(json.dumps(result, default=str))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"machine": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "installed": setup_paths(args.wheels, args.work), "parts": {}}
    for name in args.parts.split(","):
        report["parts"][name] = run_part(name, args)
        print(f"gpu_check: {name}: {report['parts'][name]['status']} {report['parts'][name].get('reason', '')}", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"gpu_check: wrote {args.out} in {report['seconds']} s", flush=True)
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
