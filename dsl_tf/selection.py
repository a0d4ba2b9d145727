"""Prune / grow selection: the one place that ranks weights.

All functions work on flat 1-D tensors of a table (or of several tables concatenated,
for a global budget), or on a compact table by row chunks (:func:`compact_prune_and_grow`),
and are vectorised TF ops: they are meant to run only at an exploration step. Ranking is a
radix select over chunks of at most :data:`CHUNK` entries (:func:`top_k_chunks`), so memory
is O(chunk) beyond what is selected. Ties at the selection boundary are broken uniformly at
random (stateless, from ``seed``); distinct values are ranked exactly.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf

from dsl_tf.layers import PositionBitmap, map_chunks, row_chunks

_NEG_INF = float("-inf")


CHUNK = 1 << 24
"""Entries per chunk of the ranking, of :func:`random_positions` and of a compact table's
exploration: their temporaries stay O(chunk) beyond their inputs and outputs."""


def random_positions(size: int, count: int, seed: tuple[int, int], chunked: bool = False
                     ) -> tf.Tensor | list[tf.Tensor]:
    """``count`` distinct positions in ``[0, size)`` (in no particular order), drawn at random.

    Stratified, so that no tensor of ``size`` is ever made (tables of billions of entries):
    each chunk of :data:`CHUNK` entries gets its proportional share of ``count`` (largest
    remainders first), drawn uniformly inside the chunk. Every entry has probability
    ``count / size``. Deterministic in ``(seed, size, count)``. int64 throughout.
    ``chunked=True`` returns the chunks' positions as a list (one tensor per chunk, in
    chunk order) instead of concatenating them.

    >>> random_positions(10, 3, (0, 1)).shape
    TensorShape([3])
    """
    size, count = int(size), int(count)
    if not 0 <= count <= size:
        raise ValueError(f"count must be in [0, {size}], got {count!r}")
    starts = list(range(0, size, CHUNK))
    lengths = [min(CHUNK, size - start) for start in starts]
    parts = [tf.zeros([0], tf.int64)]
    for index, (start, length, quota) in enumerate(zip(starts, lengths, quotas(lengths, count))):
        if quota:
            keys = tf.random.stateless_uniform([length], seed=_fold(seed, index), minval=None, maxval=None,
                                               dtype=tf.int32)  # 32 random bits: few ties
            parts.append(top_k_indices(keys, quota, _fold(seed, -index - 1)) + start)
    return parts[1:] if chunked else tf.concat(parts, 0)


def quotas(sizes: list[int], count: int) -> list[int]:
    """Split ``count`` over parts of ``sizes`` proportionally, largest remainders first
    (ties to the earlier part); each quota is at most its size.

    >>> quotas([5, 5, 10], 7)
    [2, 2, 3]
    """
    total = sum(sizes)
    if not 0 <= count <= total:
        raise ValueError(f"count must be in [0, {total}], got {count!r}")
    if not total:
        return [0] * len(sizes)
    shares = [count * n // total for n in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(count * sizes[i] % total), i))
    for i in by_remainder[: count - sum(shares)]:
        shares[i] += 1
    return shares


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

    :func:`top_k_chunks` on ``keys`` cut into chunks of :data:`CHUNK` entries.

    >>> sorted(top_k_indices(tf.constant([3.0, 1.0, 4.0, 1.0, 5.0]), 2, (0, 0)).numpy().tolist())
    [2, 4]
    """
    keys = tf.convert_to_tensor(keys)
    n = int(tf.size(keys, out_type=tf.int64))
    starts = range(0, n, CHUNK)
    found = top_k_chunks(lambda: (keys[start:start + CHUNK] for start in starts), int(k), seed)
    return tf.concat([tf.zeros([0], tf.int64)] + [idx + start for start, idx in zip(starts, found)], 0)


