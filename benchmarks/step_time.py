"""Step time of DSL vs dense training for the same model, side by side in one process.

Model: a two-tower retrieval model (user table, item table, in-batch softmax), trained
with Adam. Variants, interleaved round-robin so machine noise hits all of them alike:

* ``dense``: ``tf.keras.layers.Embedding`` tables, no callback;
* ``dsl``: ``dsl_tf.MaskedEmbedding`` tables + ``DynamicSparsity`` (gradient growth, score
  accumulation on), exploration every ``--interval`` steps *included* in the timing.

Usage: python benchmarks/step_time.py [--users 29858 --items 40981 --dim 64 --batch 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import dsl_tf
import tensorflow as tf


class _TwoTower(tf.keras.Model):
    def __init__(self, users: int, items: int, dim: int, masked: bool):
        super().__init__()
        layer = dsl_tf.MaskedEmbedding if masked else tf.keras.layers.Embedding
        init = tf.keras.initializers.RandomNormal(stddev=0.1, seed=0)
        self.user = layer(users, dim, embeddings_initializer=init)
        self.item = layer(items, dim, embeddings_initializer=init)

    def call(self, inputs):
        u, i = inputs
        return tf.matmul(self.user(u), self.item(i), transpose_b=True)


def _build(args, masked: bool):
    model = _TwoTower(args.users, args.items, args.dim, masked)
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(tf.keras.optimizers.Adam(1e-3), loss)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=29858)
    p.add_argument("--items", type=int, default=40981)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50, help="steps per timed chunk")
    p.add_argument("--rounds", type=int, default=16, help="round-robin rounds")
    p.add_argument("--interval", type=int, default=100, help="DSL exploration interval ΔT")
    p.add_argument("--sparsity", type=float, default=0.8)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    u = rng.integers(0, args.users, n)
    i = rng.integers(0, args.items, n)
    labels = np.tile(np.arange(args.batch), args.steps)
    ds = tf.data.Dataset.from_tensor_slices(((u, i), labels)).batch(args.batch).cache()
    total_steps = args.steps * (args.rounds + 1)
    models = {"dense": _build(args, False), "dsl": _build(args, True)}
    callbacks = {
        "dense": [],
        "dsl": [dsl_tf.DynamicSparsity(args.sparsity, update_interval=args.interval, end_step=total_steps * 10)],
    }
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds + 1):  # round 0 = warm-up (tracing), not timed
        for name, model in models.items():
            w0, c0 = time.perf_counter(), time.process_time()
            model.fit(ds, epochs=1, verbose=0, callbacks=callbacks[name])
            if r:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    dsl_cb = callbacks["dsl"][0]
    timed_steps = args.steps * args.rounds
    print(f"tables {args.users}x{args.dim} + {args.items}x{args.dim}, batch {args.batch}, Adam, "
          f"s={args.sparsity}, ΔT={args.interval}, {args.rounds} rounds x {args.steps} steps, "
          f"explorations in the DSL run: {len(dsl_cb.explorations)}, mean "
          f"{statistics.mean(e['dsl_seconds'] for e in dsl_cb.explorations):.2f} s each")
    print("| variant | ms/step (wall, total) | ms/step (wall, median chunk) | CPU ms/step (total) |")
    print("|---|---|---|---|")
    for k in models:
        print(f"| {k} | {sum(wall[k]) / timed_steps * 1e3:.1f} | "
              f"{statistics.median(wall[k]) / args.steps * 1e3:.1f} | {sum(cpu[k]) / timed_steps * 1e3:.1f} |")
    print(f"ratio dsl/dense: wall total {sum(wall['dsl']) / sum(wall['dense']):.3f}, "
          f"wall median {statistics.median(wall['dsl']) / statistics.median(wall['dense']):.3f}, "
          f"CPU total {sum(cpu['dsl']) / sum(cpu['dense']):.3f}")


if __name__ == "__main__":
    main()
