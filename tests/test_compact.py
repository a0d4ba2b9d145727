"""Tests for dsl_tf.compact: the compact serving format of masked embedding tables."""

from __future__ import annotations

import doctest
import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from dsl_tf import compact

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, **_COMMON)
TF_FUZZ = settings(max_examples=60, **_COMMON)

INTERESTING_DIMS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33, 64, 65]


def random_masked_table(rows, dim, seed, density=None, zero_frac=0.1, specials=False):
    """A random table with an irregular per-row density, empty rows and full rows.

    Some active entries are exactly 0.0 (and -0.0); with ``specials`` also +-inf and NaN.
    """
    rng = np.random.default_rng(seed)
    if density is None:
        row_density = rng.beta(0.7, 1.5, size=rows)
        kind = rng.random(rows)
        row_density[kind < 0.1] = 0.0  # empty rows
        row_density[kind > 0.9] = 1.0  # full rows
    else:
        row_density = np.full(rows, density)
    mask = rng.random((rows, dim)) < row_density[:, None]
    scale = np.float32(rng.choice([1e-3, 1.0, 1e3]))
    table = rng.standard_normal((rows, dim)).astype(np.float32) * scale
    table[rng.random((rows, dim)) < zero_frac] = 0.0
    table[rng.random((rows, dim)) < zero_frac / 2] = -0.0
    if specials:
        pick = rng.random((rows, dim))
        table[pick < 0.01] = np.inf
        table[(pick >= 0.01) & (pick < 0.02)] = -np.inf
        table[(pick >= 0.02) & (pick < 0.03)] = np.nan
    # Inactive entries hold garbage: encode must ignore them.
    table[~mask] = rng.standard_normal(int((~mask).sum())).astype(np.float32)
    assert table.dtype == np.float32
    return table, mask


def fit_float16(table):
    """Clip finite values into float16 range (encode rejects overflow); keep inf/NaN."""
    return np.where(np.isfinite(table), np.clip(table, -6e4, 6e4), table).astype(np.float32)


