"""Training memory and step time of every table storage × optimizer, side by side in one process.

Gowalla-sized tables (29,858 users + 40,981 items × 64 by default). Models:

* ``two_tower``: user · item logits over the batch's items, in-batch softmax;
* ``mf_bpr``: BPR on (user, positive, negative) triples (three lookups per example).

Variants (``DynamicSparsity`` with gradient growth on every sparse one, explorations every
``--interval`` steps *included* in the timing):

* ``dense+adam``: ``tf.keras.layers.Embedding`` + Keras Adam (the reference, 12 B/entry);
* ``dense+lazy``: ``Embedding`` + ``dsl_tf.LazyAdam`` (the fair dense baseline);
* ``masked+adam``: ``MaskedEmbedding`` (table + mask + scores) + Keras Adam (dsl-tf before compact storage);
* ``compact+adam``: ``CompactMaskedEmbedding`` (exact scores) + Keras Adam (``trainers/train.py --method dsl``);
* ``compact+lazy``: ``CompactMaskedEmbedding`` (exact scores) + LazyAdam (``--optimizer lazy_adam``);
* ``compact+catchup``: ``CompactMaskedEmbedding`` (exact scores) + ``dsl_tf.CatchUpAdam`` (O(batch) steps that
  equal Keras Adam's; ``--optimizer catch_up_adam``; each ``fit`` ends with a whole-table catch-up, timed);
* ``int8+lazy``: ``CompactMaskedEmbedding(growth_scores="int8")`` + LazyAdam (scores in a byte per entry);
* ``window+lazy``: ``CompactMaskedEmbedding(growth_scores="window")`` + LazyAdam (no table-sized scores).

State bytes = every model and optimizer variable after the first step. Timing: ``--rounds``
round-robin rounds of ``--steps`` steps per variant (round 0, tracing, not timed).

    PYTHONPATH=. python benchmarks/training_cost.py --json docs/results/training_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsl_tf  # noqa: E402  (must precede tf.keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainers.train import OPTIMIZERS  # noqa: E402  (the classes `trainers/train.py --optimizer` uses)

VARIANTS = ("dense+adam", "dense+lazy", "masked+adam", "compact+adam", "compact+lazy", "compact+catchup", "int8+lazy",
            "window+lazy")
OPTIMIZER_OF = {"adam": "adam", "lazy": "lazy_adam", "catchup": "catch_up_adam"}
"""A variant's optimizer (its name after ``+``) as ``trainers/train.py --optimizer``."""


def _table(variant: str, rows: int, dim: int, sparsity: float, name: str) -> tf.keras.layers.Layer:
    init = tf.keras.initializers.RandomNormal(stddev=0.1, seed=0)
    storage = variant.split("+")[0]
    if storage == "dense":
        return tf.keras.layers.Embedding(rows, dim, embeddings_initializer=init, name=name)
    if storage == "masked":
        return dsl_tf.MaskedEmbedding(rows, dim, embeddings_initializer=init, name=name)
    scores = storage if storage in ("window", "int8") else "dense"
    return dsl_tf.CompactMaskedEmbedding(rows, dim, sparsity=sparsity, growth_scores=scores,
                                         embeddings_initializer=init, name=name)


class _Model(tf.keras.Model):
    def __init__(self, kind: str, variant: str, args, sparsity: float):
        super().__init__()
        self.kind = kind
        self.user = _table(variant, args.users, args.dim, sparsity, "user")
        self.item = _table(variant, args.items, args.dim, sparsity, "item")

    def call(self, inputs):
        if self.kind == "two_tower":
            u, i = inputs
            return tf.matmul(self.user(u), self.item(i), transpose_b=True)
        u, pos, neg = inputs
        user = self.user(u)
        return tf.reduce_sum(user * (self.item(pos) - self.item(neg)), -1, keepdims=True)


def _data(kind: str, args) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    u, i, j = rng.integers(0, args.users, n), rng.integers(0, args.items, n), rng.integers(0, args.items, n)
    if kind == "two_tower":
        return tf.data.Dataset.from_tensor_slices(((u, i), np.tile(np.arange(args.batch), args.steps)))
    return tf.data.Dataset.from_tensor_slices(((u, i, j), np.ones((n, 1), np.float32)))


def _compile(model: _Model, kind: str, variant: str) -> None:
    optimizer = OPTIMIZERS[OPTIMIZER_OF[variant.split("+")[1]]](1e-3)
    loss = (tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True) if kind == "two_tower"
            else tf.keras.losses.BinaryCrossentropy(from_logits=True))
    model.compile(optimizer, loss)


