"""CompactMaskedEmbedding: only the active entries are stored and trained."""

import numpy as np
import pytest
import tensorflow as tf

import dsl_tf
from dsl_tf import CompactMaskedEmbedding, DynamicSparsity, MaskedEmbedding, masks


def _model(layer_cls, rows=40, dim=8, seed=0, optimizer=None, **kwargs):
    tf.keras.utils.set_random_seed(seed)
    init = tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=seed)
    model = tf.keras.Sequential([
        tf.keras.Input((2,), dtype="int64"),
        layer_cls(rows, dim, embeddings_initializer=init, name="table", **kwargs),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed)),
    ])
    model.compile(optimizer or tf.keras.optimizers.Adam(0.02), "mse")
    return model


def _data(rows=40, n=600, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, rows, (n, 2))
    return x, (np.sin(x[:, :1]) + np.cos(x[:, 1:])).astype(np.float32)


class _CopyInitialValues(tf.keras.callbacks.Callback):
    """After DynamicSparsity's on_train_begin: give the compact table the dense table's initial values."""

    def __init__(self, layer, dense_initial):
        super().__init__()
        self.layer, self.dense_initial = layer, dense_initial

    def on_train_begin(self, logs=None):
        self.layer.values.assign(tf.gather(tf.reshape(self.dense_initial, [-1]), self.layer.positions()))


@pytest.mark.parametrize("growth, criteria", [("gradient", {}), ("momentum", {}),
                                              ("gradient", dict(prune_by="row_relative", grow_by="row_scaled")),
                                              ("gradient", dict(budget="per_row")), ("random", dict(budget="per_row"))])
def test_compact_and_dense_storage_train_identically(growth, criteria):
    """Same seed, data, Adam and 15 explorations: same masks, same weights (1e-6); also with the
    row-relative prune and row-scaled growth, and with per-row budgets (gradient and random growth)."""
    x, y = _data()
    kwargs = dict(sparsity=0.75, update_interval=4, initial_update_ratio=0.5, growth=growth, seed=3, **criteria)
    dense = _model(MaskedEmbedding)
    initial = tf.identity(dense.layers[0].embeddings)
    dense.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0, callbacks=[dsl_d := DynamicSparsity(**kwargs)])
    compact = _model(CompactMaskedEmbedding, sparsity=0.75, growth_scores="dense")
    table = compact.layers[0]
    compact.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0,
                callbacks=[dsl_c := DynamicSparsity(**kwargs), _CopyInitialValues(table, initial)])
    assert len(dsl_d.explorations) == len(dsl_c.explorations) == 14
    assert [e["dsl_num_swapped"] for e in dsl_d.explorations] == [e["dsl_num_swapped"] for e in dsl_c.explorations]
    np.testing.assert_array_equal(table.dense_mask().numpy(), dense.layers[0].mask.numpy().astype(bool))
    np.testing.assert_allclose(table.effective_table().numpy(), dense.layers[0].effective_table().numpy(), atol=1e-6)
    np.testing.assert_allclose(compact.predict(x[:50], verbose=0), dense.predict(x[:50], verbose=0), atol=1e-5)
    for c, d in zip(dsl_c.explorations, dsl_d.explorations):
        assert c["dsl_mask_changed/table"] == pytest.approx(d["dsl_mask_changed/table"])


