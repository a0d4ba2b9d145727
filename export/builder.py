"""The servable: a ``tf.Module`` whose four ``tf.function`` s become TF Serving signatures.

Signatures (all ``tensorflow/serving/predict``; ``ID`` is ``string`` when the data's raw ids
are strings, ``int64`` when they are integers)::

    serving_default  user_id ID[B]              -> item_ids ID[B, k], scores float32[B, k], known bool[B]
    score            user_id ID[B], item_id ID[B] -> scores float32[B], known bool[B]
    user_embedding   user_id ID[B]              -> embedding float32[B, d], known bool[B]
    item_embedding   item_id ID[B]              -> embedding float32[B, d], known bool[B]

Raw ids are mapped to the model's dense ids inside the graph with standard ops
(``tf.lookup.StaticHashTable``; integer ids equal to the dense ids need only a range check),
and returned item ids are raw ids. Unknown ids never fail a request: ``known`` is false,
their embedding is the zero vector, a pair with an unknown id scores 0, and an unknown
user's recommendations are the k most popular training items with score 0. ``score``
requires ``user_id`` and ``item_id`` of equal length (``InvalidArgumentError`` otherwise).

Formats (``fmt``):

* ``"compact"``: both masked tables are stored with :mod:`dsl_tf.compact` (bitmask + packed
  float32/float16 values + row offsets), so the version folder scales with the active
  entries. User/item embedding lookups rebuild only the requested rows. Retrieval over all
  items needs the whole item matrix; ``item_matrix`` chooses how:

  - ``"cache"`` (default): rebuilt ONCE when the model is loaded (a SavedModel resource
    initializer, run by TF Serving / the TF1 loader right after restoring the variables)
    into an in-memory, never-saved float32 ``[num_items, d]`` variable.
  - ``"rebuild"``: rebuilt from the compact arrays on every ``serving_default`` request
    (smallest resident memory, slower requests).

* ``"dense"``: the baseline. The masked user table ``E ⊙ M`` and the final item matrix
  (item tower applied at export time) stored as dense variables.
"""

from __future__ import annotations

import uuid
from typing import Callable, Sequence

import dsl_tf  # noqa: F401  (must precede tf.keras)
import numpy as np
import tensorflow as tf

from dsl_tf import compact, masks

FORMATS = ("compact", "dense")
ITEM_MATRIX = ("cache", "rebuild")
VALUES = ("float32", "float16")
SIGNATURES = ("serving_default", "score", "user_embedding", "item_embedding")
F16_UNIT_ROUNDOFF = 2.0**-11
"""Relative rounding error of float16 (round to nearest): |fl(x) - x| <= 2^-11 |x|."""


class ExportError(RuntimeError):
    """The model cannot be exported (nothing was written)."""


# ============================================================================ towers
def split_tower(tower, side: str):
    """``(MaskedEmbedding, [following Keras layers])`` of a retrieval tower.

    Supported: a bare ``MaskedEmbedding`` or a ``tf.keras.Sequential`` whose first layer is
    one. Raises :class:`ExportError` otherwise.
    """
    if tower is None:
        raise ExportError(
            f"the model has no {side}_tower: only dot-product retrieval models "
            "(two_tower, mf_bpr) can be exported"
        )
    if isinstance(tower, dsl_tf.MaskedEmbedding):
        return tower, []
    if isinstance(tower, tf.keras.Sequential) and tower.layers and isinstance(
        tower.layers[0], dsl_tf.MaskedEmbedding
    ):
        return tower.layers[0], list(tower.layers[1:])
    raise ExportError(
        f"{side}_tower must be a MaskedEmbedding or a tf.keras.Sequential starting with one "
        f"(a model without masked tables cannot be exported compactly); got {type(tower).__name__}"
    )


class _Post(tf.Module):
    """The tower layers after the embedding. Their variables are tracked (saved); the Keras
    layer objects themselves are hidden from tracking so only plain functions are saved."""

    def __init__(self, layers: Sequence[tf.keras.layers.Layer], name: str):
        super().__init__(name=name)
        self.weights = [w for layer in layers for w in layer.weights]
        self.__dict__["_layers"] = tuple(layers)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for layer in self.__dict__["_layers"]:
            x = layer(x)
        return tf.cast(x, tf.float32)


def _valid(ids: tf.Tensor, rows: int) -> tf.Tensor:
    return tf.logical_and(ids >= 0, ids < rows)


