"""Masked embedding layer: a drop-in ``tf.keras.layers.Embedding`` with a binary mask."""

from __future__ import annotations

import tensorflow as tf

_ON_READ = tf.VariableSynchronization.ON_READ


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
      cross-replica context reduces it over replicas.
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

    def __init__(self, input_dim: int, output_dim: int, **kwargs):
        if kwargs.get("sparse"):
            raise ValueError("MaskedEmbedding does not support sparse=True, got sparse=True")
        super().__init__(input_dim, output_dim, **kwargs)

    def build(self, input_shape=None):
        super().build(input_shape)
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
        rows = tf.gather(self.embeddings, ids) * tf.gather(self.mask, ids)
        rows = self._track_growth_scores(rows, ids)
        compute_dtype = self._dtype_policy.compute_dtype
        if rows.dtype != compute_dtype:
            rows = tf.cast(rows, compute_dtype)
        return rows

    def _track_growth_scores(self, rows: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
        """Identity whose gradient scatter-adds ``∂L/∂rows`` into ``growth_scores``."""
        scores, tracking, dim = self.growth_scores, self.score_tracking, self.output_dim

        @tf.custom_gradient
        def identity(x):
            def grad(dy):
                def accumulate():
                    flat_dy = tf.reshape(tf.cast(dy, tf.float32), [-1, dim])
                    flat_ids = tf.reshape(ids, [-1])
                    _local(scores).scatter_add(tf.IndexedSlices(flat_dy, flat_ids))
                    return tf.constant(True)

                done = tf.cond(tracking, accumulate, lambda: tf.constant(False))
                with tf.control_dependencies([done]):
                    return tf.identity(dy)

            return tf.identity(x), grad

        return identity(rows)

    def effective_table(self) -> tf.Tensor:
        """The whole masked table ``E ⊙ M`` (whole-table work: for export/analysis)."""
        return self.embeddings * self.mask


def _local(variable: tf.Variable) -> tf.Variable:
    """This replica's component of a sync-on-read variable (the variable itself otherwise).

    Sync-on-read variables do not implement scatter ops; their per-replica components do.
    """
    get_local = getattr(variable, "_get_on_device_or_primary", None)
    return get_local() if get_local is not None else variable


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
