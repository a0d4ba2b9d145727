"""Prune / grow selection: the one place that ranks weights.

All functions work on flat 1-D tensors of a table (or of several tables concatenated,
for a global budget) and are vectorised TF ops: they are meant to run only at an
exploration step. Ties at the selection boundary are broken uniformly at random (stateless, from
``seed``); distinct values are ranked exactly.
"""

from __future__ import annotations

import tensorflow as tf

_NEG_INF = float("-inf")


def random_mask(size: int, num_active: int, seed: tuple[int, int]) -> tf.Tensor:
    """A bool vector of ``size`` with exactly ``num_active`` True entries, uniformly at random.

    >>> int(tf.reduce_sum(tf.cast(random_mask(10, 3, (0, 1)), tf.int32)))
    3
    """
    if not 0 <= num_active <= size:
        raise ValueError(f"num_active must be in [0, {size}], got {num_active!r}")
    keys = tf.random.stateless_uniform([size], seed=seed)
    chosen = tf.math.top_k(keys, k=num_active, sorted=False).indices
    return scatter_flags(size, chosen)


def top_k_indices(keys: tf.Tensor, k: tf.Tensor | int, seed) -> tf.Tensor:
    """Indices of the ``k`` largest ``keys``, ties at the k-th value broken at random.

    Everything strictly above the k-th largest value is taken; the rest is drawn
    uniformly (stateless, from ``seed``) among the entries equal to it. Only that tie set
    is shuffled, so the cost is one ``top_k`` plus two passes over ``keys``.

    >>> sorted(top_k_indices(tf.constant([3.0, 1.0, 4.0, 1.0, 5.0]), 2, (0, 0)).numpy().tolist())
    [2, 4]
    """
    k = tf.cast(k, tf.int32)
    values = tf.math.top_k(keys, k=k, sorted=False).values

    def select() -> tf.Tensor:
        threshold = tf.reduce_min(values)
        above = tf.where(keys > threshold)[:, 0]
        ties = tf.random.experimental.stateless_shuffle(tf.where(keys == threshold)[:, 0], seed=seed)
        return tf.concat([above, ties[: k - tf.size(above)]], axis=0)

    return tf.cond(k > 0, select, lambda: tf.zeros([0], tf.int64))


def num_updates(mask: tf.Tensor, ratio: float, exclude_pruned: bool = False) -> tf.Tensor:
    """How many entries one exploration swaps: ``floor(ratio · active)`` (counted in int64).

    With ``exclude_pruned=True`` (regrowth only among entries inactive *before* the prune)
    the count is capped at the inactive count, ``min(·, inactive)``; with the paper's rule
    (``False``) growth may reuse the just-pruned entries, so no cap is needed.

    >>> m = tf.constant([True] * 9 + [False])
    >>> int(num_updates(m, 0.5)), int(num_updates(m, 0.5, exclude_pruned=True))
    (4, 1)
    """
    active = tf.reduce_sum(tf.cast(mask, tf.int64))
    wanted = tf.cast(tf.floor(float(ratio) * tf.cast(active, tf.float64)), tf.int64)
    if not exclude_pruned:
        return wanted
    return tf.minimum(wanted, tf.size(mask, out_type=tf.int64) - active)