class _InitialMask(tf.keras.callbacks.Callback):
    """Records the table's mask once DynamicSparsity (listed before) has installed it."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.mask = layer, None

    def on_train_begin(self, logs=None):
        self.mask = _dense_mask(self.layer)


def _dense_mask(layer) -> np.ndarray:
    return layer.dense_mask().numpy() if masks.is_compact(layer) else layer.mask.numpy().astype(bool)


@pytest.mark.parametrize("layer_cls", [MaskedEmbedding, CompactMaskedEmbedding])
def test_per_row_budget_keeps_every_rows_count_and_swaps_rho_k_per_row(layer_cls):
    """``budget="per_row"``: the initial mask gives each row budget // rows or one more entries
    (96 over 40 rows: 16 rows of 3, 24 of 2); after 14 explorations every row still has its
    count, each exploration swapped between Σ_r floor(ρ_t · k_r) and Σ_r ceil(ρ_t · k_r) entries,
    ρ_t · 96 over all of them within 4 sigma, and the late ones still swap (with a floor, the 9
    explorations with ρ_t < 1/3 swapped nothing), and the masks moved."""
    x, y = _data()
    extra = dict(sparsity=0.7, growth_scores="dense") if layer_cls is CompactMaskedEmbedding else {}
    model = _model(layer_cls, **extra)
    table = model.layers[0]
    callback = DynamicSparsity(sparsity=0.7, update_interval=4, budget="per_row", seed=5)
    initial = _InitialMask(table)
    model.fit(x, y, batch_size=20, epochs=2, shuffle=False, verbose=0, callbacks=[callback, initial])
    counts = initial.mask.sum(1)
    assert np.bincount(counts).tolist() == [0, 0, 24, 16]  # 96 = round(0.3 x 40 x 8) entries
    final = _dense_mask(table)
    np.testing.assert_array_equal(final.sum(1), counts)
    assert (final != initial.mask).sum() > 0
    assert len(callback.explorations) == 14
    ratios = np.array([e["dsl_update_ratio"] for e in callback.explorations])
    swapped = np.array([e["dsl_num_swapped"] for e in callback.explorations])
    for ratio, num in zip(ratios, swapped):
        assert sum(np.floor(ratio * k) for k in counts) <= num <= sum(np.ceil(ratio * k) for k in counts)
    variance = sum((r * k % 1) * (1 - r * k % 1) for r in ratios for k in counts)
    assert abs(swapped.sum() - 96 * ratios.sum()) < 4 * np.sqrt(variance)
    assert swapped[ratios < 1 / 3].sum() > 0


def test_per_row_budget_is_refused_with_window_scores():
    model = _model(CompactMaskedEmbedding, sparsity=0.75, growth_scores="window")
    x, y = _data()
    with pytest.raises(ValueError, match="growth_scores in \\('dense', 'int8'\\)"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[DynamicSparsity(sparsity=0.75, budget="per_row")])


def test_trainable_state_is_only_the_budget():
    layer = CompactMaskedEmbedding(1000, 64, sparsity=0.8, growth_scores="none")
    layer.build(None)
    assert [v.shape for v in layer.trainable_variables] == [tf.TensorShape([12800])]
    model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), layer])
    model.compile(dsl_tf.LazyAdam(0.01), "mse")
    model.fit(np.arange(10)[:, None], np.zeros((10, 1, 64)), verbose=0)
    slots = masks.optimizer_slots(model.optimizer, layer.values)
    assert [s.shape for s in slots] == [tf.TensorShape([12800])] * 2
    state = sum(v.shape.num_elements() * v.dtype.size for v in layer.weights + slots)
    # values + 2 Adam slots (12 B) + int16 columns (2 B) per active entry, int64 row splits, two flags
    assert state == 12800 * 14 + 1001 * 8 + 2


def test_exploration_keeps_values_and_slots_of_kept_entries_and_resets_grown():
    x, y = _data()
    model = _model(CompactMaskedEmbedding, sparsity=0.5)
    table = model.layers[0]
    dsl = DynamicSparsity(0.5, update_interval=1000, end_step=10**6)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[dsl])
    before = dict(zip(table.positions().numpy().tolist(), table.values.numpy()))
    slots = masks.slot_states(model.optimizer, table.values)
    slot_before = [dict(zip(table.positions().numpy().tolist(), s.numpy())) for s, _ in slots]
    keep = np.ones(table.budget, bool)
    keep[[0, 5, 7]] = False
    free = np.setdiff1d(np.arange(40 * 8), table.positions().numpy())[:3]
    masks.apply_compact_update(table, keep, free, model.optimizer)
    after = dict(zip(table.positions().numpy().tolist(), table.values.numpy()))
    assert sorted(after) == sorted(set(before) - {list(before)[i] for i in (0, 5, 7)} | set(free.tolist()))
    for pos, value in after.items():
        assert value == (0.0 if pos in free else before[pos])
    for (slot, initial), old in zip(slots, slot_before):
        for pos, value in zip(table.positions().numpy().tolist(), slot.numpy()):
            assert value == (initial if pos in free else old[pos])


def test_gradient_reaches_values_as_indexed_slices_of_the_looked_up_rows():
    layer = CompactMaskedEmbedding(6, 3, sparsity=0.5)
    layer.build(None)
    layer.set_layout(tf.constant([0, 2, 4, 5, 7, 9, 11, 13, 16], tf.int64))
    with tf.GradientTape() as tape:
        out = layer(tf.constant([1, 1, 4]))
        loss = tf.reduce_sum(out * tf.constant([1.0, 2.0, 3.0]))
    grad = tape.gradient(loss, layer.values)
    assert isinstance(grad, tf.IndexedSlices)
    # row 1 holds positions 4, 5 (cols 1, 2) = values 2, 3; row 4 none (12..14 → 13 = col 1: value 7);
    # row 1, looked up twice, is gathered once: its values appear once, with the summed gradient
    assert sorted(zip(grad.indices.numpy().tolist(), grad.values.numpy().tolist())) == [
        (2, 4.0), (3, 6.0), (7, 2.0)]
    table = np.zeros(18, np.float32)
    table[[0, 2, 4, 5, 7, 9, 11, 13, 16]] = layer.values.numpy()
    np.testing.assert_array_equal(out.numpy(), table.reshape(6, 3)[[1, 1, 4]])


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.float32])
def test_repeated_rows_give_the_masked_table_rows_and_gradients(dtype):
    """A batch repeating rows (and a second lookup of the same rows, as mf_bpr's positive and negative
    items): outputs are the rows of E ⊙ M, the values' gradient is the dense table gradient at the
    active positions, and a LazyAdam step matches the same step on the dense masked table."""
    rng = np.random.default_rng(4)
    rows, dim = 30, 8
    layer = CompactMaskedEmbedding(rows, dim, sparsity=0.6, growth_scores="none")
    layer.build(None)
    positions = np.sort(rng.choice(rows * dim, layer.budget, replace=False))
    layer.set_layout(tf.constant(positions, tf.int64))
    layer.values.assign(rng.normal(size=layer.budget).astype(np.float32))
    first = tf.constant([[3, 7, 3], [0, 3, 29], [7, 7, 3]], dtype)
    second = tf.constant([29, 3, 11, 3], dtype)
    w1, w2 = rng.normal(size=(3, 3, dim)).astype(np.float32), rng.normal(size=(4, dim)).astype(np.float32)
    mask = np.zeros(rows * dim, np.float32)
    mask[positions] = 1
    table = tf.Variable(layer.effective_table())

    def loss(lookup):
        return (tf.reduce_sum(lookup(first) * w1) + tf.reduce_sum(lookup(second) ** 2 * w2))

    with tf.GradientTape() as tape:
        compact_loss = loss(layer)
    grad = tape.gradient(compact_loss, layer.values)
    with tf.GradientTape() as tape:
        dense_loss = loss(lambda ids: tf.gather(table, tf.cast(ids, tf.int32)))
    dense_slices = tape.gradient(dense_loss, table)
    dense_grad = tf.convert_to_tensor(dense_slices).numpy().reshape(-1)
    np.testing.assert_allclose(compact_loss.numpy(), dense_loss.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(layer(first).numpy(), tf.gather(table, tf.cast(first, tf.int32)).numpy())
    # one lookup's gradient names each value once; the two lookups' are concatenated
    per_lookup = [int(layer.row_splits[r + 1] - layer.row_splits[r]) for r in (0, 3, 7, 29)]
    assert grad.indices.shape[0] == sum(per_lookup) + sum(per_lookup[1::2]) + int(
        layer.row_splits[12] - layer.row_splits[11])
    np.testing.assert_allclose(tf.convert_to_tensor(grad).numpy(), dense_grad[positions], rtol=1e-6, atol=1e-6)
    opt, dense_opt = dsl_tf.LazyAdam(0.1), dsl_tf.LazyAdam(0.1)
    opt.apply_gradients([(grad, layer.values)])
    dense_opt.apply_gradients([(dense_slices, table)])
    np.testing.assert_allclose(layer.effective_table().numpy().reshape(-1), table.numpy().reshape(-1) * mask,
                               rtol=1e-6, atol=1e-6)


def test_rebuild_layout_by_small_chunks_matches_one_chunk():
    """Grown positions spanning many row chunks (a window's) and confined to one (a chunk's random
    draw), split among the chunks in one pass: the same layout, sources and regrown count as one chunk."""
    rng = np.random.default_rng(5)
    rows, dim = 700, 4
    results = []
    for max_entries in (1 << 24, 256):  # one chunk; 11 chunks of 64 rows
        layer = CompactMaskedEmbedding(rows, dim, sparsity=0.7, growth_scores="none")
        layer.build(None)
        rng = np.random.default_rng(5)
        old = np.sort(rng.choice(rows * dim, layer.budget, replace=False))
        layer.set_layout(tf.constant(old, tf.int64))
        keep = rng.random(layer.budget) < 0.6
        free = np.setdiff1d(np.arange(rows * dim), old[keep])
        grown = rng.permutation(free)[:layer.budget - int(keep.sum())]
        spanning, confined = grown[grown >= 64 * dim], grown[grown < 64 * dim]  # chunk 0's own part
        source, regrown = layer.rebuild_layout(tf.constant(keep), [tf.constant(spanning), tf.constant(confined)],
                                               max_entries=max_entries)
        assert len(layer.row_chunks(max_entries)) == (1 if max_entries > 256 else 11)
        np.testing.assert_array_equal(layer.positions().numpy(), np.sort(np.concatenate([old[keep], grown])))
        assert regrown == len(np.intersect1d(grown, old[~keep]))
        results.append(source.numpy())
    np.testing.assert_array_equal(*results)


def test_budget_mismatch_and_missing_scores_are_clear_errors():
    x, y = _data()
    model = _model(CompactMaskedEmbedding, sparsity=0.5)
    with pytest.raises(ValueError, match=r"'table' stores 160 active entries \(sparsity 0.5\) but DynamicSparsity asks for 64"):
        model.fit(x, y, verbose=0, callbacks=[DynamicSparsity(0.8, 5)])
    model = _model(CompactMaskedEmbedding, sparsity=0.5, growth_scores="none")
    with pytest.raises(ValueError, match=r"growth=.gradient. needs growth_scores in \(.dense., .int8., .window.\)"):
        model.fit(x, y, verbose=0, callbacks=[DynamicSparsity(0.5, 5)])
    with pytest.raises(ValueError, match="element-wise initializer"):
        CompactMaskedEmbedding(10, 4, embeddings_initializer="glorot_uniform")


def test_checkpoint_round_trip_restores_layout_and_values(tmp_path):
    x, y = _data()
    model = _model(CompactMaskedEmbedding, sparsity=0.75)
    model.fit(x, y, batch_size=20, verbose=0, callbacks=[DynamicSparsity(0.75, 5)])
    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    other = _model(CompactMaskedEmbedding, sparsity=0.75, seed=1)
    other.predict(x[:2], verbose=0)
    tf.train.Checkpoint(model=other).read(str(tmp_path / "ckpt")).assert_existing_objects_matched()
    np.testing.assert_array_equal(other.layers[0].positions().numpy(), model.layers[0].positions().numpy())
    np.testing.assert_array_equal(other.predict(x[:20], verbose=0), model.predict(x[:20], verbose=0))
    config = model.layers[0].get_config()
    assert config["sparsity"] == 0.75 and config["growth_scores"] == "dense"
    assert CompactMaskedEmbedding.from_config(config).budget == 80


@pytest.mark.parametrize("scores, growth", [("window", "gradient"), ("int8", "gradient"), ("int8", "momentum"),
                                            ("none", "random"), ("none", "none")])
def test_planted_signal_with_cheap_scores(scores, growth):
    """Only 2 of 8 coordinates reach the output: window-scored DSL moves > 90% of its budget onto
    them, SET (magnitude pruning, random regrowth) part of it, RP (static mask) none; budgets stay exact."""
    rows, dim, signal = 200, 8, [1, 5]
    head = np.zeros((dim, 1), np.float32)
    head[signal] = 1.0
    targets = np.random.default_rng(0).normal(size=(rows, 1)).astype(np.float32) * 2
    tf.keras.utils.set_random_seed(0)
    layer = CompactMaskedEmbedding(rows, dim, sparsity=0.75, growth_scores=scores, score_capacity=120,
                                   embeddings_initializer=tf.keras.initializers.RandomUniform(-0.01, 0.01, seed=0))
    model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), layer, tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(1, use_bias=False, trainable=False)])
    model.layers[-1].set_weights([head])
    model.compile(dsl_tf.LazyAdam(0.05), "mse")
    dsl = DynamicSparsity(0.75, update_interval=10, initial_update_ratio=0.5, growth=growth, seed=3)
    x = np.repeat(np.arange(rows), 4)[:, None]
    model.fit(x, targets[x[:, 0]], batch_size=40, epochs=15, verbose=0, callbacks=[dsl])
    mask = layer.dense_mask().numpy()
    assert mask.sum() == layer.budget == 400
    coverage = mask[:, signal].sum() / mask.sum()
    expected = {"gradient": (0.9, 1.0), "momentum": (0.9, 1.0), "random": (0.4, 0.9), "none": (0.0, 0.35)}[growth]
    assert expected[0] < coverage <= expected[1], coverage
    assert len(dsl.explorations) == 29 and (growth == "none") == (dsl.explorations[0]["dsl_num_swapped"] == 0)


def test_window_keeps_the_last_rows_and_sums_repeats():
    layer = CompactMaskedEmbedding(10, 2, sparsity=0.5, growth_scores="window", score_capacity=4)
    layer.build(None)
    layer.score_tracking.assign(True)
    for ids in ([1, 2, 3], [3, 7, 1]):  # ring of 4: keeps 3 | 3, 7, 1 (the oldest 1, 2 are overwritten)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(tf.constant(ids)) * tf.constant([1.0, 2.0]))
        tape.gradient(loss, layer.values)
    positions, scores = layer.window_scores()
    got = dict(zip(positions.numpy().tolist(), scores.numpy().tolist()))
    assert got == {6: 2.0, 7: 4.0, 14: 1.0, 15: 2.0, 2: 1.0, 3: 2.0}
    layer.reset_scores()
    assert int(tf.size(layer.window_scores()[0])) == 0


def test_export_format_straight_from_the_training_layout(monkeypatch):
    """compact.from_layer == encode(E ⊙ M, M) bit for bit, without ever building the whole table."""
    from dsl_tf import compact

    x, y = _data()
    model = _model(CompactMaskedEmbedding, sparsity=0.75)
    model.fit(x, y, batch_size=20, verbose=0, callbacks=[DynamicSparsity(0.75, 5)])
    table = model.layers[0]
    reference = compact.encode(table.effective_table().numpy(), table.dense_mask().numpy(), "float16")
    monkeypatch.setattr(CompactMaskedEmbedding, "effective_table", lambda self: pytest.fail("densified"))
    monkeypatch.setattr(CompactMaskedEmbedding, "dense_mask", lambda self: pytest.fail("densified"))
    got = compact.from_layer(table, "float16")
    np.testing.assert_array_equal(got.bitmask, reference.bitmask)
    np.testing.assert_array_equal(got.values, reference.values)
    np.testing.assert_array_equal(got.row_offsets, reference.row_offsets)


def test_numpy_scalars_and_bad_arguments():
    layer = CompactMaskedEmbedding(np.int64(15), 2, sparsity=np.float32(0.9), score_capacity=np.int64(3))
    assert layer.sparsity == 0.9 and layer.budget == 3 and layer.score_capacity == 3
    for bad in ("0.8", True, 1.0, 0.0):
        with pytest.raises(ValueError, match="sparsity must be a float in"):
            CompactMaskedEmbedding(10, 2, sparsity=bad)
    with pytest.raises(ValueError, match="growth_scores must be one of"):
        CompactMaskedEmbedding(10, 2, growth_scores="exact")
    with pytest.raises(ValueError, match="score_capacity must be a positive integer, got 0"):
        CompactMaskedEmbedding(10, 2, score_capacity=0)


def test_int8_scores_rank_like_the_exact_ones_in_a_byte_per_entry():
    """The int8 accumulator keeps each row's sum to within half a step (its largest |score| / 254)
    over many batches with repeated rows, so the entries it ranks first are the exact ones'."""
    rows, dim = 50, 16
    exact = CompactMaskedEmbedding(rows, dim, sparsity=0.5, growth_scores="dense")
    cheap = CompactMaskedEmbedding(rows, dim, sparsity=0.5, growth_scores="int8")
    rng = np.random.default_rng(0)
    for layer in (exact, cheap):
        layer.build(None)
    for _ in range(30):
        ids = tf.constant(rng.integers(0, rows, 64))
        grads = tf.constant(rng.normal(size=(64, dim)).astype(np.float32))
        exact._add_scores(grads, ids)
        cheap._add_scores(grads, ids)
    ref = exact.growth_scores.numpy()
    got = cheap.score_reader()(0, rows).numpy()
    step = np.abs(ref).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - ref) <= 0.5 * step * 30 + 1e-6)  # at most half a step lost per update of a row
    top = lambda a: set(np.argsort(-np.abs(a).ravel())[:40].tolist())  # noqa: E731
    assert len(top(got) & top(ref)) >= 38
    assert sum(v.shape.num_elements() * v.dtype.size for v in (cheap.score_q, cheap.score_scale)) == rows * (dim + 4)
    cheap.reset_scores(0.5)
    np.testing.assert_allclose(cheap.score_reader()(0, rows).numpy(), got * 0.5, rtol=1e-6)


