"""Implicit-feedback interaction data: one container, file loaders and a synthetic generator.

Everything a trainer needs about a dataset lives in :class:`InteractionData`: binary
user x item ``scipy.sparse.csr_matrix`` splits (train / valid / test), the raw-id maps and
a few helpers (training pairs, popularity counts, a ``tf.data`` pipeline).

>>> from trainers.data import synthetic
>>> data = synthetic(num_users=300, num_items=500, seed=1)
>>> data.train.shape
(300, 500)
>>> users, items = data.train_pairs()
>>> len(users) == data.train.nnz
True
>>> final = data.merged_train_valid()  # paper protocol: fit on train+valid, test on test
>>> final.valid.nnz, final.train.nnz == data.train.nnz + data.valid.nnz
(0, True)

Rules shared by every loader (they never return a silently wrong matrix):

* Malformed input raises ``ValueError("<file>:<line>: <problem>")`` with a 1-based line
  number: a bad token, a negative id, a wrong number of fields, an empty file.
* Duplicate interactions (the same user/item pair twice in one split) are kept once; the
  number removed is reported by :meth:`InteractionData.stats` (``duplicates_removed``).
* Users that have valid/test interactions but no training interaction ("cold" users) are
  kept in the matrices, reported by ``stats()`` (``cold_valid_users``, ``cold_test_users``)
  and left out of evaluation by :meth:`InteractionData.eval_users` and by
  ``trainers.evaluation`` (nothing can be learned about them).
* Ids that imply an embedding table larger than the available memory fail before any
  matrix is built, naming the file, line and id (:func:`check_table_memory`).
* ``load_dataset`` rejects an argument its loader does not take, naming the accepted ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import scipy.sparse as sp
import tensorflow as tf

MAX_DENSE_ID = 2**31 - 2
"""Largest id accepted in LightGCN-format files (so that counts fit in int32)."""

_SPLITS = ("train", "valid", "test")
_INT_TOKEN = re.compile(r"[+-]?[0-9]{1,18}")
_MAX_ID_DIGITS = len(str(MAX_DENSE_ID))


@dataclasses.dataclass(frozen=True, eq=False)
class InteractionData:
    """Binary implicit-feedback interactions split into train / valid / test.

    Attributes:
      num_users: number of users (rows of every matrix).
      num_items: number of items (columns of every matrix).
      train, valid, test: ``csr_matrix`` of shape ``[num_users, num_items]``, dtype
        float32, every stored value 1.0, canonical (sorted, no duplicate entries).
        ``valid``/``test`` may have no entries.
      user_ids, item_ids: raw ids, ``user_ids[dense_id] == raw_id`` (strings or ints);
        ``None`` when the source ids already were the dense ids.
      name: a short dataset name for logs.
      notes: loader counters merged into :meth:`stats` (e.g. ``duplicates_removed``).

    >>> import scipy.sparse as sp, numpy as np
    >>> m = sp.csr_matrix(np.array([[1, 0, 1], [0, 1, 0]], dtype=np.float32))
    >>> empty = sp.csr_matrix((2, 3), dtype=np.float32)
    >>> d = InteractionData(2, 3, m, empty, empty, name="toy")
    >>> d.item_popularity().tolist(), d.user_activity().tolist()
    ([1, 1, 1], [2, 1])
    """

    num_users: int
    num_items: int
    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    name: str = "data"
    notes: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        shape = (self.num_users, self.num_items)
        for split in _SPLITS:
            matrix = getattr(self, split)
            if not isinstance(matrix, sp.csr_matrix):
                raise TypeError(f"{split} must be a scipy.sparse.csr_matrix, got {type(matrix).__name__}")
            if matrix.shape != shape:
                raise ValueError(f"{split} has shape {matrix.shape}, expected {shape}")
            if matrix.dtype != np.float32:
                raise ValueError(f"{split} has dtype {matrix.dtype}, expected float32")
            if not matrix.has_canonical_format:
                raise ValueError(f"{split} is not canonical (unsorted or duplicate entries)")
            if matrix.nnz and not np.all(matrix.data == 1.0):
                raise ValueError(f"{split} is not binary: every stored value must be 1.0")
        for attr, size in (("user_ids", self.num_users), ("item_ids", self.num_items)):
            ids = getattr(self, attr)
            if ids is not None and len(ids) != size:
                raise ValueError(f"{attr} has {len(ids)} entries, expected {size}")

    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Training interactions as ``(users, items)`` int64 arrays, sorted by user then item."""
        users = np.repeat(np.arange(self.num_users, dtype=np.int64), np.diff(self.train.indptr))
        return users, self.train.indices.astype(np.int64)

    def item_popularity(self) -> np.ndarray:
        """Number of training interactions per item, int64 ``[num_items]``."""
        return np.bincount(self.train.indices, minlength=self.num_items).astype(np.int64)

    def user_activity(self) -> np.ndarray:
        """Number of training interactions per user, int64 ``[num_users]``."""
        return np.diff(self.train.indptr).astype(np.int64)

    def eval_users(self, split: str = "test") -> np.ndarray:
        """Users evaluated on ``split``: >= 1 interaction there and >= 1 training interaction."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        has_eval = np.diff(getattr(self, split).indptr) > 0
        return np.flatnonzero(has_eval & (self.user_activity() > 0)).astype(np.int64)

    def merged_train_valid(self) -> InteractionData:
        """Copy with ``train = train | valid`` and an empty ``valid`` (the paper's protocol)."""
        merged = _binarize((self.train + self.valid).tocsr())
        empty = sp.csr_matrix((self.num_users, self.num_items), dtype=np.float32)
        return dataclasses.replace(self, train=merged, valid=empty)

    def stats(self) -> dict:
        """Summary counts: sizes, density, evaluated and cold users, items seen only in
        valid/test (``cold_valid_items``, ``cold_test_items``), loader notes."""
        has_train = self.user_activity() > 0
        out = {
            "name": self.name,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_train": int(self.train.nnz),
            "num_valid": int(self.valid.nnz),
            "num_test": int(self.test.nnz),
            "train_density": self.train.nnz / max(1, self.num_users * self.num_items),
            "users_without_train": int(np.sum(~has_train)),
        }
        for split in ("valid", "test"):
            has_split = np.diff(getattr(self, split).indptr) > 0
            out[f"{split}_users"] = int(np.sum(has_split & has_train))
            out[f"cold_{split}_users"] = int(np.sum(has_split & ~has_train))
        item_in_train = self.item_popularity() > 0
        for split in ("valid", "test"):
            in_split = np.bincount(getattr(self, split).indices, minlength=self.num_items) > 0
            out[f"cold_{split}_items"] = int(np.sum(in_split & ~item_in_train))
        out.update(self.notes)
        return out

    def as_dataset(self, batch_size: int, shuffle: bool = True, seed: int | None = None) -> tf.data.Dataset:
        """``tf.data.Dataset`` of ``{"user_id": int64[B], "item_id": int64[B]}`` over train pairs.

        One pass over all training interactions per epoch (the last batch may be smaller),
        reshuffled every epoch when ``shuffle``; the cardinality is known.

        >>> ds = synthetic(num_users=50, num_items=80, seed=0).as_dataset(256, seed=1)
        >>> int(ds.cardinality()) > 0
        True
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        users, items = self.train_pairs()
        ds = tf.data.Dataset.from_tensor_slices({"user_id": users, "item_id": items})
        if shuffle:
            ds = ds.shuffle(max(1, len(users)), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------
# Shared helpers


def _binarize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    matrix = matrix.astype(np.float32)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.data[:] = 1.0
    return matrix


def _binary_csr(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> sp.csr_matrix:
    """Binary canonical csr from (already de-duplicated) pairs."""
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(num_users, num_items)
    )
    return _binarize(matrix)


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """``np.unique`` for int64 keys via one sort (numpy 2's hash-based unique is much slower)."""
    keys = np.sort(keys)
    keep = np.ones(len(keys), dtype=bool)
    keep[1:] = keys[1:] != keys[:-1]
    return keys[keep]


def _split_per_user(
    users: np.ndarray, sort_keys: tuple[np.ndarray, ...], valid_fraction: float, test_fraction: float
) -> np.ndarray:
    """Assign each interaction to train (0), valid (1) or test (2), per user.

    Within a user, interactions are ordered by ``sort_keys`` (``np.lexsort`` order: last key
    most significant); the first ``round(n * test_fraction)`` go to test, the next
    ``round(n * valid_fraction)`` to valid, the rest to train. Every user keeps at least
    one training interaction (valid, then test, shrink when needed). ``round`` is
    half-up: ``floor(x + 0.5)``.
    """
    order = np.lexsort((*sort_keys, users))
    sorted_users = users[order]
    counts = np.bincount(users)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(users)) - starts[sorted_users]
    n = counts[sorted_users]
    n_test = np.minimum(np.floor(n * test_fraction + 0.5), n - 1)
    n_valid = np.minimum(np.floor(n * valid_fraction + 0.5), n - 1 - n_test)
    split = np.empty(len(users), dtype=np.int8)
    split[order] = np.where(rank < n_test, 2, np.where(rank < n_test + n_valid, 1, 0))
    return split


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    if valid_fraction < 0 or test_fraction < 0 or valid_fraction + test_fraction >= 1:
        raise ValueError(
            "need valid_fraction >= 0, test_fraction >= 0 and valid_fraction + test_fraction < 1, "
            f"got {valid_fraction} and {test_fraction}"
        )


def _from_split_labels(
    users: np.ndarray,
    items: np.ndarray,
    split: np.ndarray,
    num_users: int,
    num_items: int,
    **fields,
) -> InteractionData:
    mats = {
        name: _binary_csr(users[split == code], items[split == code], num_users, num_items)
        for code, name in enumerate(_SPLITS)
    }
    return InteractionData(num_users, num_items, **mats, **fields)


# ---------------------------------------------------------------------------------------
# LightGCN format: "user item item ..." per line, dense 0-based ids


def _token_error(path: Path, raw: bytes, line_breaks: np.ndarray, position: int) -> ValueError:
    """Error for the first byte that is neither an ASCII digit nor whitespace."""
    index = int(np.searchsorted(line_breaks, position))
    start = int(line_breaks[index - 1]) + 1 if index > 0 else 0
    end = int(line_breaks[index]) if index < len(line_breaks) else len(raw)
    text = raw[start:end].decode("utf-8", errors="replace")
    for token in text.split():
        if re.fullmatch(r"[0-9]+", token):
            continue
        if re.fullmatch(r"-[0-9]+", token):
            return ValueError(f"{path}:{index + 1}: negative id {token}")
        return ValueError(f"{path}:{index + 1}: bad token {token!r}")
    bad = raw[position : position + 1].decode("utf-8", errors="replace")
    return ValueError(f"{path}:{index + 1}: bad character {bad!r}")


class _LightGCNFile(NamedTuple):
    """One parsed LightGCN-format file (int64 arrays; line numbers are 1-based)."""

    declared: np.ndarray  # the user of every non-blank line (also lines without items)
    declared_lines: np.ndarray
    users: np.ndarray  # one entry per interaction
    items: np.ndarray
    item_lines: np.ndarray
    label: int | None  # the third token when every line has exactly 3 and it is the same everywhere


def _read_lightgcn_file(path: Path) -> _LightGCNFile:
    """Parse one LightGCN-format file.

    Vectorised: digits are located and combined into numbers with numpy, no per-token
    Python work.
    """
    raw = path.read_bytes()
    buf = np.frombuffer(raw, dtype=np.uint8)
    line_breaks = np.flatnonzero(buf == ord("\n"))
    is_digit = (buf >= ord("0")) & (buf <= ord("9"))
    is_space = (buf == ord(" ")) | (buf == ord("\t")) | (buf == ord("\n")) | (buf == ord("\r"))
    bad = np.flatnonzero(~(is_digit | is_space))
    if bad.size:
        raise _token_error(path, raw, line_breaks, int(bad[0]))
    edges = np.flatnonzero(np.diff(np.concatenate(([0], is_digit.view(np.int8), [0]))))
    starts, ends = edges[0::2], edges[1::2]
    if starts.size == 0:
        raise ValueError(f"{path}:1: empty file (expected lines 'user_id item_id item_id ...')")
    lines = np.searchsorted(line_breaks, starts)  # 0-based line of every token
    lengths = ends - starts
    values = np.zeros(len(starts), dtype=np.int64)
    for j in range(min(int(lengths.max()), _MAX_ID_DIGITS + 1)):  # Horner, one digit column at a time
        has_digit = lengths > j
        values[has_digit] = values[has_digit] * 10 + (buf[starts[has_digit] + j] - ord("0"))
    too_big = np.flatnonzero((lengths > _MAX_ID_DIGITS) | (values > MAX_DENSE_ID))
    if too_big.size:
        k = int(too_big[0])
        token = raw[starts[k] : ends[k]].decode()
        raise ValueError(f"{path}:{lines[k] + 1}: id {token} out of range (max {MAX_DENSE_ID})")
    first = np.ones(len(starts), dtype=bool)
    first[1:] = lines[1:] != lines[:-1]
    first_index = np.flatnonzero(first)
    tokens_per_line = np.diff(np.append(first_index, len(starts)))
    label = None
    if np.all(tokens_per_line == 3) and np.all(values[first_index + 2] == values[2]):
        label = int(values[2])
    declared = values[first]
    return _LightGCNFile(
        declared=declared,
        declared_lines=lines[first] + 1,
        users=declared[np.cumsum(first) - 1][~first],
        items=values[~first],
        item_lines=lines[~first] + 1,
        label=label,
    )


def available_memory_bytes() -> int:
    """Memory available to new allocations: ``MemAvailable`` of ``/proc/meminfo`` (Linux),
    else free physical pages."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_table_memory(rows: int, dim: int, origin: str, itemsize: int = 4) -> None:
    """Raise ``ValueError`` when one dense ``rows x dim`` table (``itemsize`` bytes per value)
    exceeds the available memory; ``origin`` names where ``rows`` came from
    (``"<file>:<line>: user id N"``).

    >>> check_table_memory(10, 64, "train.txt:1: user id 9")
    >>> check_table_memory(2 * 10**12, 64, "train.txt:2: user id 1999999999999")
    Traceback (most recent call last):
    ...
    ValueError: train.txt:2: user id 1999999999999 implies a 2000000000000 x 64 float32 table (512000.0 GB) ...
    """
    needed = int(rows) * int(dim) * int(itemsize)
    available = available_memory_bytes()
    if needed > available:
        raise ValueError(
            f"{origin} implies a {rows} x {dim} float{8 * itemsize} table ({needed / 1e9:.1f} GB) but only "
            f"{available / 1e9:.1f} GB of memory is available; are the ids dense 0-based ids? (for raw ids "
            "use a triplets file, or format='triplets' for a split directory)"
        )


def _split_matrices(
    root: Path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], num_users: int, num_items: int
) -> tuple[dict[str, sp.csr_matrix], dict[str, int]]:
    """Binary train/valid/test matrices from per-split dense pairs: duplicates within a split
    are kept once, pairs already in an earlier split are dropped with a warning."""
    duplicates = overlaps = 0
    seen = np.zeros(0, dtype=np.int64)  # sorted keys of the earlier splits
    mats = {}
    for split in _SPLITS:
        users, items = pairs[split]
        keys = _sorted_unique(users * num_items + items)
        duplicates += len(users) - len(keys)
        position = np.minimum(np.searchsorted(seen, keys), max(0, len(seen) - 1))
        overlap = seen[position] == keys if len(seen) else np.zeros(len(keys), dtype=bool)
        if overlap.any():
            overlaps += int(overlap.sum())
            warnings.warn(
                f"{root / (split + '.txt')}: dropped {int(overlap.sum())} pairs that also occur in an earlier split",
                stacklevel=3,
            )
            keys = keys[~overlap]
        seen = _sorted_unique(np.concatenate([seen, keys]))
        mats[split] = _binary_csr(keys // num_items, keys % num_items, num_users, num_items)
    return mats, {"duplicates_removed": duplicates, "overlaps_removed": overlaps}


_SPLIT_FORMATS = ("auto", "lightgcn", "triplets")


def load_lightgcn_dir(
    path: str | os.PathLike, format: str = "auto", embedding_dim: int | None = None
) -> InteractionData:
    """Load a split directory: ``train.txt`` and optional ``valid.txt``, ``test.txt``.

    ``format="lightgcn"``: each non-blank line is ``user_id item_id item_id ...`` with
    0-based dense ids (a line may list no items; the user still counts). ``num_users`` /
    ``num_items`` are one more than the largest user/item id in any file. A user on several
    lines of one file gets the union.

    ``format="triplets"``: each non-blank line is ``user item [label]`` with raw ids (any
    tokens, mapped jointly over the three files like :func:`load_triplets`; the ids are
    kept in ``user_ids``/``item_ids``); every line is a positive, and a third column must
    be the same value on every line.

    ``format="auto"`` (default) reads LightGCN lines, unless every line of every file has
    exactly three tokens with the same third token (``user item 1``): that layout is read
    as triplets, with a ``UserWarning`` naming the file.

    In both formats, pairs repeated within a split are kept once (``duplicates_removed``);
    a valid pair already in train, or a test pair already in train or valid, is dropped
    with a warning (``overlaps_removed``), so the three splits are disjoint. With
    ``embedding_dim``, LightGCN ids that imply a ``rows x embedding_dim`` float32 table
    larger than the available memory fail first (:func:`check_table_memory`).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.txt").write_text("0 1 2\\n1 0\\n")
    >>> _ = (d / "test.txt").write_text("0 0\\n1 2\\n")
    >>> data = load_lightgcn_dir(d)
    >>> data.train.toarray().tolist(), data.test.nnz
    ([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], 2)
    """
    if format not in _SPLIT_FORMATS:
        raise ValueError(f"format must be 'auto', 'lightgcn' or 'triplets', got {format!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected train.txt[, valid.txt, test.txt])")
    if not (root / "train.txt").is_file():
        raise FileNotFoundError(f"{root / 'train.txt'}: no such file")
    files = [root / f"{split}.txt" for split in _SPLITS if split == "train" or (root / f"{split}.txt").exists()]
    if format == "triplets":
        return _load_triplet_dir(root, files)
    parsed = {file.stem: _read_lightgcn_file(file) for file in files}
    labels = {p.label for p in parsed.values()}
    if format == "auto" and len(labels) == 1 and None not in labels:
        warnings.warn(
            f"{files[0]}: every line of {', '.join(f.name for f in files)} is 'user item {labels.pop()}': "
            "read as 'user item label' triplets, not LightGCN lines (pass format='triplets' or "
            "format='lightgcn' to choose)",
            UserWarning,
            stacklevel=2,
        )
        return _load_triplet_dir(root, files)
    empty = np.zeros(0, dtype=np.int64)
    parts = [parsed.get(split) for split in _SPLITS]
    num_users = 1 + max(int(p.declared.max(initial=-1)) for p in parts if p is not None)
    num_items = 1 + max(int(p.items.max(initial=-1)) for p in parts if p is not None)
    if num_items == 0:
        raise ValueError(f"{root / 'train.txt'}:1: no interactions in any file (every line lists only a user)")
    if embedding_dim is not None:
        for what, rows, ids, lines in (("user", num_users, "declared", "declared_lines"),
                                       ("item", num_items, "items", "item_lines")):
            split, part = next((s, p) for s, p in parsed.items() if getattr(p, ids).max(initial=-1) == rows - 1)
            line = int(getattr(part, lines)[np.argmax(getattr(part, ids))])
            check_table_memory(rows, embedding_dim, f"{root / (split + '.txt')}:{line}: {what} id {rows - 1}")
    pairs = {split: (empty, empty) if p is None else (p.users, p.items) for split, p in zip(_SPLITS, parts)}
    mats, notes = _split_matrices(root, pairs, num_users, num_items)
    return InteractionData(num_users, num_items, **mats, name=root.resolve().name, notes=notes)


def _load_triplet_dir(root: Path, files: list[Path]) -> InteractionData:
    """``format="triplets"`` of :func:`load_lightgcn_dir`."""
    columns, lines = {}, {}
    for file in files:
        columns[file.stem], lines[file.stem] = _read_records(file, None, 2, 3, False, "'user item [label]'")
    train_fields = sum(c is not None for c in columns["train"])
    label = columns["train"][2]
    for file in files:
        cols, numbers = columns[file.stem], lines[file.stem]
        if sum(c is not None for c in cols) != train_fields:
            got = file.read_text(encoding="utf-8").split("\n")[numbers[0] - 1].rstrip("\r")
            raise ValueError(f"{file}:{numbers[0]}: expected {train_fields} fields like line "
                             f"{lines['train'][0]} of {files[0]}, got {got!r}")
        if label is not None:
            differs = np.flatnonzero(cols[2] != label[0])
            if differs.size:
                raise ValueError(
                    f"{file}:{numbers[differs[0]]}: third column varies ({label[0]} on line {lines['train'][0]} of "
                    f"{files[0].name}, {cols[2][differs[0]]} here); a split directory of triplets lists positives "
                    "only (use a triplets file with min_rating for ratings)"
                )
    splits = [file.stem for file in files]
    sizes = np.cumsum([0] + [len(columns[s][0]) for s in splits])
    user_ids, users = _dense_ids(np.concatenate([columns[s][0] for s in splits]))
    item_ids, items = _dense_ids(np.concatenate([columns[s][1] for s in splits]))
    empty = np.zeros(0, dtype=np.int64)
    pairs = {split: (empty, empty) for split in _SPLITS}
    for k, split in enumerate(splits):
        pairs[split] = (users[sizes[k] : sizes[k + 1]], items[sizes[k] : sizes[k + 1]])
    mats, notes = _split_matrices(root, pairs, len(user_ids), len(item_ids))
    return InteractionData(len(user_ids), len(item_ids), **mats, user_ids=user_ids, item_ids=item_ids,
                           name=root.resolve().name, notes=notes)


# ---------------------------------------------------------------------------------------
# Record files: triplets and MovieLens


def _dense_ids(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map raw id strings to dense ids in sorted raw-id order.

    Ids that are all integers are mapped as integers (so ``"7"`` and ``"007"`` are the
    same id and the order is numeric); otherwise as strings.
    """
    unique, inverse = np.unique(tokens, return_inverse=True)
    if all(_INT_TOKEN.fullmatch(token) for token in unique):
        unique, int_inverse = np.unique(unique.astype(np.int64), return_inverse=True)
        inverse = int_inverse[inverse]
    return unique, inverse.astype(np.int64)


def _column_as_float(path: Path, column: np.ndarray, lines: np.ndarray, what: str) -> np.ndarray:
    try:
        return column.astype(np.float64)
    except ValueError:
        for token, line in zip(column.tolist(), lines):
            try:
                float(token)
            except ValueError:
                raise ValueError(f"{path}:{line}: bad {what} {token!r}") from None
        raise  # pragma: no cover - numpy and float() agree on what parses


def _read_records(
    path: Path, sep: str | None, min_fields: int, max_fields: int, header: bool, usage: str
) -> tuple[list[np.ndarray | None], np.ndarray]:
    """Split a record file into four string columns (``None`` past the last field).

    Blank lines are skipped; the first record fixes the number of fields and every other
    record must have as many (non-empty) fields. Returns the columns and the 1-based line
    number of every record. Per-line work is one ``str.split``; the rest is numpy.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().split("\n")
    rows = [line.split(sep) for line in lines]
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    blank = counts == 0
    for index in np.flatnonzero(counts == 1):  # with a separator, blank lines give one field
        blank[index] = not rows[index][0].strip()
    records = np.flatnonzero(~blank)
    if header:
        records = records[1:]
    if records.size == 0:
        raise ValueError(f"{path}:1: empty file (expected lines {usage})")
    first, num_fields = records[0], int(counts[records[0]])

    def fail(index: int) -> ValueError:
        expected = usage if index == first else f"{num_fields} fields like line {first + 1}"
        got = lines[index].rstrip("\r")
        return ValueError(f"{path}:{index + 1}: expected {expected}, got {got!r}")

    if not min_fields <= num_fields <= max_fields:
        raise fail(first)
    wrong = records[counts[records] != num_fields]
    if wrong.size:
        raise fail(wrong[0])
    columns: list[np.ndarray | None] = [np.array(column) for column in zip(*(rows[i] for i in records))]
    if sep is not None:
        columns = [np.char.strip(column) for column in columns]
        empty = np.flatnonzero(np.any(np.stack(columns) == "", axis=0))
        if empty.size:
            raise fail(records[empty[0]])
    return columns + [None] * (4 - num_fields), records + 1


def _records_to_data(
    path: Path,
    columns: list[np.ndarray | None],
    line_numbers: np.ndarray,
    min_rating: float | None,
    split: str,
    valid_fraction: float,
    test_fraction: float,
    seed: int,
    name: str,
) -> InteractionData:
    raw_users, raw_items, raw_ratings, raw_times = columns
    n_rows = len(raw_users)
    if split not in ("random", "temporal"):
        raise ValueError(f"split must be 'random' or 'temporal', got {split!r}")
    first = line_numbers[0]
    if min_rating is not None and raw_ratings is None:
        raise ValueError(f"{path}:{first}: no rating field (min_rating={min_rating} needs 'user item rating')")
    if split == "temporal" and raw_times is None:
        raise ValueError(f"{path}:{first}: no timestamp field (split='temporal' needs 'user item rating timestamp')")
    ratings = None if raw_ratings is None else _column_as_float(path, raw_ratings, line_numbers, "rating")
    times = np.zeros(n_rows) if raw_times is None else _column_as_float(path, raw_times, line_numbers, "timestamp")
    keep = np.ones(n_rows, dtype=bool) if min_rating is None else ratings >= min_rating
    if not keep.any():
        raise ValueError(f"{path}:{first}: no rating >= {min_rating} in the file")

    user_ids, users = _dense_ids(raw_users[keep])
    item_ids, items = _dense_ids(raw_items[keep])
    num_users, num_items = len(user_ids), len(item_ids)
    # De-duplicate; a repeated pair keeps its latest timestamp.
    keys = users * num_items + items
    times = times[keep]
    order = np.lexsort((times, keys))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = keys[order][1:] != keys[order][:-1]
    keys, times = keys[order][last], times[order][last]
    users, items = keys // num_items, keys % num_items
    if split == "temporal":  # latest first: newest interactions go to test; ties by larger item id
        sort_keys = (-items, -times)
    else:  # pairs are sorted by (user, item) here, so the split only depends on the seed
        sort_keys = (np.random.default_rng(seed).random(len(keys)),)
    labels = _split_per_user(users, sort_keys, valid_fraction, test_fraction)
    notes = {"duplicates_removed": int(keep.sum()) - len(keys), "below_min_rating": int(n_rows - keep.sum())}
    return _from_split_labels(
        users, items, labels, num_users, num_items, user_ids=user_ids, item_ids=item_ids, name=name, notes=notes
    )


def load_triplets(
    path: str | os.PathLike,
    sep: str | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    min_rating: float | None = None,
    split: str = "random",
    header: bool = False,
) -> InteractionData:
    """Load ``user item [rating [timestamp]]`` lines with arbitrary raw ids and split per user.

    Args:
      path: the file. Blank lines are skipped.
      sep: field separator; ``None`` splits on any whitespace.
      valid_fraction, test_fraction: per-user share of (unique) positives sent to valid /
        test, rounded half-up; every user keeps at least one training interaction.
      seed: seed of the ``"random"`` split (same file + seed -> same split).
      min_rating: if set, only rows with ``rating >= min_rating`` are positives.
      split: ``"random"`` (uniform per user) or ``"temporal"`` (a user's newest
        interactions go to test, the next newest to valid; needs the timestamp column).
      header: skip the first non-blank line.

    Ids are mapped to dense ids in sorted raw-id order (numeric order when every id is an
    integer); ``user_ids``/``item_ids`` hold the raw ids. Users and items without any
    positive row do not appear. A pair listed twice is kept once.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "r.tsv"
    >>> _ = f.write_text("alice x 5\\nalice y 1\\nbob x 4\\n")
    >>> d = load_triplets(f, min_rating=4, valid_fraction=0, test_fraction=0)
    >>> d.user_ids.tolist(), d.item_ids.tolist(), d.train.toarray().tolist()
    (['alice', 'bob'], ['x'], [[1.0], [1.0]])
    """
    _check_fractions(valid_fraction, test_fraction)
    path = Path(path)
    columns, lines = _read_records(path, sep, 2, 4, header, "'user item [rating [timestamp]]'")
    return _records_to_data(path, columns, lines, min_rating, split, valid_fraction, test_fraction, seed, path.stem)


def load_movielens(
    path: str | os.PathLike,
    threshold: float = 4.0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split: str = "temporal",
    seed: int = 0,
) -> InteractionData:
    """Load a MovieLens ``ratings.dat`` (``user::item::rating::timestamp``) as implicit data.

    Ratings ``>= threshold`` become positives. The default split is per-user temporal: a
    user's newest ``test_fraction`` of positives go to test, the next newest
    ``valid_fraction`` to valid, the rest to train (ties by larger item id);
    ``split="random"`` uses a seeded uniform per-user split instead. Other rules as in
    :func:`load_triplets`; ``name`` is the parent directory (e.g. ``"ml-1m"``).
    """
    _check_fractions(valid_fraction, test_fraction)
    path = Path(path)
    columns, lines = _read_records(path, "::", 4, 4, False, "'user::item::rating::timestamp'")
    name = path.resolve().parent.name or path.stem
    return _records_to_data(path, columns, lines, threshold, split, valid_fraction, test_fraction, seed, name)


# ---------------------------------------------------------------------------------------
# Synthetic data


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticModel:
    """The generative model behind :func:`synthetic` (for oracle baselines in tests).

    Item ``i`` is chosen by user ``u`` with probability proportional to
    ``exp(item_log_popularity[i] + user_factors[u] . item_factors[i] / (sqrt(dim) * temperature))``.
    """

    item_log_popularity: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    temperature: float

    def logits(self, users: np.ndarray) -> np.ndarray:
        """True preference logits ``[len(users), num_items]``; ranking by them is the oracle."""
        dim = self.user_factors.shape[1]
        affinity = self.user_factors[users] @ self.item_factors.T / math.sqrt(dim)
        return self.item_log_popularity[None, :] + affinity / self.temperature


def synthetic(
    num_users: int = 2000,
    num_items: int = 3000,
    dim: int = 16,
    mean_interactions: float = 40,
    seed: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.2,
    *,
    zipf_exponent: float = 1.0,
    temperature: float = 0.4,
    min_interactions: int = 5,
    return_model: bool = False,
) -> InteractionData | tuple[InteractionData, SyntheticModel]:
    """Deterministic synthetic implicit feedback with long-tail popularity and latent tastes.

    * Item popularity follows a Zipf law: the item of popularity rank ``r`` (a random
      permutation of item ids) has log-weight ``-zipf_exponent * log(1 + r)``.
    * User activity is log-normal with mean ``mean_interactions`` (sigma 0.8), clipped to
      ``[min_interactions, num_items // 4]``.
    * Users and items have standard Gaussian factors of size ``dim``; each user draws its
      items without replacement with probability proportional to
      ``popularity * exp(affinity / temperature)`` (Gumbel top-k sampling).
      ``affinity`` is the factors' dot product divided by ``sqrt(dim)``.
    * Each user's items are split at random into train / valid / test like
      :func:`load_triplets`.

    The same arguments give identical data. Ranking by the true logits
    (``return_model=True``) is far better than ranking by popularity, so a model that
    learns user preferences measurably beats the popularity baseline.

    >>> a, b = synthetic(num_users=100, num_items=200, seed=3), synthetic(num_users=100, num_items=200, seed=3)
    >>> (a.train != b.train).nnz, a.stats()["num_users"]
    (0, 100)
    """
    _check_fractions(valid_fraction, test_fraction)
    if min(num_users, num_items, dim) <= 0 or mean_interactions <= 0 or temperature <= 0:
        raise ValueError("num_users, num_items, dim, mean_interactions and temperature must be positive")
    max_interactions = num_items // 4
    if max_interactions < min_interactions:
        raise ValueError(f"num_items={num_items} too small for min_interactions={min_interactions} (need 4x)")
    rng = np.random.default_rng(seed)
    popularity_rank = rng.permutation(num_items)
    model = SyntheticModel(
        item_log_popularity=(-zipf_exponent * np.log1p(popularity_rank)).astype(np.float32),
        user_factors=rng.standard_normal((num_users, dim)).astype(np.float32),
        item_factors=rng.standard_normal((num_items, dim)).astype(np.float32),
        temperature=temperature,
    )
    sigma = 0.8
    counts = rng.lognormal(np.log(mean_interactions) - sigma**2 / 2, sigma, num_users)
    counts = np.clip(np.round(counts), min_interactions, max_interactions).astype(np.int64)

    chosen = []
    chunk = max(1, 2**22 // num_items)  # ~32 MB of float64 keys per chunk
    for start in range(0, num_users, chunk):
        users = np.arange(start, min(start + chunk, num_users))
        # Gumbel top-k: -log(Exp(1)) is Gumbel noise; keys ascending = best first.
        noise = np.maximum(rng.standard_exponential((len(users), num_items), dtype=np.float32), 1e-30)
        keys = np.log(noise) - model.logits(users)
        most = int(counts[users].max())
        top = np.argpartition(keys, most - 1, axis=1)[:, :most]  # the `most` best, unordered
        top = np.take_along_axis(top, np.argsort(np.take_along_axis(keys, top, axis=1), axis=1), axis=1)
        chosen.append(top[np.arange(most)[None, :] < counts[users, None]])
    items = np.concatenate(chosen).astype(np.int64)
    users = np.repeat(np.arange(num_users, dtype=np.int64), counts)
    labels = _split_per_user(users, (rng.random(len(users)),), valid_fraction, test_fraction)
    data = _from_split_labels(users, items, labels, num_users, num_items, name="synthetic")
    return (data, model) if return_model else data


# ---------------------------------------------------------------------------------------
# Dispatcher


def gowalla_dir() -> Path:
    """Directory of the Gowalla data: ``$DSL_GOWALLA_DIR`` or ``<repo>/../shared/data/gowalla``."""
    override = os.environ.get("DSL_GOWALLA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "gowalla"


def load_dataset(spec: str | os.PathLike, embedding_dim: int | None = None, **kwargs) -> InteractionData:
    """Load a dataset by name or path; ``kwargs`` go to the chosen loader.

    * ``"synthetic"`` -> :func:`synthetic`
    * ``"gowalla"`` -> :func:`load_lightgcn_dir` on :func:`gowalla_dir`
    * a directory -> :func:`load_lightgcn_dir` (``format="auto"|"lightgcn"|"triplets"``)
    * a file named ``ratings.dat`` -> :func:`load_movielens`
    * any other file -> :func:`load_triplets`

    An argument the chosen loader does not take raises ``ValueError`` naming it and the
    accepted ones. ``embedding_dim`` (the trainer's table width) makes dense-id loaders
    check the implied table size against the available memory before building anything.

    >>> load_dataset("synthetic", num_users=50, num_items=100).num_items
    100
    >>> load_dataset("synthetic", bogus=1)
    Traceback (most recent call last):
    ...
    ValueError: unknown dataset argument 'bogus' for synthetic; accepted: num_users, num_items, ...
    """
    if isinstance(spec, str) and spec in ("synthetic", "gowalla"):
        path = gowalla_dir() if spec == "gowalla" else None
        if path is not None and not path.is_dir():
            raise FileNotFoundError(
                f"Gowalla data not found at {path}; set DSL_GOWALLA_DIR to the directory with "
                "train.txt, valid.txt and test.txt"
            )
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"dataset {str(spec)!r}: no such file or directory (expected 'synthetic', 'gowalla', "
                "a LightGCN-format directory, a MovieLens ratings.dat or a triplets file)"
            )
    if path is None:
        loader, args = synthetic, ()
    elif path.is_dir():
        loader, args = load_lightgcn_dir, (path,)
        kwargs["embedding_dim"] = embedding_dim
    else:
        loader, args = (load_movielens if path.name == "ratings.dat" else load_triplets), (path,)
    accepted = [name for name in list(inspect.signature(loader).parameters)[len(args):]
                if name not in ("return_model", "embedding_dim")]
    unknown = [name for name in kwargs if name not in accepted and name != "embedding_dim"]
    if unknown:
        raise ValueError(f"unknown dataset argument {unknown[0]!r} for {spec}; accepted: {', '.join(accepted)}")
    return loader(*args, **kwargs)
