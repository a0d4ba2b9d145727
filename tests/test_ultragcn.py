"""UltraGCN backbone: constraint weights, item neighbours, the loss against numpy, training, DSL budget."""

import dsl_tf
import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf
from dsl_tf import masks

from trainers.data import synthetic
from trainers.evaluation import evaluate_full_ranking
from trainers.models import UltraGCN, build_model, item_neighbors, ultragcn_degree_weights
from trainers.train import TrainConfig, run_training

# users x items: u0 {0, 1}, u1 {1, 2}, u2 {1}, u3 {0, 1, 3}
GRAPH = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1]], np.float32))


def softplus(x):
    return np.log1p(np.exp(x))


def test_degree_weights_by_hand():
    beta_u, beta_i = ultragcn_degree_weights(GRAPH)
    d_u, d_i = np.array([2, 2, 1, 3.0]), np.array([2, 4, 1, 1.0])
    np.testing.assert_allclose(beta_u, np.sqrt(d_u + 1) / d_u, rtol=1e-6)
    np.testing.assert_allclose(beta_i, 1 / np.sqrt(d_i + 1), rtol=1e-6)
    # β_{u,i} of the pair (u3, i0): 1/3 · sqrt(4/3), the paper's (1/d_u) sqrt((d_u + 1)/(d_i + 1))
    assert beta_u[3] * beta_i[0] == pytest.approx(1 / 3 * np.sqrt(4 / 3), rel=1e-6)
    empty_user = sp.csr_matrix(np.array([[1, 0], [0, 0]], np.float32))
    assert ultragcn_degree_weights(empty_user)[0].tolist() == [np.float32(np.sqrt(2.0)), 0.0]


def test_item_neighbors_by_hand():
    # G = AᵀA: G_00 = 2, G_01 = 2, G_03 = 1, G_11 = 4, G_12 = 1, G_13 = 1, G_22 = 1, G_33 = 1
    g_full = np.array([[2, 2, 0, 1], [2, 4, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1.0]])
    for diagonal_zero in (False, True):
        g = g_full.copy()
        if diagonal_zero:
            np.fill_diagonal(g, 0)
        rows = g.sum(1)
        omega = g * (np.sqrt(rows + 1) / rows)[:, None] / np.sqrt(rows + 1)[None, :]
        ids, weights = item_neighbors(GRAPH, 2, diagonal_zero=diagonal_zero)
        assert ids.dtype == np.int64 and weights.dtype == np.float32 and ids.shape == (4, 2)
        for item in range(4):
            expected = sorted(range(4), key=lambda j: (-omega[item, j], j))[:2]
            expected_w = omega[item, expected]
            padded = expected_w == 0  # fewer than 2 co-occurring items: the item itself at weight 0
            assert ids[item].tolist() == [item if p else j for j, p in zip(expected, padded)], (diagonal_zero, item)
            np.testing.assert_allclose(weights[item], expected_w, rtol=1e-6)
    ids, weights = item_neighbors(GRAPH, 2, diagonal_zero=True)
    # item 2 co-occurs only with item 1: second slot padded with itself
    assert ids[2].tolist() == [1, 2] and weights[2, 1] == 0.0
    # with the diagonal, item 1 (g = 8) ranks itself first: 4·3/8/3 = 0.5 > ω_10 = 2·3/8/sqrt(6)
    assert item_neighbors(GRAPH, 1)[0][1].tolist() == [1]
    with pytest.raises(ValueError, match="k must be in"):
        item_neighbors(GRAPH, 5)


