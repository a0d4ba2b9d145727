"""Keras 2 optimizers whose step on a sparse (``IndexedSlices``) gradient is O(batch).

:class:`LazyAdam` is Adam that, for an ``IndexedSlices`` gradient, reads and writes only
the rows (2-D tables) or entries (1-D value vectors) named by the gradient's indices:
their first/second moments and weights get the Adam update with bias correction, and
every other entry's weight *and moments* stay bit-identical (no decay of untouched
moments). Dense gradients get exactly Keras Adam.

>>> import dsl_tf, tensorflow as tf
>>> table = tf.Variable(tf.ones([4, 2]))
>>> opt = dsl_tf.optimizers.LazyAdam(learning_rate=0.1)
>>> with tf.GradientTape() as tape:
...     loss = tf.reduce_sum(tf.gather(table, [1, 3, 1]))  # row 1 twice: gradients summed
>>> _ = opt.apply_gradients([(tape.gradient(loss, table), table)])
>>> table.numpy().round(4)  # rows 0 and 2 (and their moments) untouched
array([[1. , 1. ],
       [0.9, 0.9],
       [1. , 1. ],
       [0.9, 0.9]], dtype=float32)
>>> tf.keras.utils.get_registered_name(dsl_tf.LazyAdam)
'dsl_tf>LazyAdam'

Why our own: no maintained library offers a lazy Adam for the Keras 2 optimizer of
tf_keras 2.21 (``keras.src.optimizers.optimizer.Optimizer``, whose subclasses override
``update_step``). TF Addons' ``tfa.optimizers.LazyAdam`` reached end of life in May 2024,
is built against TF <= 2.15 and subclasses the *legacy* optimizer (it overrides
``_resource_apply_sparse``); so does Merlin Models' copy of it (``merlin.models.tf.LazyAdam``,
last release 2023-12). Keras' own Adam (tf_keras and Keras 3) decays both moments of the
whole variable on every step, TensorFlow has no ``SparseApplyAdam`` kernel (only Adagrad,
Ftrl, momentum, RMSProp, ...), TF Recommenders has none, TF Recommenders-Addons only works
on its own hash-table ``dynamic_embedding`` variables through C++ ops built against one
TF version each (last release 0.8.1, 2024-09), and the ``lazy_adam`` option of
``tf.tpu.experimental.embedding.Adam`` is TPU only.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf

from dsl_tf.callbacks import catch_up_optimizer, prepare_catch_up
from dsl_tf.layers import CompactMaskedEmbedding, masked_embeddings, masked_table_of

__all__ = ["CatchUp", "CatchUpAdam", "LazyAdam"]


@tf.keras.utils.register_keras_serializable(package="dsl_tf")
class LazyAdam(tf.keras.optimizers.Adam):
    """Adam whose ``IndexedSlices`` updates touch only the looked-up rows / entries.

    For a sparse gradient with (deduplicated) indices ``I`` and summed values ``g`` at step
    ``t``, for ``i`` in ``I`` only::

        m[i] = beta_1 * m[i] + (1 - beta_1) * g
        v[i] = beta_2 * v[i] + (1 - beta_2) * g**2      (amsgrad: vhat[i] = max(vhat[i], v[i]))
        w[i] -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m[i] / (sqrt(v[i]) + epsilon)

    This is the semantics of TF Addons' ``LazyAdam`` (a row's moments do not decay while it
    is absent from the batch, so it is *not* Adam on the dense gradient). Repeated indices
    are summed first (``tf.unique`` + ``tf.math.unsorted_segment_sum``). Works for 2-D tables
    ``[rows, dim]`` with row indices and 1-D vectors ``[n]`` with entry indices, under
    ``tf.function``, with ``jit_compile`` and under ``tf.distribute``.

    Slots are Adam's (``m``, ``v`` and, with ``amsgrad``, ``vhat``), so checkpoints are
    interchangeable with ``tf.keras.optimizers.Adam``. Everything the base optimizer does
    (``clipnorm``/``clipvalue``/``global_clipnorm``, ``weight_decay``, EMA, learning-rate
    schedules) works as with Adam; note that ``weight_decay`` and ``use_ema`` are applied by
    the base class to the *whole* variable every step, which makes the step O(table) again.

    Args:
      learning_rate, beta_1, beta_2, epsilon, adaptive_epsilon, amsgrad: as in
        ``tf.keras.optimizers.Adam`` (``amsgrad`` is supported, lazily as well).
      name: optimizer name.
      **kwargs: the base optimizer's keyword arguments (``clipnorm``, ``weight_decay``,
        ``jit_compile``, ...).
    """

    lazy = True
    """Its ``IndexedSlices`` step touches only the gradient's entries (read by
    :class:`dsl_tf.DynamicSparsity` to keep compact tables' gradients sparse)."""

    def __init__(
        self,
        learning_rate: float | tf.keras.optimizers.schedules.LearningRateSchedule = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        adaptive_epsilon: bool = False,
        amsgrad: bool = False,
        name: str = "LazyAdam",
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            adaptive_epsilon=adaptive_epsilon,
            amsgrad=amsgrad,
            name=name,
            **kwargs,
        )
        self._looked_up = _LookedUp()

    def prepare(self, model: tf.keras.Model) -> bool:
        """Let ``model``'s (built) compact tables hand what their lookups read to this
        optimizer's step (see :meth:`update_step`). Returns True if it changed a table: the
        training step must then be traced again. :class:`dsl_tf.DynamicSparsity` and
        :class:`CatchUp` call it at ``on_train_begin``."""
        changed = False
        for table in masked_embeddings(model):
            if isinstance(table, CompactMaskedEmbedding) and table.built and _owner(table) is not self:
                table.value_reader = _reader(self, self._var_key(table.values), table.values)
                changed = True
        return changed

    def read_looked_up(self, key, variable, indices: tf.Tensor, rows: tf.Tensor, row_of: tf.Tensor) -> tf.Tensor:
        """A compact table's lookup (its ``value_reader``): ``tf.gather(variable, indices)`` of the
        distinct ``indices`` of whole ``rows`` (``row_of``: each index's position in ``rows``).
        Inside a traced step on one replica, the indices and the values read are handed to this
        step's :meth:`update_step` (``key``: the variable's)."""
        w = tf.gather(variable, indices)
        if not tf.executing_eagerly() and tf.distribute.get_strategy().num_replicas_in_sync == 1:
            self._looked_up.put(key, (indices, w))
        return w

    def update_step(self, gradient, variable):
        """Keras Adam for dense gradients; the lazy update for ``tf.IndexedSlices``.

        A compact table's gradient whose indices are those of the table's one lookup in this
        step (checked at run time) holds each entry once: its step takes the lookup's indices
        and the values it read (no deduplication, no second gather of the weights)."""
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        slot = self._index_dict[self._var_key(variable)]
        lookups = self._looked_up.take(self._var_key(variable))
        if len(lookups) != 1:
            self._step_summed(gradient, variable, slot)
            return
        indices, w = lookups[0]

        def looked_up() -> tf.Tensor:
            _, m, v, v_hat = self._read_rows(variable, slot, indices, weights=False)
            self._step_rows(variable, slot, indices, gradient.values, w, m, v, v_hat)
            return tf.constant(True)

        def searched() -> tf.Tensor:
            self._step_summed(gradient, variable, slot)
            return tf.constant(False)

        tf.cond(_equal(tf.cast(gradient.indices, indices.dtype), indices), looked_up, searched)

    def _step_summed(self, gradient: tf.IndexedSlices, variable, slot: int) -> None:
        """The step on ``gradient``'s distinct indices, its repeated indices summed."""
        # Summed here, once (see _deduplicate_sparse_grad): a scatter_update with repeated
        # indices would keep one arbitrary write.
        indices, grad = _summed(gradient, variable.shape[0])
        self._step_rows(variable, slot, indices, grad, *self._read_rows(variable, slot, indices))

    def _step_rows(self, variable, slot: int, indices: tf.Tensor, grad: tf.Tensor, w_rows, m_rows, v_rows,
                   v_hat_rows) -> None:
        """Adam's step on the distinct ``indices`` with their summed gradient ``grad`` and their
        state before the step (``v_hat_rows`` None without ``amsgrad``)."""
        # Scalars computed as Keras Adam computes them (e.g. 1 - beta_1 in Python before
        # the cast), so that a step touching every row once is bit-identical to Adam's.
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon_hat = tf.cast(self.epsilon, dtype)
        if self.adaptive_epsilon:
            epsilon_hat = epsilon_hat * tf.sqrt(1 - beta_2_power)
        one_minus_beta_1 = tf.cast(1 - self.beta_1, dtype)
        one_minus_beta_2 = tf.cast(1 - self.beta_2, dtype)
        m, v = self._momentums[slot], self._velocities[slot]

        # Same expressions as Keras Adam's dense step, on the gathered rows only.
        m_rows = m_rows + (grad - m_rows) * one_minus_beta_1
        v_rows = v_rows + (tf.square(grad) - v_rows) * one_minus_beta_2
        m.scatter_update(tf.IndexedSlices(m_rows, indices))
        v.scatter_update(tf.IndexedSlices(v_rows, indices))
        if self.amsgrad:
            v_rows = tf.maximum(v_hat_rows, v_rows)
            self._velocity_hats[slot].scatter_update(tf.IndexedSlices(v_rows, indices))
        # gather + scatter_update: 2.5x faster than scatter_sub on CPU (no per-entry locking)
        w_rows = w_rows - (m_rows * alpha) / (tf.sqrt(v_rows) + epsilon_hat)
        variable.scatter_update(tf.IndexedSlices(w_rows, indices))

    def _read_rows(self, variable, slot: int, indices: tf.Tensor, weights: bool = True) -> tuple:
        """``(w, m, v, v_hat)`` of the gradient's (distinct) ``indices`` before this step's
        update (``v_hat`` None without ``amsgrad``; ``w`` None unless ``weights``)."""
        v_hat = tf.gather(self._velocity_hats[slot], indices) if self.amsgrad else None
        w = tf.gather(variable, indices) if weights else None
        return w, tf.gather(self._momentums[slot], indices), tf.gather(self._velocities[slot], indices), v_hat

    def _deduplicate_sparse_grad(self, grads):
        """Leave ``IndexedSlices`` as they come: :meth:`update_step` sums repeated indices
        itself, so ``apply_gradients`` does not pay for it twice (a ``tf.unique`` and a
        segment sum over every looked-up entry, ~40 % of a compact table's step)."""
        return list(grads)

    def get_config(self) -> dict:
        """Adam's config plus ``adaptive_epsilon`` (which tf_keras' Adam leaves out)."""
        return {**super().get_config(), "adaptive_epsilon": self.adaptive_epsilon}


