"""Prune / grow selection: the one place that ranks weights.

All functions work on flat 1-D tensors of a table (or of several tables concatenated,
for a global budget) and are vectorised TF ops: they are meant to run only at an
exploration step. Ties at the selection boundary are broken uniformly at random (stateless, from
``seed``); distinct values are ranked exactly.
"""

from __future__ import annotations

import math

import tensorflow as tf

from dsl_tf.layers import PositionBitmap

_NEG_INF = float("-inf")


CHUNK = 1 << 24
"""Entries per chunk of :func:`random_positions`: memory stays O(chunk + count)."""


def random_positions(size: int, count: int, seed: tuple[int, int]) -> tf.Tensor:
    """``count`` distinct positions in ``[0, size)`` (in no particular order), drawn at random.

    Stratified, so that no tensor of ``size`` is ever made (tables of billions of entries):
    each chunk of :data:`CHUNK` entries gets its proportional share of ``count`` (largest
    remainders first), drawn uniformly inside the chunk. Every entry has probability
    ``count / size``. Deterministic in ``(seed, size, count)``. int64 throughout.

    >>> random_positions(10, 3, (0, 1)).shape
    TensorShape([3])
    """
    size, count = int(size), int(count)
    if not 0 <= count <= size:
        raise ValueError(f"count must be in [0, {size}], got {count!r}")
    starts = list(range(0, size, CHUNK))
    lengths = [min(CHUNK, size - start) for start in starts]
    quotas = [count * n // size for n in lengths]
    by_remainder = sorted(range(len(lengths)), key=lambda i: (-(count * lengths[i] % size), i))
    for i in by_remainder[: count - sum(quotas)]:
        quotas[i] += 1
    parts = [tf.zeros([0], tf.int64)]
    for index, (start, length, quota) in enumerate(zip(starts, lengths, quotas)):
        if quota:
            keys = tf.random.stateless_uniform([length], seed=_fold(seed, index))
            parts.append(top_k_indices(keys, quota, _fold(seed, -index - 1)) + start)
    return tf.concat(parts, 0)


def random_mask(size: int, num_active: int, seed: tuple[int, int]) -> tf.Tensor:
    """A bool vector of ``size`` with exactly ``num_active`` True entries, at random
    (:func:`random_positions`).

    >>> int(tf.reduce_sum(tf.cast(random_mask(10, 3, (0, 1)), tf.int32)))
    3
    """
    if not 0 <= num_active <= size:
        raise ValueError(f"num_active must be in [0, {size}], got {num_active!r}")
    return scatter_flags(size, random_positions(size, num_active, seed))


def _fold(seed, index: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), index)


def top_k_indices(keys: tf.Tensor, k: tf.Tensor | int, seed) -> tf.Tensor:
    """Indices (int64) of the ``k`` largest ``keys``, ties at the k-th value broken at random.

    Everything strictly above the k-th largest value is taken; the rest is drawn
    uniformly (stateless, from ``seed``) among the entries equal to it. The k-th largest
    value is found by a radix select on the keys' float32 bit patterns (two bincount
    passes of 16 bits), not by ``tf.math.top_k``, whose cost on CPU grows with ``k`` (42 s
    for k = 18M of 64M): O(n) time, int64 counts (no 2^31 limit).

    >>> sorted(top_k_indices(tf.constant([3.0, 1.0, 4.0, 1.0, 5.0]), 2, (0, 0)).numpy().tolist())
    [2, 4]
    """
    return _top_k_indices(tf.cast(keys, tf.float32), tf.cast(k, tf.int64), tf.cast(seed, tf.int64))


@tf.function(reduce_retracing=True)
def _top_k_indices(keys, k, seed):
    def select() -> tf.Tensor:
        sortable = _sortable_bits(keys)  # int64 in [0, 2^32), same order as keys
        high = sortable // 65536
        top = _kth_bucket(high, k)
        above_high = tf.math.count_nonzero(high > top, dtype=tf.int64)
        low = tf.boolean_mask(sortable % 65536, high == top)
        threshold = top * 65536 + _kth_bucket(low, k - above_high)
        above = tf.where(sortable > threshold)[:, 0]
        ties = tf.random.experimental.stateless_shuffle(tf.where(sortable == threshold)[:, 0], seed=seed)
        return tf.concat([above, ties[: k - tf.size(above, out_type=tf.int64)]], axis=0)

    return tf.cond(k > 0, select, lambda: tf.zeros([0], tf.int64))


def _sortable_bits(keys: tf.Tensor) -> tf.Tensor:
    """float32 -> int64 in [0, 2^32) with the same order: IEEE bits, with the magnitude
    bits of negatives flipped; ``-0.0`` is made ``+0.0`` first so that the two tie."""
    bits = tf.cast(tf.bitcast(keys + 0.0, tf.int32), tf.int64)
    return tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits) + 2**31


