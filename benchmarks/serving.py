"""Compact vs dense TF Serving exports: bytes, peak RSS of a loaded servable, latency, CPU time.

Models (``--backbone``), random tables with exact-budget random masks at each sparsity s:

* ``two_tower``: Gowalla-sized towers (29,858 users, 40,981 items, dim 64, each a
  ``MaskedEmbedding`` + L2 normalisation like ``trainers.models.TwoTower``);
* ``lightgcn``: ``trainers.models.LightGCN`` (3 layers) on a random graph with Gowalla's
  number of training interactions (810,128 by default).

Variants, exported with ``export.export_model``:

* ``dense``             dense float32 tables (the baseline every ratio is against);
* ``compact``           compact float32, the default: a dense float32 item matrix built once at
                        load from the compact item table (``item_matrix="cache"``);
* ``compact-sparse``    compact float32, retrieval multiplies straight from the compact item
                        table (``item_matrix="sparse"``), no dense item matrix;
* ``compact-rebuild``   compact float32, dense item matrix built on every request;
* ``compact-f16``       compact float16 values, default scoring.

(``lightgcn``: ``dense`` stores the final propagated vectors, ``compact`` the compact base
tables + the graph, propagated once at load; the item-matrix options do not apply.)

Measured per variant:

* bytes of the version folder (saved_model.pb + variables/ + assets.extra/);
* in a fresh process per variant (TensorFlow imported, the version loaded with the TF1
  loader as TF Serving does, then 30 batch-64 ``serving_default`` requests): load seconds,
  peak RSS (VmHWM), RSS right after the load (before any request) and final RSS (VmRSS) minus
  those of a process that loads nothing, and
  the process CPU seconds (user + system, all threads) per batch-64 request — the cost of
  scoring every item;
* the same in a *warm* process, as a server that already serves a model: it first loads a small
  servable of the same backbone and variant (1,000 users × 1,000 items) and serves 3 batch-64
  requests with it, then the peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) of
  loading and serving the measured version, minus the RSS before it: what one more model of this
  size costs a running server, without the once-per-process runtime pages (``peak_added_warm``);
* p50/p99 latency of ``serving_default`` (k=20) at batch 1 and 64 through a TF1 ``Session``
  (``Session.make_callable``), all variants of a sparsity loaded in one process and
  interleaved request by request in random order, so machine noise hits them alike.

Results go to ``--json`` after every variant: a rerun with the same ``--json`` and ``--out``
skips what is there (resumable). ``--quick``: small tables, one sparsity, few requests.
``--bytes-only``: export the variants and print the version folders' bytes per stored array
(no loading, timing or RSS; nothing written to ``--json``).

    python benchmarks/serving.py --json docs/serving.json --out /tmp/dsl_bench_serving
    python benchmarks/serving.py --backbone lightgcn --sparsities 0.8 --json /tmp/lgcn.json --out /tmp/dsl_lgcn
    python benchmarks/serving.py --quick --json /tmp/q.json --out /tmp/q
    python benchmarks/serving.py --backbone lightgcn --bytes-only --variants dense compact --out /tmp/dsl_lgcn
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsl_tf  # noqa: E402  (before tf.keras)
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import tensorflow as tf  # noqa: E402

from export.servable import SessionServable, export_model  # noqa: E402

VARIANTS = {
    "dense": dict(fmt="dense"),
    "compact": dict(fmt="compact"),
    "compact-sparse": dict(fmt="compact", item_matrix="sparse"),
    "compact-rebuild": dict(fmt="compact", item_matrix="rebuild"),
    "compact-f16": dict(fmt="compact", values="float16"),
}
GRAPH_VARIANTS = ("dense", "compact", "compact-f16")
GOWALLA_INTERACTIONS = 810_128
WARM_SIZE = 1_000
"""Users and items of the servable a warm process serves before the measured one."""

_CHILD = r"""
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
path, users, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
warm, warm_users = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 4 else (None, 0)
rng = np.random.default_rng(0)
def status():
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
            if k in ("VmHWM", "VmRSS")}