def prune_and_grow(
    mask: tf.Tensor,
    weights: tf.Tensor,
    grow_scores: tf.Tensor | None,
    num_update: tf.Tensor | int,
    seed: tuple[int, int],
    exclude_pruned: bool = False,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Swap ``num_update`` active entries for as many inactive ones.

    Prunes the active entries with the smallest ``|weights|`` and grows, among the entries
    inactive *after* the prune (the paper's and RigL's rule: a just-pruned entry may be
    regrown, from 0), those with the largest ``|grow_scores|``; ``grow_scores=None`` grows
    uniformly at random (SET). ``exclude_pruned=True`` grows only among entries inactive
    *before* this step. The number of active entries is unchanged.

    Args:
      mask: bool [n], True = active.
      weights: float [n].
      grow_scores: float [n] or None.
      num_update: entries to swap; ≤ the active count, and with ``exclude_pruned`` ≤ the
        inactive count (see :func:`num_updates`).
      seed: stateless seed (two ints) for tie-breaking / random growth.
      exclude_pruned: grow only among entries inactive before the prune.

    Returns:
      ``(new_mask, pruned_indices, grown_indices)``.

    >>> m = tf.constant([True, True, False, False])
    >>> new, pruned, grown = prune_and_grow(
    ...     m, tf.constant([0.1, 2.0, 0.0, 0.0]), tf.constant([0.0, 0.0, 5.0, 1.0]), 1, (0, 0))
    >>> new.numpy().tolist(), pruned.numpy().tolist(), grown.numpy().tolist()
    ([False, True, True, False], [0], [2])
    """
    return _prune_and_grow(
        tf.convert_to_tensor(mask, tf.bool),
        tf.convert_to_tensor(weights),
        None if grow_scores is None else tf.convert_to_tensor(grow_scores),
        tf.cast(num_update, tf.int64),
        tf.constant(seed, tf.int64),
        bool(exclude_pruned),
    )


def prune_and_grow_positions(
    positions: tf.Tensor,
    values: tf.Tensor,
    size: int,
    grow_scores: tf.Tensor | None,
    num_update: tf.Tensor | int,
    seed: tuple[int, int],
    exclude_pruned: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`prune_and_grow` on a compact table: its active entries only.

    Args:
      positions: int64 [n], distinct flat positions of the active entries, ascending.
      values: float [n], their weights.
      size: number of entries of the whole (flat) table.
      grow_scores: float [size] or None (random growth).
      num_update, seed, exclude_pruned: as in :func:`prune_and_grow`.

    Returns:
      ``(keep, grown)``: bool [n], False for the pruned entries; int64 [num_update], the
      flat positions grown. Given the same table, the same entries are chosen as by
      :func:`prune_and_grow` (both storages share this ranking).

    >>> keep, grown = prune_and_grow_positions(
    ...     tf.constant([0, 1], tf.int64), tf.constant([0.1, 2.0]), 4, tf.constant([0.0, 0.0, 5.0, 1.0]), 1, (0, 0))
    >>> keep.numpy().tolist(), grown.numpy().tolist()
    ([False, True], [2])
    """
    return _select(
        tf.cast(positions, tf.int64),
        tf.convert_to_tensor(values),
        tf.cast(size, tf.int64),
        None if grow_scores is None else tf.convert_to_tensor(grow_scores),
        tf.cast(num_update, tf.int64),
        tf.constant(seed, tf.int64),
        bool(exclude_pruned),
    )


@tf.function(reduce_retracing=True)
def _select(positions, values, size, grow_scores, num_update, seed, exclude_pruned):
    prune_keys = -tf.abs(tf.cast(values, tf.float32))
    keep = tf.logical_not(scatter_flags(tf.size(positions, out_type=tf.int64),
                                        top_k_indices(prune_keys, num_update, seed)))
    occupied = scatter_flags(size, positions if exclude_pruned else tf.boolean_mask(positions, keep))
    if grow_scores is None:
        candidate_keys = tf.random.stateless_uniform([size], seed=seed + [1, 0])
    else:
        candidate_keys = tf.abs(tf.cast(grow_scores, tf.float32))
    grown = top_k_indices(tf.where(occupied, _NEG_INF, candidate_keys), num_update, seed + [2, 0])
    return keep, grown


@tf.function(reduce_retracing=True)
def _prune_and_grow(mask, weights, grow_scores, num_update, seed, exclude_pruned):
    size = tf.size(mask, out_type=tf.int64)
    active = tf.where(mask)[:, 0]  # rank only the active entries for pruning
    keep, grown = _select(active, tf.gather(weights, active), size, grow_scores, num_update, seed,
                          exclude_pruned)
    pruned = tf.boolean_mask(active, tf.logical_not(keep))
    new_mask = tf.logical_and(mask, tf.logical_not(scatter_flags(size, pruned)))
    return tf.logical_or(new_mask, scatter_flags(size, grown)), pruned, grown


def magnitude_mask(weights: tf.Tensor, num_active: int, seed: tuple[int, int]) -> tf.Tensor:
    """Keep the ``num_active`` largest ``|weights|`` (one-shot magnitude pruning, OMP)."""
    return scatter_flags(
        tf.size(weights, out_type=tf.int64),
        top_k_indices(tf.abs(tf.cast(weights, tf.float32)), num_active, seed),
    )


def scatter_flags(size: tf.Tensor | int, indices: tf.Tensor) -> tf.Tensor:
    """A bool vector of ``size``, True at ``indices``.

    >>> scatter_flags(4, tf.constant([0, 2])).numpy().tolist()
    [True, False, True, False]
    """
    indices = tf.cast(indices, tf.int64)
    return tf.scatter_nd(
        indices[:, None], tf.ones_like(indices, dtype=tf.bool), tf.reshape(tf.cast(size, tf.int64), [1])
    )
