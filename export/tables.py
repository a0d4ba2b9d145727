"""Masked tables as a servable stores them, and how a servable scores against them.

:class:`ServedTable` holds one ``MaskedEmbedding`` / ``CompactMaskedEmbedding`` table:

* ``fmt="compact"``: the :mod:`dsl_tf.compact` bitmask and values (encoded with
  ``compact.from_layer``, never densified for a compact-storage layer), ``values`` float32 or
  float16; the row offsets are recomputed from the bitmask at load (``compact.row_offsets_of``,
  a load-time tensor), never stored. ``load_only=True`` (a table only the load reads, e.g.
  LightGCN's base tables, propagated once at load): float32 values are stored packed
  (``compact.pack_floats``: 24 + 5 or 6 bits per value instead of 32, lossless) and the table
  answers no request itself;
* ``fmt="dense"``: the dense masked table ``E ⊙ M`` (the baseline).

``lookup(ids)`` rebuilds only the requested rows. ``scores(x) = x · tableᵀ`` (``[B, rows]``,
every row scored: retrieval, autoencoder output layers) depends on ``scoring`` (compact only):

* ``"cache"`` (default): the dense float32 table decoded once at load, chunk by chunk into
  one buffer (:func:`filled`; dense memory for that table, dense speed: see export/README.md);
* ``"sparse"``: a sparse × dense product straight from the compact arrays
  (``SparseTensorDenseMatMul``); its int32 ``[nnz, 2]`` coordinates are computed once when
  the model is loaded (8 bytes per active entry in memory, never saved): no dense copy of
  the table, at any time;
* ``"rebuild"``: the dense table rebuilt on every request (least resident memory, slow).

Load-time tensors are SavedModel resources (:class:`LoadTimeTensor`) initialised by the
init op TF Serving runs after restoring the variables; they are never written to disk.
:func:`patched_layers` makes a Keras model's masked layers read from their served tables
while a servable traces the model's own code (user models, :mod:`export.custom`).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Callable, Iterator

import dsl_tf  # noqa: F401  (must precede tf.keras)
import numpy as np
import tensorflow as tf

from dsl_tf import compact, masks

FORMATS = ("compact", "dense")
VALUES = ("float32", "float16")
SCORING = ("sparse", "cache", "rebuild")
CHUNK_ENTRIES = 2**15
"""Table entries decoded per chunk when a load-time matrix is built (bounds the load transients;
measured at Gowalla sizes: 2**18 adds 4.6 MiB to the load peak)."""
MAX_CHUNKS = 64
"""At most this many chunks per load-time matrix (larger tables get larger chunks)."""


class ExportError(RuntimeError):
    """The model cannot be exported (nothing was written)."""


def valid(ids: tf.Tensor, rows: int) -> tf.Tensor:
    """``0 <= ids < rows``."""
    return tf.logical_and(ids >= 0, ids < rows)


class LoadTimeTensor(tf.saved_model.experimental.TrackableResource):
    """An in-memory variable of ``shape``/``dtype`` computed when the SavedModel is loaded (a
    resource initializer: part of the init op, run after the variables are restored). A
    resource, not a ``tf.Variable``: never checkpointed, never on disk.

    ``compute() -> tensor`` fills it at once; with ``chunk_rows``, ``compute(start, stop)``
    returns rows ``[start, stop)``, written chunk by chunk into one buffer (``InplaceUpdate``
    in a sequential ``while`` loop) that the variable then adopts, so loading holds the matrix
    plus one chunk's transients instead of every intermediate of the whole matrix. (Not
    ``ResourceScatterUpdate`` / sliced assigns into the variable: those switch it to
    copy-on-read, and every request would copy the whole matrix.)"""

    def __init__(self, compute: Callable[..., tf.Tensor], shape, dtype: tf.DType = tf.float32,
                 chunk_rows: int | None = None):
        self._compute, self._dtype, self._chunk_rows = compute, tf.as_dtype(dtype), chunk_rows
        self._shape = [int(s) for s in shape]
        self._shared_name = f"dsl_load_time_{uuid.uuid4().hex}"
        super().__init__()
        self._initialize()  # eager: fill it now (the servable answers before it is saved)

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=self._dtype, shape=self._shape, shared_name=self._shared_name,
                                      container="")

    def _initialize(self):
        if self._chunk_rows is None:
            return self.assign(self._compute())
        return self.assign(filled(self._shape, self._dtype, self._compute, self._chunk_rows))

    def assign(self, value: tf.Tensor):
        """Replace the whole tensor (load time only)."""
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=value)

    def _destroy_resource(self):
        tf.raw_ops.DestroyResourceOp(resource=self.resource_handle, ignore_lookup_error=True)

    def read(self) -> tf.Tensor:
        out = tf.raw_ops.ReadVariableOp(resource=self.resource_handle, dtype=self._dtype)
        out.set_shape(self._shape)
        return out


def filled(shape, dtype: tf.DType, rows: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], chunk_rows: int) -> tf.Tensor:
    """A ``shape`` tensor whose rows ``[start, stop)`` are ``rows(start, stop)``, written chunk
    by chunk (``chunk_rows`` rows) into one buffer by ``InplaceUpdate`` in a sequential
    ``while`` loop: the buffer plus one chunk's transients are alive, never every
    intermediate of the whole tensor."""
    total, dtype = int(shape[0]), tf.as_dtype(dtype)

    def fill(start, matrix):
        stop = tf.minimum(start + chunk_rows, total)
        return stop, tf.raw_ops.InplaceUpdate(x=matrix, i=tf.range(start, stop), v=tf.cast(rows(start, stop), dtype))

    _, matrix = tf.while_loop(lambda start, _: start < total, fill, [tf.constant(0), zeros(shape, dtype)],
                              parallel_iterations=1)
    return matrix


def zeros(shape, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """A zero tensor made when the op runs (``Empty``, which Grappler never constant-folds):
    ``tf.zeros`` of a static shape is folded into a ``Const`` of the whole size that the
    loaded graph keeps for its lifetime and that in-place ops cannot reuse (measured at Gowalla
    sizes: the init op of a 10 MiB item matrix added 24.6 MiB of RSS with it, 18.1 without)."""
    return tf.raw_ops.Empty(shape=tf.constant(shape, tf.int32), dtype=dtype, init=True)


def rows_per_chunk(rows: int, dim: int) -> int:
    """Rows per load-time chunk: ``CHUNK_ENTRIES`` float entries (128 KiB of float32), or
    more for tables of over ``MAX_CHUNKS`` such chunks (the loop's per-iteration overhead)."""
    return max(1, CHUNK_ENTRIES // max(int(dim), 1), -(-int(rows) // MAX_CHUNKS))


class DenseMatrix(tf.Module):
    """A dense float32 ``[rows, dim]`` matrix stored in the servable (dense exports)."""

    def __init__(self, matrix: np.ndarray, values: str, name: str):
        super().__init__(name=name)
        self.rows, self.dim = matrix.shape
        with self.name_scope:
            self.table = tf.Variable(np.asarray(matrix).astype(values), trainable=False, name="table")

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        ids = tf.cast(ids, tf.int64)
        out = tf.cast(tf.gather(self.table, tf.clip_by_value(ids, 0, self.rows - 1)), tf.float32)
        return out * tf.cast(valid(ids, self.rows), tf.float32)[..., None]

    def full(self) -> tf.Tensor:
        return tf.cast(tf.convert_to_tensor(self.table), tf.float32)

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, self.full(), transpose_b=True)


def describe_layer(layer, fmt: str, scoring: str) -> dict:
    """A masked table as the servable's metadata records it."""
    rows, dim = int(layer.input_dim), int(layer.output_dim)
    return {"rows": rows, "dim": dim, "density": masks.active_count(layer) / (rows * dim), "format": fmt,
            "scoring": scoring}


class ServedTable(tf.Module):
    """One masked table of a servable (see the module docstring). ``transform`` (dense format
    only): store ``transform(E ⊙ M)`` instead, e.g. a tower's final vectors.

    >>> import dsl_tf
    >>> layer = dsl_tf.CompactMaskedEmbedding(6, 4, sparsity=0.5)
    >>> layer.build(None)
    >>> table = ServedTable(layer, "compact")
    >>> table.scores(tf.ones([2, 4])).shape
    TensorShape([2, 6])
    """

    def __init__(self, layer, fmt: str = "compact", values: str = "float32", scoring: str = "cache",
                 name: str | None = None, transform: Callable[[tf.Tensor], tf.Tensor] | None = None,
                 load_only: bool = False):
        super().__init__(name=name or layer.name)
        if fmt not in FORMATS:
            raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
        if values not in VALUES:
            raise ExportError(f"values must be one of {VALUES}, got {values!r}")
        if scoring not in SCORING:
            raise ExportError(f"scoring must be one of {SCORING}, got {scoring!r}")
        self.fmt, self.scoring = fmt, scoring if fmt == "compact" else "dense"
        self.rows, self.dim = int(layer.input_dim), int(layer.output_dim)
        self.info = describe_layer(layer, fmt, self.scoring)
        self.load_only = load_only
        with self.name_scope:
            if fmt == "compact":  # from the training layout: never the whole table
                encoded = compact.from_layer(layer, values)
                self.nnz, self.packed = encoded.nnz, load_only and values == "float32"
                self._offsets_dtype = tf.as_dtype(encoded.row_offsets.dtype)
                self.bitmask = tf.Variable(encoded.bitmask, trainable=False, name="bitmask")
                if self.packed:
                    packed = compact.pack_floats(encoded.values)
                    self.width, self.min_exponent = packed.width, packed.min_exponent
                    self.values_low = tf.Variable(packed.low, trainable=False, name="values_low")
                    self.values_exponents = tf.Variable(packed.exponents, trainable=False, name="values_exponents")
                else:
                    self.values = tf.Variable(encoded.values, trainable=False, name="values")
                if load_only:
                    return
                self.row_offsets = LoadTimeTensor(self.offsets, [self.rows + 1], self._offsets_dtype)
                if self.scoring == "sparse":
                    self.coordinates = LoadTimeTensor(self._coordinates, [self.nnz, 2], tf.int32)
                elif self.scoring == "cache":
                    self.cache = LoadTimeTensor(lambda: self.decoded(), [self.rows, self.dim])
            else:  # dense baseline: E ⊙ M, or transform(E ⊙ M) (a tower's final vectors)
                table = layer.effective_table()
                self.matrix = DenseMatrix((table if transform is None else transform(table)).numpy(), values, "dense")

    # ------------------------------------------------------------------ compact helpers
    def offsets(self) -> tf.Tensor:
        """The row offsets, recomputed from the bitmask (at load; one load-time tensor may not
        read another, so load-time code calls this instead of reading ``row_offsets``)."""
        return compact.row_offsets_of(self.bitmask, self._offsets_dtype)

    def decoded(self, transform: Callable[[tf.Tensor], tf.Tensor] | None = None) -> tf.Tensor:
        """The whole float32 table (``transform`` of each chunk of rows), decoded chunk by chunk
        into one buffer (:func:`filled`) with the row offsets computed once (load time)."""
        offsets = self.offsets()

        def rows(start, stop):
            chunk = self.decode_rows(start, stop, offsets)
            return chunk if transform is None else transform(chunk)

        return filled([self.rows, self.dim], tf.float32, rows, rows_per_chunk(self.rows, self.dim))

    def _coordinates(self) -> tf.Tensor:
        """int32 ``[nnz, 2]`` (row, column) of the values, row-major (load time only)."""
        bits = compact._row_bits(self.bitmask, self.dim)  # noqa: SLF001  (the format's own unpacking)
        return tf.cast(tf.where(bits), tf.int32)

    def decode_rows(self, start, stop, offsets: tf.Tensor | None = None) -> tf.Tensor:
        """float32 rows ``[start, stop)`` of a compact table (``start``/``stop``: ints or int32
        scalars; ``offsets``: :meth:`offsets`, computed once by a caller decoding many row
        ranges). Each row's values are placed at its set bits by an int32 running count of
        the bits (no int64 ``[nnz, 2]`` coordinates): transients are a few times the rows'
        dense bytes."""
        offsets = self.offsets() if offsets is None else offsets
        bits = tf.reshape(compact._row_bits(self.bitmask[start:stop], self.dim), [-1])  # noqa: SLF001
        first, last = offsets[start], offsets[stop]
        if self.packed:
            values = compact.unpack_floats(self.values_low, self.values_exponents, self.width, self.min_exponent,
                                           first, last - first)
        else:
            values = tf.cast(self.values[first:last], tf.float32)
        slot = tf.cumsum(tf.cast(bits, tf.int32), exclusive=True)  # index of each set bit's value
        placed = tf.gather(tf.concat([values, [0.0]], 0), slot)  # the padding keeps a chunk without values valid
        return tf.reshape(tf.where(bits, placed, 0.0), [-1, self.dim])

    # ------------------------------------------------------------------ the three reads
    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        """float32 ``[*ids.shape, dim]``; zero vectors for ids outside ``[0, rows)``."""
        if self.fmt == "dense":
            return self.matrix.lookup(ids)
        self._answers()
        return compact.lookup(self.bitmask, self.values, self.row_offsets.read(), tf.cast(ids, tf.int64), self.dim)

    def _answers(self) -> None:
        if self.load_only:
            raise ExportError(f"{self.name} is a load-only table: it answers no request")

    def full(self) -> tf.Tensor:
        """The whole float32 table ``[rows, dim]`` (cached at load with ``scoring="cache"``)."""
        if self.fmt == "dense":
            return self.matrix.full()
        self._answers()
        if self.scoring == "cache":
            return self.cache.read()
        return self.decode_rows(0, self.rows)

    def scores(self, x: tf.Tensor) -> tf.Tensor:
        """``x · tableᵀ``: float32 ``[B, rows]`` for ``x`` float32 ``[B, dim]``."""
        if self.fmt == "compact" and self.scoring == "sparse":
            self._answers()
            product = tf.raw_ops.SparseTensorDenseMatMul(
                a_indices=self.coordinates.read(), a_values=tf.cast(self.values, tf.float32),
                a_shape=tf.constant([self.rows, self.dim], tf.int64), b=tf.transpose(x))
            return tf.transpose(product)
        return tf.matmul(x, self.full(), transpose_b=True)

    def row_norms(self) -> tf.Tensor:
        """float32 ``[rows]``: ``1 / max(‖row‖, 1e-6)`` as ``tf.math.l2_normalize`` scales rows
        (``rsqrt(max(Σx², 1e-12))``), from the stored values alone."""
        if self.fmt == "dense":
            squares = tf.reduce_sum(tf.square(self.full()), axis=1)
        else:
            rows = tf.ragged.row_splits_to_segment_ids(tf.cast(self.offsets(), tf.int64))
            squares = tf.math.unsorted_segment_sum(tf.square(tf.cast(self.values, tf.float32)), rows, self.rows)
        return tf.math.rsqrt(tf.maximum(squares, 1e-12))



def served_tables(model, fmt: str, values: str, scoring: str) -> dict:
    """``{layer name: ServedTable}`` for every masked table of ``model`` (error if none)."""
    layers = dsl_tf.masked_embeddings(model)
    if not layers:
        raise ExportError(f"{type(model).__name__} has no MaskedEmbedding / CompactMaskedEmbedding table: "
                          "nothing to store compactly")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ExportError(f"masked tables must have distinct names, got {names}")
    return {layer.name: ServedTable(layer, fmt, values, scoring) for layer in layers}


@contextlib.contextmanager
def patched_layers(model, tables: dict) -> Iterator[None]:
    """While active, every masked layer of ``model`` answers ``layer(ids)`` from its
    :class:`ServedTable` (``tables[layer.name]``) instead of its training variables, so a
    servable can trace the model's own code without capturing the dense tables."""
    layers = dsl_tf.masked_embeddings(model)
    try:
        for layer in layers:
            table = tables[layer.name]
            object.__setattr__(layer, "call", lambda inputs, *args, _t=table, **kwargs: _t.lookup(inputs))
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("call", None)


def layer_variables(model) -> set[int]:
    """``id`` s of every variable owned by a masked layer of ``model`` (none may be saved)."""
    return {id(v) for layer in dsl_tf.masked_embeddings(model) for v in layer.weights}


def checked_captures(functions, model, owned: list) -> list:
    """The variables the traced ``functions`` read that the servable does not own yet (the
    model's other weights: Dense kernels, biases, ...), to be tracked so they are saved.
    Raises :class:`ExportError` if one belongs to a masked layer (a dense table would be
    saved)."""
    masked, mine = layer_variables(model), {id(v) for v in owned}
    extra: dict[int, tf.Variable] = {}
    for fn in functions:
        for var in fn.variables:
            if id(var) in masked:
                raise ExportError(f"the servable reads {var.name}, a variable of a masked layer, directly: "
                                  "only layer calls (layer(ids)) can be served from the compact table")
            if id(var) not in mine:
                extra.setdefault(id(var), var)
    return list(extra.values())



def captured_resources(functions, model) -> list:
    """The non-variable resources of ``model`` (lookup tables of ``StringLookup`` /
    ``IntegerLookup`` layers, ...) the traced ``functions`` read, to be tracked so they are
    saved with their initializers."""
    handles = {id(t) for fn in functions for t in fn.captured_inputs if t.dtype == tf.resource}
    found: dict[int, object] = {}
    for obj in tf.train.TrackableView(model).descendants():
        if (isinstance(obj, tf.saved_model.experimental.TrackableResource)
                and id(getattr(obj, "_resource_handle", None)) in handles):
            found.setdefault(id(obj), obj)
    return list(found.values())
