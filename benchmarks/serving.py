"""Compact vs dense TF Serving exports: bytes, request latency, peak RSS and load time.

Model: a two-tower retrieval model with Gowalla-sized tables (29,858 users, 40,981 items,
dim 64, towers = MaskedEmbedding + L2 normalisation like ``trainers.models.TwoTower``),
random tables with exact-budget random masks at each sparsity s. Variants, exported with
``export.export_model``:

* ``dense``             dense float32 tables (the baseline every ratio is against);
* ``compact``           compact float32, item matrix rebuilt once at load (the default);
* ``compact-rebuild``   compact float32, item matrix rebuilt on every request;
* ``compact-f16``       compact float16 values, item matrix rebuilt once at load.

Measured:

* bytes of the version folder (saved_model.pb + variables/ + assets.extra/);
* p50/p99 latency of ``serving_default`` through a TF1 ``Session`` (the way TF Serving runs
  it: ``loader.load`` + feeding the SignatureDef tensors, via ``Session.make_callable``),
  batch 1 and 64, all variants loaded in one process and interleaved request by request
  (random order per round) so machine noise hits them alike;
* peak RSS (VmHWM) and final RSS (VmRSS) and load time of a fresh process that imports
  TensorFlow only, loads the version through the TF1 loader and serves 50 batch-64
  requests, minus the same figures of a process that loads nothing (TF runtime + session);
  ``ru_maxrss`` is not used: after fork+exec it still includes the (large) parent's peak.

Usage: python benchmarks/serving.py [--sparsities 0.5 0.8 0.9] [--rounds 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsl_tf  # noqa: E402  (before tf.keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from export.servable import SessionServable, export_model  # noqa: E402

VARIANTS = {
    "dense": dict(fmt="dense"),
    "compact": dict(fmt="compact"),
    "compact-rebuild": dict(fmt="compact", item_matrix="rebuild"),
    "compact-f16": dict(fmt="compact", values="float16"),
}

_CHILD = r"""
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
path, users = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
start = time.perf_counter()
graph = tf.Graph()
sess = tf.compat.v1.Session(graph=graph)
with graph.as_default():
    if path != "-":
        mg = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        sig = mg.signature_def["serving_default"]
        fetch = [sig.outputs["item_ids"].name, sig.outputs["scores"].name]
        feed = sig.inputs["user_id"].name
    else:
        x = tf.compat.v1.placeholder(tf.int64, [None])
        fetch, feed = [x + 1], x
