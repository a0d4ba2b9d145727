"""Selection: exact budgets and exact ranking against numpy references."""

import numpy as np
import tensorflow as tf

import dsl_tf
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsl_tf import masks, selection


def _np_prune_grow(mask, w, score, k, exclude_pruned):
    active = np.flatnonzero(mask)
    pruned = active[np.argsort(np.abs(w[active]), kind="stable")[:k]]
    new = mask.copy()
    new[pruned] = False
    candidates = np.flatnonzero(~(mask if exclude_pruned else new))
    grown = candidates[np.argsort(-np.abs(score[candidates]), kind="stable")[:k]]
    new[grown] = True
    return new, set(pruned.tolist()), set(grown.tolist())


@settings(max_examples=40, deadline=None)
@given(st.integers(10, 400), st.floats(0.05, 0.95), st.floats(0.0, 1.0), st.integers(0, 2**30), st.booleans())
def test_prune_smallest_grow_largest_like_numpy(size, sparsity, ratio, seed, exclude_pruned):
    rng = np.random.default_rng(seed)
    mask = np.zeros(size, bool)
    mask[rng.choice(size, masks.budget(size, sparsity), replace=False)] = True
    w = rng.permutation(size).astype(np.float32) - size / 2  # distinct |w| up to sign ...
    w = np.where(w >= 0, w + 0.25, w)  # ... made distinct in magnitude
    score = rng.permutation(size).astype(np.float32) * rng.choice([-1, 1], size)
    k = int(selection.num_updates(tf.constant(mask), ratio, exclude_pruned).numpy())
    wanted = int(np.floor(ratio * mask.sum()))
    assert k == (min(wanted, size - mask.sum()) if exclude_pruned else wanted)
    new, pruned, grown = selection.prune_and_grow(mask, w, score, k, (seed, 1), exclude_pruned)
    ref_new, ref_pruned, ref_grown = _np_prune_grow(mask, w, score, k, exclude_pruned)
    np.testing.assert_array_equal(new.numpy(), ref_new)
    assert set(pruned.numpy().tolist()) == ref_pruned
    assert set(grown.numpy().tolist()) == ref_grown


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 60),
    dim=st.integers(1, 16),
    sparsity=st.floats(0.01, 0.99),
    ratio=st.floats(0.0, 1.0),
    kind=st.sampled_from(["random", "ties", "zeros", "scoreless"]),
    seed=st.integers(0, 2**30),
    exclude_pruned=st.booleans(),
)
def test_budget_is_exact(rows, dim, sparsity, ratio, kind, seed, exclude_pruned):
    size = rows * dim
    rng = np.random.default_rng(seed)
    b = masks.budget(size, sparsity)
    mask = selection.random_mask(size, b, (seed, 0))
    assert int(tf.reduce_sum(tf.cast(mask, tf.int32))) == b
    if kind == "random":
        w, s = rng.normal(size=size), rng.normal(size=size)
    elif kind == "ties":
        w, s = rng.integers(-2, 3, size).astype(float), rng.integers(-1, 2, size).astype(float)
    else:
        w, s = np.zeros(size), np.zeros(size)
    k = selection.num_updates(mask, ratio, exclude_pruned)
    new, pruned, grown = selection.prune_and_grow(
        mask, w.astype(np.float32), None if kind == "scoreless" else s.astype(np.float32), k, (seed, 3),
        exclude_pruned,
    )
    assert int(tf.reduce_sum(tf.cast(new, tf.int32))) == b
    pruned, grown, old, new = pruned.numpy(), grown.numpy(), mask.numpy(), new.numpy()
    assert len(set(pruned)) == len(pruned) == len(grown) == len(set(grown)) == int(k)
    assert old[pruned].all() and new[grown].all()
    kept = old.copy()
    kept[pruned] = False
    assert not kept[grown].any()  # grown only from entries inactive after the prune ...
    if exclude_pruned:
        assert not old[grown].any()  # ... and, with exclude_pruned, inactive before it
    np.testing.assert_array_equal(new, kept | np.isin(np.arange(size), grown))


