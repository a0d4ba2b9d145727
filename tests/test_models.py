"""Backbones: each trains sparse with DSL at the exact budget and scores all items."""

import dsl_tf
import numpy as np
import pytest
import tensorflow as tf
from dsl_tf import masks

from trainers.data import synthetic
from trainers.methods import compact_factory
from trainers.models import MODELS, Cost, build_model

SPARSITY = 0.75


@pytest.fixture(scope="module")
def data():
    return synthetic(num_users=60, num_items=90, dim=4, mean_interactions=10, seed=0)


def _fit_dsl(name, data, epochs=2, factory=None, optimizer=None):
    tf.keras.utils.set_random_seed(0)
    model = build_model(name, data.num_users, data.num_items, factory, dim=8)
    model.attach(data.train)
    model.compile(optimizer or tf.keras.optimizers.Adam(0.01))
    callback = dsl_tf.DynamicSparsity(SPARSITY, update_interval=1, seed=0)
    history = model.fit(model.make_dataset(data, 32, seed=0), epochs=epochs, callbacks=[callback], verbose=0)
    return model, callback, history


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backbone_trains_with_compact_storage_and_lazy_adam(name, data):
    """Every backbone with CompactMaskedEmbedding tables: exact budget, explores, finite scores."""
    model, callback, history = _fit_dsl(name, data, factory=compact_factory(SPARSITY, "dense"),
                                        optimizer=dsl_tf.LazyAdam(0.01))
    layers = dsl_tf.masked_embeddings(model)
    assert layers and all(isinstance(layer, dsl_tf.CompactMaskedEmbedding) for layer in layers)
    for layer in layers:
        assert masks.active_count(layer) == layer.values.shape[0] == masks.budget(layer.input_dim * layer.output_dim,
                                                                                  SPARSITY)
    assert sum(e["dsl_num_swapped"] for e in callback.explorations) > 0
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(model.score_all(np.arange(5, dtype=np.int64)).numpy()))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_backbone_trains_sparse_at_exact_budget(name, data):
    model, callback, history = _fit_dsl(name, data)
    layers = dsl_tf.masked_embeddings(model)
    assert layers, f"{name} has no MaskedEmbedding"
    for layer in layers:
        size = layer.embeddings.shape.num_elements()
        mask = layer.mask.numpy()
        assert int(mask.sum()) == masks.budget(size, SPARSITY)
        # pruned entries are exactly zero in the table
        assert np.all(layer.embeddings.numpy()[mask == 0] == 0.0)
    assert len(callback.explorations) >= 1
    assert sum(e["dsl_num_swapped"] for e in callback.explorations) > 0
    assert np.all(np.isfinite(history.history["loss"]))
    scores = model.score_all(np.arange(5, dtype=np.int64)).numpy()
    assert scores.shape == (5, data.num_items) and np.all(np.isfinite(scores))
    assert np.ptp(scores) > 0


@pytest.mark.parametrize("name", ["two_tower", "mf_bpr", "ultragcn"])
def test_retrieval_towers_reproduce_scores(name, data):
    model = build_model(name, data.num_users, data.num_items, dim=8)
    model.attach(data.train)
    users = np.array([0, 7, 59], dtype=np.int64)
    for tower in (model.user_tower, model.item_tower):
        first = tower.layers[0] if isinstance(tower, tf.keras.Sequential) else tower
        assert isinstance(first, dsl_tf.MaskedEmbedding)
    expected = model.user_tower(users).numpy() @ model.item_tower(np.arange(data.num_items)).numpy().T
    np.testing.assert_allclose(model.score_all(users).numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lightgcn", "neumf", "multvae", "cdae"])
def test_non_retrieval_models_have_no_towers(name):
    model = build_model(name, 4, 6, dim=4)
    assert model.user_tower is None and model.item_tower is None


def test_two_tower_learns_better_than_popularity(data):
    """A few epochs of dense two-tower training rank held-out items above popularity."""
    from trainers.evaluation import evaluate_full_ranking

    big = synthetic(num_users=400, num_items=300, seed=1)
    tf.keras.utils.set_random_seed(0)
    model = build_model("two_tower", big.num_users, big.num_items, dim=16)
    model.attach(big.train)
    model.compile(tf.keras.optimizers.Adam(0.01))
    model.fit(model.make_dataset(big, 256, seed=0), epochs=8, verbose=0)
    ours = evaluate_full_ranking(model.score_all, big.train, big.valid)["recall@20"]
    pop = np.tile(big.item_popularity().astype(np.float32), (big.num_users, 1))
    baseline = evaluate_full_ranking(lambda u: pop[u], big.train, big.valid)["recall@20"]
    assert ours > 1.2 * baseline, (ours, baseline)


def test_lightgcn_propagation_is_normalised_mean():
    """With one layer, final = (E + Â E) / 2 where Â = D^-1/2 A D^-1/2."""
    import scipy.sparse as sp

    train = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 0]], dtype=np.float32))
    model = build_model("lightgcn", 2, 3, dim=2, num_layers=1)
    model.attach(train)
    final = model.propagate()[0].numpy()
    ego = np.concatenate([model.user_table.embeddings.numpy(), model.item_table.embeddings.numpy()])
    adj = np.zeros((5, 5))
    adj[:2, 2:] = train.toarray()
    adj[2:, :2] = train.toarray().T
    deg = adj.sum(1)
    norm = np.where(deg > 0, deg, 1) ** -0.5
    expected = (ego + (norm[:, None] * adj * norm[None, :]) @ ego) / 2
    np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-6)


