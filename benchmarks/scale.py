"""Train a table too large for dense Embedding + Adam on this machine (compact storage).

A ``dsl_tf.CompactMaskedEmbedding`` of ``--rows`` × ``--dim`` at ``--sparsity`` with
window growth scores and ``dsl_tf.LazyAdam``, dotted with a small item table, trained on
random (user, item, label) triples with ``DynamicSparsity`` for ``--explorations``
intervals of ``--interval`` steps. Prints and writes (``--json``) rows, entries, state
bytes (every model + optimizer variable) against dense Embedding + Adam's 12 bytes per
entry, peak RSS, median step time and each exploration's wall and CPU seconds.

    PYTHONPATH=. python benchmarks/scale.py --rows 40000000 --json docs/results/scale_40m.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsl_tf  # noqa: E402  (must precede tf.keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class _StepTimer(tf.keras.callbacks.Callback):
    """Wall seconds of each training step (explorations happen after the step ends, in the
    callback after this one) and the resident memory before each exploration."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.rss_gib: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.rss_gib.append(_rss_gib())
        self.cpu_before_dsl = time.process_time()


class _ExplorationCpu(tf.keras.callbacks.Callback):
    """CPU seconds (every thread of the process) of each exploration: placed after the
    ``DynamicSparsity`` callback, it reads the CPU clock the step timer took before it."""

    def __init__(self, timer: _StepTimer, dsl: dsl_tf.DynamicSparsity):
        super().__init__()
        self.timer, self.dsl, self.seconds = timer, dsl, []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.dsl.explorations) > len(self.seconds):
            self.seconds.append(time.process_time() - self.timer.cpu_before_dsl)


def _rss_gib() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=40_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--interval", type=int, default=20, help="ΔT, steps between explorations")
    p.add_argument("--explorations", type=int, default=2)
    p.add_argument("--growth-scores", default="window", choices=["window", "none"])
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)

    start = time.perf_counter()
    users = dsl_tf.CompactMaskedEmbedding(args.rows, args.dim, sparsity=args.sparsity,
                                          growth_scores=args.growth_scores, name="users")
    items = tf.keras.layers.Embedding(args.items, args.dim, name="items")
    u, i = tf.keras.Input((), dtype="int64"), tf.keras.Input((), dtype="int64")
    logits = tf.reduce_sum(users(u) * items(i), axis=-1, keepdims=True)
    model = tf.keras.Model([u, i], logits)
    model.compile(dsl_tf.LazyAdam(0.01), tf.keras.losses.BinaryCrossentropy(from_logits=True))
    build_seconds = time.perf_counter() - start

    def triples(seed):
        rng = tf.random.stateless_uniform
        s = tf.random.experimental.stateless_split(tf.stack([seed, 0]), 3)
        uid = rng([args.batch], s[0], 0, args.rows, tf.int64)
        iid = rng([args.batch], s[1], 0, args.items, tf.int64)
        label = tf.cast(rng([args.batch, 1], s[2]) < 0.5, tf.float32)
        return (uid, iid), label

    steps = args.interval * args.explorations + 1
    data = tf.data.Dataset.range(steps).map(triples).prefetch(2)
    dsl = dsl_tf.DynamicSparsity(args.sparsity, update_interval=args.interval, end_step=steps + 1,
                                 growth="gradient" if args.growth_scores == "window" else "random", verbose=1)
    timer = _StepTimer()
    exploration_cpu = _ExplorationCpu(timer, dsl)
    model.fit(data, epochs=1, verbose=0, callbacks=[timer, dsl, exploration_cpu])

    slots = [s for v in model.trainable_variables for s in dsl_tf.masks.optimizer_slots(model.optimizer, v)]
    table_vars = users.weights + [s for s in slots if s.shape == users.values.shape]
    state = sum(v.shape.num_elements() * v.dtype.size for v in table_vars)
    entries = args.rows * args.dim
    result = {
        "command": "PYTHONPATH=. python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows, "dim": args.dim, "entries": entries, "sparsity": args.sparsity,
        "budget": users.budget, "growth_scores": args.growth_scores, "score_capacity": users.score_capacity,
        "table_state_bytes": state, "dense_adam_state_bytes": 12 * entries,
        "state_ratio_vs_dense_adam": state / (12 * entries),
        "peak_rss_gib": _peak_rss_gib(),
        "rss_before_explorations_gib": [timer.rss_gib[i * args.interval - 1] for i in range(1, args.explorations + 1)],
        "exploration_peak_over_state": (_peak_rss_gib() - timer.rss_gib[args.interval - 1]) * 2**30 / state,
        "build_seconds": build_seconds,
        "steps": len(timer.seconds),
        "median_step_seconds": float(np.median(timer.seconds[1:])),
        "exploration_seconds": [e["dsl_seconds"] for e in dsl.explorations],
        "exploration_cpu_seconds": exploration_cpu.seconds,
        "swapped": [e["dsl_num_swapped"] for e in dsl.explorations],
        "active": dsl_tf.masks.active_count(users),
        "wall_seconds": time.perf_counter() - start,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