def bits32(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def expected_dense(table, mask, values_dtype):
    ref = table.astype(values_dtype).astype(np.float32)
    return np.where(mask, ref, np.float32(0.0))


def reference_lookup(dense, ids):
    ids = np.asarray(ids, dtype=np.int64)
    rows, dim = dense.shape
    valid = (ids >= 0) & (ids < rows)
    out = dense[np.where(valid, ids, 0)]
    out[~valid] = 0.0
    return out.reshape(ids.shape + (dim,))


def graph_ops(saved_model_dir: str) -> set[str]:
    """All op types in a SavedModel's graph, including its function library."""
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    graph = sm.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    for fn in graph.library.function:
        ops.update(node.op for node in fn.node_def)
    function_names = {fn.signature.name for fn in graph.library.function}
    return ops - function_names  # direct calls to library functions are not ops


# --------------------------------------------------------------------------- encode/decode


@FUZZ
@given(
    rows=st.integers(1, 1000),
    dim=st.one_of(st.sampled_from(INTERESTING_DIMS), st.integers(1, 70)),
    seed=st.integers(0, 2**32 - 1),
    density=st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    values_dtype=st.sampled_from(["float32", "float16"]),
    specials=st.booleans(),
)
@example(rows=1, dim=1, seed=0, density=0.0, values_dtype="float32", specials=False)
@example(rows=1, dim=1, seed=0, density=1.0, values_dtype="float16", specials=False)
@example(rows=5, dim=8, seed=1, density=None, values_dtype="float32", specials=False)
@example(rows=5, dim=16, seed=2, density=None, values_dtype="float16", specials=True)
@example(rows=1000, dim=64, seed=3, density=0.0, values_dtype="float32", specials=False)
@example(rows=1000, dim=9, seed=4, density=1.0, values_dtype="float32", specials=True)
def test_round_trip_with_mask(rows, dim, seed, density, values_dtype, specials):
    table, mask = random_masked_table(rows, dim, seed, density, specials=specials)
    if values_dtype == "float16":
        table = fit_float16(table)
    ct = compact.encode(table, mask, values_dtype=values_dtype)

    assert (ct.rows, ct.dim, ct.nnz) == (rows, dim, int(mask.sum()))
    assert ct.bitmask.dtype == np.uint8 and ct.bitmask.shape == (rows, -(-dim // 8))
    assert ct.values.dtype == np.dtype(values_dtype) and ct.values.shape == (ct.nnz,)
    assert ct.row_offsets.dtype == np.int32 and ct.row_offsets.shape == (rows + 1,)
    assert ct.nbytes == compact.compact_nbytes(rows, dim, ct.nnz, values_dtype)
    assert ct.density == pytest.approx(mask.mean())
    # Documented bit order: bit j of row r is (bitmask[r, j // 8] >> (j % 8)) & 1.
    r, j = np.nonzero(np.ones((rows, dim), bool))
    assert np.array_equal((ct.bitmask[r, j // 8] >> (j % 8)) & 1, mask[r, j].astype(np.uint8))

    decoded, decoded_mask = compact.decode(ct)
    assert decoded.dtype == np.float32 and decoded.shape == (rows, dim)
    assert decoded_mask.dtype == np.bool_ and np.array_equal(decoded_mask, mask)
    assert np.array_equal(bits32(decoded), bits32(expected_dense(table, mask, values_dtype)))
    # The arrays of a valid table pass validation when rebuilt.
    compact.CompactTable(ct.bitmask, ct.values, ct.row_offsets, ct.rows, ct.dim)


@FUZZ
@given(
    rows=st.integers(1, 300),
    dim=st.sampled_from(INTERESTING_DIMS),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_without_mask_uses_nonzeros(rows, dim, seed):
    table, _ = random_masked_table(rows, dim, seed)
    ct = compact.encode(table)
    decoded, mask = compact.decode(ct)
    assert np.array_equal(mask, table != 0)
    assert np.array_equal(decoded, table)  # -0.0 is inactive and decodes as +0.0
    assert not np.signbit(decoded[decoded == 0]).any()


def test_active_zeros_round_trip_exactly():
    table = np.array([[0.0, -0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 0], [0, 1, 0]], np.int8)
    ct = compact.encode(table, mask)
    assert ct.nnz == 3 and ct.row_offsets.tolist() == [0, 2, 3]
    decoded, decoded_mask = compact.decode(ct)
    assert np.array_equal(decoded_mask, mask.astype(bool))
    assert np.array_equal(bits32(decoded), bits32([[0.0, -0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_accepts_float64_integer_table_and_float_mask():
    table = np.array([[1, 0, 3]], np.int64)
    ct = compact.encode(table.astype(np.float64) + 0.25, np.array([[1.0, 0.0, 1.0]]))
    assert compact.decode(ct)[0].tolist() == [[1.25, 0.0, 3.25]]
    assert compact.decode(compact.encode(table))[0].tolist() == [[1.0, 0.0, 3.0]]
    assert compact.encode(table, values_dtype=np.float16).values.dtype == np.float16


@pytest.mark.parametrize(
    "table, mask, values_dtype, match",
    [
        (np.zeros(4, np.float32), None, "float32", "2-D"),
        (np.zeros((2, 2, 2), np.float32), None, "float32", "2-D"),
        (np.zeros((0, 4), np.float32), None, "float32", "rows >= 1"),
        (np.zeros((4, 0), np.float32), None, "float32", "rows >= 1"),
        (np.zeros((2, 2), np.complex64), None, "float32", "real"),
        (np.array([["a", "b"]]), None, "float32", "real"),
        (np.zeros((2, 2), bool), None, "float32", "real"),
        (np.zeros((2, 2)), np.ones((2, 3), bool), "float32", "does not match"),
        (np.zeros((2, 2)), np.full((2, 2), 2), "float32", "only 0 and 1"),
        (np.zeros((2, 2)), np.full((2, 2), 0.5), "float32", "only 0 and 1"),
        (np.zeros((2, 2)), np.full((2, 2), "1"), "float32", "bool or numeric"),
        (np.zeros((2, 2)), None, "float64", "float32 or float16"),
        (np.zeros((2, 2)), None, "int8", "float32 or float16"),
        (np.zeros((2, 2)), None, "not-a-dtype", "float32 or float16"),
        (np.full((2, 2), 7e4), None, "float16", "overflow"),
    ],
)
def test_encode_rejects_bad_input(table, mask, values_dtype, match):
    with pytest.raises(ValueError, match=match):
        compact.encode(table, mask, values_dtype=values_dtype)


def test_float16_rounding_near_max_is_not_overflow():
    ct = compact.encode(np.array([[65510.0, -65519.0, np.inf]], np.float32), values_dtype="float16")
    assert compact.decode(ct)[0].tolist() == [[65504.0, -65504.0, np.inf]]


def test_compact_table_validation():
    ct = compact.encode(np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]], np.float32))
    good = dict(bitmask=ct.bitmask, values=ct.values, row_offsets=ct.row_offsets, rows=2, dim=3)
    compact.CompactTable(**good)
    bad = [
        (dict(rows=0), "rows and dim"),
        (dict(dim=2.0), "integers"),
        (dict(bitmask=ct.bitmask.astype(np.int8)), "bitmask"),
        (dict(bitmask=ct.bitmask.tolist()), "numpy array"),
        (dict(dim=9), "bitmask"),
        (dict(bitmask=ct.bitmask | 0x80), "beyond dim"),
        (dict(values=ct.values.astype(np.float64)), "values"),
        (dict(row_offsets=ct.row_offsets.astype(np.uint32)), "row_offsets"),
        (dict(row_offsets=np.array([0, 1, 3], np.int32)), "popcount"),
        (dict(values=ct.values[:2], row_offsets=np.array([0, 2, 2], np.int32)), "popcount"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            compact.CompactTable(**{**good, **change})
    with pytest.raises(dataclasses_frozen_error()):
        ct.rows = 5
    assert repr(ct) == "CompactTable(rows=2, dim=3, nnz=3, values_dtype=float32, nbytes=26)"
    assert ct.dense_nbytes() == 24 and ct.dense_nbytes(np.float16) == 12


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_compact_nbytes():
    assert compact.compact_nbytes(2, 3, 3) == 2 + 12 + 12
    assert compact.compact_nbytes(10, 17, 0, "float16") == 10 * 3 + 0 + 11 * 4
    assert compact.compact_nbytes(1, 2**32, 2**31, "float16") == 2**29 + 2**32 + 2 * 8
    with pytest.raises(ValueError):
        compact.compact_nbytes(2, 2, 5)
    with pytest.raises(ValueError):
        compact.compact_nbytes(2, 2, 1, "float64")


def test_size_ratio_at_80_percent_sparsity():
    """40,981 x 64 at exactly 80% sparsity with an irregular per-row density."""
    rows, dim = 40981, 64
    rng = np.random.default_rng(0)
    # DSL-style global magnitude pruning: keep the top 20% of |w| with row-dependent scales.
    row_scale = rng.lognormal(0.0, 1.0, size=(rows, 1)).astype(np.float32)
    table = rng.standard_normal((rows, dim)).astype(np.float32) * row_scale
    nnz = round(0.2 * rows * dim)
    mask = np.zeros(rows * dim, bool)
    mask[np.argpartition(-np.abs(table).ravel(), nnz)[:nnz]] = True
    mask = mask.reshape(rows, dim)
    per_row = mask.sum(1)
    assert per_row.min() == 0 and per_row.max() == dim  # irregular: empty and full rows
    assert per_row.std() > 10

    ratios = {}
    for values_dtype in ("float32", "float16"):
        ct = compact.encode(table, mask, values_dtype=values_dtype)
        assert ct.nnz == nnz == 524557
        ratios[values_dtype] = ct.nbytes / ct.dense_nbytes()
        print(
            f"\n{values_dtype}: nbytes={ct.nbytes:,} dense={ct.dense_nbytes():,} "
            f"ratio={ratios[values_dtype]:.4f}"
        )
        assert ct.nbytes == compact.compact_nbytes(rows, dim, nnz, values_dtype)
    assert ratios["float32"] == 2_590_004 / 10_491_136  # 0.2469
    assert ratios["float16"] == 1_540_890 / 10_491_136  # 0.1469
    assert ratios["float32"] <= 0.30 and ratios["float16"] <= 0.17


# --------------------------------------------------------------------------- TF lookup


def lookup_np(ct, ids, **kw):
    return compact.lookup(ct.bitmask, ct.values, ct.row_offsets, ids, ct.dim, **kw).numpy()


@TF_FUZZ
@given(
    rows=st.integers(1, 200),
    dim=st.sampled_from(INTERESTING_DIMS),
    seed=st.integers(0, 2**32 - 1),
    values_dtype=st.sampled_from(["float32", "float16"]),
    id_shape=st.sampled_from([(0,), (1,), (7,), (64,), (3, 5), (2, 0), (2, 3, 4), ()]),
    id_dtype=st.sampled_from([np.int32, np.int64]),
)
def test_lookup_matches_decode(rows, dim, seed, values_dtype, id_shape, id_dtype):
    table, mask = random_masked_table(rows, dim, seed, specials=values_dtype == "float32")
    if values_dtype == "float16":
        table = fit_float16(table)
    ct = compact.encode(table, mask, values_dtype)
    decoded, _ = compact.decode(ct)
    rng = np.random.default_rng(seed)
    # Mostly valid ids (with repeats), some invalid ones.
    ids = rng.integers(-3, rows + 3, size=id_shape).astype(id_dtype)
    out = lookup_np(ct, tf.constant(ids))
    assert out.dtype == np.float32 and out.shape == id_shape + (dim,)
    assert np.array_equal(bits32(out), bits32(reference_lookup(decoded, ids)))


def test_lookup_repeated_and_2d_ids():
    table, mask = random_masked_table(50, 20, seed=7)
    ct = compact.encode(table, mask)
    decoded, _ = compact.decode(ct)
    ids = np.array([[3, 3, 3, 49], [0, 49, 3, 0]], np.int64)
    assert np.array_equal(lookup_np(ct, ids), decoded[ids])


def test_lookup_invalid_ids_give_zero_vectors():
    table = np.arange(1, 13, dtype=np.float32).reshape(4, 3)  # all entries active, nonzero
    ct = compact.encode(table)
    big = np.iinfo(np.int64)
    ids = np.array([-1, 4, 1, big.max, big.min, 3, -(2**40)], np.int64)
    out = lookup_np(ct, ids)
    assert out.tolist() == [[0.0] * 3, [0.0] * 3, [4.0, 5.0, 6.0], [0.0] * 3, [0.0] * 3,
                            [10.0, 11.0, 12.0], [0.0] * 3]
    i32 = np.iinfo(np.int32)
    assert lookup_np(ct, np.array([i32.min, i32.max, 0], np.int32))[:, 0].tolist() == [0, 0, 1]


def test_lookup_all_empty_table_and_dim_one():
    ct = compact.encode(np.zeros((5, 1), np.float32))
    assert ct.nnz == 0
    assert lookup_np(ct, [0, 4, 9]).tolist() == [[0.0], [0.0], [0.0]]


def test_lookup_rejects_bad_arguments():
    ct = compact.encode(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="integer"):
        lookup_np(ct, tf.constant([0.0, 1.0]))
    for dim in (0, 3.0, True, None, 9):
        with pytest.raises(ValueError, match="dim"):
            compact.lookup(ct.bitmask, ct.values, ct.row_offsets, [0], dim)
    # Plain Python lists are accepted like tensors.
    args = (ct.bitmask.tolist(), ct.values.tolist(), ct.row_offsets.tolist())
    assert compact.lookup(*args, [2], 3).numpy().tolist() == [[0.0, 0.0, 1.0]]


@pytest.fixture(scope="module")
def large_table():
    """~100k rows x dim 4 at 95% sparsity: cheap, but exercises large ids."""
    rows, dim = 100_003, 4
    rng = np.random.default_rng(11)
    mask = rng.random((rows, dim)) < 0.05
    mask[-1] = [True, False, True, True]  # a known last row
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    ct = compact.encode(table, mask)
    return ct, compact.decode(ct)[0]


def test_lookup_large_ids(large_table):
    ct, decoded = large_table
    rows = ct.rows
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [np.arange(rows - 40, rows), rng.integers(0, rows, 500), [rows - 1] * 5,
         [0, rows, rows + 1]]
    ).astype(np.int64)
    out = lookup_np(ct, ids)
    assert np.array_equal(out, reference_lookup(decoded, ids))
    assert out[-3:].tolist() == [list(decoded[0]), [0.0] * 4, [0.0] * 4]
    ids2 = ids[:510].reshape(5, 102)
    assert np.array_equal(lookup_np(ct, tf.constant(ids2.astype(np.int32))), decoded[ids2])


def test_lookup_in_tf_function_with_unknown_batch(large_table):
    ct, decoded = large_table
    bitmask = tf.constant(ct.bitmask)
    values = tf.constant(ct.values)
    offsets = tf.constant(ct.row_offsets)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
    def fn(ids):
        out = compact.lookup(bitmask, values, offsets, ids, ct.dim)
        assert out.shape.as_list() == [None, ct.dim]  # static shape is kept
        return out

    rng = np.random.default_rng(1)
    for batch in (0, 1, 64, 1000):
        ids = rng.integers(-2, ct.rows + 2, batch)
        out = fn(tf.constant(ids, tf.int64)).numpy()
        assert np.array_equal(out, reference_lookup(decoded, ids))
    assert fn.experimental_get_tracing_count() == 1


def test_lookup_work_does_not_scale_with_rows():
    """Regression guard: no op in lookup may touch all rows per call (e.g. RaggedGather, i.e.
    tf.gather on a RaggedTensor, validates all row splits: O(rows) per call)."""
    emb = compact.CompactEmbedding(compact.encode(np.eye(8, dtype=np.float32)))
    graph = emb.__call__.get_concrete_function(tf.TensorSpec(None, tf.int64)).graph
    ops = {op.type for op in graph.get_operations()}
    assert "RaggedGather" not in ops and "ReadVariableOp" not in ops  # row-wise gathers only
    assert {"ResourceGather", "RaggedRange", "SparseToDense"} <= ops


# --------------------------------------------------------------------------- CompactEmbedding


def test_compact_embedding_call_and_dense():
    table, mask = random_masked_table(300, 17, seed=5)
    for values_dtype in ("float32", "float16"):
        emb = compact.CompactEmbedding.from_dense(table, mask, values_dtype=values_dtype)
        decoded, _ = compact.decode(compact.encode(table, mask, values_dtype))
        assert [v.trainable for v in emb.variables] == [False, False, False]
        assert emb.trainable_variables == ()
        assert emb.values.dtype == tf.as_dtype(values_dtype)
        ids = np.array([[0, 299, 300], [-1, 5, 5]])
        expected = reference_lookup(decoded, ids)
        assert np.array_equal(emb(ids).numpy(), expected)
        assert np.array_equal(emb(tf.constant(ids, tf.int32)).numpy(), expected)
        dense = emb.dense()
        assert dense.dtype == tf.float32 and np.array_equal(dense.numpy(), decoded)
    assert emb.__call__.experimental_get_tracing_count() == 2  # int32 + int64, any shape
    with pytest.raises(ValueError, match="CompactTable"):
        compact.CompactEmbedding(table)


def test_dense_of_empty_table():
    emb = compact.CompactEmbedding(compact.encode(np.zeros((3, 10), np.float32)))
    assert emb.dense().numpy().tolist() == [[0.0] * 10] * 3


@pytest.mark.parametrize("values_dtype", ["float32", "float16"])
def test_saved_model_round_trip(tmp_path, values_dtype):
    rows, dim = 5000, 32
    table, mask = random_masked_table(rows, dim, seed=9, density=0.2)
    ct = compact.encode(table, mask, values_dtype)
    decoded, _ = compact.decode(ct)
    emb = compact.CompactEmbedding(ct, name="item_embedding")
    path = str(tmp_path / "compact_sm")
    serve = emb.__call__.get_concrete_function(tf.TensorSpec([None], tf.int64, name="ids"))
    tf.saved_model.save(emb, path, signatures={"serving_default": serve, "dense": emb.dense})

    # Variables land in variables/, not in the graph: the proto stays small.
    pb_size = os.path.getsize(os.path.join(path, "saved_model.pb"))
    assert pb_size < 100_000 < ct.nbytes
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    stored = {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name.endswith("VARIABLE_VALUE")
    }
    assert sorted(a.dtype.name for a in stored.values()) == sorted(
        ["uint8", np.dtype(values_dtype).name, "int32"]
    )
    assert sum(a.nbytes for a in stored.values()) == ct.nbytes

    loaded = tf.saved_model.load(path)
    rng = np.random.default_rng(2)
    ids = rng.integers(-5, rows + 5, size=(4, 33))
    expected = reference_lookup(decoded, ids)
    assert np.array_equal(loaded(tf.constant(ids, tf.int64)).numpy(), expected)
    assert np.array_equal(loaded(tf.constant(ids, tf.int32)).numpy(), expected)
    assert np.array_equal(loaded(tf.constant(ids, tf.int64)).numpy(), emb(ids).numpy())
    assert np.array_equal(loaded.dense().numpy(), decoded)
    out = loaded.signatures["serving_default"](ids=tf.constant(ids[0], tf.int64))
    assert np.array_equal(out["output_0"].numpy(), expected[0])
    assert np.array_equal(loaded.signatures["dense"]()["output_0"].numpy(), decoded)

    ops = graph_ops(path)
    print(f"\nsaved_model.pb: {pb_size:,} bytes; ops: {sorted(ops)}")
    assert {"RaggedRange", "SparseToDense", "ResourceGather"} <= ops
    forbidden = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    assert not ops & forbidden
    assert not [op for op in ops if ">" in op]  # namespaced custom ops
    assert [op for op in ops if op_def_registry.get(op) is None] == []  # all registered TF ops


def test_docstring_examples():
    results = doctest.testmod(compact, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 10 and results.failed == 0
