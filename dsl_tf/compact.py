"""Compact storage of masked embedding tables for serving.

A DSL-trained embedding table is ``table * mask`` with ``mask`` in {0, 1} and a fixed
fraction of active entries. This module owns the serving format, whose size scales with the
number of active entries (``nnz``) rather than ``rows * dim``:

* ``bitmask``: ``uint8 [rows, ceil(dim / 8)]``. Bit ``j`` of row ``r`` is
  ``(bitmask[r, j // 8] >> (j % 8)) & 1`` (little-endian bit order within a byte, i.e.
  ``np.packbits(mask, axis=1, bitorder="little")``); unused high bits of a row's last
  byte are 0.
* ``values``: ``float32`` or ``float16 [nnz]``, the active entries in row-major order.
* ``row_offsets``: ``int32 [rows + 1]`` (``int64`` when ``nnz >= 2**31``), the exclusive
  prefix sum of per-row active counts: row ``r``'s values are
  ``values[row_offsets[r]:row_offsets[r + 1]]``.

Per row this costs ``ceil(dim/8) + 4`` bytes of index plus ``itemsize`` per active entry,
e.g. 40,981 x 64 at 80% sparsity: 24.7% of the dense float32 bytes with float32 values,
14.7% with float16 values. A per-row bitmask costs ``dim/8`` bytes per row; CSR-style
uint8 column indices would cost ``density * dim``, so the bitmask is smaller whenever
density > 1/8 (sparsity < 87.5%), and it lets a lookup unpack a row without a search.

A servable stores only the bitmask and the values (the row offsets are the bitmask's per-row
popcounts, recomputed at load: :func:`row_offsets_of`); the load-time codecs at the end of this
module store what is decoded once at load more tightly still: float32 values losslessly in
24 + 5 or 6 bits (:func:`pack_floats`) and sorted id sets, e.g. a graph's edges, in Elias–Fano
form (:func:`encode_sorted`).

>>> import numpy as np
>>> table = np.array([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]], np.float32)
>>> ct = encode(table)
>>> ct.nnz, ct.bitmask.ravel().tolist(), ct.values.tolist(), ct.row_offsets.tolist()
(3, [2, 5], [1.5, 2.0, -3.0], [0, 1, 3])
>>> restored, mask = decode(ct)
>>> bool(np.array_equal(restored, table))
True
>>> emb = CompactEmbedding(ct)
>>> emb(np.array([1, 7])).numpy().tolist()  # id 7 is out of range: zero vector
[[2.0, 0.0, -3.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np
import tensorflow as tf

__all__ = [
    "CompactEmbedding",
    "CompactTable",
    "PackedFloats",
    "SortedIds",
    "compact_nbytes",
    "decode",
    "decode_sorted",
    "encode",
    "encode_sorted",
    "from_layer",
    "lookup",
    "pack_fields",
    "pack_floats",
    "row_offsets_of",
    "unpack_fields",
    "unpack_floats",
]

DTypeLike = Union[str, type, np.dtype]

_VALUES_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_OFFSET_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_INT32_LIMIT = 2**31  # row_offsets are int32 iff nnz < 2**31

# _BYTE_BITS[b, k] is bit k (little-endian) of byte value b.
_BYTE_BITS = np.unpackbits(
    np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little"
).astype(bool)


def _values_dtype(values_dtype: DTypeLike) -> np.dtype:
    try:
        dtype = np.dtype(values_dtype)
    except TypeError as err:
        raise ValueError(
            f"values_dtype must be float32 or float16, got {values_dtype!r}"
        ) from err
    if dtype not in _VALUES_DTYPES:
        raise ValueError(f"values_dtype must be float32 or float16, got {dtype}")
    return dtype


def _offsets_dtype(nnz: int) -> np.dtype:
    return np.dtype(np.int32 if nnz < _INT32_LIMIT else np.int64)


def compact_nbytes(rows: int, dim: int, nnz: int, values_dtype: DTypeLike = "float32",
                   offsets: bool = True) -> int:
    """Bytes of the compact format for a ``rows x dim`` table with ``nnz`` active entries;
    ``offsets=False``: without the row offsets (what a servable stores: it recomputes them
    at load with :func:`row_offsets_of`).

    >>> compact_nbytes(2, 3, 3)  # 2 bitmask bytes + 3 float32 values + 3 int32 offsets
    26
    >>> compact_nbytes(2, 3, 3, offsets=False)
    14
    >>> compact_nbytes(40981, 64, 524557, "float16")
    1540890
    """
    rows, dim, nnz = int(rows), int(dim), int(nnz)
    if rows < 1 or dim < 1 or not 0 <= nnz <= rows * dim:
        raise ValueError(
            f"need rows >= 1, dim >= 1, 0 <= nnz <= rows*dim; got {rows}, {dim}, {nnz}"
        )
    itemsize = _values_dtype(values_dtype).itemsize
    return rows * (-(-dim // 8)) + nnz * itemsize + offsets * (rows + 1) * _offsets_dtype(nnz).itemsize


def _cast_values(active: np.ndarray, vdtype: np.dtype) -> np.ndarray:
    """``active`` as ``vdtype``; ValueError if a finite value overflows float16."""
    with np.errstate(over="ignore"):  # overflow is reported below
        values = active.astype(vdtype)
    if vdtype != np.float32:
        overflow = np.isinf(values) & np.isfinite(active)
        if overflow.any():
            worst = float(np.abs(active[overflow]).max())
            raise ValueError(
                f"{int(overflow.sum())} active values overflow {vdtype} (max |x| = {worst:g}); "
                "use values_dtype='float32'"
            )
    return values


def from_layer(layer, values_dtype: DTypeLike = "float32") -> CompactTable:
    """The :class:`CompactTable` of a trained ``MaskedEmbedding`` or ``CompactMaskedEmbedding``.

    A compact layer is converted straight from its training layout (values in row-major
    order, CSR row splits, column ids): O(active entries + rows · dim / 8) memory, the
    whole table is never made. A dense-mask layer goes through :func:`encode`.

    >>> import dsl_tf
    >>> layer = dsl_tf.CompactMaskedEmbedding(4, 3, sparsity=0.5)
    >>> layer.build(None)
    >>> ct = from_layer(layer)
    >>> ct.nnz, ct.row_offsets.tolist()
    (6, [0, 3, 6, 6, 6])
    """
    if getattr(layer, "storage", "dense") != "compact":
        return encode(layer.effective_table().numpy(), layer.dense_mask().numpy(), values_dtype)
    rows, dim = layer.input_dim, layer.output_dim
    splits = layer.row_splits.numpy()
    cols = layer.col_ids.numpy().astype(np.int64)
    row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(splits))
    width = -(-dim // 8)
    byte = row_of * width + cols // 8
    bits = np.bincount(byte, weights=np.left_shift(1, cols % 8), minlength=rows * width)  # distinct bits: sum = OR
    values = _cast_values(layer.values.numpy().astype(np.float32), _values_dtype(values_dtype))
    return CompactTable(bitmask=bits.astype(np.uint8).reshape(rows, width), values=values,
                        row_offsets=splits.astype(_offsets_dtype(values.shape[0])), rows=rows, dim=dim)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class CompactTable:
    """A masked ``[rows, dim]`` table in the compact format (see the module docstring).

    The constructor validates that the three arrays are consistent (dtypes, shapes, and
    ``row_offsets`` agreeing with the bitmask's per-row popcounts) and raises ValueError
    otherwise. Build one with :func:`encode`; the arrays are not copied, so do not mutate
    them afterwards.

    >>> ct = encode(np.eye(3, dtype=np.float32))
    >>> ct
    CompactTable(rows=3, dim=3, nnz=3, values_dtype=float32, nbytes=31)
    >>> ct.density, ct.dense_nbytes(), ct.dense_nbytes("float16")
    (0.3333333333333333, 36, 18)
    """

    bitmask: np.ndarray
    values: np.ndarray
    row_offsets: np.ndarray
    rows: int
    dim: int

    def __post_init__(self) -> None:
        rows, dim = self.rows, self.dim
        if not (isinstance(rows, (int, np.integer)) and isinstance(dim, (int, np.integer))):
            raise ValueError(f"rows and dim must be integers, got {rows!r}, {dim!r}")
        object.__setattr__(self, "rows", int(rows))
        object.__setattr__(self, "dim", int(dim))
        rows, dim = self.rows, self.dim
        if rows < 1 or dim < 1:
            raise ValueError(f"rows and dim must be >= 1, got rows={rows}, dim={dim}")
        bm, vals, offs = self.bitmask, self.values, self.row_offsets
        for name, arr in (("bitmask", bm), ("values", vals), ("row_offsets", offs)):
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
        nbytes_row = -(-dim // 8)
        if bm.dtype != np.uint8 or bm.shape != (rows, nbytes_row):
            raise ValueError(
                f"bitmask must be uint8 [{rows}, {nbytes_row}], got {bm.dtype} {list(bm.shape)}"
            )
        if vals.ndim != 1 or vals.dtype not in _VALUES_DTYPES:
            raise ValueError(
                f"values must be 1-D float32 or float16, got {vals.dtype} {list(vals.shape)}"
            )
        if offs.shape != (rows + 1,) or offs.dtype not in _OFFSET_DTYPES:
            raise ValueError(
                f"row_offsets must be int32/int64 [{rows + 1}], got {offs.dtype} {list(offs.shape)}"
            )
        nnz = vals.shape[0]
        if nnz >= _INT32_LIMIT and offs.dtype != np.int64:
            raise ValueError(f"row_offsets must be int64 when nnz >= 2**31 (nnz={nnz})")
        bits = np.unpackbits(bm, axis=1, bitorder="little")
        if dim % 8 and bits[:, dim:].any():
            raise ValueError("bitmask has bits set beyond dim (padding bits must be 0)")
        counts = bits.sum(axis=1, dtype=np.int64)
        if offs[0] != 0 or offs[-1] != nnz or not np.array_equal(np.diff(offs), counts):
            raise ValueError(
                "row_offsets must be [0, cumsum(per-row popcount of bitmask)] ending at "
                f"len(values)={nnz}"
            )

    @property
    def nnz(self) -> int:
        """Number of active entries (``len(values)``)."""
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of active entries, ``nnz / (rows * dim)`` (1 - sparsity)."""
        return self.nnz / (self.rows * self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays (what serving stores)."""
        return int(self.bitmask.nbytes + self.values.nbytes + self.row_offsets.nbytes)

    def dense_nbytes(self, dtype: DTypeLike = np.float32) -> int:
        """Bytes of the equivalent dense ``[rows, dim]`` table of ``dtype``."""
        return self.rows * self.dim * np.dtype(dtype).itemsize

    def __repr__(self) -> str:
        return (
            f"CompactTable(rows={self.rows}, dim={self.dim}, nnz={self.nnz}, "
            f"values_dtype={self.values.dtype}, nbytes={self.nbytes})"
        )


def encode(
    table: np.ndarray,
    mask: np.ndarray | None = None,
    values_dtype: DTypeLike = "float32",
) -> CompactTable:
    """Encode a ``[rows, dim]`` table and its {0, 1} mask into a :class:`CompactTable`.

    Args:
      table: real 2-D array (floating or integer; converted to float32, then to
        ``values_dtype``). Entries where ``mask`` is 0 are ignored.
      mask: bool or numeric {0, 1} array of the same shape. Entries with mask 1 are stored
        even if their value is 0.0. If None, the mask is ``table != 0`` (so ``-0.0`` counts
        as inactive and decodes as ``+0.0``; NaN counts as active).
      values_dtype: ``"float32"`` (exact) or ``"float16"`` (half the value bytes; values
        are rounded to nearest).

    Raises:
      ValueError: on bad shapes/dtypes, a mask with values other than 0/1, or float16
        values that would overflow to inf (|x| > 65504 after rounding).

    >>> ct = encode(np.array([[0.0, 2.0]]), mask=np.array([[1, 1]]), values_dtype="float16")
    >>> ct.nnz, ct.values.dtype, ct.values.tolist()
    (2, dtype('float16'), [0.0, 2.0])
    """
    vdtype = _values_dtype(values_dtype)
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be 2-D [rows, dim], got shape {list(table.shape)}")
    if not (np.issubdtype(table.dtype, np.floating) or np.issubdtype(table.dtype, np.integer)):
        raise ValueError(f"table must be a real floating or integer array, got {table.dtype}")
    rows, dim = table.shape
    if rows < 1 or dim < 1:
        raise ValueError(f"table must have rows >= 1 and dim >= 1, got shape {list(table.shape)}")
    table = table.astype(np.float32, copy=False)
    if mask is None:
        mask = table != 0
    else:
        mask = np.asarray(mask)
        if mask.shape != table.shape:
            raise ValueError(
                f"mask shape {list(mask.shape)} does not match table shape {list(table.shape)}"
            )
        if mask.dtype != np.bool_:
            if not np.issubdtype(mask.dtype, np.number) or np.iscomplexobj(mask):
                raise ValueError(f"mask must be bool or numeric 0/1, got {mask.dtype}")
            is_one = mask == 1
            if not np.all(is_one | (mask == 0)):
                raise ValueError("mask must contain only 0 and 1")
            mask = is_one
    values = _cast_values(table[mask], vdtype)  # row-major (C) order
    counts = mask.sum(axis=1, dtype=np.int64)
    row_offsets = np.zeros(rows + 1, dtype=_offsets_dtype(values.shape[0]))
    np.cumsum(counts, out=row_offsets[1:])
    bitmask = np.packbits(mask, axis=1, bitorder="little")
    return CompactTable(bitmask=bitmask, values=values, row_offsets=row_offsets, rows=rows, dim=dim)


def decode(ct: CompactTable) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild ``(table, mask)``: float32 ``[rows, dim]`` with 0.0 at inactive entries,
    and the bool mask.

    Exact: with float32 values ``table`` is bitwise equal to the encoded active entries;
    with float16 values it equals ``original.astype(float16).astype(float32)`` there.

    >>> table, mask = decode(encode(np.array([[0.0, 1.0], [3.0, 0.0]])))
    >>> table.tolist(), mask.tolist()
    ([[0.0, 1.0], [3.0, 0.0]], [[False, True], [True, False]])
    """
    mask = np.unpackbits(ct.bitmask, axis=1, count=ct.dim, bitorder="little").view(bool)
    table = np.zeros((ct.rows, ct.dim), dtype=np.float32)
    table[mask] = ct.values.astype(np.float32, copy=False)
    return table, mask


def _row_bits(bitmask_rows: tf.Tensor, dim: int) -> tf.Tensor:
    """uint8 ``[n, ceil(dim/8)]`` bitmask rows -> bool ``[n, dim]`` (little-endian bits)."""
    byte_bits = tf.constant(_BYTE_BITS)  # [256, 8]; a table gather beats shift-and-mask
    bits = tf.gather(byte_bits, tf.cast(bitmask_rows, tf.int32))  # [n, ceil(dim/8), 8]
    bits = tf.reshape(bits, [-1, 8 * (-(-dim // 8))])
    return bits if dim % 8 == 0 else bits[:, :dim]


def lookup(
    bitmask_t: tf.Tensor | tf.Variable,
    values_t: tf.Tensor | tf.Variable,
    row_offsets_t: tf.Tensor | tf.Variable,
    ids: tf.Tensor,
    dim: int,
) -> tf.Tensor:
    """Gather rows ``ids`` of a compact table as a dense float32 ``[*ids.shape, dim]`` tensor.

    Pure TF graph code (Gather, RaggedRange, Where, SparseToDense, ...: core ops only, no
    py_function or custom ops), usable inside ``tf.function`` with unknown batch size and
    in SavedModels.
    The work is proportional to the requested rows only: the bitmask rows are unpacked,
    each requested row's contiguous slice ``values[row_offsets[r]:row_offsets[r+1]]`` is
    gathered, and those values are placed at the row's set bits.

    Args:
      bitmask_t, values_t, row_offsets_t: the :class:`CompactTable` arrays as tensors,
        variables or numpy arrays (``values_t`` may be float16; the output is always
        float32). They must be mutually consistent, as a CompactTable guarantees.
      ids: integer tensor of any shape (int32/int64).
      dim: the table's embedding dimension (a Python int).

    Returns:
      float32 ``[*ids.shape, dim]``. Invalid ids (negative or ``>= rows``) give a zero
      vector (clip-and-zero); they never raise.

    >>> ct = encode(np.array([[0.0, 1.0], [3.0, 0.0]], np.float32))
    >>> lookup(ct.bitmask, ct.values, ct.row_offsets, tf.constant([[1], [-1]]), 2).numpy().tolist()
    [[[3.0, 0.0]], [[0.0, 0.0]]]
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive Python int, got {dim!r}")
    dim = int(dim)
    bitmask_t, values_t, row_offsets_t = (
        t if isinstance(t, tf.Variable) else tf.convert_to_tensor(t)
        for t in (bitmask_t, values_t, row_offsets_t)
    )
    if bitmask_t.shape.rank is not None and bitmask_t.shape[1] not in (None, -(-dim // 8)):
        raise ValueError(
            f"bitmask has {bitmask_t.shape[1]} bytes per row but dim={dim} needs {-(-dim // 8)}"
        )
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype.name}")
    # Few, cheap ops: at serving batch sizes the per-op overhead dominates the run time.
    flat = tf.cast(ids, tf.int64)
    if ids.shape.rank != 1:
        flat = tf.reshape(flat, [-1])
    rows = bitmask_t.shape[0]  # static for variables: saves reading the bitmask's shape
    last = rows - 1 if rows is not None else tf.shape(bitmask_t, out_type=tf.int64)[0] - 1
    safe = tf.clip_by_value(flat, 0, last)
    valid = tf.equal(safe, flat)

    bits = _row_bits(tf.gather(bitmask_t, safe), dim) & valid[:, None]  # [n, dim]
    starts = tf.gather(row_offsets_t, safe)
    limits = tf.where(valid, tf.gather(row_offsets_t, safe + 1), starts)  # invalid -> empty
    # Positions of the requested rows' values, concatenated in order: O(requested) work.
    # (tf.gather on a RaggedTensor would validate all row splits: O(rows) per call.)
    positions = tf.ragged.range(starts, limits).flat_values
    row_values = tf.cast(tf.gather(values_t, positions), tf.float32)
    # tf.where lists the set bits in row-major order, matching row_values.
    out = tf.sparse.to_dense(
        tf.SparseTensor(tf.where(bits), row_values, tf.shape(bits, out_type=tf.int64)),
        validate_indices=False,
    )
    if ids.shape.rank != 1:
        out = tf.reshape(out, tf.concat([tf.shape(ids), [dim]], axis=0))
    out.set_shape(ids.shape.concatenate([dim]))
    return out


def _dense(bitmask_t: tf.Tensor | tf.Variable, values_t: tf.Tensor | tf.Variable, dim: int):
    """The full float32 ``[rows, dim]`` table from the bitmask and values."""
    bits = _row_bits(tf.convert_to_tensor(bitmask_t), dim)
    values = tf.cast(tf.convert_to_tensor(values_t), tf.float32)
    shape = tf.shape(bits, out_type=tf.int64)
    dense = tf.SparseTensor(tf.where(bits), values, shape)
    return tf.sparse.to_dense(dense, validate_indices=False)


class CompactEmbedding(tf.Module):
    """A compact table as a SavedModel-ready module: ``emb(ids)`` and ``emb.dense()``.

    The three arrays are non-trainable ``tf.Variable`` s (``bitmask``, ``values``,
    ``row_offsets``), so ``tf.saved_model.save`` writes them to ``variables/`` and the
    graph stays small. ``__call__`` is pre-traced for int32 and int64 ids of any shape, so
    a loaded module accepts both. Python attributes ``rows``/``dim`` are not restored by
    ``tf.saved_model.load``; read shapes from the loaded variables instead.

    >>> emb = CompactEmbedding(encode(np.array([[0.0, 1.0], [3.0, 0.0]], np.float32)))
    >>> emb(tf.constant([[1, 0]], tf.int32)).shape
    TensorShape([1, 2, 2])
    >>> emb.dense().numpy().tolist()
    [[0.0, 1.0], [3.0, 0.0]]
    """

    def __init__(self, table: CompactTable, name: str | None = None):
        if not isinstance(table, CompactTable):
            raise ValueError(f"table must be a CompactTable, got {type(table).__name__}")
        super().__init__(name=name)
        self.rows = table.rows
        self.dim = table.dim
        with self.name_scope:
            self.bitmask = tf.Variable(table.bitmask, trainable=False, name="bitmask")
            self.values = tf.Variable(table.values, trainable=False, name="values")
            self.row_offsets = tf.Variable(table.row_offsets, trainable=False, name="row_offsets")
        for dtype in (tf.int64, tf.int32):
            self.__call__.get_concrete_function(tf.TensorSpec(None, dtype))
        self.dense.get_concrete_function()

    @classmethod
    def from_dense(
        cls,
        table: np.ndarray,
        mask: np.ndarray | None = None,
        values_dtype: DTypeLike = "float32",
        name: str | None = None,
    ) -> "CompactEmbedding":
        """``CompactEmbedding(encode(table, mask, values_dtype))``."""
        return cls(encode(table, mask, values_dtype), name=name)

    @tf.function
    def __call__(self, ids: tf.Tensor) -> tf.Tensor:
        """float32 ``[*ids.shape, dim]`` embeddings; invalid ids give zero vectors."""
        return lookup(self.bitmask, self.values, self.row_offsets, ids, self.dim)

    @tf.function(input_signature=[])
    def dense(self) -> tf.Tensor:
        """The full float32 ``[rows, dim]`` table (zeros at inactive entries)."""
        return _dense(self.bitmask, self.values, self.dim)


# ============================================================================ load-time codecs
# Tighter encodings of what a servable stores and decodes once, when it is loaded: numpy
# encoders, decoders in core TF ops (Gather, bitwise shifts, PopulationCount, Where, Bitcast;
# no py_function, no custom ops), so the stock TF Serving binary runs them. The general-purpose
# codecs that do this (tensorflow-compression's range / Elias-gamma coders) are custom ops.


def row_offsets_of(bitmask_t: tf.Tensor | tf.Variable, dtype: tf.DType = tf.int32) -> tf.Tensor:
    """A compact table's ``row_offsets`` recomputed from its bitmask (per-row popcounts), so a
    servable need not store them.

    >>> ct = encode(np.array([[0.0, 1.5, 0.0], [2.0, 0.0, -3.0]], np.float32))
    >>> row_offsets_of(ct.bitmask).numpy().tolist()
    [0, 1, 3]
    """
    counts = tf.cast(tf.raw_ops.PopulationCount(x=tf.convert_to_tensor(bitmask_t)), dtype)
    return tf.concat([tf.zeros([1], dtype), tf.cumsum(tf.reduce_sum(counts, axis=1))], 0)


def pack_fields(fields: np.ndarray, width: int) -> np.ndarray:
    """uint8 stream of the non-negative integers ``fields``, ``width`` bits each: field ``i``
    is bits ``[i * width, (i + 1) * width)``, little-endian (bit ``b`` of the stream is
    ``(stream[b // 8] >> (b % 8)) & 1``). ``ceil(len(fields) * width / 8)`` bytes.

    >>> pack_fields(np.array([1, 2, 3]), 2).tolist()  # bits 10 01 11 -> 0b111001
    [57]
    """
    fields = np.asarray(fields)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= 32:
        raise ValueError(f"width must be an int in [1, 32], got {width!r}")
    if fields.ndim != 1 or not np.issubdtype(fields.dtype, np.integer):
        raise ValueError(f"fields must be a 1-D integer array, got {fields.dtype} {list(fields.shape)}")
    if fields.size and (int(fields.min()) < 0 or int(fields.max()) >= 2**width):
        raise ValueError(f"fields must be in [0, 2**{width}), got [{fields.min()}, {fields.max()}]")
    fields = fields.astype(np.uint64)
    bits = np.empty((fields.size, int(width)), np.uint8)
    for j in range(int(width)):
        bits[:, j] = (fields >> np.uint64(j)) & np.uint64(1)
    return np.packbits(bits.ravel(), bitorder="little")


def unpack_fields(stream_t: tf.Tensor | tf.Variable, width: int, start, count) -> tf.Tensor:
    """int64 ``[count]``: fields ``start .. start + count - 1`` of a :func:`pack_fields` stream
    (``start`` / ``count``: ints or scalar tensors; in a SavedModel pass tensors computed when
    it runs: a Python ``count`` makes every ``[count]`` intermediate foldable into a constant).
    Gathers the few bytes each field spans: random access, work proportional to ``count``.

    >>> unpack_fields(pack_fields(np.array([5, 0, 7, 1]), 3), 3, 1, 3).numpy().tolist()
    [0, 7, 1]
    """
    stream = tf.convert_to_tensor(stream_t)
    start, count = tf.cast(start, tf.int64), tf.cast(count, tf.int64)
    bit = tf.range(start, start + count, dtype=tf.int64) * width
    byte, shift = bit // 8, bit % 8
    last = tf.shape(stream, out_type=tf.int64)[0] - 1
    word = tf.zeros_like(bit)
    for k in range(-(-(width + 7) // 8)):  # the bytes a field can span; past the end reads as 0
        at = byte + k
        part = tf.cast(tf.gather(stream, tf.clip_by_value(at, 0, tf.maximum(last, 0))), tf.int64)
        word = tf.bitwise.bitwise_or(word, tf.bitwise.left_shift(tf.where(at <= last, part, 0), 8 * k))
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(word, shift), 2**width - 1)


@dataclasses.dataclass(frozen=True, eq=False)
class SortedIds:
    """A non-decreasing sequence of ``count`` integers in ``[0, universe)`` in Elias–Fano form:
    each id's low ``low_bits`` bits packed in ``lower`` (:func:`pack_fields`), its high part
    ``id >> low_bits`` in unary in the bits of ``upper`` (bit ``high_i + i`` set). About
    ``2 + log2(universe / count)`` bits per id, within 0.6 bit of the entropy of a random
    ``count``-subset. Made by :func:`encode_sorted`, decoded by :func:`decode_sorted`."""

    upper: np.ndarray
    lower: np.ndarray
    count: int
    low_bits: int

    @property
    def nbytes(self) -> int:
        return int(self.upper.nbytes + self.lower.nbytes)


def encode_sorted(ids: np.ndarray, universe: int) -> SortedIds:
    """Elias–Fano code of the non-decreasing integers ``ids`` in ``[0, universe)``.

    >>> code = encode_sorted(np.array([3, 4, 7, 13, 14, 15]), 16)
    >>> code.low_bits, code.upper.tolist(), code.lower.tolist()
    (1, [42, 26], [45])
    >>> decode_sorted(code.upper, code.lower, code.low_bits).numpy().tolist()
    [3, 4, 7, 13, 14, 15]
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    ids = ids.astype(np.int64)
    if ids.size and (ids[0] < 0 or ids[-1] >= universe or np.any(np.diff(ids) < 0)):
        raise ValueError(f"ids must be non-decreasing in [0, {universe}), got [{ids.min()}, {ids.max()}]")
    count = int(ids.size)
    low_bits = max(0, int(np.floor(np.log2(universe / count)))) if count else 0
    low_bits = min(low_bits, 32)
    upper = np.zeros(count + ((int(universe) - 1) >> low_bits) + 1, np.uint8)
    upper[(ids >> low_bits) + np.arange(count)] = 1
    lower = pack_fields(ids & (2**low_bits - 1), low_bits) if low_bits else np.zeros(0, np.uint8)
    return SortedIds(np.packbits(upper, bitorder="little"), lower, count, low_bits)


def decode_sorted(upper_t, lower_t, low_bits: int, byte_start=0, byte_stop=None, rank_start=0):
    """The ids of a :class:`SortedIds` (its arrays as tensors or variables), in TF ops: the set
    bits of ``upper`` give the high parts, ``lower`` the rest. With no range: int64 ``[count]``,
    every id. With ``byte_start`` / ``byte_stop`` (bytes of ``upper``) and ``rank_start`` (the
    number of set bits before ``byte_start``): ``(ids, ranks)``, the ids whose unary bit is in
    those bytes and their int64 positions in the sequence, so a caller can decode a long
    sequence chunk by chunk with bounded transients. Every shape is computed when the op runs:
    no whole-size ``range`` for Grappler to fold into a constant the loaded graph would keep."""
    upper = tf.convert_to_tensor(upper_t)
    whole = byte_stop is None
    byte_start = tf.cast(byte_start, tf.int64)
    part = upper if whole else upper[byte_start:byte_stop]
    bits = tf.reshape(tf.gather(tf.constant(_BYTE_BITS), tf.cast(part, tf.int32)), [-1])
    ones = tf.where(bits)[:, 0] + 8 * byte_start
    ranks = tf.range(tf.shape(ones, out_type=tf.int64)[0]) + tf.cast(rank_start, tf.int64)
    ids = ones - ranks
    if low_bits:
        low = unpack_fields(lower_t, low_bits, rank_start, tf.size(ranks, out_type=tf.int64))
        ids = tf.bitwise.bitwise_or(tf.bitwise.left_shift(ids, low_bits), low)
    return ids if whole else (ids, ranks)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedFloats:
    """``count`` float32 values, lossless, in ``24 + width`` bits each: ``low`` (uint8
    ``[3 * count]``) holds each value's 23 mantissa bits and its sign (bit 23), little-endian;
    ``exponents`` (:func:`pack_fields`, ``width`` bits) its biased exponent ``e`` as code
    ``e - min_exponent + 1``, or 0 when ``e == 0`` (zeros, subnormals). Trained embedding
    values span a few dozen binades, so ``width`` is 5-6 instead of 8. Made by
    :func:`pack_floats`, decoded by :func:`unpack_floats`."""

    low: np.ndarray
    exponents: np.ndarray
    count: int
    width: int
    min_exponent: int

    @property
    def nbytes(self) -> int:
        return int(self.low.nbytes + self.exponents.nbytes)


def pack_floats(values: np.ndarray) -> PackedFloats:
    """The :class:`PackedFloats` of the float32 ``values`` (bitwise exact: NaN, inf, -0.0 too).

    >>> packed = pack_floats(np.array([0.5, -3.0, 0.0, 1e-3], np.float32))
    >>> packed.width, packed.min_exponent, packed.nbytes
    (4, 117, 14)
    >>> unpack_floats(packed.low, packed.exponents, packed.width, packed.min_exponent, 0, 4).numpy().tolist()
    [0.5, -3.0, 0.0, 0.0010000000474974513]
    """
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype != np.float32:
        raise ValueError(f"values must be a 1-D float32 array, got {values.dtype} {list(values.shape)}")
    bits = values.view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int64)
    low = ((bits & 0x7FFFFF) | ((bits >> 31) << 23)).astype("<u4")
    nonzero = exponent[exponent > 0]
    min_exponent = int(nonzero.min()) if nonzero.size else 1
    codes = np.where(exponent > 0, exponent - min_exponent + 1, 0)
    width = max(1, int(codes.max(initial=0)).bit_length())
    return PackedFloats(low.view(np.uint8).reshape(-1, 4)[:, :3].ravel(), pack_fields(codes, width),
                        int(values.size), width, min_exponent)


def unpack_floats(low_t, exponents_t, width: int, min_exponent: int, start, count) -> tf.Tensor:
    """float32 ``[count]``: values ``start .. start + count - 1`` of a :class:`PackedFloats` (its
    arrays as tensors or variables; ``start`` / ``count``: ints or scalar tensors), bitwise
    equal to the packed values."""
    index = tf.range(tf.cast(start, tf.int64), tf.cast(start, tf.int64) + tf.cast(count, tf.int64)) * 3
    low = tf.zeros_like(index, tf.uint32)
    for k in range(3):
        byte = tf.cast(tf.gather(tf.convert_to_tensor(low_t), index + k), tf.uint32)
        low = tf.bitwise.bitwise_or(low, tf.bitwise.left_shift(byte, tf.constant(8 * k, tf.uint32)))
    code = tf.cast(unpack_fields(exponents_t, width, start, count), tf.int32)
    exponent = tf.cast(tf.where(code > 0, code + (min_exponent - 1), 0), tf.uint32)
    sign = tf.bitwise.right_shift(low, tf.constant(23, tf.uint32))
    bits = tf.bitwise.bitwise_or(
        tf.bitwise.bitwise_or(tf.bitwise.left_shift(sign, tf.constant(31, tf.uint32)),
                              tf.bitwise.left_shift(exponent, tf.constant(23, tf.uint32))),
        tf.bitwise.bitwise_and(low, tf.constant(0x7FFFFF, tf.uint32)))
    return tf.bitcast(bits, tf.float32)
