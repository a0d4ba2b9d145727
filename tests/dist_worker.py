"""Worker script of the tf.distribute tests (run in its own process).

usage: dist_worker.py mirrored|multiworker OUT.npz [dense|compact]  (TF_CONFIG set by the test)
Trains a small two-table model (MaskedEmbedding or CompactMaskedEmbedding tables) with
DynamicSparsity under the strategy and saves every replica's mask and table, plus the
growth-score check, to OUT.npz.
"""

import sys

import numpy as np

import dsl_tf  # noqa: F401
import tensorflow as tf

kind, out = sys.argv[1], sys.argv[2]
storage = sys.argv[3] if len(sys.argv) > 3 else "dense"
if kind == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
else:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

tf.keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
users, items = rng.integers(0, 50, 640), rng.integers(0, 80, 640)
labels = (rng.random(640) < 0.5).astype(np.float32)
ds = tf.data.Dataset.from_tensor_slices(((users, items), labels)).batch(32)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
ds = ds.with_options(options)

with strategy.scope():
    u = tf.keras.Input((), dtype="int64")
    i = tf.keras.Input((), dtype="int64")
    if storage == "compact":
        ue = dsl_tf.CompactMaskedEmbedding(50, 8, sparsity=0.75, name="users")
        ie = dsl_tf.CompactMaskedEmbedding(80, 8, sparsity=0.75, name="items")
    else:
        ue = dsl_tf.MaskedEmbedding(50, 8, name="users")
        ie = dsl_tf.MaskedEmbedding(80, 8, name="items")
    logit = tf.reduce_sum(ue(u) * ie(i), axis=-1, keepdims=True)
    model = tf.keras.Model([u, i], logit)
    model.compile(tf.keras.optimizers.Adam(0.05), tf.keras.losses.BinaryCrossentropy(from_logits=True))

scores_seen = {}


class ScoreCheck(tf.keras.callbacks.Callback):
    """Just before the step-6 exploration: the score read = sum of the replica components."""

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 5:
            reduced = tf.convert_to_tensor(ie.growth_scores).numpy()
            parts = [v.numpy() for v in ie.growth_scores.values]
            scores_seen["reduced"], scores_seen["parts_sum"] = reduced, np.sum(parts, axis=0)


dsl = dsl_tf.DynamicSparsity(0.75, update_interval=6, seed=3)
model.fit(ds, epochs=3, verbose=0, callbacks=[ScoreCheck(), dsl])
result = {"explorations": np.array(len(dsl.explorations))}


def replica_tables(layer) -> tuple[np.ndarray, np.ndarray]:
    """Every replica's (mask, table), from its own components of the layer's variables."""
    if storage == "dense":
        return (np.stack([v.numpy() for v in layer.mask.values]),
                np.stack([v.numpy() for v in layer.embeddings.values]))
    found_masks, found_tables = [], []
    for splits, cols, values in zip(layer.row_splits.values, layer.col_ids.values, layer.values.values):
        rows = tf.ragged.row_splits_to_segment_ids(splits, out_type=tf.int64).numpy()
        mask, table = np.zeros((layer.input_dim, layer.output_dim)), np.zeros((layer.input_dim, layer.output_dim))
        mask[rows, cols.numpy()] = 1.0
        table[rows, cols.numpy()] = values.numpy()
        found_masks.append(mask)
        found_tables.append(table)
    return np.stack(found_masks), np.stack(found_tables)


for layer in (ue, ie):
    result[f"{layer.name}_masks"], result[f"{layer.name}_tables"] = replica_tables(layer)
result.update({f"scores_{k}": v for k, v in scores_seen.items()})
np.savez(out, **result)
print("ok", result["explorations"])