def test_paper_rule_swaps_the_full_ratio_at_low_sparsity():
    """At s=0.1 the paper's rule swaps floor(ρ·active); excluding the just-pruned caps it."""
    size, rng = 800, np.random.default_rng(0)
    mask = selection.random_mask(size, masks.budget(size, 0.1), (0, 0))
    active = int(tf.math.count_nonzero(mask))
    assert active == 720
    assert int(selection.num_updates(mask, 0.497)) == 357
    assert int(selection.num_updates(mask, 0.497, exclude_pruned=True)) == 80
    w, s = rng.normal(size=size).astype(np.float32), rng.normal(size=size).astype(np.float32)
    new, pruned, grown = selection.prune_and_grow(mask, w, s, 357, (0, 1))
    assert int(tf.math.count_nonzero(new)) == 720
    regrown = np.intersect1d(pruned.numpy(), grown.numpy())
    assert len(regrown) > 0  # strongest-scored just-pruned entries come back


def test_ties_are_broken_at_random_not_by_index():
    mask = tf.constant([True] * 50 + [False] * 950)
    zeros = tf.zeros([1000])
    grown = [selection.prune_and_grow(mask, zeros, zeros, 10, (s, 0))[2].numpy() for s in range(5)]
    assert len({tuple(sorted(g)) for g in grown}) == 5  # different seeds, different picks
    assert max(int(g.max()) for g in grown) > 500  # not the lowest indices


def test_random_mask_is_reproducible_and_exact():
    a = selection.random_mask(1000, 123, (7, 0)).numpy()
    b = selection.random_mask(1000, 123, (7, 0)).numpy()
    c = selection.random_mask(1000, 123, (8, 0)).numpy()
    assert a.sum() == 123 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_magnitude_mask_keeps_largest():
    w = tf.constant([0.1, -5.0, 0.3, 2.0, -0.2])
    assert selection.magnitude_mask(w, 2, (0, 0)).numpy().tolist() == [False, True, False, True, False]


def test_budget_rounding():
    assert [masks.budget(1000, s) for s in (0.5, 0.8, 0.9)] == [500, 200, 100]
    assert masks.budget(5, 0.5) == 3 and masks.budget(3, 0.5) == 2


def test_random_positions_are_exact_distinct_and_uniform(monkeypatch):
    monkeypatch.setattr(selection, "CHUNK", 64)  # many chunks on a small table
    size, count = 1000, 300
    counts = np.zeros(size)
    for seed in range(100):
        pos = selection.random_positions(size, count, (seed, 0)).numpy()
        assert len(pos) == count == len(set(pos.tolist())) and pos.min() >= 0 and pos.max() < size
        counts[pos] += 1
    # every entry has probability 0.3: 100 draws -> mean 30, binomial sd 4.6
    assert abs(counts.mean() - 30) < 1e-9 and counts.min() > 10 and counts.max() < 50
    np.testing.assert_array_equal(selection.random_positions(size, count, (7, 0)),
                                  selection.random_positions(size, count, (7, 0)))


def test_random_free_positions_avoid_taken_and_are_distinct():
    taken = tf.constant(np.arange(0, 1000, 2), tf.int64)  # even positions taken
    free = selection.random_free_positions(1000, taken, 499, (0, 0)).numpy()
    assert len(set(free.tolist())) == 499 and np.all(free % 2 == 1)
    with pytest.raises(ValueError, match="cannot draw 501 free positions: only 500 of 1000 are free"):
        selection.random_free_positions(1000, taken, 501, (0, 0))


@settings(max_examples=25, deadline=None)
@given(st.integers(20, 300), st.integers(1, 5), st.floats(0.1, 0.9), st.floats(0.0, 1.0), st.integers(0, 2**30),
       st.booleans(), st.sampled_from(["scores", "window", "random"]), st.booleans())