@pytest.mark.parametrize("l2_scope", ["batch", "table"])
def test_loss_matches_numpy(l2_scope):
    hp = dict(dim=3, w1=0.1, w2=2.0, w3=0.3, w4=0.5, negative_weight=7.0, ii_weight=0.25, ii_neighbors=2,
              l2=0.01, negatives="all", l2_scope=l2_scope)
    model = build_model("ultragcn", 4, 4, **hp)
    model.attach(GRAPH)
    model.score_all(np.zeros([1], np.int64))
    rng = np.random.default_rng(0)
    eu, ei = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    model.user_table.embeddings.assign(eu)
    model.item_table.embeddings.assign(ei)
    users, pos = np.array([0, 3, 1]), np.array([1, 0, 2])
    loss = float(model.compute_loss({"user_id": tf.constant(users), "item_id": tf.constant(pos)}))

    beta_u, beta_i = ultragcn_degree_weights(GRAPH)
    ids, omega = item_neighbors(GRAPH, 2)
    total = 0.0
    for u, i in zip(users, pos):
        total += (0.1 + 2.0 * beta_u[u] * beta_i[i]) * softplus(-eu[u] @ ei[i])
        total += 7.0 * np.mean([(0.3 + 0.5 * beta_u[u] * beta_i[j]) * softplus(eu[u] @ ei[j]) for j in range(4)])
        total += 0.25 * sum(omega[i, k] * softplus(-eu[u] @ ei[ids[i, k]]) for k in range(2))
    if l2_scope == "table":
        norm = (eu**2).sum() + (ei**2).sum()
    else:  # looked-up rows: users, positives, every item (the negatives), neighbours
        looked_up = np.concatenate([pos, np.arange(4), ids[pos].ravel()])
        norm = (eu[users] ** 2).sum() + (ei[looked_up] ** 2).sum()
    expected = (total + 0.01 * norm / 2) / len(users)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_per_pair_negatives_draw_batch_by_n_items():
    model = build_model("ultragcn", 4, 4, dim=3, negatives="per_pair", num_negatives=5, ii_neighbors=2)
    model.attach(GRAPH)
    seen = []
    original = model.item_table.call

    def spy(ids, *args, **kwargs):
        seen.append(int(tf.size(ids)))
        return original(ids, *args, **kwargs)

    model.item_table.call = spy
    model.compute_loss({"user_id": tf.constant([0, 1, 3]), "item_id": tf.constant([1, 2, 0])})
    assert seen == [3 + 3 * 5 + 3 * 2]  # one lookup: positives, B·N negatives, B·K neighbours
    with pytest.raises(ValueError, match="negatives must be one of"):
        build_model("ultragcn", 4, 4, negatives="shared")


def test_trains_with_decreasing_loss():
    data = synthetic(num_users=150, num_items=200, dim=4, mean_interactions=12, seed=0)
    tf.keras.utils.set_random_seed(0)
    model = build_model("ultragcn", data.num_users, data.num_items, dim=16, init_std=0.01)
    model.attach(data.train)
    model.compile(tf.keras.optimizers.Adam(0.01))
    before = evaluate_full_ranking(model.scorer(), data.train, data.test)["recall@20"]
    loss = model.fit(model.make_dataset(data, 128, seed=0), epochs=6, verbose=0).history["loss"]
    assert all(b < a for a, b in zip(loss, loss[1:])), loss
    after = evaluate_full_ranking(model.scorer(), data.train, data.test)["recall@20"]
    assert after > 2 * before, (before, after)


def test_dsl_run_keeps_the_exact_budget_and_exports_like_mf_bpr(tmp_path):
    from export import split_tower
    from trainers.runs import load_run

    tiny = {"num_users": 100, "num_items": 130, "dim": 4, "mean_interactions": 10}
    cfg = TrainConfig(model="ultragcn", dataset_args=tiny, method="dsl", sparsity=0.75, epochs=2, batch_size=64,
                      lr=0.01, dim=8, out=str(tmp_path / "run"), verbose=0)
    model, summary = run_training(cfg)
    layers = dsl_tf.masked_embeddings(model)
    assert [type(layer) for layer in layers] == [dsl_tf.CompactMaskedEmbedding] * 2
    for layer in layers:
        assert masks.active_count(layer) == masks.budget(layer.input_dim * 8, 0.75)
    assert summary["explorations"] and summary["active_parameters"] == sum(
        masks.budget(n * 8, 0.75) for n in (100, 130))
    loaded, _, _ = load_run(tmp_path / "run")
    for side in ("user", "item"):
        table, post = split_tower(getattr(loaded, f"{side}_tower"), side)
        assert post == [] and table.name == f"{side}_embedding"
    users = np.arange(10, dtype=np.int64)
    np.testing.assert_array_equal(loaded.score_all(users).numpy(), model.score_all(users).numpy())


def test_constants_are_not_computed_to_score():
    model = UltraGCN(4, 4, dim=3)
    model.attach(GRAPH)
    model.score_all(np.arange(2, dtype=np.int64))
    assert model._constants is None