def test_lightgcn_gradient_matches_dense_reference():
    """d/dE Σ(final ⊙ R) = (Σ_k Â^k) R / (L + 1) (Â symmetric): checks the CSR product's gradient."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((6, 8)) < 0.4).astype(np.float32))
    model = build_model("lightgcn", 6, 8, dim=3, num_layers=2)
    model.attach(train)
    model.score_all(np.zeros([1], np.int64))
    weights = tf.constant(rng.normal(size=(14, 3)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model.propagate()[0] * weights)
    grads = tape.gradient(loss, [model.user_table.embeddings, model.item_table.embeddings])
    got = np.concatenate([tf.convert_to_tensor(g).numpy() for g in grads])
    adj = np.zeros((14, 14))
    adj[:6, 6:] = train.toarray()
    adj[6:, :6] = train.toarray().T
    deg = adj.sum(1)
    norm = np.where(deg > 0, deg, 1) ** -0.5
    a_hat = norm[:, None] * adj * norm[None, :]
    expected = (np.eye(14) + a_hat + a_hat @ a_hat) @ weights.numpy() / 3
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_costs_scale_with_density():
    cost = Cost(sparse_per_example=10, sparse_per_step=100, dense_per_example=1)
    assert cost.macs(examples=4, steps=2, density=0.5) == 0.5 * (40 + 200) + 4
    model = build_model("mf_bpr", 5, 7, dim=8)
    assert model.train_cost(32).sparse_per_example == 16
    assert model.inference_cost().sparse_per_example == 7 * 8


def test_bad_model_and_hparams_are_rejected():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", 2, 2)
    with pytest.raises(ValueError, match=r"unknown hyper-parameters \['temprature'\]"):
        build_model("two_tower", 2, 2, temprature=0.1)
    with pytest.raises(ValueError, match="needs model.attach"):
        build_model("lightgcn", 2, 2).score_all(np.array([0]))


class _BatchLosses(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[-1].append(float(logs["total_loss"]))  # the batch's own loss (no regularisers here)


@pytest.mark.parametrize("name", ["mf_bpr", "two_tower"])
def test_history_loss_is_the_epoch_mean_of_batch_losses(name, data):
    """Fig. 5 reads History's loss: it must average the epoch's batches (TFRS reports the last batch's)."""
    tf.keras.utils.set_random_seed(0)
    model = build_model(name, data.num_users, data.num_items, dim=8)
    model.attach(data.train)
    model.compile(tf.keras.optimizers.Adam(0.01))
    batches = _BatchLosses()
    history = model.fit(model.make_dataset(data, 32, seed=0), epochs=3, verbose=0, callbacks=[batches])
    assert [len(b) for b in batches.epochs] == [len(model.make_dataset(data, 32, seed=0))] * 3
    for loss, losses in zip(history.history["loss"], batches.epochs):
        assert loss == pytest.approx(np.mean(losses), rel=1e-5)
        assert abs(loss - losses[-1]) > 1e-4  # not the last batch's


@pytest.mark.parametrize("name", sorted(MODELS))
def test_num_examples_gives_the_batches_make_dataset_yields(name, data):
    """trainers/train.py fits the endless dataset with ``steps_per_epoch`` from ``num_examples``:
    an epoch is one pass only if the two agree."""
    model = build_model(name, data.num_users, data.num_items, dim=4)
    steps = -(-MODELS[name].num_examples(data.train) // 32)
    assert int(model.make_dataset(data, 32, seed=0).cardinality()) == steps