@pytest.mark.parametrize("make_optimizer, dense", [
    (lambda: tf.keras.optimizers.Adam(0.01), True),
    (lambda: dsl_tf.LazyAdam(0.01), False),
    (lambda: tf.keras.optimizers.SGD(0.1), False),
])
def test_value_gradients_are_dense_only_for_optimizers_that_update_the_whole_variable(make_optimizer, dense):
    """Keras Adam decays every moment on every step: the callback gives it a dense [budget] gradient
    (no unique/scatter-add sparse path); LazyAdam and SGD keep O(batch) IndexedSlices."""
    x, y = _data()
    model = _model(CompactMaskedEmbedding, sparsity=0.5, optimizer=make_optimizer())
    model.fit(x, y, batch_size=20, epochs=1, verbose=0,
              callbacks=[DynamicSparsity(0.5, update_interval=1000, end_step=10**6)])
    table = model.layers[0]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(table(tf.constant([[1, 2]])))
    grad = tape.gradient(loss, table.values)
    assert isinstance(grad, tf.IndexedSlices) is not dense
    looked_up = int(table.row_splits[3] - table.row_splits[1])  # the entries of rows 1 and 2
    if dense:
        assert grad.shape == [table.budget] and int(tf.math.count_nonzero(grad)) == looked_up
    else:
        assert sorted(grad.indices.numpy().tolist()) == list(range(int(table.row_splits[1]), int(table.row_splits[3])))