def top_k_chunks(chunks: Callable[[], Iterable[tf.Tensor]], k: int, seed) -> Iterator[tf.Tensor]:
    """The ``k`` largest keys of a stream of chunks, chunk by chunk: for each chunk that
    ``chunks()`` yields, the int64 indices (within the chunk) of its entries among the ``k``
    largest of all chunks. Memory is O(one chunk), so keys never need to exist all at once.

    ``chunks`` is called three times (the same keys each time): a radix select on the keys'
    order-preserving 32-bit patterns finds the k-th largest value in two counting passes
    (65,536 bins of the high, then of the low 16 bits; O(n), no sort, no ``tf.math.top_k``,
    whose CPU cost grows with ``k``: 42 s for k = 18M of 64M), and the third pass takes
    every entry above it and the chosen ties. Ties at the k-th value are broken uniformly
    at random by their ordinal in the stream (stateless, from ``seed``), so the selection does
    not depend on how the keys are cut into chunks. Keys are float (NaN-free) or int32.
    Counts are int64 (no 2^31 limit).

    >>> chunks = lambda: iter([tf.constant([1.0, 9.0]), tf.constant([5.0])])
    >>> [i.numpy().tolist() for i in top_k_chunks(chunks, 2, (0, 0))]
    [[1], [0]]
    """
    k = int(k)
    if k <= 0:
        for _ in chunks():
            yield tf.zeros([0], tf.int64)
        return
    chunks, threshold, chosen = _threshold(chunks, k, seed)
    seen = 0
    for chunk in chunks():
        picked, count = _pick(_sortable(chunk), threshold, chosen, tf.constant(seen, tf.int64))
        seen += int(count)
        yield picked