load = time.perf_counter() - start
for _ in range(50):
    sess.run(fetch, {feed: rng.integers(0, users, 64)})
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
# VmHWM / VmRSS belong to this process image (ru_maxrss would include the forked parent's)
print(load, int(status["VmHWM"].split()[0]) * 1024, int(status["VmRSS"].split()[0]) * 1024)
"""


class _Tower2(tf.keras.Model):
    def __init__(self, users: int, items: int, dim: int):
        super().__init__()
        norm = tf.keras.layers.UnitNormalization
        self.user_tower = tf.keras.Sequential([dsl_tf.MaskedEmbedding(users, dim, name="user_embedding"), norm()])
        self.item_tower = tf.keras.Sequential([dsl_tf.MaskedEmbedding(items, dim, name="item_embedding"), norm()])


def random_model(users: int, items: int, dim: int, sparsity: float, seed: int = 0) -> _Tower2:
    rng = np.random.default_rng(seed)
    model = _Tower2(users, items, dim)
    model.user_tower(tf.constant([0])), model.item_tower(tf.constant([0]))
    for layer in dsl_tf.masked_embeddings(model):
        size = layer.input_dim * dim
        mask = np.zeros(size, np.float32)
        mask[rng.permutation(size)[: int(round((1 - sparsity) * size))]] = 1.0
        mask = mask.reshape(layer.input_dim, dim)
        layer.mask.assign(mask)
        layer.embeddings.assign(rng.standard_normal(mask.shape).astype(np.float32) * 0.1 * mask)
    return model


def child(path: str, users: int) -> tuple[float, int, int]:
    """(load seconds, peak RSS, RSS after serving) of a fresh process."""
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(users)], capture_output=True,
                         text=True, check=True)
    load, peak, rss = out.stdout.split()[-3:]
    return float(load), int(peak), int(rss)


def latencies(servables: dict, users: int, batch: int, rounds: int) -> dict:
    rng = np.random.default_rng(batch)
    calls = {name: s.callable("serving_default") for name, s in servables.items()}
    for name, call in calls.items():  # warm up
        for _ in range(5):
            call(rng.integers(0, users, batch))
    times = {name: [] for name in calls}
    order = list(calls)
    for _ in range(rounds):
        random.shuffle(order)
        ids = rng.integers(0, users, batch)
        for name in order:
            start = time.perf_counter()
            calls[name](ids)
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.percentile(t, 50)) * 1e3, float(np.percentile(t, 99)) * 1e3)
            for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=29858)
    p.add_argument("--items", type=int, default=40981)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    p.add_argument("--rounds", type=int, default=200, help="interleaved requests per variant and batch size")
    p.add_argument("--rss-repeats", type=int, default=2, help="fresh processes per variant (min is kept)")
    p.add_argument("--out", help="keep the exports here (default: a temporary directory)")
    p.add_argument("--json", help="also write the results as JSON")
    args = p.parse_args(argv)
    random.seed(0)
    print("command: " + " ".join([Path(sys.executable).name, "benchmarks/serving.py"] + (argv or sys.argv[1:])))
    print(f"tables: {args.users} users, {args.items} items, dim {args.dim}; TF {tf.__version__}; "
          f"{args.rounds} interleaved requests per variant and batch size", flush=True)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsl_bench_serving_"))
    base = [child("-", args.users) for _ in range(args.rss_repeats)]
    base_peak, base_rss = min(b[1] for b in base), min(b[2] for b in base)
    print(f"baseline process (TF imported, empty session): peak RSS {base_peak / 2**20:.1f} MB, "
          f"after serving {base_rss / 2**20:.1f} MB", flush=True)
    results = []
    try:
        for s in args.sparsities:
            model = random_model(args.users, args.items, args.dim, s)
            exported = {}
            for name, kw in VARIANTS.items():
                exported[name] = export_model(model, root / f"s{s}", name, k=20, compare_dense=False,
                                              overwrite=True, version=1, **kw)
            servables = {name: SessionServable(r.path) for name, r in exported.items()}
            lat = {b: latencies(servables, args.users, b, args.rounds) for b in (1, 64)}
            for sess in servables.values():
                sess.close()
            peaks = {name: [] for name in exported}
            rss = {name: [] for name in exported}
            loads = {name: [] for name in exported}
            for _ in range(args.rss_repeats):
                for name in random.sample(list(exported), len(exported)):
                    load, peak, steady = child(str(exported[name].path), args.users)
                    peaks[name].append(peak)
                    rss[name].append(steady)
                    loads[name].append(load)
            dense = exported["dense"].bytes
            for name, r in exported.items():
                results.append({
                    "sparsity": s, "variant": name, "bytes": r.bytes, "bytes_ratio": r.bytes / dense,
                    **{f"p{q}_b{b}_ms": lat[b][name][i] for b in (1, 64) for i, q in enumerate((50, 99))},
                    **{f"p50_b{b}_ratio": lat[b][name][0] / lat[b]["dense"][0] for b in (1, 64)},
                    "peak_rss": min(peaks[name]), "peak_above_base": min(peaks[name]) - base_peak,
                    "rss": min(rss[name]), "rss_above_base": min(rss[name]) - base_rss,
                    "load_s": min(loads[name]),
                })
            for row in results[-len(exported):]:
                d = next(x for x in results[-len(exported):] if x["variant"] == "dense")
                row["peak_ratio"] = row["peak_above_base"] / d["peak_above_base"]
                row["rss_ratio"] = row["rss_above_base"] / d["rss_above_base"]
            print(f"  s={s}: done", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    header = (f"{'s':>4} {'variant':<16} {'MB':>6} {'/dense':>6} | {'b1 p50':>7} {'p99':>7} {'b64 p50':>8} "
              f"{'p99':>7} {'p50/dense b1':>12} {'b64':>5} | {'peak+':>6} {'/dense':>6} {'RSS+':>6} {'/dense':>6}"
              f" | {'load s':>6}")
    print("\nlatency in ms (TF1 session, serving_default, k=20); MB = version folder (1e6 bytes); "
          "peak+ / RSS+ = MiB of a fresh load+serve process's peak (VmHWM) / final (VmRSS) RSS above "
          "the empty-session baseline")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['sparsity']:>4} {r['variant']:<16} {r['bytes'] / 1e6:>6.2f} {r['bytes_ratio']:>6.3f} | "
              f"{r['p50_b1_ms']:>7.2f} {r['p99_b1_ms']:>7.2f} {r['p50_b64_ms']:>8.2f} {r['p99_b64_ms']:>7.2f} "
              f"{r['p50_b1_ratio']:>12.2f} {r['p50_b64_ratio']:>5.2f} | {r['peak_above_base'] / 2**20:>6.1f} "
              f"{r['peak_ratio']:>6.2f} {r['rss_above_base'] / 2**20:>6.1f} {r['rss_ratio']:>6.2f} | "
              f"{r['load_s']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline_peak": base_peak, "baseline_rss": base_rss, "rows": results}, indent=2))
    return {"baseline_peak": base_peak, "baseline_rss": base_rss, "rows": results}


if __name__ == "__main__":
    main()
