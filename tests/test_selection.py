"""Selection: exact budgets and exact ranking against numpy references."""

import numpy as np
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl_tf import masks, selection


def _np_prune_grow(mask, w, score, k):
    active = np.flatnonzero(mask)
    inactive = np.flatnonzero(~mask)
    pruned = active[np.argsort(np.abs(w[active]), kind="stable")[:k]]
    grown = inactive[np.argsort(-np.abs(score[inactive]), kind="stable")[:k]]
    new = mask.copy()
    new[pruned] = False
    new[grown] = True
    return new, set(pruned.tolist()), set(grown.tolist())


@settings(max_examples=30, deadline=None)
@given(st.integers(10, 400), st.floats(0.05, 0.95), st.floats(0.0, 1.0), st.integers(0, 2**30))
def test_prune_smallest_grow_largest_like_numpy(size, sparsity, ratio, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(size, bool)
    mask[rng.choice(size, masks.budget(size, sparsity), replace=False)] = True
    w = rng.permutation(size).astype(np.float32) - size / 2  # distinct |w| up to sign ...
    w = np.where(w >= 0, w + 0.25, w)  # ... made distinct in magnitude
    score = rng.permutation(size).astype(np.float32) * rng.choice([-1, 1], size)
    k = int(selection.num_updates(tf.constant(mask), ratio).numpy())
    assert k == min(int(np.floor(ratio * mask.sum())), size - mask.sum())
    new, pruned, grown = selection.prune_and_grow(mask, w, score, k, (seed, 1))
    ref_new, ref_pruned, ref_grown = _np_prune_grow(mask, w, score, k)
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
)
def test_budget_is_exact(rows, dim, sparsity, ratio, kind, seed):
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
    k = selection.num_updates(mask, ratio)
    new, pruned, grown = selection.prune_and_grow(
        mask, w.astype(np.float32), None if kind == "scoreless" else s.astype(np.float32), k, (seed, 3)
    )
    assert int(tf.reduce_sum(tf.cast(new, tf.int32))) == b
    pruned, grown, old = pruned.numpy(), grown.numpy(), mask.numpy()
    assert len(set(pruned)) == len(pruned) == len(grown) == len(set(grown)) == int(k)
    assert old[pruned].all() and not old[grown].any()  # grown only from previously inactive
    assert not new.numpy()[pruned].any() and new.numpy()[grown].all()


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
