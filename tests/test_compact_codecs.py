"""Load-time codecs of ``dsl_tf.compact`` (issue 13): exact round trips in TF ops, sizes."""

from __future__ import annotations

import dsl_tf  # noqa: F401  (before tf.keras)
import numpy as np
import pytest
import tensorflow as tf

from dsl_tf import compact


@pytest.mark.parametrize("width", [1, 3, 8, 10, 17, 32])
def test_fields_round_trip_at_any_offset(width):
    rng = np.random.default_rng(width)
    fields = rng.integers(0, 2**width, 1001, dtype=np.int64)
    fields[:2] = [0, 2**width - 1]
    stream = compact.pack_fields(fields, width)
    assert stream.dtype == np.uint8 and stream.size == -(-1001 * width // 8)
    np.testing.assert_array_equal(compact.unpack_fields(stream, width, 0, 1001).numpy(), fields)
    for start, count in [(0, 1), (999, 2), (333, 0), (7, 500)]:  # the last field reads past the stream's end
        np.testing.assert_array_equal(compact.unpack_fields(tf.constant(stream), width, tf.constant(start),
                                                            count).numpy(), fields[start:start + count])


def test_pack_fields_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*3\)"):
        compact.pack_fields(np.array([8]), 3)
    with pytest.raises(ValueError, match="width"):
        compact.pack_fields(np.array([1]), 0)


@pytest.mark.parametrize("universe, count", [(1, 1), (64, 64), (1000, 7), (29858 * 409, 8100), (2**36, 50)])
def test_sorted_ids_round_trip_near_the_entropy(universe, count):
    rng = np.random.default_rng(count)
    ids = np.sort(rng.choice(universe, count, replace=False)) if universe < 2**31 else np.unique(
        rng.integers(0, universe, count))
    code = compact.encode_sorted(ids, universe)
    got = compact.decode_sorted(tf.constant(code.upper), tf.constant(code.lower), code.low_bits)
    assert got.dtype == tf.int64
    np.testing.assert_array_equal(got.numpy(), ids)
    # at most 2 + log2(universe / count) bits per id, plus at most one byte of padding per array
    assert code.nbytes <= count * (2 + np.log2(universe / count)) / 8 + 2
    assert code.low_bits == int(np.floor(np.log2(universe / count)))


def test_sorted_ids_with_repeats_and_empty():
    ids = np.array([0, 0, 5, 5, 5, 9])
    code = compact.encode_sorted(ids, 10)
    np.testing.assert_array_equal(compact.decode_sorted(code.upper, code.lower, code.low_bits), ids)
    empty = compact.encode_sorted(np.array([], np.int64), 10)
    assert compact.decode_sorted(empty.upper, empty.lower, empty.low_bits).numpy().tolist() == []
    with pytest.raises(ValueError, match="non-decreasing"):
        compact.encode_sorted(np.array([3, 2]), 10)
    with pytest.raises(ValueError, match="non-decreasing"):
        compact.encode_sorted(np.array([10]), 10)


def test_floats_round_trip_bitwise_with_specials():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(5000) * 0.1).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3e-39, np.finfo(np.float32).max], np.float32)
    for data in (values, np.concatenate([values, specials])):
        packed = compact.pack_floats(data)
        got = compact.unpack_floats(packed.low, packed.exponents, packed.width, packed.min_exponent, 0, packed.count)
        np.testing.assert_array_equal(got.numpy().view(np.uint32), data.view(np.uint32))
        part = compact.unpack_floats(tf.constant(packed.low), tf.constant(packed.exponents), packed.width,
                                     packed.min_exponent, tf.constant(4000), 700)
        np.testing.assert_array_equal(part.numpy().view(np.uint32), data[4000:4700].view(np.uint32))
    # these 5,000 N(0, 0.1) values span binades 2^-16 .. 2^-2 (biased exponents 111 .. 125): codes 1 .. 15, 4 bits
    plain = compact.pack_floats(values)
    assert (plain.width, plain.min_exponent, plain.nbytes) == (4, 111, 3 * 5000 + 5000 * 4 // 8)
    assert packed.width == 8  # inf / NaN (exponent 255) and subnormals (code 0): every code


def test_row_offsets_of_equals_the_stored_offsets():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((300, 37)).astype(np.float32) * (rng.random((300, 37)) < 0.2)
    table[10:20] = 0.0  # empty rows
    ct = compact.encode(table)
    np.testing.assert_array_equal(compact.row_offsets_of(ct.bitmask).numpy(), ct.row_offsets)
    assert compact.row_offsets_of(ct.bitmask, tf.int64).dtype == tf.int64


def test_sorted_ids_decode_chunk_by_chunk():
    """Byte ranges of ``upper`` with the running rank give every id once, in order, with its rank."""
    rng = np.random.default_rng(5)
    ids = np.sort(rng.choice(50_000, 900, replace=False))
    code = compact.encode_sorted(ids, 50_000)
    got, ranks, rank = [], [], 0
    for start in range(0, code.upper.size, 37):
        part, at = compact.decode_sorted(code.upper, code.lower, code.low_bits, start, start + 37, rank)
        got.append(part.numpy()), ranks.append(at.numpy())
        rank += int(at.shape[0])
    np.testing.assert_array_equal(np.concatenate(got), ids)
    np.testing.assert_array_equal(np.concatenate(ranks), np.arange(900))