def _kth_bucket(buckets: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """The largest b in [0, 65536) with count(buckets >= b) >= k (1 <= k <= size)."""
    counts = tf.math.bincount(buckets, minlength=65536, maxlength=65536, dtype=tf.int64)
    at_least = tf.cumsum(counts, reverse=True)
    return tf.reduce_max(tf.where(at_least >= k)[:, 0])


def swap_count(active: int, size: int, ratio: float, exclude_pruned: bool = False) -> int:
    """How many entries one exploration swaps: ``floor(ratio · active)``.

    With ``exclude_pruned=True`` (regrowth only among entries inactive *before* the prune)
    the count is capped at the inactive count, ``min(·, size − active)``; with the paper's
    rule (``False``) growth may reuse the just-pruned entries, so no cap is needed.

    >>> swap_count(9, 10, 0.5), swap_count(9, 10, 0.5, exclude_pruned=True)
    (4, 1)
    """
    wanted = math.floor(float(ratio) * int(active))
    return min(wanted, int(size) - int(active)) if exclude_pruned else wanted


def num_updates(mask: tf.Tensor, ratio: float, exclude_pruned: bool = False) -> tf.Tensor:
    """:func:`swap_count` of a bool mask (counted in int64), as an int64 tensor.

    >>> int(num_updates(tf.constant([True] * 9 + [False]), 0.5))
    4
    """
    active = int(tf.math.count_nonzero(mask, dtype=tf.int64))
    return tf.constant(swap_count(active, int(tf.size(mask, out_type=tf.int64)), ratio, exclude_pruned), tf.int64)


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


def _keep_after_prune(values: tf.Tensor, num_update, seed) -> tf.Tensor:
    """bool over ``values``: False for the ``num_update`` smallest ``|values|`` (the pruned)."""
    pruned = top_k_indices(-tf.abs(tf.cast(values, tf.float32)), num_update, seed)
    return tf.logical_not(scatter_flags(tf.size(values, out_type=tf.int64), pruned))


@tf.function(reduce_retracing=True)
def _select(positions, values, size, grow_scores, num_update, seed, exclude_pruned):
    keep = _keep_after_prune(values, num_update, seed)
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


def prune_and_grow_sparse(
    positions: tf.Tensor,
    values: tf.Tensor,
    size: int,
    candidates: tf.Tensor | None,
    candidate_scores: tf.Tensor | None,
    num_update: int,
    seed: tuple[int, int],
    exclude_pruned: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`prune_and_grow_positions` without any tensor of the table's size.

    Pruning is the same (smallest ``|values|``). Growth ranks only the given
    ``candidates`` (distinct int64 flat positions, e.g. the entries of the rows looked up
    in the last batches) by ``|candidate_scores|``; whatever is still due is grown
    uniformly at random among the free entries (all of them when ``candidates`` is None:
    SET). Memory is O(active + candidates + grown).

    Returns ``(keep, grown)`` as :func:`prune_and_grow_positions` does.

    >>> keep, grown = prune_and_grow_sparse(tf.constant([0, 1], tf.int64), tf.constant([0.1, 2.0]), 4,
    ...     tf.constant([2, 3], tf.int64), tf.constant([5.0, 1.0]), 1, (0, 0))
    >>> keep.numpy().tolist(), grown.numpy().tolist()
    ([False, True], [2])
    """
    positions = tf.cast(positions, tf.int64)
    seed = tf.constant(seed, tf.int64)
    num_update = int(num_update)
    keep = _keep_after_prune(values, num_update, seed)
    occupied = positions if exclude_pruned else tf.boolean_mask(positions, keep)
    grown = tf.zeros([0], tf.int64)
    if candidates is not None:
        candidates = tf.cast(candidates, tf.int64)
        free = tf.logical_not(PositionBitmap(size, occupied).contains(candidates))
        keys = tf.abs(tf.cast(tf.boolean_mask(candidate_scores, free), tf.float32))
        candidates = tf.boolean_mask(candidates, free)
        take = min(num_update, int(tf.size(candidates)))
        grown = tf.gather(candidates, top_k_indices(keys, take, seed + [2, 0]))
    rest = num_update - int(tf.size(grown))
    if rest:
        taken = tf.concat([occupied, grown], 0)
        grown = tf.concat([grown, random_free_positions(size, taken, rest, seed + [3, 0])], 0)
    return keep, grown


def random_free_positions(size: int, taken: tf.Tensor, count: int, seed, max_rounds: int = 50) -> tf.Tensor:
    """``count`` distinct positions of ``[0, size)`` not in ``taken`` (distinct int64),
    uniformly at random, by rejection sampling against a bitmap of ``taken``:
    O(count + taken + size / 64) memory, never a tensor of ``size``.

    >>> sorted(random_free_positions(5, tf.constant([0, 1, 3], tf.int64), 2, (0, 0)).numpy().tolist())
    [2, 4]
    """
    free = int(size) - int(tf.size(taken))
    if count > free:
        raise ValueError(f"cannot draw {count} free positions: only {free} of {size} are free")
    occupied = PositionBitmap(size, taken)
    found = tf.zeros([0], tf.int64)
    for round_ in range(max_rounds):
        need = count - int(tf.size(found))
        if need <= 0:
            break
        draws = int(need * size / max(free - int(tf.size(found)), 1) * 1.25) + 64
        sample = tf.random.stateless_uniform([draws], seed=_fold(seed, round_), minval=0, maxval=int(size),
                                             dtype=tf.int64)
        sample = tf.boolean_mask(sample, tf.logical_not(occupied.contains(sample)))
        found = tf.unique(tf.concat([found, sample], 0)).y  # keeps first occurrences, in order
    else:
        raise RuntimeError(f"random_free_positions: {count} positions not found in {max_rounds} rounds")
    return found[:count]


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
    # unsorted_segment_max is several times faster than scatter_nd on CPU (no locking)
    flags = tf.math.unsorted_segment_max(tf.ones_like(indices, tf.int8), indices, tf.cast(size, tf.int64))
    return flags > 0