class _DenseTable(tf.Module):
    def __init__(self, table: np.ndarray, values: str, name: str):
        super().__init__(name=name)
        self.rows, self.dim = table.shape
        with self.name_scope:
            self.table = tf.Variable(table.astype(values), trainable=False, name="table")

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        safe = tf.clip_by_value(ids, 0, self.rows - 1)
        rows = tf.cast(tf.gather(self.table, safe), tf.float32)
        return rows * tf.cast(_valid(ids, self.rows), tf.float32)[:, None]

    def full(self) -> tf.Tensor:
        return tf.cast(tf.convert_to_tensor(self.table), tf.float32)


class _CompactTable(tf.Module):
    def __init__(self, table: compact.CompactTable, name: str):
        super().__init__(name=name)
        self.rows, self.dim = table.rows, table.dim
        emb = compact.CompactEmbedding(table, name="compact")
        # Track only the three arrays: the CompactEmbedding's own pre-traced functions
        # would add ~35 KB of unused graph to every export.
        self.bitmask, self.values, self.row_offsets = emb.bitmask, emb.values, emb.row_offsets
        self.__dict__["_emb"] = emb

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        return compact.lookup(self.bitmask, self.values, self.row_offsets, ids, self.dim)

    def full(self) -> tf.Tensor:
        return self.__dict__["_emb"].dense()


class _LoadTimeMatrix(tf.saved_model.experimental.TrackableResource):
    """A float32 ``[rows, dim]`` in-memory variable computed by ``compute`` when the
    SavedModel is loaded (resource initializer = part of the SavedModel's init op, run after
    the variables are restored). It is a resource, not a tf.Variable: never checkpointed."""

    def __init__(self, compute: Callable[[], tf.Tensor], rows: int, dim: int):
        self._compute = compute
        self._shape = [int(rows), int(dim)]
        self._shared_name = f"dsl_item_matrix_{uuid.uuid4().hex}"
        super().__init__()
        self._initialize()  # eager: fill it now

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(
            dtype=tf.float32, shape=self._shape, shared_name=self._shared_name, container=""
        )

    def _initialize(self):
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=self._compute())

    def _destroy_resource(self):
        tf.raw_ops.DestroyResourceOp(resource=self.resource_handle, ignore_lookup_error=True)

    def read(self) -> tf.Tensor:
        out = tf.raw_ops.ReadVariableOp(resource=self.resource_handle, dtype=tf.float32)
        out.set_shape(self._shape)
        return out


class IdMap(tf.Module):
    """One side's raw ids <-> the model's dense ids, with standard TF ops only.

    ``raw[dense] == raw id`` (strings or integers, all distinct). Integer ids equal to the
    dense ids (``0..rows-1``) need no table: ``dense`` is a range check. Otherwise a
    ``tf.lookup.StaticHashTable`` (``KeyValueTensorInitializer``: raw -> dense, default -1)
    is initialised by the SavedModel's init op when TF Serving loads the model.
    """

    def __init__(self, raw: np.ndarray | None, rows: int, name: str):
        super().__init__(name=name)
        raw = np.arange(rows, dtype=np.int64) if raw is None else np.asarray(raw)
        if raw.shape != (rows,):
            raise ExportError(f"{name}: {raw.shape} raw ids for a table of {rows} rows")
        if raw.dtype.kind in "iu":
            self.dtype, raw = tf.int64, raw.astype(np.int64)
        elif raw.dtype.kind in "US":
            self.dtype, raw = tf.string, raw.astype(str)
        else:
            raise ExportError(f"{name}: raw ids must be strings or integers, got dtype {raw.dtype}")
        if len(np.unique(raw)) != rows:
            raise ExportError(f"{name}: raw ids are not distinct")
        self.rows, self.raw_ids = rows, raw
        self.identity = self.dtype == tf.int64 and bool(np.array_equal(raw, np.arange(rows)))
        if not self.identity:
            with self.name_scope:
                init = tf.lookup.KeyValueTensorInitializer(tf.constant(raw), tf.range(rows, dtype=tf.int64))
                self.table = tf.lookup.StaticHashTable(init, default_value=-1)
            self._raw = tf.constant(raw)

    def dense(self, ids: tf.Tensor) -> tf.Tensor:
        """Dense ids of raw ``ids``; -1 for unknown ones."""
        if self.identity:
            return tf.where(_valid(ids, self.rows), ids, tf.constant(-1, tf.int64))
        return self.table.lookup(ids)

    def raw(self, dense: tf.Tensor) -> tf.Tensor:
        """Raw ids of (valid) dense ids."""
        return dense if self.identity else tf.gather(self._raw, dense)

    def unknown_id(self):
        """A raw id that is not in the map (for warmup requests and tests)."""
        if self.dtype == tf.int64:
            return int(self.raw_ids.max(initial=-1)) + 1
        known, candidate = set(self.raw_ids.tolist()), "<unknown>"
        while candidate in known:
            candidate += "?"
        return candidate

    def describe(self) -> dict:
        return {"dtype": self.dtype.name, "count": self.rows}