before = 0
if warm:  # a server already serving a model: its runtime pages are in
    wgraph = tf.Graph()
    wsess = tf.compat.v1.Session(graph=wgraph)
    with wgraph.as_default():
        wsig = tf.compat.v1.saved_model.loader.load(wsess, ["serve"], warm).signature_def["serving_default"]
    for _ in range(3):
        wsess.run(wsig.outputs["item_ids"].name, {wsig.inputs["user_id"].name: rng.integers(0, warm_users, 64)})
    before = status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
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
loaded = status()["VmRSS"]
sess.run(fetch, {feed: rng.integers(0, users, 64)})
cpu = time.process_time()  # all threads of this process
for _ in range(requests):
    sess.run(fetch, {feed: rng.integers(0, users, 64)})
cpu_per_request = (time.process_time() - cpu) / requests
end = status()
# VmHWM / VmRSS belong to this process image (ru_maxrss would include the forked parent's)
print(load, end["VmHWM"] - before, end["VmRSS"] - before, cpu_per_request, loaded - before)
"""


def _random_masks(model, sparsity: float, rng: np.random.Generator) -> None:
    for layer in dsl_tf.masked_embeddings(model):
        size = layer.input_dim * layer.output_dim
        mask = np.zeros(size, np.float32)
        mask[rng.permutation(size)[: int(round((1 - sparsity) * size))]] = 1.0
        mask = mask.reshape(layer.input_dim, layer.output_dim)
        layer.mask.assign(mask)
        layer.embeddings.assign(rng.standard_normal(mask.shape).astype(np.float32) * 0.1 * mask)


class _Tower2(tf.keras.Model):
    def __init__(self, users: int, items: int, dim: int):
        super().__init__()
        norm = tf.keras.layers.UnitNormalization
        self.user_tower = tf.keras.Sequential([dsl_tf.MaskedEmbedding(users, dim, name="user_embedding"), norm()])
        self.item_tower = tf.keras.Sequential([dsl_tf.MaskedEmbedding(items, dim, name="item_embedding"), norm()])


def random_model(backbone: str, users: int, items: int, dim: int, sparsity: float, interactions: int,
                 seed: int = 0):
    """``(model, training CSR or None)`` with random tables and exact-budget random masks."""
    rng = np.random.default_rng(seed)
    if backbone == "two_tower":
        model = _Tower2(users, items, dim)
        model.user_tower(tf.constant([0])), model.item_tower(tf.constant([0]))
        _random_masks(model, sparsity, rng)
        return model, None
    from trainers.models import build_model

    flat = np.unique(rng.integers(0, users * items, size=interactions))
    train = sp.csr_matrix((np.ones(len(flat), np.float32), (flat // items, flat % items)), shape=(users, items))
    model = build_model("lightgcn", users, items, dim=dim)
    model.attach(train)
    model.user_table(tf.constant([0])), model.item_table(tf.constant([0]))
    _random_masks(model, sparsity, rng)
    return model, train


def child(path: str, users: int, requests: int, warm: str | None = None) -> tuple[float, int, int, float, int]:
    """(load seconds, peak RSS, RSS after serving, CPU seconds per batch-64 request, RSS right after
    the load, before any request) of a fresh process; with ``warm`` (a servable's path) the process
    first loads and serves that one, and the RSS figures are above the RSS it then had."""
    warm_args = [warm, str(WARM_SIZE)] if warm else []
    out = subprocess.run([sys.executable, "-c", _CHILD, path, str(users), str(requests)] + warm_args,
                         capture_output=True, text=True, check=True)
    load, peak, rss, cpu, loaded = out.stdout.split()[-5:]
    return float(load), int(peak), int(rss), float(cpu), int(loaded)


def stored_bytes(path: Path) -> dict:
    """Bytes of a version folder: each stored array (from the checkpoint) and each file."""
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    arrays = {name.split("/.ATTRIBUTES")[0]: int(np.prod(shape)) * reader.get_variable_to_dtype_map()[name].size
              for name, shape in reader.get_variable_to_shape_map().items() if "/.ATTRIBUTES" in name}
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    return {"arrays": arrays, "files": files, "total": sum(files.values())}


def bytes_report(exported: dict) -> str:
    """Each variant's bytes per stored array and file, and its ratio to ``dense``."""
    sizes = {name: stored_bytes(result.path) for name, result in exported.items()}
    dense = sizes.get("dense", {}).get("total")
    lines = []
    for name, size in sizes.items():
        ratio = f" = {size['total'] / dense:.4f} of dense" if dense else ""
        lines.append(f"{name}: {size['total']:,} bytes{ratio}")
        for key, value in {**size["arrays"], **size["files"]}.items():
            lines.append(f"    {key:<60} {value:>12,}" + (f"  ({value / dense:.4f})" if dense else ""))
    return "\n".join(lines)


def latencies(servables: dict, users: int, batch: int, rounds: int) -> dict:
    rng = np.random.default_rng(batch)
    calls = {name: s.callable("serving_default") for name, s in servables.items()}
    for call in calls.values():  # warm up
        for _ in range(3):
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


def _ratios(rows: list[dict]) -> None:
    """Every row's figures relative to the dense row of its backbone and sparsity."""
    for row in rows:
        dense = next((r for r in rows if r["variant"] == "dense" and r["sparsity"] == row["sparsity"]
                      and r["backbone"] == row["backbone"]), None)
        if dense is None:
            continue
        for key in ("bytes", "peak_above_base", "rss_above_base", "loaded_above_base", "cpu_per_request_b64",
                    "p50_b1_ms", "p50_b64_ms", "load_s", "peak_added_warm", "rss_added_warm"):
            if key in row and key in dense:  # rows of older runs lack the newer figures
                row[f"{key}_ratio"] = row[key] / dense[key] if dense[key] else float("nan")


def _export(model, train, args, sparsity: float, name: str, folder: str | None = None):
    kw = {key: value for key, value in VARIANTS[name].items() if args.backbone == "two_tower" or key != "item_matrix"}
    return export_model(model, Path(args.out) / args.backbone / (folder or f"s{sparsity}"), name, k=20,
                        compare_dense=False, overwrite=True, version=1, interactions=train, **kw)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("two_tower", "lightgcn"), default="two_tower")
    p.add_argument("--users", type=int, default=29858)
    p.add_argument("--items", type=int, default=40981)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--interactions", type=int, default=GOWALLA_INTERACTIONS, help="lightgcn: training edges")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: all that apply")
    p.add_argument("--rounds", type=int, default=200, help="interleaved requests per variant and batch size")
    p.add_argument("--requests", type=int, default=30, help="batch-64 requests of the RSS / CPU process")
    p.add_argument("--rss-repeats", type=int, default=2, help="fresh processes per variant (min is kept)")
    p.add_argument("--out", default="/tmp/dsl_bench_serving", help="exports (kept, for resuming)")
    p.add_argument("--json", help="results file (read first: present rows are skipped); required unless --bytes-only")
    p.add_argument("--bytes-only", action="store_true", help="print the version folders' bytes per stored array only")
    p.add_argument("--quick", action="store_true", help="2,000 users x 3,000 items x 32, s=0.8, 20 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.items, args.dim, args.interactions = 2000, 3000, 32, 20000
        args.sparsities, args.rounds, args.requests, args.rss_repeats = [0.8], 20, 5, 1
    variants = args.variants or [v for v in VARIANTS if args.backbone == "two_tower" or v in GRAPH_VARIANTS]
    if args.bytes_only:
        for s in args.sparsities:
            model, train = random_model(args.backbone, args.users, args.items, args.dim, s, args.interactions)
            exported = {name: _export(model, train, args, s, name) for name in variants}
            print(f"s={s}\n" + bytes_report(exported), flush=True)
        return {}
    if args.json is None:
        p.error("--json is required (unless --bytes-only)")
    random.seed(0)
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.exists() else {"rows": []}
    rows = saved["rows"]
    print("command: " + " ".join([Path(sys.executable).name, "benchmarks/serving.py"] + (argv or sys.argv[1:])))
    print(f"{args.backbone}: {args.users} users, {args.items} items, dim {args.dim}; TF {tf.__version__}", flush=True)
    if "baseline_loaded" not in saved:
        base = [child("-", args.users, args.requests) for _ in range(args.rss_repeats)]
        saved["baseline_peak"], saved["baseline_rss"] = min(b[1] for b in base), min(b[2] for b in base)
        saved["baseline_loaded"] = min(b[4] for b in base)
    for s in args.sparsities:
        done = {r["variant"] for r in rows if r["sparsity"] == s and r["backbone"] == args.backbone}
        todo = [v for v in variants if v not in done]
        if not todo:
            continue
        model, train = random_model(args.backbone, args.users, args.items, args.dim, s, args.interactions)
        exported = {name: _export(model, train, args, s, name) for name in todo}
        small = random_model(args.backbone, WARM_SIZE, WARM_SIZE, args.dim, s, WARM_SIZE * 20, seed=1)
        warm = {name: _export(*small, args, s, name, f"warm_s{s}").path for name in todo}
        servables = {name: SessionServable(r.path) for name, r in exported.items()}
        lat = {b: latencies(servables, args.users, b, args.rounds) for b in (1, 64)}
        for session in servables.values():
            session.close()
        for name in random.sample(todo, len(todo)):
            runs = [child(str(exported[name].path), args.users, args.requests) for _ in range(args.rss_repeats)]
            warm_runs = [child(str(exported[name].path), args.users, args.requests, str(warm[name]))
                         for _ in range(args.rss_repeats)]
            rows.append({
                "backbone": args.backbone, "sparsity": s, "variant": name, "bytes": exported[name].bytes,
                **{f"p{q}_b{b}_ms": lat[b][name][i] for b in (1, 64) for i, q in enumerate((50, 99))},
                "peak_above_base": min(r[1] for r in runs) - saved["baseline_peak"],
                "rss_above_base": min(r[2] for r in runs) - saved["baseline_rss"],
                "loaded_above_base": min(r[4] for r in runs) - saved["baseline_loaded"],
                "peak_added_warm": min(r[1] for r in warm_runs), "rss_added_warm": min(r[2] for r in warm_runs),
                "load_s": min(r[0] for r in runs), "cpu_per_request_b64": min(r[3] for r in runs),
                "sizes": [args.users, args.items, args.dim], "tensorflow": tf.__version__,
            })
            _ratios(rows)
            path.write_text(json.dumps(saved, indent=2))
            print(f"  s={s} {name}: done", flush=True)
    _ratios(rows)
    path.write_text(json.dumps(saved, indent=2))
    header = (f"{'backbone':<9} {'s':>4} {'variant':<16} {'MB':>6} {'/dense':>6} | {'b1 p50':>7} {'/dense':>6} "
              f"{'b64 p50':>8} {'/dense':>6} | {'peak+MB':>7} {'/dense':>6} | {'cpu b64':>7} {'/dense':>6} | "
              f"{'load s':>6} | {'warm+MB':>7} {'/dense':>6}")
    print("\nlatency ms (TF1 session, serving_default, k=20, interleaved); MB = version folder (1e6 bytes); "
          "peak+ = MiB of a fresh load+serve process's peak RSS above an empty session's; cpu b64 = process CPU s "
          "per batch-64 request; warm+ = MiB of peak RSS a load+serve adds to a process already serving a model")
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["backbone"], r["sparsity"], list(VARIANTS).index(r["variant"]))):
        print(f"{r['backbone']:<9} {r['sparsity']:>4} {r['variant']:<16} {r['bytes'] / 1e6:>6.2f} "
              f"{r.get('bytes_ratio', float('nan')):>6.3f} | {r['p50_b1_ms']:>7.2f} "
              f"{r.get('p50_b1_ms_ratio', float('nan')):>6.2f} {r['p50_b64_ms']:>8.2f} "
              f"{r.get('p50_b64_ms_ratio', float('nan')):>6.2f} | {r['peak_above_base'] / 2**20:>7.1f} "
              f"{r.get('peak_above_base_ratio', float('nan')):>6.2f} | {r['cpu_per_request_b64']:>7.4f} "
              f"{r.get('cpu_per_request_b64_ratio', float('nan')):>6.2f} | {r['load_s']:>6.2f} | "
              f"{r.get('peak_added_warm', float('nan')) / 2**20:>7.1f} {r.get('peak_added_warm_ratio', float('nan')):>6.2f}")
    return saved


if __name__ == "__main__":
    main()
