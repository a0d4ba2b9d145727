"""Servables: ``tf.Module`` s whose ``tf.function`` s become TF Serving signatures.

:class:`Servable` is the common part (raw-id maps, top-k with the popular-items fallback,
excluding seen items, warmup inputs, metadata). One subclass per kind of model:

* :class:`RetrievalServable` — dot-product models: ``two_tower``, ``mf_bpr``, ``ultragcn``
  (``user_tower`` / ``item_tower``) and ``lightgcn`` (final propagated embeddings)::

    serving_default  user_id ID[B]               -> item_ids ID[B, k], scores float32[B, k], known bool[B]
    score            user_id ID[B], item_id ID[B] -> scores float32[B], known bool[B]
    user_embedding   user_id ID[B]               -> embedding float32[B, d], known bool[B]
    item_embedding   item_id ID[B]               -> embedding float32[B, d], known bool[B]

* ``export.backbones``: ``NeuMFServable`` (MLP scores of every item), ``AutoencoderServable``
  (MultVAE / CDAE from a raw item history); ``export.custom``: a user's own Keras model.

``ID`` is ``string`` when the data's raw ids are strings, ``int64`` when they are integers.
Raw ids are mapped inside the graph (``tf.lookup.StaticHashTable``; integer ids equal to the
dense ids need only a range check), and returned item ids are raw ids. Unknown ids never
fail a request: ``known`` is false, their embedding is the zero vector, a pair with an
unknown id scores 0, and an unknown user's recommendations are the k most popular training
items with score 0.

Every masked table is an :class:`export.tables.ServedTable` (compact or dense format); the
rest of the model's computation (tower layers, MLPs, biases) runs as the Keras model does.
"""

from __future__ import annotations

from typing import Sequence

import dsl_tf  # noqa: F401  (must precede tf.keras)
import numpy as np
import tensorflow as tf

from dsl_tf import compact
from export.tables import (FORMATS, SCORING, VALUES, DenseMatrix, ExportError, LoadTimeTensor,  # noqa: F401
                           MAX_CHUNKS, ServedTable, describe_layer, valid, zeros)

ITEM_MATRIX = SCORING
F16_UNIT_ROUNDOFF = 2.0**-11
"""Relative rounding error of float16 (round to nearest): |fl(x) - x| <= 2^-11 |x|."""
RETRIEVAL_SIGNATURES = ("serving_default", "score", "user_embedding", "item_embedding")
SCORE_CHUNK_BATCH = 64
"""Batch size a chunk of items is sized for: ``SCORE_ENTRIES // SCORE_CHUNK_BATCH`` items."""
SCORE_ENTRIES = 2**19
"""Scores a request of the item cache holds at once (2 MiB of float32): a batch whose
``[B, num_items]`` scores are larger is answered item chunk by item chunk. Measured at Gowalla
sizes, batch 64, fresh process (under load): peak RSS 54.0 / 46.8 / 47.1 MiB with 2**20 / 2**19 /
2**18 (dense: 47.1) at 1.07 / 1.15 / 1.22 × dense's p50 latency (interleaved)."""
SIGNATURES = RETRIEVAL_SIGNATURES  # the dot-product servables' signatures


# ============================================================================ raw ids
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
        """Dense ids of raw ``ids`` (any shape); -1 for unknown ones."""
        if self.identity:
            return tf.where(valid(ids, self.rows), ids, tf.constant(-1, tf.int64))
        return self.table.lookup(ids)

    def raw(self, dense: tf.Tensor) -> tf.Tensor:
        """Raw ids of (valid) dense ids."""
        return dense if self.identity else tf.gather(self._raw, dense)

    def unknown_id(self):
        """A raw id that is not in the map (for warmup requests, padding and tests)."""
        if self.dtype == tf.int64:
            return int(self.raw_ids.max(initial=-1)) + 1
        known, candidate = set(self.raw_ids.tolist()), "<unknown>"
        while candidate in known:
            candidate += "?"
        return candidate

    def sample(self, rng: np.random.Generator, size: int, unknown: bool) -> np.ndarray:
        """``size`` random raw ids, the last one unknown when ``unknown`` (and size > 1)."""
        ids = self.raw_ids[rng.integers(0, self.rows, size=size)]
        if unknown and size > 1:
            ids = np.concatenate([ids[:-1], np.array([self.unknown_id()], ids.dtype)])
        return ids

    def spec(self, name: str, shape=(None,)) -> tf.TensorSpec:
        return tf.TensorSpec(list(shape), self.dtype, name=name)

    def describe(self) -> dict:
        return {"dtype": self.dtype.name, "count": self.rows}