class ServingModule(tf.Module):
    """The exported ``tf.Module``; its four ``tf.function`` s become the signatures.

    ``user_ids`` / ``item_ids``: the raw id of every dense id (``None``: raw ids are the
    dense ids, ``int64``). ``seen``: a ``[num_users, num_items]`` scipy CSR matrix of the
    training interactions; when given, ``serving_default`` never returns an item the user
    interacted with (stored as CSR ``indptr`` int64 + ``indices`` int32: 4 bytes per
    interaction; seen items get score ``float32.min`` before the top-k).
    """

    def __init__(self, user_tower, item_tower, *, fmt: str = "compact", values: str = "float32",
                 k: int = 20, item_popularity: np.ndarray | None = None,
                 item_matrix: str = "cache", user_ids: np.ndarray | None = None,
                 item_ids: np.ndarray | None = None, seen=None):
        super().__init__(name="dsl_servable")
        if fmt not in FORMATS:
            raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
        if values not in VALUES:
            raise ExportError(f"values must be one of {VALUES}, got {values!r}")
        if item_matrix not in ITEM_MATRIX:
            raise ExportError(f"item_matrix must be one of {ITEM_MATRIX}, got {item_matrix!r}")
        user_emb, user_post = split_tower(user_tower, "user")
        item_emb, item_post = split_tower(item_tower, "item")
        if user_emb.output_dim != item_emb.output_dim:
            raise ExportError("user and item embeddings have different dims")
        self.fmt, self.values_dtype, self.item_matrix_mode = fmt, values, item_matrix
        if int(k) < 1:
            raise ExportError(f"k must be >= 1, got {k}")
        self.num_users, self.num_items = int(user_emb.input_dim), int(item_emb.input_dim)
        self.user_map = IdMap(user_ids, self.num_users, "user_ids")
        self.item_map = IdMap(item_ids, self.num_items, "item_ids")
        self.k = int(min(int(k), self.num_items))  # k > num_items: every item, ranked
        self.user_post = _Post(user_post, "user_post")
        self.item_post = _Post(item_post, "item_post")
        self.densities = {emb.name: masks.active_count(emb) / (emb.input_dim * emb.output_dim)
                          for emb in (user_emb, item_emb)}
        self.table_names = {"user": user_emb.name, "item": item_emb.name}
        self.dim = int(user_emb.output_dim)
        if fmt == "compact":  # compact tables are encoded from their training layout, never densified
            self.user_table = _CompactTable(compact.from_layer(user_emb, values), "user")
            self.item_table = _CompactTable(compact.from_layer(item_emb, values), "item")
            if item_matrix == "cache":
                self.item_cache = _LoadTimeMatrix(
                    lambda: self.item_post(self.item_table.full()), self.num_items, self.dim
                )
        else:
            self.user_table = _DenseTable(user_emb.effective_table().numpy(), values, "user")
            final_items = self.item_post(item_emb.effective_table()).numpy()
            self.item_table = _DenseTable(final_items, values, "item_matrix")
        popularity = np.zeros(self.num_items) if item_popularity is None else np.asarray(item_popularity)
        if popularity.shape != (self.num_items,):
            raise ExportError(f"item_popularity has shape {popularity.shape}, expected ({self.num_items},)")
        order = np.argsort(-popularity.astype(np.float64), kind="stable")[: self.k]
        self._popular = tf.constant(order.astype(np.int64))  # the k most popular items (dense ids)
        self.popular_items = self.item_map.raw_ids[order]
        self.exclude_seen = seen is not None
        if self.exclude_seen:
            if seen.shape != (self.num_users, self.num_items):
                raise ExportError(f"seen has shape {seen.shape}, expected ({self.num_users}, {self.num_items})")
            seen = seen.tocsr()
            self.seen_indptr = tf.Variable(seen.indptr.astype(np.int64), trainable=False, name="seen_indptr")
            self.seen_items = tf.Variable(seen.indices.astype(np.int32), trainable=False, name="seen_items")
        users = tf.TensorSpec([None], self.user_map.dtype, name="user_id")
        items = tf.TensorSpec([None], self.item_map.dtype, name="item_id")
        self.serving_default = tf.function(self._recommend, input_signature=[users])
        self.score = tf.function(self._score, input_signature=[users, items])
        self.user_embedding = tf.function(self._user_embedding, input_signature=[users])
        self.item_embedding = tf.function(self._item_embedding, input_signature=[items])

    # -------------------------------------------------------------- vectors of dense ids
    def _users(self, user_id: tf.Tensor) -> tf.Tensor:
        vectors = self.user_post(self.user_table.lookup(user_id))
        return vectors * tf.cast(_valid(user_id, self.num_users), tf.float32)[:, None]

    def _items(self, item_id: tf.Tensor) -> tf.Tensor:
        if self.fmt == "dense":
            return self.item_table.lookup(item_id)  # final vectors, zero for invalid ids
        vectors = self.item_post(self.item_table.lookup(item_id))
        return vectors * tf.cast(_valid(item_id, self.num_items), tf.float32)[:, None]

    def item_matrix(self) -> tf.Tensor:
        """Final item vectors ``[num_items, d]`` used for retrieval."""
        if self.fmt == "dense":
            return self.item_table.full()
        if self.item_matrix_mode == "cache":
            return self.item_cache.read()
        return self.item_post(self.item_table.full())

    # -------------------------------------------------------------- signatures (raw ids)
    def _recommend(self, user_id):
        users = self.user_map.dense(user_id)
        known = users >= 0
        scores = tf.matmul(self._users(users), self.item_matrix(), transpose_b=True)
        if self.exclude_seen:
            scores = self._drop_seen(users, scores)
        top = tf.math.top_k(scores, k=self.k)
        items = tf.where(known[:, None], tf.cast(top.indices, tf.int64), self._popular[None, :])
        return {"item_ids": self.item_map.raw(items),
                "scores": tf.where(known[:, None], top.values, tf.zeros_like(top.values)), "known": known}

    def _drop_seen(self, users: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        """``scores`` with each (known) user's training items set to ``float32.min``:
        O(batch's interactions), never the whole interaction matrix."""
        known = users >= 0
        safe = tf.where(known, users, tf.zeros_like(users))
        starts = tf.gather(self.seen_indptr, safe)
        lengths = tf.where(known, tf.gather(self.seen_indptr, safe + 1) - starts, tf.zeros_like(starts))
        rows = tf.repeat(tf.range(tf.size(users, out_type=tf.int64)), lengths)
        items = tf.cast(tf.gather(self.seen_items, tf.ragged.range(starts, starts + lengths).flat_values), tf.int64)
        low = tf.fill(tf.shape(items), tf.float32.min)
        return tf.tensor_scatter_nd_update(scores, tf.stack([rows, items], axis=1), low)

    def _score(self, user_id, item_id):
        same = tf.debugging.assert_equal(
            tf.size(user_id), tf.size(item_id),
            message="score: user_id and item_id must have the same length (one pair per position)")
        with tf.control_dependencies([same]):
            users, items = self.user_map.dense(user_id), self.item_map.dense(item_id)
        return {"scores": tf.reduce_sum(self._users(users) * self._items(items), axis=-1),
                "known": tf.logical_and(users >= 0, items >= 0)}

    def _user_embedding(self, user_id):
        users = self.user_map.dense(user_id)
        return {"embedding": self._users(users), "known": users >= 0}

    def _item_embedding(self, item_id):
        items = self.item_map.dense(item_id)
        return {"embedding": self._items(items), "known": items >= 0}

    def signatures(self) -> dict:
        return {name: getattr(self, name) for name in SIGNATURES}


def build_servable(user_tower, item_tower, **kwargs) -> ServingModule:
    """A :class:`ServingModule` (see its arguments), checked against the towers.

    The check compares the module's user/item embeddings with the Keras towers on a sample
    of ids (float32: 1e-5; float16: the rounding bound), so an unsupported tower structure
    fails here instead of serving wrong vectors, and maps the sample's raw ids back to
    their dense ids.
    """
    module = ServingModule(user_tower, item_tower, **kwargs)
    rng = np.random.default_rng(0)
    tol = 1e-5 if module.values_dtype == "float32" else 8 * F16_UNIT_ROUNDOFF
    for side, tower, rows, fn, id_map in (("user", user_tower, module.num_users, module._users, module.user_map),
                                          ("item", item_tower, module.num_items, module._items, module.item_map)):
        ids = np.unique(rng.integers(0, rows, size=min(rows, 64))).astype(np.int64)
        mapped = id_map.dense(tf.constant(id_map.raw_ids[ids])).numpy()
        if not np.array_equal(mapped, ids):
            raise ExportError(f"the {side} id map does not invert: dense {ids[:5]} -> raw -> {mapped[:5]}")
        want = tf.cast(tower(tf.constant(ids)), tf.float32).numpy()
        got = fn(tf.constant(ids)).numpy()
        scale = np.maximum(np.abs(want).max(), 1.0)
        if not np.allclose(got, want, rtol=0, atol=tol * scale):
            raise ExportError(
                f"the exported {side} vectors differ from {side}_tower(ids) "
                f"(max |diff| {np.abs(got - want).max():.3g}): unsupported tower structure"
            )
    return module