@example(rows=20, dim=1, sparsity=0.75, ratio=1.0, seed=0, exclude_pruned=True, growth="window", scaled=True)  # empty rows
def test_compact_chunked_selection_matches_the_dense_one(rows, dim, sparsity, ratio, seed, exclude_pruned, growth,
                                                         scaled):
    """compact_prune_and_grow, by row chunks of 64 rows and value chunks of 128 entries, prunes
    and grows what prune_and_grow chooses on the dense mask (exact growth scores, or a window
    holding every row; ``scaled``: scores times the row norms, ``grow_by="row_scaled"``); random
    growth keeps the budget and only takes free entries."""
    size = rows * dim
    rng = np.random.default_rng(seed)
    layer = dsl_tf.CompactMaskedEmbedding(rows, dim, sparsity=sparsity, score_capacity=rows,
                                          growth_scores="window" if growth == "window" else "dense")
    layer.build(None)
    positions = np.sort(rng.choice(size, layer.budget, replace=False))
    layer.set_layout(tf.constant(positions))
    w = rng.permutation(size).astype(np.float32) + 0.5
    score = rng.permutation(size).astype(np.float32) - size / 2  # |score| ties: broken alike in both storages
    if growth == "window":  # ranked in window order, not flat order: no ties, so that the choice is unique
        score = (score + size) * rng.choice([-1, 1], size)
    layer.values.assign(w[positions])
    if growth == "window":
        layer.score_rows.assign(rng.permutation(rows))
        layer.score_grads.assign(score.reshape(rows, dim)[layer.score_rows.numpy()])
    else:
        layer.growth_scores.assign(score.reshape(rows, dim))
    mask = np.zeros(size, bool)
    mask[positions] = True
    k = int(selection.num_updates(tf.constant(mask), ratio, exclude_pruned).numpy())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "CHUNK", 128)
        scale = selection.row_scale(selection.row_norms(layer.values, layer.row_splits)) if scaled else None
        keep, grown = selection.compact_prune_and_grow(layer, k, (seed, 1), growth, exclude_pruned, grow_scale=scale)
    grown = np.concatenate([g.numpy() for g in grown])
    if scaled:
        norms = np.linalg.norm((w * mask).reshape(rows, dim).astype(np.float64), axis=1)
        np.testing.assert_allclose(scale.numpy(), np.where(norms > 0, norms, 1.0), rtol=1e-6)  # empty rows: 1
        score = score * np.repeat(scale.numpy(), dim)  # the products compact ranks, in float32
    new, pruned, ref_grown = selection.prune_and_grow(mask, w, None if growth == "random" else score, k, (seed, 1),
                                                      exclude_pruned)
    assert set(positions[~keep.numpy()].tolist()) == set(pruned.numpy().tolist())
    assert len(grown) == len(set(grown.tolist())) == k
    if growth == "random":
        occupied = positions if exclude_pruned else positions[keep.numpy()]
        assert not set(grown.tolist()) & set(occupied.tolist()) and grown.min(initial=0) >= 0 and grown.max(initial=0) < size
    else:
        assert set(grown.tolist()) == set(ref_grown.numpy().tolist())
    masks.apply_compact_update(layer, keep, [tf.constant(grown, tf.int64)])
    expected = np.sort(np.concatenate([positions[keep.numpy()], grown]))
    np.testing.assert_array_equal(layer.positions().numpy(), expected)


def test_chunks_on_threads_choose_and_lay_out_what_one_thread_does(monkeypatch):
    """Random growth and the layout rebuild by 5 row chunks of 64 rows, on 1 or 2 threads
    (layers.map_chunks): the same grown positions, layout and sources, every swap exact."""
    from dsl_tf import layers

    rng = np.random.default_rng(3)
    rows, dim = 300, 4
    old = np.sort(rng.choice(rows * dim, 360, replace=False))
    weights = rng.permutation(360).astype(np.float32)
    monkeypatch.setattr(selection, "CHUNK", 128)
    results = []
    for workers in (1, 2):
        monkeypatch.setattr(layers, "CHUNK_WORKERS", workers)
        layer = dsl_tf.CompactMaskedEmbedding(rows, dim, sparsity=0.7, growth_scores="none")
        layer.build(None)
        layer.set_layout(tf.constant(old, tf.int64))
        layer.values.assign(weights)
        keep, grown = selection.compact_prune_and_grow(layer, 100, (4, 2), "random")
        grown = np.concatenate([g.numpy() for g in grown])
        source, regrown = layer.rebuild_layout(keep, [tf.constant(grown)], max_entries=128)
        assert len(layer.row_chunks(128)) == 5 and len(grown) == len(set(grown.tolist())) == 100
        kept = old[keep.numpy()]
        assert np.sum(~keep.numpy()) == 100 and not set(grown.tolist()) & set(kept.tolist())
        np.testing.assert_array_equal(layer.positions().numpy(), np.sort(np.concatenate([kept, grown])))
        assert regrown == len(np.intersect1d(grown, old[~keep.numpy()]))
        results.append((grown, layer.positions().numpy(), source.numpy()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_chunks_of_2_31_entries_are_refused():
    """A chunk's layout marks its entries in int32: max_entries >= 2^31 is a clear error (checked
    before any variable is read, so an unbuilt layer of 2^26 x 64 entries shows it)."""
    layer = dsl_tf.CompactMaskedEmbedding(2**26, 64, sparsity=0.99)
    with pytest.raises(ValueError, match=r"row chunks of max_entries=4294967296 hold 2\^31 entries or more"):
        layer.rebuild_layout(None, [], max_entries=2**32)


def test_top_k_indices_orders_every_float_like_numpy():
    keys = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.25, np.inf, -2.0, 2.0], np.float32)
    order = np.argsort(-keys, kind="stable")
    for k in range(1, len(keys) + 1):
        got = set(selection.top_k_indices(keys, k, (0, k)).numpy().tolist())
        threshold = np.sort(keys)[::-1][k - 1]
        assert set(np.flatnonzero(keys > threshold)) <= got and len(got) == k
        assert all(keys[i] >= threshold for i in got), (k, got, order)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 12), st.floats(0.05, 0.95), st.floats(0.0, 1.0), st.integers(0, 2**30),
       st.booleans())