# ============================================================================ base
class Servable(tf.Module):
    """What every servable shares. Subclasses set ``kind``, ``signature_names`` and the
    ``tf.function`` s of those names, and implement :meth:`warmup_inputs` and
    :meth:`reference` (the Keras model's answer, checked at export)."""

    kind = ""
    signature_names: tuple = ()

    def __init__(self, *, tables: dict, num_items: int, k: int, item_popularity, item_ids, fmt: str,
                 values: str, item_matrix: str, num_users: int | None = None, user_ids=None, seen=None,
                 table_info: dict | None = None):
        super().__init__(name="dsl_servable")
        if int(k) < 1:
            raise ExportError(f"k must be >= 1, got {k}")
        self.fmt, self.values_dtype, self.item_matrix_mode = fmt, values, item_matrix
        self.tables = tables  # {layer name: ServedTable}: what is stored
        self.table_info = table_info or {name: table.info for name, table in tables.items()}
        self.num_items = int(num_items)
        self.num_users = None if num_users is None else int(num_users)
        self.item_map = IdMap(item_ids, self.num_items, "item_ids")
        self.user_map = None if num_users is None else IdMap(user_ids, self.num_users, "user_ids")
        self.k = int(min(int(k), self.num_items))  # k > num_items: every item, ranked
        popularity = np.zeros(self.num_items) if item_popularity is None else np.asarray(item_popularity)
        if popularity.shape != (self.num_items,):
            raise ExportError(f"item_popularity has shape {popularity.shape}, expected ({self.num_items},)")
        order = np.argsort(-popularity.astype(np.float64), kind="stable")[: self.k]
        self._popular = tf.constant(order.astype(np.int64))  # the k most popular items (dense ids)
        self.popular_items = self.item_map.raw_ids[order]
        self.exclude_seen = seen is not None
        if self.exclude_seen:
            if self.num_users is None or seen.shape != (self.num_users, self.num_items):
                raise ExportError(f"seen has shape {seen.shape}, expected ({self.num_users}, {self.num_items})")
            seen = seen.tocsr()
            self.__dict__["_seen"] = seen
            self.seen_indptr = tf.Variable(seen.indptr.astype(np.int64), trainable=False, name="seen_indptr")
            self.seen_items = tf.Variable(seen.indices.astype(np.int32), trainable=False, name="seen_items")

    @property
    def densities(self) -> dict:
        return {name: info["density"] for name, info in self.table_info.items()}

    @property
    def example_users(self) -> list:
        """The first raw user ids (for the REST example and ``--query``)."""
        return [] if self.user_map is None else self.user_map.raw_ids[:2].tolist()

    def signatures(self) -> dict:
        return {name: getattr(self, name) for name in self.signature_names}

    def metadata(self) -> dict:
        ids = {"item": self.item_map.describe()}
        if self.user_map is not None:
            ids = {"user": self.user_map.describe(), **ids}
        return {"kind": self.kind, "k": self.k, "num_users": self.num_users, "num_items": self.num_items,
                "densities": self.densities, "tables": self.table_info,
                "ids": ids, "exclude_seen": self.exclude_seen, "popular_items": self.popular_items.tolist()}

    # -------------------------------------------------------------- shared pieces
    def _top(self, scores: tf.Tensor, known: tf.Tensor) -> dict:
        """Top-k of ``scores [B, num_items]`` as raw ids; rows not ``known`` get the popular items."""
        top = tf.math.top_k(scores, k=self.k)
        return self._answer(top.values, top.indices, known)

    def _answer(self, values: tf.Tensor, indices: tf.Tensor, known: tf.Tensor) -> dict:
        """``serving_default``'s outputs from the top-k ``values`` / dense item ``indices``."""
        items = tf.where(known[:, None], tf.cast(indices, tf.int64), self._popular[None, :])
        return {"item_ids": self.item_map.raw(items),
                "scores": tf.where(known[:, None], values, tf.zeros_like(values)), "known": known}

    def _drop_seen(self, users: tf.Tensor, scores: tf.Tensor, first_item: int = 0) -> tf.Tensor:
        """``scores`` (of items ``first_item, first_item + 1, …``) with each (known) user's
        training items set to ``float32.min``: O(batch's interactions), never the whole
        interaction matrix."""
        known = users >= 0
        safe = tf.where(known, users, tf.zeros_like(users))
        starts = tf.gather(self.seen_indptr, safe)
        lengths = tf.where(known, tf.gather(self.seen_indptr, safe + 1) - starts, tf.zeros_like(starts))
        rows = tf.repeat(tf.range(tf.size(users, out_type=tf.int64)), lengths)
        items = tf.cast(tf.gather(self.seen_items, tf.ragged.range(starts, starts + lengths).flat_values), tf.int64)
        items -= first_item
        inside = tf.logical_and(items >= 0, items < tf.shape(scores, out_type=tf.int64)[1])
        rows, items = tf.boolean_mask(rows, inside), tf.boolean_mask(items, inside)
        low = tf.fill(tf.shape(items), tf.float32.min)
        return tf.tensor_scatter_nd_update(scores, tf.stack([rows, items], axis=1), low)

    def _reference_seen(self, users: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """``scores`` of dense ``users`` with their seen items at ``float32.min`` (as served)."""
        if not self.exclude_seen:
            return scores
        scores = scores.copy()
        seen = self.__dict__["_seen"][users]
        scores[seen.nonzero()] = np.finfo(np.float32).min
        return scores

    def _pairs(self, user_id: tf.Tensor, item_id: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        same = tf.debugging.assert_equal(
            tf.size(user_id), tf.size(item_id),
            message="score: user_id and item_id must have the same length (one pair per position)")
        with tf.control_dependencies([same]):
            return self.user_map.dense(user_id), self.item_map.dense(item_id)

    def _retrieval_warmup(self, batch: int, rng: np.random.Generator) -> dict:
        users = self.user_map.sample(rng, batch, unknown=True)
        items = self.item_map.sample(rng, batch, unknown=False)
        return {"serving_default": {"user_id": users}, "score": {"user_id": users, "item_id": items}}

    def warmup_inputs(self, batch: int, rng: np.random.Generator) -> dict:
        """``{signature: {input: array}}`` of one request per signature of ``batch`` rows."""
        raise NotImplementedError

    def reference(self, model, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
        """``(serving_default inputs, the Keras model's scores [B, num_items])`` of a sample."""
        raise NotImplementedError


def split_tower(tower, side: str):
    """``(masked embedding layer, [following Keras layers])`` of a retrieval tower.

    Supported: a bare ``MaskedEmbedding`` / ``CompactMaskedEmbedding`` or a
    ``tf.keras.Sequential`` whose first layer is one. Raises :class:`ExportError` otherwise.
    """
    if tower is None:
        raise ExportError(f"the model has no {side}_tower")
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


class Post(tf.Module):
    """Keras layers applied after a table lookup. Their variables are tracked (saved); the
    layer objects themselves are hidden from tracking so only plain functions are saved."""

    def __init__(self, layers: Sequence[tf.keras.layers.Layer], name: str):
        super().__init__(name=name)
        self.weights = [w for layer in layers for w in layer.weights]
        self.__dict__["_layers"] = tuple(layers)

    @property
    def normalizes(self) -> bool:
        """Only a ``UnitNormalization`` over the last axis (a per-row scale)."""
        layers = self.__dict__["_layers"]
        return (len(layers) == 1 and isinstance(layers[0], tf.keras.layers.UnitNormalization)
                and list(np.ravel(layers[0].axis)) in ([-1], [1]))

    @property
    def empty(self) -> bool:
        return not self.__dict__["_layers"]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for layer in self.__dict__["_layers"]:
            x = layer(x)
        return tf.cast(x, tf.float32)


class FilledInPlace(LoadTimeTensor):
    """A :class:`LoadTimeTensor` that ``fill(self)`` writes in place at load (several in-place
    updates instead of one computed value: LightGCN's propagation)."""

    def _initialize(self):
        return self._compute(self)


# ============================================================================ retrieval
class RetrievalServable(Servable):
    """Dot-product retrieval: scores are ``user_vector · item_vector``.

    * towers (``model.user_tower`` / ``item_tower``: a masked table, optionally followed by
      Keras layers): user vectors are computed per request from the stored user table.
      Scoring every item (``item_matrix``, compact format): ``"sparse"`` multiplies the user
      vectors with the compact item table directly (towers ending in
      ``UnitNormalization``: then scales each item's score by its stored row norm), so no
      dense item matrix exists; ``"cache"`` builds the dense final item matrix once at load;
      ``"rebuild"`` on every request. The dense format stores the final item matrix.
    * ``lightgcn``: final vectors are the mean of the propagated layers. The compact format
      stores the two compact base tables (load-only: float32 values packed, see
      :class:`export.tables.ServedTable`) and the training graph as the Elias–Fano code of its
      sorted edge keys ``user * items + item`` (``compact.encode_sorted``: about
      ``2 + log2(users * items / edges)`` bits per edge, 12.5 at Gowalla's density, and no row
      pointers or degrees: both are recomputed at load), and propagates once at load into an
      in-memory ``[users + items, d]`` matrix (exactly the model's arithmetic); the dense format
      stores the final vectors.
    """

    kind = "retrieval"
    signature_names = RETRIEVAL_SIGNATURES

    def __init__(self, model, *, fmt="compact", values="float32", item_matrix="cache", k=20,
                 item_popularity=None, user_ids=None, item_ids=None, seen=None, interactions=None):
        graph = getattr(model, "user_tower", None) is None
        if graph:
            user_layer, item_layer, user_post, item_post = model.user_table, model.item_table, [], []
        else:
            user_layer, user_post = split_tower(model.user_tower, "user")
            item_layer, item_post = split_tower(model.item_tower, "item")
        if user_layer.output_dim != item_layer.output_dim:
            raise ExportError("user and item embeddings have different dims")
        self.graph = graph
        self.user_post, self.item_post = Post(user_post, "user_post"), Post(item_post, "item_post")
        if fmt == "compact" and item_matrix == "sparse" and not graph and not (
                self.item_post.empty or self.item_post.normalizes):
            raise ExportError("item_matrix='sparse' needs an item tower that is a masked table, optionally followed "
                              "by UnitNormalization; use item_matrix='cache' or 'rebuild' for other towers")
        # the servable caches the final item matrix itself ("cache"): one load-time tensor may not read another
        item_scoring = "sparse" if fmt == "compact" and not graph and item_matrix == "sparse" else "rebuild"
        info = {user_layer.name: describe_layer(user_layer, fmt, "rebuild"),
                item_layer.name: describe_layer(item_layer, fmt, item_scoring if fmt == "compact" else "dense")}
        tables = {}
        if not (graph and fmt == "dense"):  # a dense LightGCN stores only its final vectors
            tables = {user_layer.name: ServedTable(user_layer, fmt, values, "rebuild", name="user", load_only=graph),
                      item_layer.name: ServedTable(item_layer, fmt, values, item_scoring, name="item",
                                                   transform=self.item_post, load_only=graph)}  # dense: final items
        super().__init__(tables=tables, num_users=user_layer.input_dim, num_items=item_layer.input_dim, k=k,
                         item_popularity=item_popularity, user_ids=user_ids, item_ids=item_ids, fmt=fmt,
                         values=values, item_matrix=item_matrix if fmt == "compact" else "dense", seen=seen,
                         table_info=info)
        self.kind = "lightgcn" if graph else "retrieval"
        self.dim = int(user_layer.output_dim)
        if tables:
            self.user_table, self.item_table = tables[user_layer.name], tables[item_layer.name]
        if graph:
            self._build_graph(model, fmt, values, interactions)
        elif item_matrix == "cache" and fmt == "compact":
            self.item_cache = LoadTimeTensor(lambda: self.item_table.decoded(self.item_post),
                                             [self.num_items, self.dim])
        elif item_matrix == "sparse" and fmt == "compact" and self.item_post.normalizes:
            self.item_scale = LoadTimeTensor(self.item_table.row_norms, [self.num_items])
        users, items = self.user_map.spec("user_id"), self.item_map.spec("item_id")
        self.serving_default = tf.function(self._recommend, input_signature=[users])
        self.score = tf.function(self._score, input_signature=[users, items])
        self.user_embedding = tf.function(self._user_embedding, input_signature=[users])
        self.item_embedding = tf.function(self._item_embedding, input_signature=[items])

    # -------------------------------------------------------------- LightGCN
    def _build_graph(self, model, fmt: str, values: str, interactions) -> None:
        rows = self.num_users + self.num_items
        if fmt == "dense":
            final = model.propagate()[0].numpy()
            self.final = DenseMatrix(final, values, "final")
            return
        if interactions is None:
            raise ExportError("a LightGCN servable stores the training graph: pass interactions= (the run's "
                              "interactions.npz, [num_users, num_items] CSR)")
        train = interactions.tocsr().sorted_indices()  # each user's items in order, as the model sums them
        if train.shape != (self.num_users, self.num_items):
            raise ExportError(f"interactions have shape {train.shape}, expected {(self.num_users, self.num_items)}")
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(train.indptr))
        edges = compact.encode_sorted(users * self.num_items + train.indices, self.num_users * self.num_items)
        self.graph_edges, self.graph_low_bits = edges.count, edges.low_bits
        self.graph_upper = tf.Variable(edges.upper, trainable=False, name="graph_upper")
        self.graph_lower = tf.Variable(edges.lower, trainable=False, name="graph_lower")
        self.num_layers = int(model.hp.num_layers)
        self.final = FilledInPlace(self._propagate, [rows, self.dim])

    def _edges(self) -> tf.Tensor:
        """int32 ``[edges, 2]`` (user, item) of every training edge in key order, decoded from
        the Elias–Fano code chunk by chunk (``MAX_CHUNKS`` ranges of ``graph_upper`` bytes) into
        one buffer (``InplaceUpdate`` in a sequential ``while`` loop): the int64 transients of
        the decoding are one chunk's, not the whole graph's (+26 MiB of peak RSS at Gowalla size)."""
        total = int(self.graph_upper.shape[0])
        step = max(1, -(-total // MAX_CHUNKS))

        def chunk(start, rank, coordinates):
            stop = tf.minimum(start + step, total)
            keys, ranks = compact.decode_sorted(self.graph_upper, self.graph_lower, self.graph_low_bits, start, stop,
                                                rank)
            pairs = tf.cast(tf.stack([keys // self.num_items, keys % self.num_items], 1), tf.int32)
            coordinates = tf.raw_ops.InplaceUpdate(x=coordinates, i=tf.cast(ranks, tf.int32), v=pairs)
            return stop, rank + tf.size(ranks, out_type=tf.int64), coordinates

        start = [tf.constant(0, tf.int64), tf.constant(0, tf.int64), zeros([self.graph_edges, 2], tf.int32)]
        return tf.while_loop(lambda start, *_: start < total, chunk, start, parallel_iterations=1)[2]

    def _propagate(self, final: LoadTimeTensor) -> tf.Operation:
        """Write LightGCN's final vectors ``mean(E⁰, ÂE⁰, …, Âᴸ E⁰)`` into ``final`` (load time
        only), ``Â = D^-½ A D^-½`` weighted as ``LightGCN._attach`` weights it. ``Â = [[0, R],
        [Rᵀ, 0]]`` is bipartite, so the layers form two chains, each holding one side at a
        time: ``e_u → Rᵀe_u → RRᵀe_u → …`` and ``e_i → Re_i → RᵀRe_i → …``; each layer is
        added into one sum buffer in place (``InplaceAdd``) and the chains run one after the
        other, so loading holds the sum, the int32 graph and two one-side layers. The mean's
        ``1/(L+1)`` scales ``E⁰`` (decoded chunk by chunk), which the linear layers carry: the
        same values up to float rounding (exact when ``L+1`` is a power of two, as for L=3), and
        a row's layers are summed in a different order than the model sums them."""
        users, items = self.num_users, self.num_items
        coordinates = self._edges()
        user_of, item_of = coordinates[:, 0], coordinates[:, 1]
        ones = tf.ones_like(item_of, tf.float32)
        degree = {"user": tf.math.unsorted_segment_sum(ones, user_of, users),
                  "item": tf.math.unsorted_segment_sum(ones, item_of, items)}

        def inv_sqrt(degree):
            return tf.where(degree > 0, 1.0 / tf.sqrt(tf.maximum(degree, 1e-12)), 0.0)

        weights = tf.gather(inv_sqrt(degree["user"]), user_of) * tf.gather(inv_sqrt(degree["item"]), item_of)
        shape = tf.constant([users, items], tf.int64)
        rows = {"user": tf.range(users), "item": tf.range(users, users + items)}
        tables = {"user": self.user_table, "item": self.item_table}
        scale = 1.0 / (self.num_layers + 1)  # the mean, applied to E⁰ (the layers are linear)
        # InplaceAdd on a tensor (forwarded buffer), not ResourceScatterAdd on `final`: a
        # scatter into a variable switches it to copy-on-read (a copy per request)
        total = zeros([users + items, self.dim])
        for start in ("user", "item"):
            with tf.control_dependencies([total]):  # one chain after the other: one side's layer alive at a time
                side, layer = start, tables[start].decoded(lambda rows: rows * scale)
            for depth in range(self.num_layers + 1):
                if depth:  # SparseTensorDenseMatMul: no transient copy of R (the CSR kernel's transpose had)
                    with tf.control_dependencies([total]):
                        layer = tf.raw_ops.SparseTensorDenseMatMul(a_indices=coordinates, a_values=weights,
                                                                   a_shape=shape, b=layer, adjoint_a=side == "user")
                    side = "item" if side == "user" else "user"
                total = tf.raw_ops.InplaceAdd(x=total, i=rows[side], v=layer)
        return final.assign(total)

    # -------------------------------------------------------------- vectors of dense ids
    def _final(self, side: str) -> tf.Tensor:
        final = self.final.full() if self.fmt == "dense" else self.final.read()
        return final[: self.num_users] if side == "user" else final[self.num_users:]  # row slices alias

    def _users(self, user_id: tf.Tensor) -> tf.Tensor:
        mask = tf.cast(valid(user_id, self.num_users), tf.float32)[:, None]
        if self.graph:
            vectors = tf.gather(self._final("user"), tf.clip_by_value(user_id, 0, self.num_users - 1))
        else:
            vectors = self.user_post(self.user_table.lookup(user_id))
        return vectors * mask

    def _items(self, item_id: tf.Tensor) -> tf.Tensor:
        mask = tf.cast(valid(item_id, self.num_items), tf.float32)[:, None]
        if self.graph:
            return tf.gather(self._final("item"), tf.clip_by_value(item_id, 0, self.num_items - 1)) * mask
        if self.fmt == "dense":
            return self.item_table.lookup(item_id)  # final vectors, zero for invalid ids
        return self.item_post(self.item_table.lookup(item_id)) * mask

    def all_scores(self, vectors: tf.Tensor) -> tf.Tensor:
        """``vectors [B, d]`` · every final item vector: ``[B, num_items]``."""
        if self.graph:
            return tf.matmul(vectors, self._final("item"), transpose_b=True)
        if self.fmt == "dense":
            return self.item_table.scores(vectors)
        if self.item_matrix_mode == "cache":
            return tf.matmul(vectors, self.item_cache.read(), transpose_b=True)
        if self.item_matrix_mode == "rebuild":
            return tf.matmul(vectors, self.item_post(self.item_table.full()), transpose_b=True)
        scores = self.item_table.scores(vectors)
        return scores * self.item_scale.read()[None, :] if self.item_post.normalizes else scores

    # -------------------------------------------------------------- signatures (raw ids)
    def _recommend(self, user_id):
        users = self.user_map.dense(user_id)
        vectors = self._users(users)
        if self.fmt == "compact" and not self.graph and self.item_matrix_mode == "cache":
            return self._recommend_from_cache(vectors, users)
        scores = self.all_scores(vectors)
        if self.exclude_seen:
            scores = self._drop_seen(users, scores)
        return self._top(scores, users >= 0)

    def _recommend_from_cache(self, vectors: tf.Tensor, users: tf.Tensor) -> dict:
        """Top-k against the load-time item matrix. A request whose ``[B, num_items]`` scores
        exceed ``SCORE_ENTRIES`` is scored per chunk of items (row slices of the matrix alias
        it): each chunk's top-k, then the top-k of those candidates — the same items as one
        ``top_k`` (equal scores: the lower item first, chunks are in item order), with
        ``[B, chunk]`` scores alive instead of ``[B, num_items]``."""
        matrix = self.item_cache.read()

        def scored(start: int, stop: int) -> tuple[tf.Tensor, tf.Tensor]:
            scores = tf.matmul(vectors, matrix[start:stop], transpose_b=True)
            if self.exclude_seen:
                scores = self._drop_seen(users, scores, start)
            top = tf.math.top_k(scores, k=min(self.k, stop - start))
            return top.values, top.indices + start

        def chunked() -> tuple[tf.Tensor, tf.Tensor]:
            step = max(self.k, SCORE_ENTRIES // SCORE_CHUNK_BATCH)
            parts = [scored(start, min(start + step, self.num_items)) for start in range(0, self.num_items, step)]
            top = tf.math.top_k(tf.concat([v for v, _ in parts], 1), k=self.k)
            return top.values, tf.gather(tf.concat([i for _, i in parts], 1), top.indices, batch_dims=1)

        small = tf.size(vectors) // self.dim * self.num_items <= SCORE_ENTRIES
        values, indices = tf.cond(small, lambda: scored(0, self.num_items), chunked)
        return self._answer(values, indices, users >= 0)

    def _score(self, user_id, item_id):
        users, items = self._pairs(user_id, item_id)
        return {"scores": tf.reduce_sum(self._users(users) * self._items(items), axis=-1),
                "known": tf.logical_and(users >= 0, items >= 0)}

    def _user_embedding(self, user_id):
        users = self.user_map.dense(user_id)
        return {"embedding": self._users(users), "known": users >= 0}

    def _item_embedding(self, item_id):
        items = self.item_map.dense(item_id)
        return {"embedding": self._items(items), "known": items >= 0}

    def warmup_inputs(self, batch, rng):
        inputs = self._retrieval_warmup(batch, rng)
        return {**inputs, "user_embedding": {"user_id": inputs["score"]["user_id"]},
                "item_embedding": {"item_id": inputs["score"]["item_id"]}}

    def reference(self, model, rng):
        users = np.unique(rng.integers(0, self.num_users, size=min(self.num_users, 64))).astype(np.int64)
        if self.graph:
            scores = model.score_all(users).numpy()
        else:
            vectors = model.user_tower(tf.constant(users))
            items = model.item_tower(tf.range(self.num_items, dtype=tf.int64))
            scores = tf.matmul(tf.cast(vectors, tf.float32), tf.cast(items, tf.float32), transpose_b=True).numpy()
        return {"user_id": self.user_map.raw_ids[users]}, self._reference_seen(users, scores)
