"""Delta weight sync (rollout.weight_delta): unchanged buckets are not put again and not pulled,
a full version costs no put, fused layers travel together, a new or lagging worker and a corrupted
or lost delta fall back to the full version (checked bucket by bucket), xor deltas of bf16 weights
shrink, and a real vLLM worker loading deltas samples from the new weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tidal.actors.weight_delta import DeltaCorrupt, DeltaPublisher, DeltaReceiver
from tidal.common.models import load_causal_lm

from test_rollout_vllm import make_pool, make_variant, max_gap, prompts

pytestmark = pytest.mark.ray


def _model(dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(64, 64, generator=g).to(dtype) for name in (
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.norm.weight")}


BUCKET_MB = 20 / 1024  # one 16 KiB tensor per bucket: 7 buckets
BF16_MB = 10 / 1024  # the same for 8 KiB bf16 tensors


class CountingPut:
    def __init__(self):
        self.objects = 0

    def __call__(self, obj):
        import ray

        self.objects += 1
        return ray.put(obj)


def _changed(model, *names, scale=1e-2):
    out = dict(model)
    for n in names:
        out[n] = model[n] + scale
    return out


def _equal(named, model) -> bool:
    return all(torch.equal(t, model[n]) for n, t in named)


def test_only_changed_buckets_are_put_and_pulled_and_a_full_version_costs_no_put(ray_cluster):
    put = CountingPut()
    pub = DeltaPublisher("buckets", put=put)
    v1 = _model()
    h1 = pub.publish(v1.items(), 1, BUCKET_MB)
    assert put.objects == 7 and h1.delta.base_version == -1
    rx = DeltaReceiver()
    assert _equal(rx.pull(h1), v1) and rx.last.full
    v2 = _changed(v1, "model.layers.0.mlp.down_proj.weight")
    h2 = pub.publish(v2.items(), 2, BUCKET_MB)
    assert put.objects == 8  # one bucket changed: one new object; the full version reuses the other six
    loaded = rx.pull(h2)
    assert [n for n, _ in loaded] == ["model.layers.0.mlp.down_proj.weight"] and _equal(loaded, v2)
    assert not rx.last.full and rx.last.bytes == 64 * 64 * 4
    fresh = DeltaReceiver()  # a new (or restarted) worker: the full version, from objects of both versions
    assert _equal(fresh.pull(h2), v2) and fresh.last.full
    assert sorted(n for n, _ in DeltaReceiver().pull(h2)) == sorted(v2)


def test_a_changed_layer_brings_the_layers_vllm_fuses_with_it(ray_cluster):
    pub, rx = DeltaPublisher("buckets"), DeltaReceiver()
    v1 = _model()
    rx.pull(pub.publish(v1.items(), 1, BUCKET_MB))
    v2 = _changed(v1, "model.layers.0.self_attn.k_proj.weight")
    loaded = rx.pull(pub.publish(v2.items(), 2, BUCKET_MB))
    assert sorted(n.split(".")[-2] for n, _ in loaded) == ["k_proj", "q_proj", "v_proj"] and _equal(loaded, v2)


def test_a_worker_that_missed_a_version_pulls_the_full_one(ray_cluster):
    pub, rx = DeltaPublisher("buckets"), DeltaReceiver()
    v1 = _model()
    rx.pull(pub.publish(v1.items(), 1, BUCKET_MB))
    v2 = _changed(v1, "model.norm.weight")
    pub.publish(v2.items(), 2, BUCKET_MB)  # never reaches this worker
    v3 = _changed(v2, "model.embed_tokens.weight")
    loaded = rx.pull(pub.publish(v3.items(), 3, BUCKET_MB))
    assert rx.last.full and "holds version 1" in rx.last.reason
    assert sorted(n for n, _ in loaded) == sorted(v3) and _equal(loaded, v3)


def _damaged(ref):
    """A copy of the object behind `ref` with one bit flipped: a FlatBucket's buffer, or zlib'd bytes."""
    import zlib

    import ray

    obj = ray.get(ref)
    if isinstance(obj, bytes):
        raw = bytearray(zlib.decompress(obj))
        raw[7] ^= 0x01
        return ray.put(zlib.compress(bytes(raw)))
    broken = obj.buffer.clone()
    broken[3] ^= 0x01
    return ray.put(dataclasses.replace(obj, buffer=broken))


@pytest.mark.parametrize("mode", ["buckets", "xor"])
def test_a_corrupted_or_lost_delta_fails_its_checksum_and_the_full_version_recovers(ray_cluster, mode):
    import ray

    pub = DeltaPublisher(mode)
    v1 = _model(torch.bfloat16)
    h1 = pub.publish(v1.items(), 1, BF16_MB)
    name = "model.layers.0.mlp.down_proj.weight"
    v2 = {**v1, name: (v1[name].float() * 1.003).to(torch.bfloat16)}  # a small update: ~60% of the bf16 values move by an ulp
    h2 = pub.publish(v2.items(), 2, BF16_MB)
    e = h2.delta.entries[5]
    assert e.load and (e.delta_ref is not None) == (mode == "xor")  # xor: a real, compressed delta
    field = "delta_ref" if mode == "xor" else "full_ref"
    damaged = dataclasses.replace(e, **{field: _damaged(getattr(e, field))})
    lost = dataclasses.replace(e, **{field: ray.put(None)})  # an object that is not the delta at all
    for entry, why in ((damaged, "checksum"), (lost, "could not be read")):
        rx = DeltaReceiver()
        rx.pull(h1)
        entries = tuple(entry if x.index == 5 else x for x in h2.delta.entries)
        loaded = rx.pull(dataclasses.replace(h2, delta=dataclasses.replace(h2.delta, entries=entries)))
        assert rx.last.full and why in rx.last.reason  # detected, then the full version (intact) was pulled
        assert sorted(n for n, _ in loaded) == sorted(v2) and _equal(loaded, v2)
    # the full version itself damaged: refused before anything is loaded
    bucket_refs = tuple(_damaged(r) if i == 5 else r for i, r in enumerate(h2.bucket_refs))
    with pytest.raises(DeltaCorrupt, match="nothing was loaded"):
        DeltaReceiver().pull(dataclasses.replace(h2, bucket_refs=bucket_refs))


def test_xor_deltas_of_small_bf16_updates_are_small_and_exact(ray_cluster):
    pub, rx = DeltaPublisher("xor"), DeltaReceiver()
    v1 = _model(torch.bfloat16)
    rx.pull(pub.publish(v1.items(), 1, BF16_MB))
    v2 = {n: (t.float() * 1.003).to(torch.bfloat16) for n, t in v1.items()}  # ~60% of the values move by an ulp
    h2 = pub.publish(v2.items(), 2, BF16_MB)
    assert all(e.load and e.delta_ref is not None for e in h2.delta.entries)  # every bucket changed, as an XOR
    assert h2.delta.delta_bytes() < h2.delta.full_bytes() / 2
    loaded = rx.pull(h2)
    assert not rx.last.full and _equal(loaded, v2)
    v3 = {n: t + torch.randn_like(t.float()).to(t.dtype) for n, t in v2.items()}  # every value changes: raw bytes
    h3 = pub.publish(v3.items(), 3, BF16_MB)
    assert all(e.delta_ref is None for e in h3.delta.entries) and _equal(rx.pull(h3), v3)


@pytest.fixture(scope="module")
def sharp_model(tiny_model, tmp_path_factory):
    return make_variant(tiny_model, tmp_path_factory.mktemp("sharp-delta"), tie=False, head_scale=8.0)


def test_a_vllm_worker_loads_the_changed_bucket_only_and_samples_from_the_new_weights(ray_cluster, sharp_model):
    """rollout.weight_delta through a real pool: the second push moves one bucket (1 MB buckets of a
    1.7 MB model; the untied head sits in the last), vLLM's partial reload gives the new model's
    log-probs, and a push that changed nothing reloads nothing. Fails when the setting is ignored."""
    pool = make_pool(sharp_model, **{"rollout.weight_delta": "buckets", "rollout.weight_bucket_mb": 1,
                                     "rollout.max_new_tokens": 8})
    try:
        model = load_causal_lm(sharp_model).eval()
        pool.load_weights(list(model.state_dict().items()), 1)

        def stats():
            return [r.get() for r in pool.group.call(lambda a: a.pull_stats.remote(), timeout_s=60)]

        assert all(s.full for s in stats())  # the first version: whole
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        pool.load_weights(list(model.state_dict().items()), 2)
        spec = pool.weights.handle.delta
        assert spec is not None and spec.base_version == 1 and 0 < spec.delta_bytes() < spec.full_bytes() / 2
        assert all(not s.full and s.bytes == spec.delta_bytes() for s in stats())
        batch = prompts(sharp_model)
        out = pool.generate(batch)
        assert set(out.weight_version) == {2} and max_gap(model, out, 1.0) < 2e-3
        pool.load_weights(list(model.state_dict().items()), 3)  # nothing changed: nothing to reload
        assert pool.weights.handle.delta.delta_bytes() == 0 and all(s.bytes == 0 for s in stats())
        out = pool.generate(batch)
        assert set(out.weight_version) == {3} and max_gap(model, out, 1.0) < 2e-3
    finally:
        pool.shutdown()


def test_delta_sync_is_refused_off_the_object_store():
    from tidal.common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rollout.weight_delta=xor works through the object store only"):
        load_config(None, ["rollout.weight_delta=xor", "rollout.weight_transport=collective"])
    assert load_config(None, ["rollout.weight_delta=buckets"]).rollout.weight_delta == "buckets"