@pytest.mark.parametrize("scores", ["dense", "int8", "window", "none"])
@pytest.mark.parametrize("dense_gradients", [False, True])
def test_whole_table_lookup_equals_the_row_lookup(scores, dense_gradients):
    """A traced lookup of ``tf.range(rows)`` (LightGCN reads its whole table every step) skips the
    deduplication and gathers: same rows, same values' gradient, same growth scores as the same ids
    looked up as data."""
    rng = np.random.default_rng(7)
    rows, dim = 50, 6
    tables = []
    for _ in range(2):
        layer = CompactMaskedEmbedding(rows, dim, sparsity=0.7, growth_scores=scores, score_capacity=64)
        layer.build(None)
        layer.set_layout(tf.constant(np.sort(rng.choice(rows * dim, layer.budget, replace=False)), tf.int64))
        layer.use_dense_gradients(dense_gradients)
        if scores != "none":
            layer.score_tracking.assign(True)
        tables.append(layer)
    whole, by_rows = tables
    by_rows.set_layout(whole.positions())
    values = rng.normal(size=whole.budget).astype(np.float32)
    for layer in tables:
        layer.values.assign(values)
    weights = tf.constant(rng.normal(size=(rows, dim)).astype(np.float32))

    @tf.function
    def step(layer, ids=None):
        with tf.GradientTape() as tape:
            out = layer(tf.range(rows, dtype=tf.int64) if ids is None else ids)
            loss = tf.reduce_sum(out * out * weights)
        return out, tf.convert_to_tensor(tape.gradient(loss, layer.values))

    out, grad = step(whole)
    traced = {op.type for op in step.get_concrete_function(whole).graph.get_operations()}
    assert "Unique" not in traced and "Unique" in {
        op.type for op in step.get_concrete_function(by_rows, tf.TensorSpec([rows], tf.int64)).graph.get_operations()}
    expected_out, expected_grad = step(by_rows, tf.constant(np.arange(rows), tf.int64))  # data: not known when traced
    np.testing.assert_array_equal(out.numpy(), expected_out.numpy())
    np.testing.assert_array_equal(out.numpy(), by_rows.effective_table().numpy())
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=1e-6)
    if scores in ("dense", "int8"):
        np.testing.assert_allclose(whole.score_reader()(0, rows).numpy(), by_rows.score_reader()(0, rows).numpy(),
                                   rtol=1e-6)
        assert np.count_nonzero(whole.score_reader()(0, rows).numpy()) > 0
    if scores == "window":
        np.testing.assert_array_equal(whole.window_scores()[0].numpy(), by_rows.window_scores()[0].numpy())
        np.testing.assert_allclose(whole.window_scores()[1].numpy(), by_rows.window_scores()[1].numpy(), rtol=1e-6)
