"""Step time of one Gowalla-sized embedding table per optimizer, dense and compact storage.

Model: one table (default 70,839 rows x 64 = Gowalla's 29,858 users + 40,981 items) whose
looked-up rows are regressed onto random targets (MSE), trained with ``model.fit``;
``--batch`` uniform random lookups per step, so the gradient is an ``IndexedSlices`` over
~``batch`` distinct rows. Variants run interleaved round-robin (chunks of ``--steps`` steps;
round 0 is a warm-up and is not timed) so machine noise hits all alike:

* dense ``tf.keras.layers.Embedding`` with Keras Adam (O(table) steps: it decays both moments
  and moves every row), ``dsl_tf.LazyAdam`` and Adagrad (O(batch));
* ``dsl_tf.CompactMaskedEmbedding`` at ``--sparsity`` (random layout) with Keras Adam (a dense
  ``[budget]`` gradient, as ``DynamicSparsity`` sets for it), ``LazyAdam`` and
  ``dsl_tf.CatchUpAdam`` (O(batch), Keras Adam's result: the forward pass reads the
  looked-up rows caught up). No exploration and no catch-up of the whole table is timed.

Usage: PYTHONPATH=. python benchmarks/optimizer_step.py [--rows 70839 --dim 64 --batch 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import dsl_tf
import tensorflow as tf
from dsl_tf import masks

OPTIMIZERS = {
    "Keras Adam": lambda: tf.keras.optimizers.Adam(1e-3),
    "LazyAdam": lambda: dsl_tf.LazyAdam(1e-3),
    "Adagrad": lambda: tf.keras.optimizers.Adagrad(1e-2),
    "CatchUpAdam": lambda: dsl_tf.CatchUpAdam(1e-3),
}
VARIANTS = [("dense", "Keras Adam"), ("dense", "LazyAdam"), ("dense", "Adagrad"), ("dense", "CatchUpAdam"),
            ("compact", "Keras Adam"), ("compact", "LazyAdam"), ("compact", "CatchUpAdam")]


def _model(rows: int, dim: int, storage: str, optimizer, sparsity: float) -> tf.keras.Model:
    ids = tf.keras.Input((), dtype="int32")
    init = tf.keras.initializers.RandomNormal(stddev=0.1, seed=0)
    if storage == "dense":
        table = tf.keras.layers.Embedding(rows, dim, embeddings_initializer=init)
    else:
        table = dsl_tf.CompactMaskedEmbedding(rows, dim, sparsity, growth_scores="none", embeddings_initializer=init)
        table.build(None)
        masks.install_positions(table, masks.initial_positions([rows * dim], [table.budget], 0)[0])
        table.use_dense_gradients(type(optimizer) is tf.keras.optimizers.Adam)  # as DynamicSparsity sets it
    model = tf.keras.Model(ids, table(ids))
    model.compile(optimizer, "mse")
    prepare = getattr(optimizer, "prepare", None)
    if prepare is not None:
        prepare(model)  # before the step is traced: compact tables read caught-up rows
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=70839)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--sparsity", type=float, default=0.8, help="of the compact tables")
    p.add_argument("--steps", type=int, default=50, help="steps per timed chunk")
    p.add_argument("--rounds", type=int, default=8, help="round-robin rounds")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    ids = rng.integers(0, args.rows, n).astype(np.int32)
    targets = rng.normal(size=(n, args.dim)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((ids, targets)).batch(args.batch).cache()
    models = {f"{storage} + {opt}": _model(args.rows, args.dim, storage, OPTIMIZERS[opt](), args.sparsity)
              for storage, opt in VARIANTS}
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds + 1):  # round 0 = warm-up (tracing), not timed
        for name, model in models.items():
            w0, c0 = time.perf_counter(), time.process_time()
            model.fit(ds, epochs=1, verbose=0)
            if r:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)

    timed = args.steps * args.rounds
    distinct = np.mean([len(np.unique(ids[s:s + args.batch])) for s in range(0, n, args.batch)])
    print(f"Table {args.rows:,} x {args.dim} (compact: s={args.sparsity}), batch {args.batch} lookups "
          f"(~{distinct:.0f} distinct rows), {args.rounds} rounds x {args.steps} steps, model.fit, TF {tf.__version__}")
    print("| table + optimizer | ms/step (wall, total) | ms/step (wall, median chunk) | CPU ms/step | "
          "wall vs dense + Keras Adam |")
    print("|---|---|---|---|---|")
    base = sum(wall["dense + Keras Adam"])
    for k in models:
        print(f"| {k} | {sum(wall[k]) / timed * 1e3:.2f} | {statistics.median(wall[k]) / args.steps * 1e3:.2f} | "
              f"{sum(cpu[k]) / timed * 1e3:.2f} | {sum(wall[k]) / base:.2f} |")


if __name__ == "__main__":
    main()
