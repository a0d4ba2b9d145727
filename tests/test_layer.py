"""MaskedEmbedding: Embedding surface, forward semantics, serialization, model kinds."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

import dsl_tf
from dsl_tf import MaskedEmbedding


def _set_mask(layer, rng, density=0.3):
    layer.mask.assign((rng.random(layer.mask.shape) < density).astype(np.float32))


def test_forward_is_gathered_table_times_mask():
    rng = np.random.default_rng(0)
    layer = MaskedEmbedding(20, 6)
    ids = tf.constant([[0, 3, 3], [19, 7, 1]], tf.int64)
    layer(ids)
    _set_mask(layer, rng)
    expected = (layer.embeddings.numpy() * layer.mask.numpy())[ids.numpy()]
    np.testing.assert_array_equal(layer(ids).numpy(), expected)
    np.testing.assert_array_equal(layer(tf.cast(ids, tf.float32)).numpy(), expected)


def test_gradient_is_sparse_and_masked():
    """The table gradient is IndexedSlices over the batch rows only (O(batch·dim))."""
    layer = MaskedEmbedding(1000, 4)
    ids = tf.constant([5, 7, 5])
    layer(ids)
    _set_mask(layer, np.random.default_rng(1), 0.5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids) * 3.0)
    grad = tape.gradient(loss, layer.embeddings)
    assert isinstance(grad, tf.IndexedSlices)
    assert sorted(grad.indices.numpy().tolist()) == [5, 5, 7]
    dense = tf.convert_to_tensor(grad).numpy()
    np.testing.assert_array_equal(dense[5], 6.0 * layer.mask.numpy()[5])
    np.testing.assert_array_equal(dense[7], 3.0 * layer.mask.numpy()[7])


def test_growth_scores_are_gradients_of_effective_weights():
    layer = MaskedEmbedding(10, 3)
    ids = tf.constant([2, 4, 2])
    layer(ids)
    layer.mask.assign(tf.zeros([10, 3]))  # fully pruned: scores must still see gradients
    weights = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids) * weights)
    tape.gradient(loss, layer.embeddings)
    assert float(tf.reduce_sum(tf.abs(layer.growth_scores))) == 0.0  # tracking off by default
    layer.score_tracking.assign(True)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids) * weights)
    tape.gradient(loss, layer.embeddings)
    expected = np.zeros([10, 3], np.float32)
    expected[2] = [8.0, 10.0, 12.0]
    expected[4] = [4.0, 5.0, 6.0]
    np.testing.assert_array_equal(layer.growth_scores.numpy(), expected)


def test_constructor_surface_and_config_round_trip():
    reg = tf.keras.regularizers.L2(1e-4)
    layer = MaskedEmbedding(
        50, 8, embeddings_initializer="glorot_uniform", embeddings_regularizer=reg,
        embeddings_constraint=tf.keras.constraints.MaxNorm(2.0), mask_zero=True,
        name="users", dtype="float32",
    )
    config = layer.get_config()
    clone = MaskedEmbedding.from_config(config)
    assert clone.get_config() == config
    assert config["input_dim"] == 50 and config["output_dim"] == 8 and config["mask_zero"]
    assert isinstance(layer, tf.keras.layers.Embedding)
    np.testing.assert_array_equal(layer.compute_mask(tf.constant([0, 3])).numpy(), [False, True])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_dim": 0, "output_dim": 4}, "Both `input_dim` and `output_dim` should be positive"),
        ({"input_dim": 4, "output_dim": 4, "sparse": True}, "MaskedEmbedding does not support sparse=True"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedEmbedding(**kwargs)


def _sequential():
    return tf.keras.Sequential([tf.keras.Input((2,), dtype="int64"), MaskedEmbedding(30, 4, name="emb"),
                                tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])


def _functional():
    inp = tf.keras.Input((2,), dtype="int64")
    tower = tf.keras.Sequential([MaskedEmbedding(30, 4, name="inner"), tf.keras.layers.Flatten()])
    return tf.keras.Model(inp, tf.keras.layers.Dense(1)(tower(inp)))


class _Subclassed(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.towers = [tf.keras.Sequential([MaskedEmbedding(30, 4)]), MaskedEmbedding(30, 4)]

    def call(self, x):
        return tf.reduce_sum(self.towers[0](x) * self.towers[1](x), axis=[1, 2])[:, None]


@pytest.mark.filterwarnings("ignore:DynamicSparsity. this fit runs no exploration")  # a 1-step fit
@pytest.mark.parametrize("build, count", [(_sequential, 1), (_functional, 1), (_Subclassed, 2)])
def test_found_in_every_model_kind_and_saved(build, count, tmp_path):
    model = build()
    x = np.array([[1, 2], [3, 4], [5, 6]], np.int64)
    y = np.ones((3, 1), np.float32)
    model.compile("sgd", "mse")
    model.fit(x, y, verbose=0, epochs=1, callbacks=[dsl_tf.DynamicSparsity(0.5, update_interval=1)])
    layers = dsl_tf.masked_embeddings(model)
    assert len(layers) == count
    assert all(int(tf.reduce_sum(l.mask)) == 60 for l in layers)
    before = model.predict(x, verbose=0)
    model.save(tmp_path / "sm")
    loaded = tf.keras.models.load_model(tmp_path / "sm")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), before, rtol=1e-6)
    loaded_layers = dsl_tf.masked_embeddings(loaded)
    if build is not _Subclassed:  # subclassed models reload without their Python class
        assert [type(l) for l in loaded_layers] == [MaskedEmbedding] * count
        for a, b in zip(layers, loaded_layers):
            np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    ckpt = tf.train.Checkpoint(model=model)
    path = ckpt.save(tmp_path / "ckpt")
    names = [n for n, _ in tf.train.list_variables(path)]
    assert sum("mask/" in n or n.endswith("mask/.ATTRIBUTES/VARIABLE_VALUE") for n in names) >= count


def test_in_tfrs_model_with_nested_towers():
    class Retrieval(tfrs.Model):
        def __init__(self):
            super().__init__()
            self.user = tf.keras.Sequential([MaskedEmbedding(20, 8), tf.keras.layers.Dense(8)])
            self.item = tf.keras.Sequential([MaskedEmbedding(40, 8)])
            self.task = tfrs.tasks.Retrieval()

        def compute_loss(self, features, training=False):
            return self.task(self.user(features["u"]), self.item(features["i"]))

    model = Retrieval()
    model.compile(tf.keras.optimizers.Adagrad(0.1))
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices(
        {"u": rng.integers(0, 20, 64), "i": rng.integers(0, 40, 64)}).batch(16)
    cb = dsl_tf.DynamicSparsity(0.75, update_interval=2)
    model.fit(ds, epochs=3, verbose=0, callbacks=[cb])
    user, item = dsl_tf.masked_embeddings(model)
    assert int(tf.reduce_sum(user.mask)) == 40 and int(tf.reduce_sum(item.mask)) == 80
    assert len(cb.explorations) == 5  # steps 2, 4, 6, 8, 10 of 12
    for layer in (user, item):
        assert np.count_nonzero(layer.embeddings.numpy()[layer.mask.numpy() == 0]) == 0


@pytest.mark.parametrize("compact", [False, True])
def test_growth_scores_of_repeated_ids_are_reproducible(compact):
    """A batch repeats ids (popular rows): their gradients are summed in one fixed order. A CPU
    scatter-add of repeated indices sums them in a thread-dependent order, which gave a
    different round-off on most repeats here and, in CI, a resumed fit that explored
    differently from the uninterrupted one."""
    rng = np.random.default_rng(0)
    ids = tf.constant(rng.integers(0, 50, 200_000), tf.int64)
    upstream = tf.constant(rng.normal(size=(200_000, 8)).astype(np.float32))
    if compact:
        layer = dsl_tf.CompactMaskedEmbedding(50, 8, sparsity=0.5)
    else:
        layer = MaskedEmbedding(50, 8)
    layer.build(None)
    layer.score_tracking.assign(True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = layer(ids)
        return tape.gradient(out, layer.trainable_variables, output_gradients=upstream)

    results = set()
    for _ in range(10):
        layer.reset_scores()
        step()
        results.add(layer.growth_scores.numpy().tobytes())
    assert len(results) == 1
    assert np.count_nonzero(layer.growth_scores.numpy()) == 50 * 8
