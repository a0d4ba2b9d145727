"""Issue 13: a user's own TFRS ranking model exports compactly and answers like Keras.

The model: three categorical features (user, item, category), each a masked table (two
``CompactMaskedEmbedding``, one ``MaskedEmbedding``), a numeric feature, a TFRS ``DCN``
cross layer and an MLP predicting a rating, trained briefly with ``DynamicSparsity``.
"""

from __future__ import annotations

import dsl_tf
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

from export import ExportError, SessionServable, export_model, saved_model_cli

USERS, ITEMS, CATEGORIES, DIM = 50, 80, 7, 8


class Ranker(tfrs.models.Model):
    def __init__(self):
        super().__init__()
        self.user = dsl_tf.CompactMaskedEmbedding(USERS, DIM, sparsity=0.75, name="user")
        self.item = dsl_tf.CompactMaskedEmbedding(ITEMS, DIM, sparsity=0.75, name="item")
        self.category = dsl_tf.MaskedEmbedding(CATEGORIES, DIM, name="category")
        self.cross = tfrs.layers.dcn.Cross()
        self.mlp = tf.keras.Sequential([tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dense(1)])
        self.task = tfrs.tasks.Ranking(loss=tf.keras.losses.MeanSquaredError())

    def call(self, features):
        x = tf.concat([self.user(features["user_id"]), self.item(features["item_id"]),
                       self.category(features["category"]), features["price"][:, None]], axis=1)
        return tf.squeeze(self.mlp(self.cross(x)), -1)

    def compute_loss(self, inputs, training=False):
        features, rating = inputs
        return self.task(labels=rating, predictions=self(features, training=training))


def _data(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = {"user_id": rng.integers(0, USERS, rows), "item_id": rng.integers(0, ITEMS, rows),
                "category": rng.integers(0, CATEGORIES, rows), "price": rng.random(rows).astype(np.float32)}
    rating = ((features["user_id"] % 5) + (features["item_id"] % 3) + features["price"]).astype(np.float32)
    return features, rating


@pytest.fixture(scope="module")
def ranker():
    features, rating = _data(2048)
    model = Ranker()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
    ds = tf.data.Dataset.from_tensor_slices((features, rating)).batch(64)
    model.fit(ds, epochs=2, verbose=0,
              callbacks=[dsl_tf.DynamicSparsity(sparsity={"user": 0.75, "item": 0.75, "category": 0.5},
                                                update_interval=8)])
    return model


@pytest.fixture(scope="module")
def exported(ranker, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving")
    example, _ = _data(64, seed=1)
    return {fmt: export_model(ranker, out, f"ranker_{fmt}", fmt=fmt, example_inputs=example)
            for fmt in ("compact", "dense")}


@pytest.mark.parametrize("fmt", ["compact", "dense"])
def test_servable_answers_exactly_like_the_keras_model(ranker, exported, fmt):
    features, _ = _data(300, seed=2)  # not the example batch
    want = ranker(features).numpy()
    with SessionServable(exported[fmt].path) as s:
        assert set(s.signatures["serving_default"].inputs) == set(features)
        got = s.run("serving_default", **features)["scores"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.5  # a real answer, not zeros


def test_every_masked_table_is_stored_compactly(ranker, exported):
    result = exported["compact"]
    tables = result.metadata["tables"]
    assert sorted(tables) == ["category", "item", "user"]
    assert {t["format"] for t in tables.values()} == {"compact"}
    assert tables["user"]["density"] == pytest.approx(0.25, abs=1e-6)
    assert tables["category"]["density"] == pytest.approx(0.5, abs=1e-6)
    reader = tf.train.load_checkpoint(str(result.path / "variables" / "variables"))
    shapes = reader.get_variable_to_shape_map()
    # no variable of the table's dense shape is saved; the compact arrays are
    assert not [name for name, shape in shapes.items() if shape in ([USERS, DIM], [ITEMS, DIM])]
    budget = sorted(shape[0] for name, shape in shapes.items() if name.endswith("values/.ATTRIBUTES/VARIABLE_VALUE")
                    and len(shape) == 1)
    assert budget == sorted([round(0.25 * USERS * DIM), round(0.25 * ITEMS * DIM), round(0.5 * CATEGORIES * DIM)])
    dense = tf.train.load_checkpoint(str(exported["dense"].path / "variables" / "variables"))
    assert [n for n, shape in dense.get_variable_to_shape_map().items() if shape == [USERS, DIM]]  # the baseline

    def data_bytes(path):  # the tables' bytes (the graph dominates the folder at this tiny size)
        return sum(f.stat().st_size for f in (path / "variables").glob("variables.data-*"))

    assert data_bytes(result.path) < data_bytes(exported["dense"].path)


def test_saved_model_cli_runs_the_custom_servable(exported):
    outputs = saved_model_cli([r.path for r in exported.values()])
    for out in outputs.values():
        assert "'price'" in out["show"] and "Result for output key scores" in out["run"]


def test_a_model_that_reads_a_masked_table_directly_is_refused(tmp_path):
    class Peeker(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.table = dsl_tf.MaskedEmbedding(10, 4, name="t")
            self.table.build(None)

        def call(self, features):
            return tf.reduce_sum(tf.gather(self.table.embeddings, features["id"]), -1)  # bypasses layer(ids)

    with pytest.raises(ExportError, match="directly"):
        export_model(Peeker(), tmp_path, "p", example_inputs={"id": np.arange(4)})
    assert not (tmp_path / "p").exists()


def test_a_model_with_its_own_string_lookup_is_saved_with_it(tmp_path):
    class Tagged(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.lookup = tf.keras.layers.StringLookup(vocabulary=["a", "b", "c"])  # a hash table resource
            self.table = dsl_tf.MaskedEmbedding(4, 3, name="tag")
            self.head = tf.keras.layers.Dense(1)

        def call(self, features):
            return tf.squeeze(self.head(self.table(self.lookup(features["tag"]))), -1)

    model = Tagged()
    example = {"tag": np.array(["a", "b", "zz", "c"])}
    want = model(example).numpy()
    result = export_model(model, tmp_path, "tagged", example_inputs=example, compare_dense=False)
    with SessionServable(result.path) as s:
        got = s.run("serving_default", tag=np.array(["c", "zz", "a"]))["scores"]
    np.testing.assert_allclose(got, want[[3, 2, 0]], atol=1e-6)  # known tags and the OOV bucket