def _threshold(chunks: Callable[[], Iterable[tf.Tensor]], k: int, seed
               ) -> tuple[Callable[[], Iterable[tf.Tensor]], tf.Tensor, tf.Tensor | None]:
    """The radix select of :func:`top_k_chunks` (``k`` >= 1): ``(chunks, threshold, chosen)``,
    the k-th largest key as an int32 order-preserving pattern and the ordinals (ascending, in
    stream order) of the keys equal to it that are taken (None: all of them), from two
    counting passes; ``chunks`` is the stream again (kept in memory if it is one chunk)."""
    high, kept = np.zeros(_BINS, np.int64), []
    for i, chunk in enumerate(chunks()):
        sortable = _sortable(chunk)
        high += _high_counts(sortable).numpy()
        kept = [sortable] if i == 0 else None  # a single chunk is kept for the next passes
    if kept:
        chunks = lambda: kept  # noqa: E731
    if k > high.sum():
        raise ValueError(f"k={k} is more than the {int(high.sum())} keys")
    top = _kth_bin(high, k)
    above_high = int(high[top + 1:].sum())
    low = np.zeros(_BINS, np.int64)
    for chunk in chunks():
        low += _low_counts(_sortable(chunk), tf.constant(top - _BINS // 2, tf.int32)).numpy()
    bottom = _kth_bin(low, k - above_high)
    threshold = tf.constant(((top - _BINS // 2) << 16) | bottom, tf.int32)
    ties, need = int(low[bottom]), k - above_high - int(low[bottom + 1:].sum())
    return chunks, threshold, None if need == ties else _choose(ties, need, seed)


_BINS = 1 << 16


def _sortable(keys: tf.Tensor) -> tf.Tensor:
    """float -> int32 with the same order (``-0.0`` ties with ``+0.0``); int32 unchanged."""
    keys = tf.convert_to_tensor(keys)
    if keys.dtype == tf.int32:
        return keys
    return _float_bits(tf.cast(keys, tf.float32))


@tf.function(reduce_retracing=True)
def _float_bits(keys):
    bits = tf.bitcast(keys + 0.0, tf.int32)  # + 0.0 makes -0.0 into +0.0
    # negatives: flip the magnitude bits, so that larger magnitudes sort lower
    return tf.bitwise.bitwise_xor(bits, tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 31), 0x7FFFFFFF))


@tf.function(reduce_retracing=True)
def _high_counts(sortable):
    return tf.math.bincount(tf.bitwise.right_shift(sortable, 16) + _BINS // 2, minlength=_BINS, maxlength=_BINS,
                            dtype=tf.int64)


@tf.function(reduce_retracing=True)
def _low_counts(sortable, top):
    low = tf.where(tf.bitwise.right_shift(sortable, 16) == top, tf.bitwise.bitwise_and(sortable, 0xFFFF), _BINS)
    return tf.math.bincount(low, minlength=_BINS, maxlength=_BINS, dtype=tf.int64)  # _BINS itself is dropped


def _kth_bin(counts: np.ndarray, k: int) -> int:
    """The largest bin b with ``sum(counts[b:]) >= k`` (1 <= k <= sum)."""
    return len(counts) - 1 - int(np.flatnonzero(np.cumsum(counts[::-1]) >= k)[0])


def _choose(ties: int, need: int, seed) -> tf.Tensor:
    """``need`` of ``ties`` tie ordinals, uniformly at random, ascending (int64)."""
    seed = tf.cast(seed, tf.int64)
    if ties <= CHUNK:
        return tf.sort(tf.random.experimental.stateless_shuffle(tf.range(ties, dtype=tf.int64), seed=seed)[:need])
    return tf.sort(random_positions(ties, need, _fold(seed, 7)))


@tf.function(reduce_retracing=True)
def _pick(sortable, threshold, chosen, seen):
    above = tf.where(sortable > threshold)[:, 0]
    ties = tf.where(sortable == threshold)[:, 0]
    count = tf.size(ties, out_type=tf.int64)
    if chosen is not None:  # the chosen ordinals that fall in this chunk
        lo, hi = tf.unstack(tf.searchsorted(chosen, tf.stack([seen, seen + count])))
        ties = tf.gather(ties, chosen[lo:hi] - seen)
    return tf.concat([above, ties], 0), count


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


def _keep_after_prune(values: tf.Tensor, num_update: int, seed) -> tf.Tensor:
    """bool over ``values``: False for the ``num_update`` smallest ``|values|`` (the pruned),
    ranked by :func:`top_k_chunks`' radix select (same choice, ties included)."""
    n = int(tf.size(values, out_type=tf.int64))
    if num_update <= 0:
        return tf.ones([n], tf.bool)
    starts = range(0, n, CHUNK)
    keys = tf.concat([tf.zeros([0], tf.int32)] + [_sortable(-tf.abs(tf.cast(values[a:a + CHUNK], tf.float32)))
                                                  for a in starts], 0)  # 4 bytes per value, once
    _, threshold, chosen = _threshold(lambda: (keys[a:a + CHUNK] for a in starts), num_update, seed)
    # the pruned are the keys above the threshold and the chosen ties: one elementwise pass (multi-threaded),
    # not top_k_chunks' indices scattered into flags; the ties are listed only when some of them stay
    keep = keys < threshold
    if chosen is None:
        return keep
    ties = tf.where(keys == threshold)[:, 0]
    return tf.logical_or(keep, tf.logical_not(scatter_flags(n, tf.gather(ties, chosen))) & (keys == threshold))


def _select(positions, values, size, grow_scores, num_update, seed, exclude_pruned):
    keep = _keep_after_prune(values, num_update, seed)
    occupied = scatter_flags(size, positions if exclude_pruned else tf.boolean_mask(positions, keep))
    if grow_scores is None:
        keys = tf.where(occupied, tf.int32.min, tf.random.stateless_uniform(
            [size], seed=seed + [1, 0], minval=None, maxval=None, dtype=tf.int32))
    else:
        keys = tf.where(occupied, _NEG_INF, tf.abs(tf.cast(grow_scores, tf.float32)))
    return keep, top_k_indices(keys, num_update, seed + [2, 0])


def _prune_and_grow(mask, weights, grow_scores, num_update, seed, exclude_pruned):
    size = int(tf.size(mask, out_type=tf.int64))
    active = tf.where(mask)[:, 0]  # rank only the active entries for pruning
    keep, grown = _select(active, tf.gather(weights, active), size, grow_scores, int(num_update), seed,
                          exclude_pruned)
    pruned = tf.boolean_mask(active, tf.logical_not(keep))
    new_mask = tf.logical_and(mask, tf.logical_not(scatter_flags(size, pruned)))
    return tf.logical_or(new_mask, scatter_flags(size, grown)), pruned, grown


GROWTH_SOURCES = ("scores", "window", "random")


def compact_prune_and_grow(
    layer,
    num_update: int,
    seed: tuple[int, int],
    growth: str = "scores",
    exclude_pruned: bool = False,
    prune_keys: tf.Tensor | None = None,
    grow_scale: tf.Tensor | None = None,
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """:func:`prune_and_grow` on a :class:`dsl_tf.CompactMaskedEmbedding`, by row chunks of at
    most :data:`CHUNK` entries, so that memory is O(budget + chunk): no tensor of the table's
    size is made (except the layer's own ``growth_scores`` if it keeps them).

    Pruning ranks the active values (smallest ``|w|``; or ``prune_keys``, ``[budget]``, e.g.
    :func:`row_relative_values`). Growth, among the entries free
    after the prune (or before it, ``exclude_pruned``), ranks scores times ``grow_scale``
    (float32 ``[rows]``, e.g. :func:`row_scale`; none: the scores as they are):

    * ``"scores"``: the largest accumulated ``|scores|`` (``growth_scores`` ``"dense"``, the
      exact accumulator, ranked by the same selection as the dense-mask storage's, so both
      choose the same entries; or ``"int8"``);
    * ``"window"``: the largest ``|Σ gradient|`` of the entries of the rows in the layer's
      score window (``window_scores``), the rest as ``"random"``;
    * ``"random"``: uniformly at random (SET), stratified by row chunk (each chunk's share
      proportional to its free entries).

    Returns ``(keep, grown)``: bool ``[budget]``, False for the pruned values; a list of int64
    tensors of distinct flat positions, ``num_update`` in all (for
    :func:`dsl_tf.masks.apply_compact_update`).
    """
    if growth not in GROWTH_SOURCES:
        raise ValueError(f"growth must be one of {GROWTH_SOURCES}, got {growth!r}")
    seed = tf.constant(seed, tf.int64)
    num_update = int(num_update)
    keep = _keep_after_prune(tf.convert_to_tensor(layer.values if prune_keys is None else prune_keys), num_update,
                             seed)
    chunks = layer.row_chunks(CHUNK)

    def occupied(r0: int, r1: int) -> tf.Tensor:  # local flat positions of the chunk's occupied entries
        v0, v1, local = layer.chunk_positions(r0, r1)
        return local if exclude_pruned else tf.boolean_mask(local, keep[v0:v1])

    dim = layer.output_dim
    if growth == "scores":
        read = layer.score_reader()

        def keys():
            for r0, r1 in chunks:
                taken = scatter_flags((r1 - r0) * dim, occupied(r0, r1))
                scores = read(r0, r1) if grow_scale is None else read(r0, r1) * grow_scale[r0:r1, None]
                yield tf.where(taken, _NEG_INF, tf.abs(tf.reshape(scores, [-1])))

        picked = top_k_chunks(keys, num_update, seed + [2, 0])
        return keep, [idx + r0 * dim for (r0, _), idx in zip(chunks, picked)]
    grown = tf.zeros([0], tf.int64)
    if growth == "window":
        candidates, candidate_scores = layer.window_scores()  # whole rows: row i's entries at i · dim + col
        # the candidates' occupied entries from the window rows' own entries: O(window), no pass over the chunks
        _, value_index, slot = layer._entries(tf.reshape(candidates, [-1, dim])[:, 0] // dim)
        taken = slot if exclude_pruned else tf.boolean_mask(slot, tf.gather(keep, value_index))
        free = tf.logical_not(scatter_flags(tf.size(candidates, out_type=tf.int64), taken))
        if grow_scale is not None:
            candidate_scores = candidate_scores * tf.gather(grow_scale, candidates // dim)
        candidates, keys = tf.boolean_mask(candidates, free), tf.abs(tf.boolean_mask(candidate_scores, free))
        grown = tf.gather(candidates, top_k_indices(keys, min(num_update, int(tf.size(keys))), seed + [2, 0]))
    grown_chunks = [grown]
    in_chunk = layer.split_by_chunk(grown, chunks)
    free_counts = []
    for (r0, r1), mine in zip(chunks, in_chunk):
        v0, v1 = layer.value_range(r0, r1)
        held = v1 - v0 if exclude_pruned else int(tf.math.count_nonzero(keep[v0:v1], dtype=tf.int64))
        free_counts.append((r1 - r0) * dim - held - int(tf.size(mine)))
    shares = quotas(free_counts, num_update - int(tf.size(grown)))

    def draw(c: int) -> tf.Tensor:
        (r0, r1), taken = chunks[c], tf.concat([occupied(*chunks[c]), in_chunk[c]], 0)
        return random_free_positions((r1 - r0) * dim, taken, shares[c], _fold(seed + [3, 0], c)) + r0 * dim

    return keep, grown_chunks + map_chunks(draw, [c for c, quota in enumerate(shares) if quota])


def row_swap(active: tf.Tensor, prune_keys: tf.Tensor, grow_keys: tf.Tensor, ratio: float, seed,
             exclude_pruned: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Prune and grow within each row: the exploration of ``DynamicSparsity(budget="per_row")``.

    Row ``r`` with ``k_r`` active entries swaps ``ratio · k_r`` of them in expectation: the
    floor, plus one with probability the fractional part (stochastic rounding). A floor alone
    would stop a row from exploring once ``ratio · k_r < 1`` (with 12.8 entries per row, for
    the last quarter of the cosine schedule; with 1.28, always); rounded, the total is
    ``ratio · budget`` on average, as with the paper's rule. Its active entries with the smallest ``|prune_keys|``
    are pruned and, among its entries free after the prune (before it, ``exclude_pruned``,
    which caps the swap at the row's free count), those with the largest ``|grow_keys|``
    grown; ties in random order. Every row keeps its count. Works on ``[rows, dim]`` tensors
    (at explorations, by row chunks: :func:`dsl_tf.layers.row_chunks`).

    Args:
      active: bool [rows, dim].
      prune_keys: float [rows, dim], e.g. the weights (only the active entries' are read).
      grow_keys: float [rows, dim], e.g. growth scores or uniform noise (only the free
        entries' are read).
      ratio: ρ_t.
      seed: stateless seed (two ints) for the ties and the rounding.
      exclude_pruned: grow only among the entries inactive before the prune.

    Returns:
      ``(pruned, grown)``: bool [rows, dim].

    >>> active = tf.constant([[True, True, False, False], [True, False, False, False]])
    >>> w = tf.constant([[0.1, -2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    >>> g = tf.constant([[0.0, 0.0, -5.0, 1.0], [0.0, 4.0, 0.0, 0.0]])
    >>> pruned, grown = row_swap(active, w, g, 0.5, (0, 0))  # row 0: 1 swap; row 1: 0 or 1 (0.5 · 1)
    >>> tf.cast(pruned, tf.int32).numpy()[0].tolist(), tf.cast(grown, tf.int32).numpy()[0].tolist()
    ([1, 0, 0, 0], [0, 0, 1, 0])
    """
    active = tf.convert_to_tensor(active, tf.bool)
    seed = tf.cast(seed, tf.int64)
    counts = tf.math.count_nonzero(active, axis=1, dtype=tf.int64)
    ratio = tf.convert_to_tensor(ratio, tf.float64)  # from the Python float (not through float32)
    expected = ratio * tf.cast(counts, tf.float64)
    num = tf.floor(expected)
    num = tf.cast(num + tf.cast(tf.random.stateless_uniform(tf.shape(num), seed + [4, 0], dtype=tf.float64)
                                < expected - num, tf.float64), tf.int64)
    if exclude_pruned:
        num = tf.minimum(num, tf.cast(tf.shape(active)[1], tf.int64) - counts)
    inf = tf.constant(np.inf, tf.float32)
    prune = tf.where(active, tf.abs(tf.cast(prune_keys, tf.float32)), inf)
    pruned = tf.cast(_row_ranks(prune, seed), tf.int64) < num[:, None]
    occupied = active if exclude_pruned else tf.logical_and(active, tf.logical_not(pruned))
    grow = tf.where(occupied, inf, -tf.abs(tf.cast(grow_keys, tf.float32)))
    return pruned, tf.cast(_row_ranks(grow, seed + [2, 0]), tf.int64) < num[:, None]


def _row_ranks(keys: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Each entry's rank (int32) in its row by ascending ``keys``, ties in random order."""
    shuffle = tf.argsort(tf.random.stateless_uniform(tf.shape(keys), seed=seed), axis=1)
    order = tf.gather(shuffle, tf.argsort(tf.gather(keys, shuffle, batch_dims=1), axis=1, stable=True),
                      batch_dims=1)
    return tf.argsort(order, axis=1)  # the inverse permutation


def rows_prune_and_grow(active: tf.Tensor, weights: tf.Tensor, grow_scores: tf.Tensor | None, ratio: float,
                        seed: tuple[int, int], exclude_pruned: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`row_swap` over a whole ``[rows, dim]`` table by :func:`row_chunks`; growth by
    ``|grow_scores|`` or, if None, uniformly at random (SET). Returns ``(new_active, grown)``,
    bool ``[rows, dim]``.

    >>> new, grown = rows_prune_and_grow(tf.constant([[True, True, False]]), tf.constant([[1.0, 0.5, 0.0]]),
    ...                                  tf.constant([[0.0, 0.0, 2.0]]), 0.5, (0, 0))
    >>> new.numpy().tolist(), grown.numpy().tolist()
    ([[True, False, True]], [[False, False, True]])
    """
    active = tf.convert_to_tensor(active, tf.bool)
    seed = tf.constant(seed, tf.int64)
    news, growns = [], []
    for c, (r0, r1) in enumerate(row_chunks(int(active.shape[0]), int(active.shape[1]), CHUNK)):
        scores = None if grow_scores is None else grow_scores[r0:r1]
        pruned, grown = _chunk_row_swap(active[r0:r1], weights[r0:r1], scores, ratio, _fold(seed, c), exclude_pruned)
        news.append(tf.logical_or(tf.logical_and(active[r0:r1], tf.logical_not(pruned)), grown))
        growns.append(grown)
    return tf.concat(news, 0), tf.concat(growns, 0)


def _chunk_row_swap(active, weights, grow_scores, ratio, seed, exclude_pruned):
    """:func:`row_swap` of one row chunk (``seed``: the chunk's), growing at random if
    ``grow_scores`` is None: the one per-chunk rule of both storages."""
    if grow_scores is None:
        grow_scores = tf.random.stateless_uniform(tf.shape(active), seed=seed + [1, 0])
    return row_swap(active, weights, grow_scores, ratio, seed, exclude_pruned)


def compact_rows_prune_and_grow(layer, ratio: float, seed: tuple[int, int], growth: str = "scores",
                                exclude_pruned: bool = False) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """:func:`rows_prune_and_grow` on a :class:`dsl_tf.CompactMaskedEmbedding`, chunk by chunk
    (memory O(budget + chunk)); growth by the layer's ``score_reader`` (``"scores"``) or at
    random (``"random"``). Each row keeps its count, so the layout's row splits are unchanged.

    Returns ``(keep, grown)`` as :func:`compact_prune_and_grow` (for
    :func:`dsl_tf.masks.apply_compact_update`).
    """
    if growth not in ("scores", "random"):
        raise ValueError(f"a per-row exploration grows by 'scores' or 'random', got {growth!r}")
    seed, dim = tf.constant(seed, tf.int64), layer.output_dim
    values = tf.convert_to_tensor(layer.values)
    read = layer.score_reader() if growth == "scores" else None
    keep, grown = [], []
    for c, (r0, r1) in enumerate(layer.row_chunks(CHUNK)):
        v0, v1, local = layer.chunk_positions(r0, r1)
        shape, size = [r1 - r0, dim], (r1 - r0) * dim
        active = tf.reshape(scatter_flags(size, local), shape)
        weights = tf.reshape(tf.scatter_nd(local[:, None], tf.cast(values[v0:v1], tf.float32), [size]), shape)
        scores = read(r0, r1) if read else None
        pruned, new = _chunk_row_swap(active, weights, scores, ratio, _fold(seed, c), exclude_pruned)
        keep.append(tf.logical_not(tf.gather(tf.reshape(pruned, [-1]), local)))
        grown.append(tf.where(tf.reshape(new, [-1]))[:, 0] + r0 * dim)
    return tf.concat(keep, 0), grown


PRUNE_CRITERIA = ("magnitude", "row_relative")
GROW_CRITERIA = ("score", "row_scaled")


def row_relative(weights: tf.Tensor) -> tf.Tensor:
    """``weights [rows, dim]`` divided by their rows' L2 norms (rows of zeros stay 0): the
    pruning key of ``prune_by="row_relative"``, for models that L2-normalise the looked-up
    rows (e.g. two-tower towers), where an entry's share of its row, not its raw size, is
    what it contributes to a score.

    >>> tf.round(100 * row_relative(tf.constant([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]))).numpy().tolist()
    [[60.0, 80.0], [60.0, 80.0], [0.0, 0.0]]
    """
    weights = tf.cast(weights, tf.float32)
    return tf.math.divide_no_nan(weights, tf.norm(weights, axis=-1, keepdims=True))


def row_relative_values(values: tf.Tensor, row_splits: tf.Tensor) -> tf.Tensor:
    """:func:`row_relative` for a compact table's ``values [budget]`` laid out by
    ``row_splits [rows + 1]`` (whole-budget work, at explorations only).

    >>> keys = row_relative_values(tf.constant([3.0, 4.0, 0.5]), tf.constant([0, 2, 2, 3], tf.int64))
    >>> tf.round(100 * keys).numpy().tolist()
    [60.0, 80.0, 100.0]
    """
    values = tf.cast(values, tf.float32)
    norms, rows = _row_norms(values, row_splits)
    return tf.math.divide_no_nan(values, tf.gather(norms, rows))


def row_norms(values: tf.Tensor, row_splits: tf.Tensor) -> tf.Tensor:
    """float32 ``[rows]``: the L2 norm of each row of a compact table's ``values [budget]``
    laid out by ``row_splits [rows + 1]``.

    >>> row_norms(tf.constant([3.0, 4.0, 0.5]), tf.constant([0, 2, 2, 3], tf.int64)).numpy().tolist()
    [5.0, 0.0, 0.5]
    """
    return _row_norms(tf.cast(values, tf.float32), row_splits)[0]


def row_scale(norms: tf.Tensor) -> tf.Tensor:
    """The growth scale of ``grow_by="row_scaled"`` from row norms: the norm, and 1 for a row
    without active entries (scaling its scores by 0 would shut an emptied row out of growth for
    good; behind an L2 normalisation its raw scores are the largest anyway).

    >>> row_scale(tf.constant([5.0, 0.0, 0.5])).numpy().tolist()
    [5.0, 1.0, 0.5]
    """
    return tf.where(norms > 0, norms, tf.ones_like(norms))


def _row_norms(values: tf.Tensor, row_splits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(norms [rows], row of every value)``, int32 rows."""
    lengths = tf.cast(row_splits[1:] - row_splits[:-1], tf.int32)
    rows = tf.repeat(tf.range(tf.size(lengths)), lengths)  # int32 row of every value
    return tf.sqrt(tf.math.unsorted_segment_sum(tf.square(values), rows, tf.size(lengths))), rows


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
    dtype = tf.int32 if size < 2**31 else tf.int64  # int32 draws: tf.unique's hashing 0.77x the CPU
    found = tf.zeros([0], dtype)
    for round_ in range(max_rounds):
        need = count - int(tf.size(found))
        if need <= 0:
            break
        draws = int(need * size / max(free - int(tf.size(found)), 1) * 1.25) + 64
        sample = tf.random.stateless_uniform([draws], seed=_fold(seed, round_), minval=0, maxval=int(size),
                                             dtype=dtype)
        sample = tf.boolean_mask(sample, tf.logical_not(occupied.contains(sample)))
        found = tf.unique(tf.concat([found, sample], 0)).y  # keeps first occurrences, in order
    else:
        raise RuntimeError(f"random_free_positions: {count} positions not found in {max_rounds} rounds")
    return tf.cast(found[:count], tf.int64)


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