def _state_bytes(model: tf.keras.Model) -> int:
    held = list(model.variables) + list(model.optimizer.variables)
    return sum(v.shape.num_elements() * v.dtype.size for v in {id(v): v for v in held}.values())


def measure(kind: str, args) -> dict:
    ds = _data(kind, args).batch(args.batch).cache()
    variants = args.variants
    total = args.steps * (args.rounds + 1)
    state: dict = {}
    for sparsity in args.sparsities:  # memory: build, one step, count
        for variant in variants:
            model = _Model(kind, variant, args, sparsity)
            _compile(model, kind, variant)
            callbacks = [] if variant.startswith("dense") else [
                dsl_tf.DynamicSparsity(sparsity, update_interval=10**9, end_step=10**9 + 1)]
            model.fit(ds.take(1), epochs=1, verbose=0, callbacks=callbacks)
            state[f"{variant}@{sparsity}"] = _state_bytes(model)
    entries = (args.users + args.items) * args.dim
    models, callbacks = {}, {}
    for variant in variants:  # time at the main sparsity
        models[variant] = _Model(kind, variant, args, args.sparsity)
        _compile(models[variant], kind, variant)
        callbacks[variant] = [] if variant.startswith("dense") else [
            dsl_tf.DynamicSparsity(args.sparsity, update_interval=args.interval, end_step=total * 10)]
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds + 1):
        for variant, model in models.items():
            w0, c0 = time.perf_counter(), time.process_time()
            model.fit(ds, epochs=1, verbose=0, callbacks=callbacks[variant])
            if r:
                wall[variant].append(time.perf_counter() - w0)
                cpu[variant].append(time.process_time() - c0)
    steps = args.steps * args.rounds
    ref_wall, ref_cpu = sum(wall["dense+adam"]), sum(cpu["dense+adam"])
    return {
        "kind": kind,
        "entries": entries,
        "state_bytes": state,
        "state_ratio_vs_dense_adam": {k: v / state[f"dense+adam@{k.split('@')[1]}"] for k, v in state.items()},
        "ms_per_step_wall": {v: sum(wall[v]) / steps * 1e3 for v in variants},
        "ms_per_step_cpu": {v: sum(cpu[v]) / steps * 1e3 for v in variants},
        "ms_per_step_wall_median_chunk": {v: statistics.median(wall[v]) / args.steps * 1e3 for v in variants},
        "wall_ratio_vs_dense_adam": {v: sum(wall[v]) / ref_wall for v in variants},
        "cpu_ratio_vs_dense_adam": {v: sum(cpu[v]) / ref_cpu for v in variants},
        "explorations": {v: len(callbacks[v][0].explorations) for v in variants if callbacks[v]},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mf_bpr", "two_tower"], choices=["mf_bpr", "two_tower"])
    p.add_argument("--users", type=int, default=29858)
    p.add_argument("--items", type=int, default=40981)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50, help="steps per timed chunk")
    p.add_argument("--rounds", type=int, default=6, help="round-robin rounds")
    p.add_argument("--interval", type=int, default=100, help="ΔT (explorations are timed)")
    p.add_argument("--sparsity", type=float, default=0.8, help="sparsity of the timed runs")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9], help="for the memory table")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="variants to measure (dense+adam, the reference, always)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = ["dense+adam"] + [v for v in dict.fromkeys(args.variants) if v != "dense+adam"]
    results = {"command": "PYTHONPATH=. python benchmarks/training_cost.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
               "args": vars(args), "models": {}}
    for kind in args.models:
        results["models"][kind] = measure(kind, args)
        if args.json:  # keep what is measured as it arrives
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        r = results["models"][kind]
        print(f"\n## {kind}: {r['entries']:,} table entries, batch {args.batch}, s={args.sparsity} "
              f"(timing), ΔT={args.interval}")
        print("| variant | " + " | ".join(f"state / dense+adam @ s={s}" for s in args.sparsities)
              + " | ms/step wall | ms/step CPU | wall / dense+adam | CPU / dense+adam |")
        print("|---" * (5 + len(args.sparsities)) + "|")
        for v in args.variants:
            ratios = " | ".join(f"{r['state_ratio_vs_dense_adam'][f'{v}@{s}']:.3f}" for s in args.sparsities)
            print(f"| {v} | {ratios} | {r['ms_per_step_wall'][v]:.1f} | {r['ms_per_step_cpu'][v]:.1f} | "
                  f"{r['wall_ratio_vs_dense_adam'][v]:.3f} | {r['cpu_ratio_vs_dense_adam'][v]:.3f} |")
    return results


if __name__ == "__main__":
    main()
