"""Masked embedding layer: a drop-in ``tf.keras.layers.Embedding`` with a binary mask."""

from __future__ import annotations

import bisect
import concurrent.futures
import math
import os
import weakref
from typing import Callable, Iterable, TypeVar

import numpy as np
import tensorflow as tf

from dsl_tf._validation import is_integer, is_real, to_float

_ON_READ = tf.VariableSynchronization.ON_READ
T = TypeVar("T")


@tf.keras.utils.register_keras_serializable(package="dsl_tf")
class MaskedEmbedding(tf.keras.layers.Embedding):
    """Embedding whose table is multiplied by a binary mask: ``E ⊙ M``.

    Constructor and ``get_config`` are those of ``tf.keras.layers.Embedding``. On top of
    the trainable ``embeddings`` the layer holds non-trainable state that is saved in
    checkpoints and SavedModels:

    * ``mask`` (float, same shape as the table): 1 for active entries, 0 for pruned ones.
      All ones until :class:`dsl_tf.DynamicSparsity` initialises it, so a model without
      the callback is the dense model.
    * ``growth_scores`` (float32): the sum over the current exploration interval of
      ``∂L/∂(E ⊙ M)``, the gradient with respect to the *effective* looked-up rows, taken
      from the training step's ``tf.GradientTape``. Accumulated only while
      ``score_tracking`` is on (the callback turns it on for gradient-based growth),
      with one scatter-add of the batch's rows per step: O(batch · dim). Under a
      ``tf.distribute`` strategy it is a sync-on-read SUM variable, so reading it in
      cross-replica context reduces it over replicas. Under mixed precision the
      gradients are unscaled by the ``LossScaleOptimizer``'s loss scale (see
      :meth:`unscale_scores_by`), and a step whose gradient for this table is not finite
      (an overflow, which the optimizer skips) adds nothing.
    * ``ever_active`` (bool) and ``mask_initialized`` (bool scalar), for bookkeeping.

    The forward pass gathers only the looked-up rows of table and mask, O(batch · dim);
    it never touches the whole table.

    Example:

    >>> import dsl_tf, tensorflow as tf
    >>> layer = dsl_tf.MaskedEmbedding(10, 4)
    >>> layer(tf.constant([1, 2])).shape
    TensorShape([2, 4])
    >>> int(tf.reduce_sum(layer.mask))  # dense until DynamicSparsity initialises it
    40
    """

    growth_scores_mode = "dense"
    value_reader = None
    """``(indices, rows, row_of=None) -> table entries`` (gradient to the table as for
    ``tf.gather``; ``row_of``: each index's place in ``rows``, default one row per index), set
    by an optimizer whose rows lag behind until looked up (:class:`dsl_tf.CatchUpAdam`), so
    that the forward pass reads them up to date; read when the step is traced."""
    _score_loss_scale = None  # () -> the loss scale dividing tracked gradients; None: 1
    _score_loss_scale_owner = None  # id() of the optimizer ``_score_loss_scale`` reads

    def __init__(self, input_dim: int, output_dim: int, **kwargs):
        if kwargs.get("sparse"):
            raise ValueError("MaskedEmbedding does not support sparse=True, got sparse=True")
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim)):
            if not is_integer(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(int(input_dim), int(output_dim), **kwargs)

    def build(self, input_shape=None):
        super().build(input_shape)
        _TABLES[self.embeddings.ref()] = self
        shape = (self.input_dim, self.output_dim)
        self.mask = self.add_weight(
            name="mask", shape=shape, initializer="ones", trainable=False,
            dtype=self.embeddings.dtype, experimental_autocast=False,
        )
        self.growth_scores = self.add_weight(
            name="growth_scores", shape=shape, initializer="zeros", trainable=False,
            dtype=tf.float32, synchronization=_ON_READ,
            aggregation=tf.VariableAggregation.SUM, experimental_autocast=False,
        )
        self.ever_active = self.add_weight(
            name="ever_active", shape=shape, initializer="ones", trainable=False,
            dtype=tf.bool,
        )
        self.mask_initialized = self.add_weight(
            name="mask_initialized", shape=(), initializer="zeros", trainable=False,
            dtype=tf.bool,
        )
        self.score_tracking = self.add_weight(
            name="score_tracking", shape=(), initializer="zeros", trainable=False,
            dtype=tf.bool,
        )

    def call(self, inputs):
        ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
        if self.value_reader is not None:  # an optimizer whose rows lag behind: read them caught up
            rows = self.value_reader(ids, ids) * tf.gather(self.mask, ids)
        else:
            rows = tf.gather(self.embeddings, ids) * tf.gather(self.mask, ids)
        rows = self._track_growth_scores(rows, ids)
        compute_dtype = self._dtype_policy.compute_dtype
        if rows.dtype != compute_dtype:
            rows = tf.cast(rows, compute_dtype)
        return rows

    def unscale_scores_by(self, optimizer) -> bool:
        """Divide the tracked gradients by ``optimizer``'s loss scale, if it has one.

        With a ``tf.keras.mixed_precision.LossScaleOptimizer`` the training step
        differentiates the loss times the (dynamic) loss scale — Keras'
        ``Model.train_step`` does it through ``optimizer.minimize``, and the optimizer
        warns if a custom ``train_step`` does not — so the row gradients seen here are
        scaled too. :class:`dsl_tf.DynamicSparsity` calls this at ``on_train_begin``.

        The scale variable is captured when the training step is traced: returns True if
        the setting changed, in which case the caller must re-create the train function.
        ``unscale_scores_by(None)`` (at ``on_train_end``) stops capturing it, so that
        functions traced later (e.g. a SavedModel of a tower without the optimizer) can be
        saved.
        """
        scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        owner = id(optimizer) if scaled else None
        if owner == self._score_loss_scale_owner:
            return False
        self._score_loss_scale = (lambda: optimizer.loss_scale) if scaled else None
        self._score_loss_scale_owner = owner
        return True

    def _track_growth_scores(self, rows: tf.Tensor, ids: tf.Tensor | None) -> tf.Tensor:
        """Identity whose gradient scatter-adds ``∂L/∂rows`` into ``growth_scores`` (``ids``
        None: ``rows`` is the whole table, added in place).

        The gradient is divided by the loss scale (mixed precision) and dropped when it is
        not finite.
        """
        tracking, dim = self.score_tracking, self.output_dim
        loss_scale = self._score_loss_scale

        @tf.custom_gradient
        def identity(x):
            def grad(dy):
                def accumulate():
                    flat_dy = tf.reshape(tf.cast(dy, tf.float32), [-1, dim])
                    if loss_scale is not None:
                        flat_dy = flat_dy / tf.cast(loss_scale(), tf.float32)
                    flat_ids = None if ids is None else tf.reshape(ids, [-1])

                    def add():
                        self._add_scores(flat_dy, flat_ids)
                        return tf.constant(True)

                    finite = tf.reduce_all(tf.math.is_finite(flat_dy))
                    return tf.cond(finite, add, lambda: tf.constant(False))

                done = tf.cond(tracking, accumulate, lambda: tf.constant(False))
                with tf.control_dependencies([done]):
                    return tf.identity(dy)

            return tf.identity(x), grad

        return identity(rows)

    def _add_scores(self, flat_dy: tf.Tensor, flat_ids: tf.Tensor | None) -> None:
        """Accumulate one step's row gradients ``[n, dim]`` of rows ``flat_ids`` (None: every
        row, in order)."""
        if flat_ids is None:
            _local(self.growth_scores).assign_add(flat_dy)
            return
        # A repeated id's rows are summed first, in batch order: on CPU a scatter-add with
        # repeated indices adds them in a thread-dependent order, and the round-off flips
        # near-tied growth ranks, so two runs with one seed (or a run and its resume) diverged.
        rows, at = tf.unique(flat_ids)
        sums = tf.math.unsorted_segment_sum(flat_dy, at, tf.size(rows))
        _local(self.growth_scores).scatter_add(tf.IndexedSlices(sums, rows))

    def effective_table(self) -> tf.Tensor:
        """The whole masked table ``E ⊙ M`` (whole-table work: for export/analysis)."""
        return self.embeddings * self.mask

    def dense_mask(self) -> tf.Tensor:
        """The table-shaped bool mask, True = active (for export/analysis)."""
        return tf.cast(self.mask, tf.bool)

    def reset_scores(self, decay: float = 0.0) -> None:
        """Start a new interval: the growth scores times ``decay`` (0: cleared)."""
        self.growth_scores.assign(self.growth_scores * decay if decay else tf.zeros_like(self.growth_scores))


def table_budget(size: int, sparsity: float) -> int:
    """Active entries kept at ``sparsity``: ``round((1 − s) · size)``, halves rounded up.

    >>> table_budget(1000, 0.8), table_budget(5, 0.5)
    (200, 3)
    """
    return int(math.floor((1.0 - float(sparsity)) * int(size) + 0.5))


SCORE_MODES = ("dense", "int8", "window", "none")


@tf.keras.utils.register_keras_serializable(package="dsl_tf")
class CompactMaskedEmbedding(MaskedEmbedding):
    """A :class:`MaskedEmbedding` whose trainable state is only its active entries.

    The budget ``round((1 − s) · input_dim · output_dim)`` is fixed for the whole run, so
    the trainable ``values`` variable has the fixed shape ``[budget]`` and so have its
    optimizer slots (Adam's moments are 2 × 4 bytes per *active* entry, not per table
    entry). Which (row, column) each value belongs to is a CSR layout that only an
    exploration changes:

    * ``row_splits`` (int64 ``[input_dim + 1]``): row ``r``'s values are
      ``values[row_splits[r]:row_splits[r + 1]]``;
    * ``col_ids`` (int16 when ``output_dim`` < 2^15, else int32, ``[budget]``): their
      columns, ascending within a row.

    Values are ordered by flat position ``row · output_dim + col``, so the layout is
    shardable by row ranges. The forward pass gathers the looked-up rows' values and
    sums them into dense ``[batch, output_dim]`` rows: O(batch × active per row),
    standard TF ops; the gradient reaches ``values`` as ``IndexedSlices`` (use
    :class:`dsl_tf.optimizers.LazyAdam` for an O(batch) optimizer step).

    Growth scores (``growth_scores``):

    * ``"dense"``: the exact float32 accumulator of ``∂L/∂(E ⊙ M)`` over the whole table
      and interval, as :class:`MaskedEmbedding` keeps (4 bytes per table entry);
    * ``"int8"``: the same accumulator, quantised: 1 byte per table entry plus a float32
      scale per row (each looked-up row is re-quantised after adding the step's gradient,
      round to nearest against the row's largest ``|score|``, so a contribution under
      1/254 of the row's largest score is lost). The ranking of the largest scores, which
      is what growth uses, is kept; single replica only (no cross-replica sum of int8).
      Supports ``growth="momentum"`` (decay scales the row scales, exactly).
    * ``"window"``: the gradients of the last ``score_capacity`` looked-up rows only (a
      ring buffer, ``score_capacity × (4 · dim + 8)`` bytes, independent of the table
      size; default ``max(4096, input_dim // 16)`` rows, at most ``input_dim``). An
      exploration ranks the inactive entries of those rows by ``|Σ gradient|`` and grows
      whatever is still due at random among the free entries. Not for ``growth="momentum"``;
      single replica only (one buffer per layer).
    * ``"none"``: no scores (``growth="random"`` or ``"none"``: SET and RP).

    ``values`` are drawn from ``embeddings_initializer`` with shape ``[budget]``, which
    equals the dense table's distribution for element-wise initializers (the default
    ``"uniform"``, normal, truncated normal, constants); shape-dependent initializers
    (Glorot, He, ...) would see the wrong fan-in and are rejected.

    Example:

    >>> import dsl_tf, tensorflow as tf
    >>> layer = dsl_tf.CompactMaskedEmbedding(100, 8, sparsity=0.75)
    >>> layer(tf.constant([[1, 2]])).shape
    TensorShape([1, 2, 8])
    >>> layer.values.shape, layer.budget
    (TensorShape([200]), 200)
    """

    storage = "compact"
    _dense_gradients = False  # see use_dense_gradients

    def __init__(self, input_dim: int, output_dim: int, sparsity: float = 0.8,
                 growth_scores: str = "dense", score_capacity: int | None = None, **kwargs):
        super().__init__(input_dim, output_dim, **kwargs)
        if not (is_real(sparsity) and 0.0 < to_float(sparsity) < 1.0):
            raise ValueError(f"sparsity must be a float in (0, 1), got {sparsity!r}")
        if growth_scores not in SCORE_MODES:
            raise ValueError(f"growth_scores must be one of {SCORE_MODES}, got {growth_scores!r}")
        initializer = type(self.embeddings_initializer).__name__
        if initializer in _FAN_INITIALIZERS:
            raise ValueError(
                f"embeddings_initializer {initializer} depends on the table's shape; use an element-wise "
                "initializer (e.g. 'uniform', RandomNormal) with CompactMaskedEmbedding")
        if score_capacity is not None and not (is_integer(score_capacity) and score_capacity >= 1):
            raise ValueError(f"score_capacity must be a positive integer, got {score_capacity!r}")
        self.sparsity = to_float(sparsity)
        self.growth_scores_mode = growth_scores
        self.score_capacity = min(self.input_dim, int(score_capacity or max(4096, self.input_dim // 16)))
        self.budget = table_budget(self.input_dim * self.output_dim, self.sparsity)
        if self.budget >= 2**31:
            raise ValueError(f"{self.name}: {self.budget} active entries; a compact table holds fewer than 2^31 "
                             "(split it into several tables)")
        if self.budget < 1:
            raise ValueError(
                f"{self.name}: sparsity {self.sparsity} leaves no active entry of the "
                f"{self.input_dim} x {self.output_dim} table")

    def get_config(self) -> dict:
        return {**super().get_config(), "sparsity": self.sparsity, "growth_scores": self.growth_scores_mode,
                "score_capacity": self.score_capacity}

    def build(self, input_shape=None):
        rows, dim = self.input_dim, self.output_dim
        self.values = self.add_weight(
            name="values", shape=(self.budget,), initializer=self.embeddings_initializer,
            regularizer=self.embeddings_regularizer, constraint=self.embeddings_constraint,
            experimental_autocast=False,
        )
        _TABLES[self.values.ref()] = self
        # Until DynamicSparsity installs a random layout: the first `budget` flat positions.
        budget = self.budget
        self.row_splits = self.add_weight(
            name="row_splits", shape=(rows + 1,), dtype=tf.int64, trainable=False,
            initializer=lambda shape, dtype: tf.minimum(tf.range(rows + 1, dtype=tf.int64) * dim, budget),
        )
        self.col_ids = self.add_weight(
            name="col_ids", shape=(budget,), dtype=_col_dtype(dim), trainable=False,
            initializer=lambda shape, dtype: tf.cast(tf.range(budget, dtype=tf.int64) % dim, dtype),
        )
        if self.growth_scores_mode == "dense":
            self.growth_scores = self.add_weight(
                name="growth_scores", shape=(rows, dim), initializer="zeros", trainable=False,
                dtype=tf.float32, synchronization=_ON_READ,
                aggregation=tf.VariableAggregation.SUM, experimental_autocast=False,
            )
        else:
            self.growth_scores = None
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.growth_scores_mode in ("int8", "window") and replicas > 1:
            raise ValueError(f"{self.name}: growth_scores={self.growth_scores_mode!r} works on one replica, the "
                             f"strategy has {replicas}: use growth_scores='dense'")
        if self.growth_scores_mode == "int8":
            self.score_q = self.add_weight(
                name="score_q", shape=(rows, dim), dtype=tf.int8, trainable=False, initializer="zeros")
            self.score_scale = self.add_weight(
                name="score_scale", shape=(rows,), dtype=tf.float32, trainable=False, initializer="zeros",
                experimental_autocast=False)
        if self.growth_scores_mode == "window":
            capacity = self.score_capacity
            self.score_rows = self.add_weight(
                name="score_rows", shape=(capacity,), dtype=tf.int64, trainable=False,
                initializer=tf.constant_initializer(-1))
            self.score_grads = self.add_weight(
                name="score_grads", shape=(capacity, dim), dtype=tf.float32, trainable=False,
                initializer="zeros", experimental_autocast=False)
            self.score_count = self.add_weight(
                name="score_count", shape=(), dtype=tf.int64, trainable=False, initializer="zeros")
        self.mask_initialized = self.add_weight(
            name="mask_initialized", shape=(), initializer="zeros", trainable=False, dtype=tf.bool)
        self.score_tracking = self.add_weight(
            name="score_tracking", shape=(), initializer="zeros", trainable=False, dtype=tf.bool)
        self.built = True

    def call(self, inputs):
        ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
        flat = tf.reshape(ids, [-1])
        dim = self.output_dim
        if _is_every_row(ids, self.input_dim):
            # The whole table in row order (graph models such as LightGCN read it every step):
            # every value once, in layout order, so no deduplication, no gathers, and the values'
            # gradient is dense (every entry has one).
            distinct, at = flat, None
            row, positions, slots = self._entries(None)
        else:
            # Each distinct row once (batches repeat popular rows): its values are gathered once
            # and appear once in the values' gradient.
            distinct, at = tf.unique(flat)
            row, positions, slots = self._entries(distinct)
        if self.value_reader is not None:  # an optimizer whose rows lag behind: read them caught up
            gathered = self.value_reader(positions, distinct, row)  # catch-up once per row
        else:
            source = _dense_gradient(tf.convert_to_tensor(self.values)) if self._dense_gradients else self.values
            gathered = tf.convert_to_tensor(source) if at is None else tf.gather(source, positions)
        rows = tf.reshape(_place(gathered, slots, tf.size(distinct, out_type=tf.int64) * dim), [-1, dim])
        if at is not None:
            rows = tf.gather(rows, at)
        if self.growth_scores_mode != "none":
            rows = self._track_growth_scores(rows, None if at is None else flat)
        rows = tf.reshape(rows, tf.concat([tf.shape(ids), [dim]], 0))
        compute_dtype = self._dtype_policy.compute_dtype
        return rows if rows.dtype == compute_dtype else tf.cast(rows, compute_dtype)

    def _entries(self, rows: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """``(row, positions, slots)`` of the active entries of ``rows`` (distinct, any order;
        None: every row in order): each entry's index ``i`` in ``rows`` (int64), its index in
        ``values`` (int32: the budget is below 2^31, and on CPU a gather of a vector by int32
        indices is ~2.5x faster than by int64 ones) and its place ``i · output_dim + col`` in
        the dense ``[len(rows), output_dim]`` rows (int64)."""
        if rows is None:
            starts, limits = self.row_splits[:-1], self.row_splits[1:]
        else:
            starts, limits = tf.gather(self.row_splits, rows), tf.gather(self.row_splits, rows + 1)
        row, positions = _ragged_entries(starts, limits)
        positions = tf.cast(positions, tf.int32)
        cols = self.col_ids if rows is None else tf.gather(self.col_ids, positions)
        return row, positions, row * self.output_dim + tf.cast(cols, tf.int64)

    def use_dense_gradients(self, dense: bool) -> bool:
        """Whether ``values`` get a dense ``[budget]`` gradient (one segment sum) instead of
        ``IndexedSlices``. For optimizers whose step touches the whole variable anyway (Keras
        Adam decays every moment), a dense gradient skips their sparse path (a ``tf.unique``
        and locked scatter-adds over every looked-up entry): 10.8 → 5.8 ms per step for three
        lookups of 2,048 rows of a 40,981 × 64 table at s = 0.8. :class:`dsl_tf.DynamicSparsity`
        sets it at ``on_train_begin`` from the optimizer (sparse for ``LazyAdam`` and for
        optimizers with O(batch) sparse steps). Read when the step is traced: returns True if
        it changed, in which case the caller re-creates the train function."""
        changed = bool(dense) != self._dense_gradients
        self._dense_gradients = bool(dense)
        return changed

    def _add_scores(self, flat_dy: tf.Tensor, flat_ids: tf.Tensor | None) -> None:
        if self.growth_scores_mode == "dense":
            super()._add_scores(flat_dy, flat_ids)
            return
        if flat_ids is None:
            flat_ids = tf.range(self.input_dim, dtype=tf.int64)
        if self.growth_scores_mode == "int8":  # O(batch · dim): the looked-up rows only
            rows, at = tf.unique(tf.cast(flat_ids, tf.int64))
            old = _dequantized(tf.gather(self.score_q, rows), tf.gather(self.score_scale, rows))
            sums = old + tf.math.unsorted_segment_sum(flat_dy, at, tf.size(rows))
            scale = tf.reduce_max(tf.abs(sums), axis=1) / 127.0
            q = tf.round(tf.math.divide_no_nan(sums, scale[:, None]))
            self.score_q.scatter_update(tf.IndexedSlices(tf.cast(q, tf.int8), rows))
            self.score_scale.scatter_update(tf.IndexedSlices(scale, rows))
            return
        capacity = self.score_capacity  # ring buffer: keep the last `capacity` rows
        flat_ids, flat_dy = flat_ids[-capacity:], flat_dy[-capacity:]
        slots = (self.score_count + tf.range(tf.size(flat_ids, out_type=tf.int64))) % capacity
        self.score_rows.scatter_update(tf.IndexedSlices(tf.cast(flat_ids, tf.int64), slots))
        self.score_grads.scatter_update(tf.IndexedSlices(flat_dy, slots))
        self.score_count.assign_add(tf.size(flat_ids, out_type=tf.int64))

    def score_reader(self):
        """``read(r0, r1)`` -> float32 ``[r1 − r0, dim]``: the accumulated scores of rows
        ``[r0, r1)``, for an exploration (``growth_scores`` ``"dense"`` or ``"int8"``)."""
        if self.growth_scores_mode == "int8":
            return lambda r0, r1: _dequantized(self.score_q[r0:r1], self.score_scale[r0:r1])
        scores = tf.convert_to_tensor(self.growth_scores)  # summed over replicas, once
        return lambda r0, r1: scores[r0:r1]

    def window_scores(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(positions, scores)``: every entry of the rows in the score window, with its
        gradient summed over the window (``growth_scores="window"``)."""
        valid = self.score_rows >= 0
        rows, segment = tf.unique(tf.boolean_mask(self.score_rows, valid))
        sums = tf.math.unsorted_segment_sum(tf.boolean_mask(self.score_grads, valid), segment, tf.size(rows))
        positions = rows[:, None] * self.output_dim + tf.range(self.output_dim, dtype=tf.int64)[None, :]
        return tf.reshape(positions, [-1]), tf.reshape(sums, [-1])

    def reset_scores(self, decay: float = 0.0) -> None:
        """Start a new interval: scores times ``decay`` (dense, int8) or an empty window."""
        if self.growth_scores_mode == "dense":
            super().reset_scores(decay)
        elif self.growth_scores_mode == "int8":
            self.score_scale.assign(self.score_scale * decay if decay else tf.zeros_like(self.score_scale))
            if not decay:
                self.score_q.assign(tf.zeros_like(self.score_q))
        elif self.growth_scores_mode == "window":
            self.score_rows.assign(tf.fill([self.score_capacity], tf.constant(-1, tf.int64)))
            self.score_count.assign(0)

    # ---------------------------------------------------------------- layout
    def positions(self) -> tf.Tensor:
        """Flat positions ``row · output_dim + col`` of the ``budget`` values (ascending)."""
        rows = tf.ragged.row_splits_to_segment_ids(self.row_splits, out_type=tf.int64)
        return rows * self.output_dim + tf.cast(self.col_ids, tf.int64)

    def row_chunks(self, max_entries: int) -> list[tuple[int, int]]:
        """:func:`row_chunks` of this table: the unit of the chunked exploration."""
        return row_chunks(self.input_dim, self.output_dim, max_entries)

    def split_by_chunk(self, positions: tf.Tensor, chunks: list[tuple[int, int]]) -> list[tf.Tensor]:
        """Flat ``positions`` (int64, in the table) split among the row ``chunks`` of
        :meth:`row_chunks`, each part relative to its chunk's first entry, order kept. One pass (a
        ``searchsorted`` and a ``dynamic_partition``), not a mask over every position per chunk,
        which made an exploration O(chunks × grown entries).

        >>> layer = dsl_tf.CompactMaskedEmbedding(200, 2, sparsity=0.5)
        >>> parts = layer.split_by_chunk(tf.constant([260, 3, 130, 1], tf.int64), layer.row_chunks(128))
        >>> [p.numpy().tolist() for p in parts]
        [[3, 1], [2], [4], []]
        """
        dim = self.output_dim
        starts = tf.constant([r0 * dim for r0, _ in chunks], tf.int64)
        which = tf.searchsorted(starts, positions, side="right", out_type=tf.int32) - 1
        return [part - r0 * dim for part, (r0, _) in zip(tf.dynamic_partition(positions, which, len(chunks)), chunks)]

    def value_range(self, r0: int, r1: int) -> tuple[int, int]:
        """``[v0, v1)``: the indices in ``values`` of rows ``[r0, r1)``."""
        v0, v1 = self.row_splits[r0].numpy(), self.row_splits[r1].numpy()
        return int(v0), int(v1)

    def chunk_positions(self, r0: int, r1: int) -> tuple[int, int, tf.Tensor]:
        """``(v0, v1, local)``: the value range of rows ``[r0, r1)`` and the flat positions
        of those values relative to the chunk's first entry ``r0 · output_dim`` (int64)."""
        splits = tf.convert_to_tensor(self.row_splits[r0:r1 + 1])
        v0, v1 = int(splits[0]), int(splits[-1])
        rows, _ = _ragged_entries(splits[:-1], splits[1:])
        return v0, v1, rows * self.output_dim + tf.cast(self.col_ids[v0:v1], tf.int64)

    def rebuild_layout(self, keep: tf.Tensor | None, grown: list[tf.Tensor], max_entries: int = 1 << 24
                       ) -> tuple[tf.Tensor, int]:
        """Install a new layout: the values where ``keep`` (bool ``[budget]``; None: none) and
        the flat positions ``grown`` (a list of int64 tensors, any order, distinct and
        disjoint from the kept ones), ``budget`` in all.

        Works by row chunks of at most ``max_entries`` (< 2^31) entries (see :meth:`row_chunks`):
        no sort and no tensor of the table's size, 4 bytes per entry of one chunk at a time
        (``_chunk_layout``). Returns ``(source, regrown)``: for each new value index,
        the index of the old value it takes (int32 ``[budget]``; −1 for a grown entry), and
        how many grown positions were pruned in the same call (regrown from scratch).
        """
        dim = self.output_dim
        chunks = self.row_chunks(max_entries)
        if max((r1 - r0) * dim for r0, r1 in chunks) >= 2**31:
            raise ValueError(f"{self.name}: row chunks of max_entries={max_entries} hold 2^31 entries or more")
        starts = [r0 * dim for r0, _ in chunks]
        # each chunk's grown positions: tensors inside it (flat, e.g. its random draw: not copied
        # before their turn) and its parts of tensors across chunks (local, split in one pass)
        inside, parts = [[] for _ in chunks], [[tf.zeros([0], tf.int64)] for _ in chunks]
        for g in grown:
            g = tf.cast(g, tf.int64)
            if not int(tf.size(g)):
                continue
            first, last = (bisect.bisect_right(starts, int(end)) - 1 for end in (tf.reduce_min(g), tf.reduce_max(g)))
            if first == last:
                inside[first].append(g)
            else:
                for mine, part in zip(parts, self.split_by_chunk(g, chunks)):
                    mine.append(part)

        def layout(c: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
            (r0, r1), mine = chunks[c], tf.concat(parts[c] + [g - starts[c] for g in inside[c]], 0)
            parts[c] = inside[c] = None
            v0, v1, local = self.chunk_positions(r0, r1)
            kept = tf.zeros([v1 - v0], tf.bool) if keep is None else tf.convert_to_tensor(keep[v0:v1])
            return _chunk_layout(
                local, kept, mine, *(tf.constant(n, tf.int64) for n in (v0, r1 - r0, dim)), self.col_ids.dtype)

        sources, cols, lengths, regrown = zip(*map_chunks(layout, range(len(chunks))))
        regrown = sum(int(again) for again in regrown)
        lengths = tf.concat(lengths, 0)
        total = int(tf.reduce_sum(lengths))
        if total != self.budget:
            raise ValueError(f"{self.name}: a layout of {total} entries does not fit its budget of {self.budget}")
        self.row_splits.assign(tf.concat([tf.zeros([1], tf.int64), tf.cumsum(lengths)], 0))
        self.col_ids.assign(tf.concat(cols, 0))
        return tf.concat(sources, 0), regrown

    def set_layout(self, positions: tf.Tensor | list[tf.Tensor]) -> None:
        """Install the layout of ``budget`` distinct flat ``positions`` (any order; or a list
        of such tensors, e.g. one per chunk), values left as they are."""
        self.rebuild_layout(None, positions if isinstance(positions, list) else [positions])

    def dense_mask(self) -> tf.Tensor:
        """The table-shaped bool mask (whole-table work: export/analysis)."""
        return tf.reshape(PositionBitmap(self.input_dim * self.output_dim, self.positions()).contains(
            tf.range(self.input_dim * self.output_dim, dtype=tf.int64)), [self.input_dim, self.output_dim])

    def effective_table(self) -> tf.Tensor:
        """The whole table ``E ⊙ M`` (whole-table work: export/analysis)."""
        table = tf.math.unsorted_segment_sum(self.values, self.positions(), self.input_dim * self.output_dim)
        return tf.reshape(table, [self.input_dim, self.output_dim])


class PositionBitmap:
    """A set of distinct flat positions in ``[0, size)`` as a bitmap of int64 words
    (``size / 8`` bytes), for O(1) membership queries without sorting.

    >>> bitmap = PositionBitmap(200, tf.constant([3, 64, 150], tf.int64))
    >>> bitmap.contains(tf.constant([3, 4, 150], tf.int64)).numpy().tolist()
    [True, False, True]
    """

    def __init__(self, size: int | tf.Tensor, positions: tf.Tensor):
        positions = tf.cast(positions, tf.int64)
        words = (tf.cast(size, tf.int64) + 63) // 64
        bits = tf.bitwise.left_shift(tf.ones_like(positions), positions % 64)
        # distinct positions set distinct bits: adding them is OR (no carries)
        self.words = tf.math.unsorted_segment_sum(bits, positions // 64, words + 1)

    def contains(self, queries: tf.Tensor) -> tf.Tensor:
        queries = tf.cast(queries, tf.int64)
        word = tf.gather(self.words, queries // 64)
        return tf.bitwise.bitwise_and(tf.bitwise.right_shift(word, queries % 64), 1) == 1

CHUNK_WORKERS = min(2, os.cpu_count() or 1)
"""Row chunks of an exploration processed at once (:func:`map_chunks`)."""


def row_chunks(rows: int, dim: int, max_entries: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering a ``rows × dim`` table, of at most ``max_entries``
    entries (at least 64 rows), each starting at a multiple of 64 rows: the unit of every
    chunked exploration (whole-table work in O(chunk) memory), the same for both storages.

    >>> row_chunks(100, 8, 512)
    [(0, 64), (64, 100)]
    """
    step = max(64, max_entries // dim // 64 * 64)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def map_chunks(fn: Callable[[int], T], items: Iterable[int]) -> list[T]:
    """``[fn(item) for item in items]``, on :data:`CHUNK_WORKERS` threads: TF kernels release
    the GIL, and many of an exploration's (segment max, ``Where``, ``Unique``, ``RaggedRange``)
    are single-threaded, so two chunks at once use two cores. Memory: the temporaries of
    ``CHUNK_WORKERS`` chunks at a time.

    >>> map_chunks(lambda c: c * c, range(4))
    [0, 1, 4, 9]
    """
    if CHUNK_WORKERS <= 1:
        return [fn(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(CHUNK_WORKERS, thread_name_prefix="dsl_tf_chunk") as pool:
        return list(pool.map(fn, items))


def _dequantized(q: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """int8 growth scores ``[n, dim]`` times their rows' scales ``[n]``, as float32."""
    return tf.cast(q, tf.float32) * scale[:, None]


def _ragged_entries(starts: tf.Tensor, limits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(row, index)``, int64, of every entry of the ragged rows ``[starts[i], limits[i])``
    (indices below 2^31), row by row.

    One ``RaggedRange`` numbers entry ``k`` of row ``i`` ``(i << 32) + starts[i] + k``, so the
    row ids need no ``tf.repeat`` (``value_rowids`` and ``row_splits_to_segment_ids``: a
    ``boolean_mask`` over ``[rows, longest row]``, 3.5x slower for a 2^24-entry chunk).

    >>> row, index = _ragged_entries(tf.constant([5, 9, 9], tf.int64), tf.constant([7, 9, 10], tf.int64))
    >>> row.numpy().tolist(), index.numpy().tolist()
    ([0, 0, 2], [5, 6, 9])
    """
    tags = tf.bitwise.left_shift(tf.range(tf.size(starts, out_type=tf.int64)), 32)
    numbered = tf.ragged.range(starts + tags, limits + tags).flat_values
    return tf.bitwise.right_shift(numbered, 32), tf.bitwise.bitwise_and(numbered, 0xFFFFFFFF)


def _is_every_row(ids: tf.Tensor, rows: int) -> bool:
    """Whether ``ids`` are known, when traced, to be the vector ``0, 1, …, rows − 1`` (e.g.
    ``tf.range(rows)``, as a graph model reads its whole table; TF cannot tell through a reshape).

    >>> _is_every_row(tf.range(4), 4), _is_every_row(tf.constant([0, 1, 3, 2]), 4)
    (True, False)
    """
    known = tf.get_static_value(ids)
    return known is not None and known.shape == (rows,) and bool(np.array_equal(known, np.arange(rows)))


def _place(entries: tf.Tensor, slots: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """``entries`` put at their distinct ``slots`` of a zero vector of ``size``.

    ``unsorted_segment_sum`` (1.6x faster forward + backward on CPU than ``scatter_nd``) with
    a plain ``gather`` as gradient: TF's own also masks negative segment ids (a comparison,
    a broadcast and a select per entry), which ``slots`` never holds.
    """

    @tf.custom_gradient
    def place(entries):
        def grad(dy):
            return tf.gather(tf.reshape(tf.convert_to_tensor(dy), [-1]), slots)

        return tf.math.unsorted_segment_sum(entries, slots, size), grad

    return place(entries)


@tf.custom_gradient
def _dense_gradient(values: tf.Tensor):
    """Identity whose gradient is a dense tensor (``IndexedSlices`` summed into place)."""
    return tf.identity(values), lambda dy: tf.convert_to_tensor(dy)


@tf.function(reduce_retracing=True)
def _chunk_layout(local, kept, grown, v0, rows, dim, col_dtype):
    """One row chunk of :meth:`CompactMaskedEmbedding.rebuild_layout`: the old entries
    ``local`` (ascending flat positions relative to the chunk, values ``v0 + i``), which of
    them stay, the positions grown in the chunk (any order) -> (source, col_ids, row lengths,
    regrown count). One int32 segment max over the chunk's entries marks each with the old
    value index it keeps (−1 if grown, int32.min if free): the new layout is the marked
    entries in position order, with no sort and no merge (0.66x the CPU of a sort of the
    grown entries merged into the kept ones by ``searchsorted`` and ``dynamic_stitch``, for a
    2^24-entry chunk at s = 0.8 swapping 29 %). Chunks hold fewer than 2^31 entries."""
    kept_at = tf.where(kept)[:, 0]
    taken = tf.math.unsorted_segment_max(
        tf.concat([tf.cast(kept_at + v0, tf.int32), -tf.ones_like(grown, tf.int32)], 0),
        tf.cast(tf.concat([tf.gather(local, kept_at), grown], 0), tf.int32), rows * dim)
    occupied = taken > tf.int32.min
    members = tf.where(occupied)[:, 0]  # the new layout: kept and grown merged in position order
    length = tf.cast(tf.reduce_sum(tf.cast(tf.reshape(occupied, [-1, dim]), tf.int32), 1), tf.int64)
    # grown positions that were in the old layout: just pruned, regrown
    pruned = tf.cast(tf.boolean_mask(local, tf.logical_not(kept)), tf.int32)
    regrown = tf.math.count_nonzero(tf.gather(taken, pruned) == -1, dtype=tf.int64)
    return tf.gather(taken, members), tf.cast(members % dim, col_dtype), length, regrown


_FAN_INITIALIZERS = frozenset({
    "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform", "LecunNormal",
    "VarianceScaling", "Orthogonal", "Identity",
})


def _col_dtype(dim: int) -> tf.DType:
    """int16 column ids (2 bytes per active entry), except where they cannot be: dims of 2^15
    and more, and MultiWorkerMirroredStrategy, whose collectives have no int16 kernels."""
    multi_worker = isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy)
    return tf.int32 if dim >= 2**15 or multi_worker else tf.int16


def _local(variable: tf.Variable) -> tf.Variable:
    """This replica's component of a sync-on-read variable (the variable itself otherwise).

    Sync-on-read variables do not implement scatter ops; their per-replica components do.
    """
    get_local = getattr(variable, "_get_on_device_or_primary", None)
    return get_local() if get_local is not None else variable


_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # trainable table variable.ref() -> layer


def masked_table_of(variable) -> MaskedEmbedding | None:
    """The masked layer whose trainable table is ``variable`` (``embeddings``, or a
    :class:`CompactMaskedEmbedding`'s ``values``, whose ``row_splits`` say which row each
    value belongs to); None for any other variable. For optimizers that keep per-row state
    (:class:`dsl_tf.CatchUpAdam`).

    >>> layer = CompactMaskedEmbedding(10, 4, sparsity=0.5)
    >>> layer.build(None)
    >>> masked_table_of(layer.values) is layer, masked_table_of(tf.Variable(1.0))
    (True, None)
    """
    return _TABLES.get(variable.ref())


def masked_embeddings(model: tf.Module) -> list[MaskedEmbedding]:
    """Every :class:`MaskedEmbedding` inside ``model``, recursively, in a stable order.

    >>> import dsl_tf, tensorflow as tf
    >>> tower = tf.keras.Sequential([dsl_tf.MaskedEmbedding(5, 2)])
    >>> model = tf.keras.Sequential([tower, tf.keras.layers.Dense(1)])
    >>> len(dsl_tf.masked_embeddings(model))
    1
    """
    found: dict[int, MaskedEmbedding] = {}
    candidates = [model] + list(model.submodules)
    for module in candidates:
        if isinstance(module, MaskedEmbedding):
            found.setdefault(id(module), module)
    return list(found.values())