EXACT_STEPS = 4096
"""Missed steps within the first ``EXACT_STEPS`` of training are caught up exactly (a
suffix-sum table of the step sizes); later ones, where Adam's step size hardly changes, with
the step size of the missed steps' weighted mean (relative error < 1e-6 of the catch-up)."""


@tf.keras.utils.register_keras_serializable(package="dsl_tf")
class CatchUpAdam(LazyAdam):
    """Keras Adam, with ``IndexedSlices`` steps that touch only the looked-up rows.

    A row absent from a batch gets a zero gradient in Keras Adam: its moments decay
    (``m ← β1·m``, ``v ← β2·v``) and its weights keep moving (``w −= α_k·m/(√v + ε)``) at
    every step. This optimizer defers that work: it keeps each row's last updated step
    (one int64 per row, in ``_last_steps``) and, when the row is next looked up, first
    applies the ``n`` missed steps in closed form::

        w −= Σ_{j=1..n} α_{t0+j} · β1^j · m / (β2^{j/2} · √v + ε),   m ← β1^n · m,   v ← β2^n · v

    (a geometric series in ``β1/√β2``, with the exact step sizes α_k of the first
    :data:`EXACT_STEPS` steps and ``ε`` taken at the missed steps' weighted mean offset), then
    Adam's step with the batch's gradient. So an ordinary step reads and writes only the
    gradient's rows, and the result is Keras Adam's on the same dense gradients (within
    float32 rounding and ~1e-6 relative of a catch-up; tested over random sparse steps).

    For training to follow Keras Adam, the forward pass must also see caught-up rows: a
    :class:`dsl_tf.CompactMaskedEmbedding` or :class:`dsl_tf.MaskedEmbedding` reads its
    looked-up rows through :meth:`read_looked_up` (no write; installed when this optimizer is
    built, which :class:`dsl_tf.DynamicSparsity` and :class:`CatchUp` do at
    ``on_train_begin``, before the step is traced), so its gradients are Keras Adam's (tested:
    same masks and values after a DSL fit); in a traced step on one replica, a compact table's
    update then takes the state its lookups caught up (no second catch-up, no row search).
    Other layers (``tf.keras.layers.Embedding``) read a lagging row as stored: their gradient
    is taken before its catch-up.

    Rows: of a 2-D table, its first axis (what ``IndexedSlices`` of an embedding lookup
    index); of a :class:`dsl_tf.CompactMaskedEmbedding`'s ``values``, the table's rows (read
    from its ``row_splits``: the layer gathers every active entry of a looked-up row, so a
    row is always stepped whole); of any other 1-D variable, its entries. Dense gradients get
    Keras Adam's step, after catching up the variable's missed rows.

    **Rows not looked up lag behind until caught up**: :meth:`catch_up` brings every row of
    every variable up to ``iterations`` (whole-table work). :class:`dsl_tf.DynamicSparsity`
    calls it before each exploration (the prune ranks caught-up magnitudes), at each epoch's
    end, before ``fit``'s validation and at the end of ``fit``; without it, add
    :class:`CatchUp` to ``fit``'s callbacks, or call ``catch_up()`` before reading the
    weights. Put them before checkpoint callbacks in the list to save caught-up weights; a
    checkpoint saved in between holds the row steps too, so it resumes exactly either way.

    Slots are Adam's plus the row steps. ``weight_decay`` and ``use_ema`` (applied to the
    whole variable every step) are rejected. With a learning-rate schedule, missed steps use
    the current rate. ``beta_1`` must be below ``sqrt(beta_2)`` (``beta_1`` < 1 with
    ``amsgrad``), so that the missed steps' sum converges.

    >>> import dsl_tf, tensorflow as tf
    >>> table, twin = tf.Variable(tf.ones([3, 2])), tf.Variable(tf.ones([3, 2]))
    >>> opt, adam = dsl_tf.CatchUpAdam(0.1), tf.keras.optimizers.Adam(0.1)
    >>> for rows in ([0, 1], [0], [0, 2]):  # row 1 misses two steps, row 2 one
    ...     grad = tf.IndexedSlices(tf.ones([len(rows), 2]), tf.constant(rows), tf.constant([3, 2]))
    ...     _ = opt.apply_gradients([(grad, table)])
    ...     _ = adam.apply_gradients([(tf.convert_to_tensor(grad), twin)])
    >>> round(float(table[1, 0]), 4)  # not moved since its step (1 − 0.1)
    0.9
    >>> opt.catch_up()
    >>> bool(tf.reduce_all(tf.abs(table - twin) < 1e-6))
    True
    """

    lazy = True
    """Its ``IndexedSlices`` step touches only the gradient's rows (see :class:`LazyAdam`)."""

    def __init__(self, *args, name: str = "CatchUpAdam", **kwargs):
        """Arguments as :class:`LazyAdam`'s (Keras Adam's)."""
        super().__init__(*args, name=name, **kwargs)
        if self.weight_decay or self.use_ema:
            raise ValueError(
                f"CatchUpAdam does not support weight_decay={self.weight_decay!r} or use_ema={self.use_ema!r}: "
                "both change every entry at every step")
        beta_1, beta_2 = self.beta_1, self.beta_2
        ratio = beta_1 if self.amsgrad else beta_1 / math.sqrt(beta_2)  # of the missed steps' series
        if not 0 < ratio < 1:
            raise ValueError(f"CatchUpAdam needs 0 < beta_1 < sqrt(beta_2) (beta_1 < 1 with amsgrad), got "
                             f"beta_1={beta_1!r}, beta_2={beta_2!r}, amsgrad={self.amsgrad!r}")
        self._ratio = ratio
        # suffix[k] = Σ_{i=k..EXACT_STEPS} A(i)·ratio^(i−k), A(i) = √(1 − β2^i)/(1 − β1^i): step i's
        # size over the learning rate; suffix[EXACT_STEPS + 1] = 0.
        steps = np.arange(1, EXACT_STEPS + 1, dtype=np.float64)
        sizes = np.sqrt(1 - beta_2**steps) / (1 - beta_1**steps)
        suffix = np.zeros(EXACT_STEPS + 2)
        for i in range(EXACT_STEPS, 0, -1):
            suffix[i] = sizes[i - 1] + ratio * suffix[i + 1]
        self._suffix = suffix

    def build(self, var_list):
        """Adam's slots, plus the last updated step of every row (int64, 0: never)."""
        super().build(var_list)
        if getattr(self, "_last_steps", None) is not None:
            return
        # str keys: a dict is not a list of per-variable slots (dsl_tf.masks resets those at
        # explorations; row steps stay), and checkpoints need str keys
        self._row_splits: dict[str, object] = {}
        self._stepped: dict[str, object] = {}  # weak: the model owns its variables
        self._last_steps = {}
        for var in var_list:
            key = str(self._index_dict[self._var_key(var)])
            self._stepped[key] = weakref.ref(var)
            table = masked_table_of(var)
            rows = var.shape[0] if table is None else table.input_dim
            self._last_steps[key] = self.add_variable([rows], tf.int64, name=f"{_name(var)}/last_step")
            if table is not None:
                if var.shape.rank == 1:  # a compact table's values
                    self._row_splits[key] = weakref.ref(table.row_splits)
                table.value_reader = _reader(self, key, var)

    def prepare(self, model: tf.keras.Model) -> bool:
        """Build the slots for ``model``'s trainable variables, if not yet built, so that its
        compact tables read their looked-up values caught up in the forward pass (and the
        gradient is taken there, as Keras Adam's). Returns True if it built them: the training
        step must then be traced again. :class:`dsl_tf.DynamicSparsity` and :class:`CatchUp`
        call it at ``on_train_begin``."""
        if getattr(self, "_last_steps", None) is not None:
            return False
        self.build(model.trainable_variables)
        return True

    def read_looked_up(self, slot: str, variable, indices: tf.Tensor, rows: tf.Tensor | None = None,
                       row_of: tf.Tensor | None = None) -> tf.Tensor:
        """``tf.gather(variable, indices)`` as it is once caught up to ``iterations``, without
        writing anything; the gradient flows to ``variable`` as for the gather.

        ``rows``: the rows whose catch-up is computed (default: the indices' rows, found from the
        layout); ``row_of``: each index's position in ``rows`` (default: one row per index), so
        that the catch-up is computed once per row and broadcast over its entries. With
        ``row_of`` (a compact table's lookup: distinct indices, whole rows), inside a traced
        step on one replica, the caught-up state is handed over to this step's
        :meth:`update_step`, which uses it if the gradient's indices are these ``indices``."""
        index = int(slot)
        w = tf.gather(variable, indices)
        v_hat = tf.gather(self._velocity_hats[index], indices) if self.amsgrad else None
        since = tf.gather(self._last_steps[slot], self._rows_of(slot, indices) if rows is None else rows)
        factors = self._factors(since, tf.cast(self.iterations, tf.int64), w.dtype)
        if row_of is not None:
            factors = tf.gather(factors, row_of)
        caught_up = self._apply_factors(w, tf.gather(self._momentums[index], indices),
                                        tf.gather(self._velocities[index], indices), v_hat, factors)
        if row_of is not None and not tf.executing_eagerly() and tf.distribute.get_strategy().num_replicas_in_sync == 1:
            # several replicas: each component's update must compute the same floats (searched)
            self._looked_up.put(slot, (indices, rows, *caught_up, v_hat))
        return _value_of(w, tf.stop_gradient(caught_up[0]))

    def update_step(self, gradient, variable):
        """Catch up the gradient's rows, then Adam's step on them; or, for a dense gradient,
        catch up the whole variable if any of its rows lags (none does for a variable that only
        gets dense gradients, e.g. a ``Dense`` kernel: the pass is skipped), then Keras Adam's step.

        A compact table's gradient whose indices are the entries its lookups of this step read,
        in their order or the reverse (checked at run time), takes the state those lookups
        caught up: no row search, no second catch-up, and for a single lookup (distinct entries)
        no deduplication."""
        slot = str(self._index_dict[self._var_key(variable)])
        if not isinstance(gradient, tf.IndexedSlices):
            last = self._last_steps[slot]

            def catch_up() -> tf.Tensor:
                self._catch_up_variable(variable, slot, self.iterations)
                return tf.constant(True)

            tf.cond(tf.reduce_any(last < self.iterations), catch_up, lambda: tf.constant(False))
            super().update_step(gradient, variable)
            last.assign(tf.fill(tf.shape(last), tf.cast(self.iterations + 1, tf.int64)))
            return
        lookups = self._looked_up.take(slot)
        orders = [lookups, lookups[::-1]] if len(lookups) > 1 else [lookups] if lookups else []

        def step(k: int) -> tf.Tensor:  # try the lookups in orders[k], else the next order
            if k == len(orders):
                self._step_summed(gradient, variable, int(slot))  # rows searched in the layout
                return tf.constant(False)
            parts = list(zip(*orders[k]))  # indices, rows, w, m, v, v_hat: each a tuple over lookups
            indices = tf.concat(parts[0], 0)  # int32 value positions (the budget is below 2^31)
            return tf.cond(_equal(tf.cast(gradient.indices, tf.int32), indices),
                           lambda: self._step_looked_up(variable, slot, gradient.values, indices, parts),
                           lambda: step(k + 1))

        step(0)

    def _step_looked_up(self, variable, slot: str, grad: tf.Tensor, indices: tf.Tensor, parts: list) -> tf.Tensor:
        """Adam's step on the entries of this step's lookups (``parts``: their indices, rows and
        caught-up ``w, m, v, v_hat``), whose concatenated ``indices`` are the gradient's."""
        state = [None if p[0] is None else tf.concat(p, 0) for p in parts[2:]]
        if len(parts[0]) > 1:  # an entry read by several lookups: its gradients summed, its state once
            indices, at = tf.unique(indices)
            grad = tf.math.unsorted_segment_sum(grad, at, tf.size(indices))
            first = tf.math.unsorted_segment_min(tf.range(tf.size(at)), at, tf.size(indices))
            state = [None if x is None else tf.gather(x, first) for x in state]
        self._step_rows(variable, int(slot), indices, grad, *state)
        self._set_row_steps(slot, tf.concat([tf.cast(r, tf.int64) for r in parts[1]], 0))
        return tf.constant(True)

    def _read_rows(self, variable, slot: int, indices: tf.Tensor) -> tuple:
        """The rows before this step, caught up to the previous step; their row steps set."""
        w, m, v, v_hat = super()._read_rows(variable, slot, indices)
        rows = self._rows_of(str(slot), indices)
        row_of = None
        if str(slot) in self._row_splits:  # a compact table's values: a row's entries are adjacent
            starts = rows != tf.concat([[-1], rows[:-1]], 0)  # runs of one row: one catch-up each
            row_of = tf.cumsum(tf.cast(starts, tf.int32)) - 1
            rows = tf.boolean_mask(rows, starts)
        now = tf.cast(self.iterations, tf.int64)
        factors = self._factors(tf.gather(self._last_steps[str(slot)], rows), now, variable.dtype)
        if row_of is not None:
            factors = tf.gather(factors, row_of)
        w, m, v = self._apply_factors(w, m, v, v_hat, factors)
        self._set_row_steps(str(slot), rows)
        return w, m, v, v_hat

    def _set_row_steps(self, slot: str, rows: tf.Tensor) -> None:
        """Record ``rows`` as updated at this step."""
        self._last_steps[slot].scatter_update(
            tf.IndexedSlices(tf.fill(tf.shape(rows), tf.cast(self.iterations + 1, tf.int64)), rows))

    def _rows_of(self, slot: str, indices: tf.Tensor) -> tf.Tensor:
        """The row of each gradient index (itself, except for a compact table's values)."""
        splits = self._row_splits.get(slot)
        if splits is None:
            return indices
        return tf.searchsorted(tf.convert_to_tensor(splits()), tf.cast(indices, tf.int64), side="right",
                               out_type=tf.int64) - 1

    def _factors(self, since: tf.Tensor, now: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
        """The catch-up of rows last updated at ``since`` (int64, any shape) to step ``now`` (a
        scalar), as ``since.shape + [4]``: the missed steps' summed step size, the decays of
        ``m`` and ``v``, and the ``epsilon`` to add to ``√v`` (see :meth:`_apply_factors`).
        Computed once per row (powers as ``exp(n · log β)``, a few dozen element-wise ops), then
        broadcast over the row's entries."""
        ln_r, ln_b1, ln_b2 = (math.log(x) for x in (self._ratio, self.beta_1, self.beta_2))
        ratio = self._ratio
        real = lambda x: tf.cast(x, dtype)  # noqa: E731
        n = real(now - since)
        # exact head: steps in (since, min(now, EXACT_STEPS)] from the suffix table
        first, last = tf.minimum(since, EXACT_STEPS), tf.minimum(now, EXACT_STEPS)
        suffix = tf.constant(self._suffix, dtype)
        head = ratio * (tf.gather(suffix, first + 1) - tf.exp(real(last - first) * ln_r) * tf.gather(suffix, last + 1))
        # tail beyond EXACT_STEPS: geometric sum, step size at the weighted mean offset
        start = tf.maximum(since, EXACT_STEPS)
        tail_n = real(tf.maximum(now - start, 0))
        k = real(start) + _mean_offset(ratio, tail_n)
        size = tf.sqrt(1 - tf.exp(k * ln_b2)) / (1 - tf.exp(k * ln_b1))
        tail = tf.exp(real(start - since) * ln_r) * size * (ratio / (1 - ratio)) * (1 - tf.exp(tail_n * ln_r))
        step_sum = real(self.learning_rate) * (head + tail)
        # epsilon at the weighted mean offset of all missed steps (divided by β2^(j/2))
        offset = _mean_offset(ratio, n)
        epsilon = real(self.epsilon)
        if self.adaptive_epsilon:
            epsilon = epsilon * tf.sqrt(1 - tf.exp((real(since) + tf.maximum(offset, 1)) * ln_b2))
        if not self.amsgrad:
            epsilon = epsilon * tf.exp(offset * (-ln_b2 / 2))
        epsilon = epsilon + tf.zeros_like(n)
        return tf.stack([step_sum, tf.exp(n * ln_b1), tf.exp(n * ln_b2), epsilon], axis=-1)

    def _apply_factors(self, w, m, v, v_hat, factors: tf.Tensor) -> tuple:
        """``(w, m, v)`` caught up by :meth:`_factors` (``factors[..., i]`` broadcastable to
        ``w``: a row's factors, or one per entry)."""
        step_sum, m_decay, v_decay, epsilon = tf.unstack(factors, axis=-1)
        if w.shape.rank is not None and step_sum.shape.rank is not None and step_sum.shape.rank < w.shape.rank:
            trailing = [1] * (w.shape.rank - step_sum.shape.rank)  # one row's factors for all its entries
            shape = tf.concat([tf.shape(step_sum), trailing], 0)
            step_sum, m_decay, v_decay, epsilon = (tf.reshape(f, shape) for f in (step_sum, m_decay, v_decay, epsilon))
        denominator = (tf.sqrt(v_hat) if self.amsgrad else tf.sqrt(v)) + epsilon
        return w - step_sum * m / denominator, m * m_decay, v * v_decay

    def catch_up(self, var_list=None) -> None:
        """Bring every row of ``var_list`` (default: every variable this optimizer steps)
        up to ``iterations``: whole-table work, by row chunks of at most 2^24 entries, in
        vectorised TF ops; variables already up to date are skipped."""
        if getattr(self, "_last_steps", None) is None:
            return  # not built: nothing stepped yet
        if var_list is None:
            var_list = [ref() for ref in self._stepped.values() if ref() is not None]
        now = tf.convert_to_tensor(self.iterations, tf.int64)
        for variable in var_list:
            slot = str(self._index_dict[self._var_key(variable)])
            if bool(tf.reduce_any(self._last_steps[slot] < now)):
                self._catch_up_variable(variable, slot, now)

    def _catch_up_variable(self, variable, slot: str, now: tf.Tensor, max_entries: int = 1 << 24) -> None:
        """Catch up every row of ``variable`` to step ``now``, by row chunks."""
        last = self._last_steps[slot]
        rows = last.shape[0]
        splits = self._row_splits.get(slot)
        per_row = 1 if splits is not None else max(1, variable.shape.num_elements() // max(rows, 1))
        chunk = max(1, max_entries // per_row)
        index = int(slot)
        state = [variable, self._momentums[index], self._velocities[index]]
        v_hat = self._velocity_hats[index] if self.amsgrad else None
        for r0 in range(0, rows, chunk):
            r1 = min(r0 + chunk, rows)
            factors = self._factors(last[r0:r1], now, variable.dtype)
            entries = tf.range(r0, r1, dtype=tf.int64)
            if splits is not None:  # a row's factors for each of its entries
                bounds = splits()[r0:r1 + 1]
                entries = tf.range(bounds[0], bounds[-1])
                factors = tf.repeat(factors, bounds[1:] - bounds[:-1], axis=0)
            values = [tf.gather(s, entries) for s in state]
            hat = None if v_hat is None else tf.gather(v_hat, entries)
            for s, new in zip(state, self._apply_factors(*values, hat, factors)):
                s.scatter_update(tf.IndexedSlices(new, entries))
        last.assign(tf.fill([rows], now))


def _summed(gradient: tf.IndexedSlices, rows: int | None) -> tuple[tf.Tensor, tf.Tensor]:
    """The distinct indices of ``gradient`` (in order of first occurrence) and their summed
    values, as Keras' ``_deduplicate_sparse_grad``; int32 indices for a variable of fewer than
    2^31 rows: on CPU, ``tf.unique`` and the gathers of the step are 1.5-2.5x faster on int32
    indices than on int64 ones.

    >>> grad = tf.IndexedSlices(tf.constant([1.0, 2.0, 4.0]), tf.constant([3, 1, 3], tf.int64))
    >>> [t.numpy().tolist() for t in _summed(grad, 5)]
    [[3, 1], [5.0, 2.0]]
    """
    indices = gradient.indices
    if rows is not None and rows < 2**31:
        indices = tf.cast(indices, tf.int32)
    distinct, at = tf.unique(indices)
    return distinct, tf.math.unsorted_segment_sum(gradient.values, at, tf.size(distinct))


def _mean_offset(ratio: float, n: tf.Tensor) -> tf.Tensor:
    """Σ j·r^j / Σ r^j over j = 1..n (0 where n = 0): where a geometric series' weight lies."""
    r_n = tf.exp(n * math.log(ratio))
    denominator = (1 - ratio) * (1 - r_n)
    safe = tf.where(n > 0, denominator, tf.ones_like(n))
    return tf.where(n > 0, (1 - (n + 1) * r_n + n * r_n * ratio) / safe, tf.zeros_like(n))


class _LookedUp:
    """What a compact table's lookups read in the step being traced, until that step's update
    takes it, per lookup in call order: ``(indices, w)`` for :class:`LazyAdam` (by variable
    key), ``(indices, rows, w, m, v, v_hat)`` caught up for :class:`CatchUpAdam` (by slot).
    Plain attributes (no Keras tracking of symbolic tensors); lookups traced in another graph
    are never taken."""

    def __init__(self):
        self._pending: dict[str, list[tuple]] = {}

    def put(self, slot: str, state: tuple) -> None:
        self._pending.setdefault(slot, []).append(state)

    def take(self, slot: str) -> list[tuple]:
        """The lookups of ``slot`` traced in the current graph (or one enclosing it), removed so
        that they serve one update only."""
        lookups = self._pending.pop(slot, [])
        if tf.executing_eagerly():
            return []
        enclosing, graph = set(), tf.compat.v1.get_default_graph()
        while graph is not None:
            enclosing.add(id(graph))
            graph = getattr(graph, "outer_graph", None)
        return [state for state in lookups if id(state[0].graph) in enclosing]


def _equal(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Whether the 1-D tensors ``a`` and ``b`` are equal (sizes first)."""
    return tf.cond(tf.equal(tf.size(a), tf.size(b)), lambda: tf.reduce_all(tf.equal(a, b)),
                   lambda: tf.constant(False))


def _reader(optimizer: LazyAdam, slot, variable):
    """A masked table's ``value_reader``: not keeping the optimizer alive (once it is gone, a
    plain gather)."""
    optimizer, variable = weakref.ref(optimizer), weakref.ref(variable)

    def read(indices: tf.Tensor, rows: tf.Tensor, row_of: tf.Tensor | None = None) -> tf.Tensor:
        owner = optimizer()
        if owner is None:
            return tf.gather(variable(), indices)
        return owner.read_looked_up(slot, variable(), indices, rows, row_of)

    read.optimizer = optimizer
    return read


def _owner(table) -> LazyAdam | None:
    """The optimizer whose reader ``table`` reads its lookups through (None: none, or gone)."""
    return getattr(table.value_reader, "optimizer", lambda: None)()


@tf.custom_gradient
def _value_of(w: tf.Tensor, value: tf.Tensor):
    """``value``, with the gradient of ``w`` (identity)."""
    return tf.identity(value), lambda dy: (dy, tf.zeros_like(dy))


def _name(variable) -> str:
    return variable.name.split(":")[0]


class CatchUp(tf.keras.callbacks.Callback):
    """Calls :meth:`CatchUpAdam.catch_up` (through any optimizer wrapper) where weights are
    read: at each epoch's end, before ``fit``'s validation and ``predict``, and at the end of
    ``fit``. :class:`dsl_tf.DynamicSparsity` does the same; this is for models without it.
    A no-op for other optimizers. List it before checkpoint callbacks.

    >>> import dsl_tf, numpy as np, tensorflow as tf
    >>> model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), tf.keras.layers.Embedding(50, 4),
    ...                              tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
    >>> model.compile(dsl_tf.CatchUpAdam(0.01), "mse")
    >>> _ = model.fit(np.arange(50)[:, None] % 7, np.zeros(50), batch_size=10, callbacks=[CatchUp()], verbose=0)
    >>> int(tf.reduce_min(model.optimizer._last_steps["0"]))  # every row caught up to the last step
    5
    """

    def on_train_begin(self, logs=None):
        if prepare_catch_up(self.model):
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        catch_up_optimizer(self.model.optimizer)

    def on_test_begin(self, logs=None):
        catch_up_optimizer(self.model.optimizer)

    def on_predict_begin(self, logs=None):
        catch_up_optimizer(self.model.optimizer)

    def on_train_end(self, logs=None):
        catch_up_optimizer(self.model.optimizer)
