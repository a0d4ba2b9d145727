"""Small trained retrieval models (and run directories) for the export tests.

Independent of ``trainers/``: a two-tower Keras model whose towers are
``Sequential([MaskedEmbedding, UnitNormalization])``, trained a few steps with in-batch
softmax under :class:`dsl_tf.DynamicSparsity`.
"""

from __future__ import annotations

import json
from pathlib import Path

import dsl_tf
import numpy as np
import tensorflow as tf


class TinyTwoTower(tf.keras.Model):
    """``user_tower`` / ``item_tower`` like ``trainers.models.TwoTower``."""

    def __init__(self, num_users: int, num_items: int, dim: int, normalize: bool = True, seed: int = 0):
        super().__init__()

        def tower(rows, name, s):
            init = tf.keras.initializers.RandomNormal(stddev=0.1, seed=s)
            layers = [dsl_tf.MaskedEmbedding(rows, dim, name=name, embeddings_initializer=init)]
            return tf.keras.Sequential(layers + ([tf.keras.layers.UnitNormalization()] if normalize else []))

        self.user_tower = tower(num_users, "user_embedding", seed)
        self.item_tower = tower(num_items, "item_embedding", seed + 1)

    def call(self, inputs):
        users = self.user_tower(inputs["user_id"])
        items = self.item_tower(inputs["item_id"])
        return tf.matmul(users, items, transpose_b=True) / 0.1  # in-batch softmax logits


def train_tiny(num_users=60, num_items=90, dim=16, sparsity=0.8, steps=40, batch=32,
               normalize=True, seed=0) -> tuple[TinyTwoTower, np.ndarray]:
    """A trained :class:`TinyTwoTower` and its item popularity (training counts)."""
    rng = np.random.default_rng(seed)
    n = steps * batch
    users = rng.integers(0, num_users, n)
    items = (users * 7 + rng.integers(0, 5, n)) % num_items  # learnable structure
    ds = tf.data.Dataset.from_tensor_slices(({"user_id": users, "item_id": items},))
    ds = ds.batch(batch, drop_remainder=True).map(lambda x: (x, tf.range(batch)))
    model = TinyTwoTower(num_users, num_items, dim, normalize, seed)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = dsl_tf.DynamicSparsity(sparsity=sparsity, update_interval=10, end_step=steps, seed=seed)
    model.fit(ds, epochs=1, verbose=0, callbacks=[callback])
    popularity = np.bincount(items, minlength=num_items).astype(np.int64)
    return model, popularity


def random_masked(num_users: int, num_items: int, dim: int, sparsity: float, seed: int = 0,
                  normalize: bool = True) -> TinyTwoTower:
    """An untrained :class:`TinyTwoTower` with random tables and exact-budget random masks."""
    rng = np.random.default_rng(seed)
    model = TinyTwoTower(num_users, num_items, dim, normalize, seed)
    model({"user_id": tf.constant([0]), "item_id": tf.constant([0])})
    for layer in dsl_tf.masked_embeddings(model):
        size = layer.input_dim * dim
        flat = np.zeros(size, np.float32)
        flat[rng.choice(size, int(round((1 - sparsity) * size)), replace=False)] = 1.0
        mask = flat.reshape(layer.input_dim, dim)
        table = rng.standard_normal((layer.input_dim, dim)).astype(np.float32) * 0.1
        layer.mask.assign(mask)
        layer.embeddings.assign(table * mask)
    return model


def write_run_dir(run_dir: str | Path, num_users=60, num_items=90, dim=16, steps=30, seed=0) -> Path:
    """A run directory readable by ``trainers.runs.load_run`` (needs ``trainers``): a
    ``trainers.models.TwoTower`` trained a few steps with DynamicSparsity, written in the
    format of ``trainers/train.py``."""
    import scipy.sparse as sp

    from trainers.models import build_model

    run = Path(run_dir)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, steps * 32)
    items = (users * 7 + rng.integers(0, 5, len(users))) % num_items
    train = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(num_users, num_items))
    train.data[:] = 1.0
    hparams = {"dim": dim, "seed": seed}
    model = build_model("two_tower", num_users, num_items, **hparams)
    model.attach(train)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    ds = tf.data.Dataset.from_tensor_slices({"user_id": users, "item_id": items}).batch(32, drop_remainder=True)
    model.fit(ds, epochs=1, verbose=0,
              callbacks=[dsl_tf.DynamicSparsity(sparsity=0.8, update_interval=10, end_step=steps)])
    run.mkdir(parents=True)
    config = {"model": "two_tower", "num_users": num_users, "num_items": num_items,
              "hparams": json.loads(json.dumps(dict(model.hparams), default=list)),
              "method": "dsl", "sparsity": 0.8, "dataset": "synthetic", "seed": seed}
    (run / "config.json").write_text(json.dumps(config))
    tf.train.Checkpoint(model=model).write(str(run / "weights" / "ckpt"))
    layers = dsl_tf.masked_embeddings(model)
    np.savez(run / "masks.npz", **{l.name: l.mask.numpy().astype(bool) for l in layers})
    np.save(run / "item_popularity.npy", np.bincount(train.indices, minlength=num_items).astype(np.int64))
    sp.save_npz(run / "interactions.npz", train)
    np.savez(run / "id_maps.npz", user_ids=np.arange(num_users), item_ids=np.arange(num_items))
    (run / "summary.json").write_text(json.dumps({"sparsity": 0.8}))
    return run


def assert_topk(item_ids, scores, all_scores, atol: float = 1e-5, tie: float = 1e-6) -> None:
    """Served top-k ``item_ids``/``scores`` [B, k] equal the top-k of the Keras model's
    ``all_scores`` [B, items]: scores within ``atol``, every returned item's own Keras score
    within ``atol`` of the reported one, and the same id at every rank except between items
    whose Keras scores tie within ``tie`` (their order is float rounding)."""
    item_ids, scores, all_scores = np.asarray(item_ids), np.asarray(scores), np.asarray(all_scores)
    k = item_ids.shape[1]
    want = tf.math.top_k(all_scores, k)
    want_ids, want_scores = want.indices.numpy(), want.values.numpy()
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=atol)
    np.testing.assert_allclose(np.take_along_axis(all_scores, item_ids, 1), scores, rtol=0, atol=atol)
    assert all(len(set(row)) == k for row in item_ids.tolist())
    rows, ranks = np.nonzero(item_ids != want_ids)
    gap = np.abs(all_scores[rows, item_ids[rows, ranks]] - all_scores[rows, want_ids[rows, ranks]])
    assert (gap <= tie).all(), (rows, ranks, gap)


def write_triplets(path: str | Path, users: list, items: list, per_user: int = 8, seed: int = 0) -> Path:
    """A ``user item`` triplets file: each user interacts with ``per_user`` of 12 items near ``3·index``."""
    rng = np.random.default_rng(seed)
    lines = [f"{u} {items[(3 * i + j) % len(items)]}" for i, u in enumerate(users)
             for j in rng.choice(12, per_user, replace=False)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