@example(rows=1, dim=1, sparsity=0.5, ratio=0.9999999999999999, seed=0, exclude_pruned=False)  # 1.0 in float32
def test_row_swap_prunes_and_grows_each_row_like_numpy(rows, dim, sparsity, ratio, seed, exclude_pruned):
    """``budget="per_row"``: each row is the numpy rule on that row alone, with its own swap
    count ``floor(ratio · k_r)`` or one more (capped at the row's free count with ``exclude_pruned``)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, dim)) > sparsity
    w, score = rng.normal(size=(rows, dim)), rng.normal(size=(rows, dim))  # distinct: no ties
    pruned, grown = selection.row_swap(tf.constant(mask), tf.constant(w, tf.float32), tf.constant(score, tf.float32),
                                       ratio, (seed, 1), exclude_pruned)
    new = (mask & ~pruned.numpy()) | grown.numpy()
    for r in range(rows):
        k = int(mask[r].sum())
        num = int(pruned.numpy()[r].sum())
        low = int(np.floor(ratio * k))
        assert num in ({min(low, dim - k), min(low + 1, dim - k)} if exclude_pruned else {low, low + 1}), (r, k, num)
        if ratio * k == low:  # no fractional part: no rounding up
            assert num == (min(low, dim - k) if exclude_pruned else low)
        want, want_pruned, want_grown = _np_prune_grow(mask[r], w[r], score[r], num, exclude_pruned)
        np.testing.assert_array_equal(new[r], want)
        assert set(np.flatnonzero(pruned.numpy()[r]).tolist()) == want_pruned
        assert set(np.flatnonzero(grown.numpy()[r]).tolist()) == want_grown
    np.testing.assert_array_equal(new.sum(1), mask.sum(1))


def test_row_swap_rounds_each_rows_swap_count_stochastically():
    """Rows of 3 entries at ρ_t = 0.1 swap 0.3 entries in expectation: 30 % of rows swap one, none
    more (a floor swapped none: exploration silently stopped once ρ_t · k_r < 1), at random
    rows, the same for the same seed."""
    mask = tf.constant(np.arange(16)[None, :].repeat(20_000, 0) < 3)
    weights = tf.random.stateless_normal([20_000, 16], (1, 2))
    pruned, grown = selection.row_swap(mask, weights, tf.random.stateless_normal([20_000, 16], (3, 4)), 0.1, (5, 6))
    per_row = pruned.numpy().sum(1)
    np.testing.assert_array_equal(per_row, grown.numpy().sum(1))
    assert set(per_row.tolist()) == {0, 1}
    assert abs(per_row.sum() - 6_000) < 4 * np.sqrt(20_000 * 0.3 * 0.7)  # 4 sigma of the binomial
    again, _ = selection.row_swap(mask, weights, tf.zeros([20_000, 16]), 0.1, (5, 6))
    np.testing.assert_array_equal(again.numpy(), pruned.numpy())
    other, _ = selection.row_swap(mask, weights, tf.zeros([20_000, 16]), 0.1, (5, 7))
    assert (other.numpy().sum(1) != per_row).sum() > 1_000


def test_row_swap_breaks_ties_at_random_not_by_column():
    """Rows nobody looked up have all-zero scores: the grown columns must not be the first ones."""
    mask = tf.constant(np.arange(64)[None, :].repeat(500, 0) < 16)
    pruned, grown = selection.row_swap(mask, tf.ones([500, 64]), tf.zeros([500, 64]), 0.5, (3, 4))
    columns = np.flatnonzero(grown.numpy().sum(0))
    assert int(tf.reduce_sum(tf.cast(grown, tf.int32))) == 500 * 8
    assert columns.min() < 16 and columns.max() > 48  # grown among the 56 free columns of each row, not 16..23
    counts = grown.numpy().sum(0)
    assert counts[16:].std() / counts[16:].mean() < 0.3  # about uniform over the free columns
