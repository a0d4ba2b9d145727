"""Full-ranking top-K evaluation (LightGCN protocol), popularity-group analysis, Keras callback.

This module is the one owner of ranking metrics in the project. Every user with at least
one test item (and, by default, at least one training item) ranks *all* items, with the
user's training items excluded, and the metrics are averaged over those users:

* ``recall@K = hits / |test items of u|``
* ``precision@K = hits / K``
* ``hr@K = 1 if hits > 0 else 0``
* ``ndcg@K = DCG / IDCG``, binary relevance, ``DCG = sum over hits of 1 / log2(rank + 2)``
  (0-based rank), ``IDCG`` the same over the first ``min(|test|, K)`` ranks.

>>> import numpy as np, scipy.sparse as sp
>>> train = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
>>> test = sp.csr_matrix(np.array([[0, 0, 1, 0], [0, 1, 0, 0]], dtype=np.float32))
>>> users = np.eye(2, dtype=np.float32)
>>> items = np.array([[9, 0], [1, 0.5], [2, 0], [0, 1]], dtype=np.float32)
>>> m = evaluate_full_ranking(embedding_score_fn(users, items), train, test, ks=(1, 2))
>>> m["recall@1"], m["recall@2"], round(m["ndcg@2"], 4), m["num_users_evaluated"]
(0.5, 1.0, 0.8155, 2)
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Sequence, Union

import numpy as np
import scipy.sparse as sp
import tensorflow as tf

ScoreFn = Callable[[np.ndarray], Union[np.ndarray, tf.Tensor]]
"""``score_fn(user_ids int64[B]) -> scores [B, num_items]`` (numpy array or tf.Tensor)."""

_BLOCK = 64  # items per block in _masked_top_k
_CHUNK_FLOATS = 2**22  # default chunk: 16 MB of float32 scores (small buffers are reused by malloc)


def embedding_score_fn(user_matrix, item_matrix) -> ScoreFn:
    """Dot-product scorer ``scores = user_matrix[users] @ item_matrix.T`` (a TF matmul per chunk).

    ``tf.Variable`` arguments are read at call time, so the scorer follows training;
    numpy arrays are converted to constants once.

    >>> score = embedding_score_fn(np.ones((3, 2)), np.arange(8.0).reshape(4, 2))
    >>> score(np.array([0, 2])).numpy().tolist()
    [[1.0, 5.0, 9.0, 13.0], [1.0, 5.0, 9.0, 13.0]]
    """
    users_t, items_t = (
        m if isinstance(m, tf.Variable) else tf.convert_to_tensor(m, dtype=tf.float32)
        for m in (user_matrix, item_matrix)
    )

    def score(user_ids: np.ndarray) -> tf.Tensor:
        return tf.matmul(tf.gather(users_t, user_ids), items_t, transpose_b=True)

    return score


def _binary_csr(matrix) -> sp.csr_matrix:
    """Canonical csr whose stored entries are the relevant / seen items (values ignored)."""
    matrix = sp.csr_matrix(matrix)
    if not matrix.has_canonical_format or (matrix.nnz and not matrix.data.all()):
        matrix = matrix.copy()
        matrix.sum_duplicates()
        matrix.eliminate_zeros()
        matrix.data[:] = 1.0
    return matrix


def _evaluated_users(train_csr, test_csr, users, skip_cold_users: bool) -> np.ndarray:
    num_users = test_csr.shape[0]
    candidates = np.arange(num_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    if candidates.size and (candidates.min() < 0 or candidates.max() >= num_users):
        raise ValueError(f"users must be in [0, {num_users}), got min {candidates.min()} max {candidates.max()}")
    keep = np.diff(test_csr.indptr)[candidates] > 0
    if skip_cold_users:
        keep &= np.diff(train_csr.indptr)[candidates] > 0
    return candidates[keep]


@tf.function(
    input_signature=[
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None, 2], tf.int32),
        tf.TensorSpec([], tf.int32),
        tf.TensorSpec([], tf.int32),
    ]
)
def _masked_top_k(scores: tf.Tensor, exclude: tf.Tensor, k: tf.Tensor, block: tf.Tensor):
    """Row-wise ``tf.math.top_k(scores, k)`` with the ``exclude`` ``[row, item]`` entries at -inf.

    Same result as the plain op (ties -> lower index) at a fraction of the cost for wide
    rows: rows are cut into blocks of ``block`` items and the ``k`` blocks with the
    largest maxima hold the top-k items (any other block is beaten by k block maxima),
    so only those ``k * block`` candidates, in item order, are ranked. Needs
    ``ceil(num_items / block) >= k``. Also returns whether a non-excluded score is NaN
    (``reduce_max`` propagates NaN into the block maxima).
    """
    rows, num_items = tf.shape(scores)[0], tf.shape(scores)[1]
    num_blocks = (num_items + block - 1) // block
    padded = tf.pad(scores, [[0, 0], [0, num_blocks * block - num_items]], constant_values=-np.inf)
    padded = tf.tensor_scatter_nd_update(padded, exclude, tf.fill(tf.shape(exclude)[:1], -np.inf))
    block_max = tf.reduce_max(tf.reshape(padded, [rows, num_blocks, block]), axis=2)
    top_blocks = tf.sort(tf.math.top_k(block_max, k).indices, axis=1)
    candidates = tf.reshape(top_blocks[:, :, None] * block + tf.range(block), [rows, k * block])
    values, position = tf.math.top_k(tf.gather(padded, candidates, batch_dims=1), k)
    has_nan = tf.reduce_any(tf.math.is_nan(block_max))
    return values, tf.gather(candidates, position, batch_dims=1), has_nan


def _ranked_hits(score_fn: ScoreFn, train_csr, test_csr, users: np.ndarray, k: int, chunk_size: int) -> np.ndarray:
    """Boolean ``[len(users), k]``: is the item at each of the top-k ranks a test item."""
    num_items = train_csr.shape[1]
    block = min(_BLOCK, max(1, num_items // (4 * k)))
    hits = np.zeros((len(users), k), dtype=bool)
    for start in range(0, len(users), chunk_size):
        chunk = users[start : start + chunk_size]
        scores = tf.convert_to_tensor(score_fn(chunk), dtype=tf.float32)
        if tuple(scores.shape) != (len(chunk), num_items):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected {(len(chunk), num_items)}")
        seen = train_csr[chunk].tocoo()
        exclude = np.stack([seen.row, seen.col], axis=1).astype(np.int32)
        values, top, has_nan = _masked_top_k(scores, exclude, tf.constant(k), tf.constant(block))
        if has_nan:
            raise ValueError("score_fn returned NaN scores")
        truth = test_csr[chunk]
        truth_keys = np.repeat(np.arange(len(chunk), dtype=np.int64), np.diff(truth.indptr)) * num_items
        truth_keys += truth.indices  # sorted: csr rows are canonical
        keys = np.arange(len(chunk), dtype=np.int64)[:, None] * num_items + top.numpy()
        position = np.minimum(np.searchsorted(truth_keys, keys), len(truth_keys) - 1)
        hits[start : start + len(chunk)] = (truth_keys[position] == keys) & (values.numpy() > -np.inf)
    return hits


def _per_user_metrics(
    score_fn: ScoreFn,
    train_csr,
    test_csr,
    ks: Sequence[int],
    users,
    chunk_size: int | None,
    skip_cold_users: bool,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    train_csr, test_csr = _binary_csr(train_csr), _binary_csr(test_csr)
    if train_csr.shape != test_csr.shape:
        raise ValueError(f"train shape {train_csr.shape} != test shape {test_csr.shape}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > train_csr.shape[1]:
        raise ValueError(f"ks must be in [1, num_items={train_csr.shape[1]}], got {ks}")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_FLOATS // train_csr.shape[1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    evaluated = _evaluated_users(train_csr, test_csr, users, skip_cold_users)
    if evaluated.size == 0:
        raise ValueError("no user to evaluate: none has a test item (and a training item)")
    hits = _ranked_hits(score_fn, train_csr, test_csr, evaluated, ks[-1], chunk_size)
    num_test = np.diff(test_csr.indptr)[evaluated].astype(np.float64)
    discount = 1.0 / np.log2(np.arange(ks[-1]) + 2.0)
    ideal = np.cumsum(discount)
    out = {}
    for k in ks:
        num_hits = hits[:, :k].sum(axis=1).astype(np.float64)
        out[f"recall@{k}"] = num_hits / num_test
        out[f"precision@{k}"] = num_hits / k
        out[f"hr@{k}"] = (num_hits > 0).astype(np.float64)
        dcg = hits[:, :k] @ discount[:k]
        out[f"ndcg@{k}"] = dcg / ideal[np.minimum(num_test, k).astype(np.int64) - 1]
    return evaluated, out


def evaluate_full_ranking(
    score_fn: ScoreFn,
    train_csr: sp.spmatrix,
    test_csr: sp.spmatrix,
    ks: Sequence[int] = (20,),
    users: np.ndarray | None = None,
    chunk_size: int | None = None,
    skip_cold_users: bool = True,
) -> dict[str, float]:
    """Recall / NDCG / HR / Precision @K over all items, train items excluded.

    Args:
      score_fn: ``score_fn(user_ids int64[B]) -> [B, num_items]`` scores (numpy or
        tf.Tensor), e.g. from :func:`embedding_score_fn`. NaN scores raise ValueError.
      train_csr: ``[num_users, num_items]`` interactions excluded from each user's
        ranking (use train+valid for the final test evaluation).
      test_csr: ``[num_users, num_items]`` held-out relevant items.
      ks: cutoffs; every metric is reported for each.
      users: evaluate only these users (default: all).
      chunk_size: users scored per ``score_fn`` call; default: as many as fit 2**22
        scores (16 MB; 102 users for Gowalla). Peak memory ~ 2 chunk score matrices.
      skip_cold_users: leave out users without any training item.

    Returns:
      ``{"recall@K": float, "ndcg@K": ..., "hr@K": ..., "precision@K": ..., ...}`` for
      each K, averaged over the evaluated users (>= 1 test item), plus
      ``"num_users_evaluated": int``.

    Ranking is exactly ``tf.math.top_k`` over the scores with training items at -inf
    (ties go to the lower item id), computed by block pruning. Items scored -inf never
    count as hits. A test item that is also a training item is excluded and can never be
    hit, but still counts in |test|.
    """
    evaluated, per_user = _per_user_metrics(score_fn, train_csr, test_csr, ks, users, chunk_size, skip_cold_users)
    out: dict[str, float] = {key: float(values.mean()) for key, values in per_user.items()}
    out["num_users_evaluated"] = int(evaluated.size)
    return out


def popularity_groups(counts, num_groups: int = 10) -> np.ndarray:
    """Split users or items into ``num_groups`` equal-size groups by popularity.

    Entities are sorted by ``counts`` ascending (ties by id) and cut into groups whose
    sizes differ by at most one; larger group id = more popular (paper Fig. 4).

    >>> popularity_groups([5, 1, 3, 3, 0, 9], num_groups=3).tolist()
    [2, 0, 1, 1, 0, 2]
    """
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    if not 1 <= num_groups <= len(counts):
        raise ValueError(f"num_groups must be in [1, {len(counts)}], got {num_groups}")
    rank = np.empty(len(counts), dtype=np.int64)
    rank[np.argsort(counts, kind="stable")] = np.arange(len(counts))
    return rank * num_groups // len(counts)


def group_density(effective_table, groups, num_groups: int | None = None) -> np.ndarray:
    """Per-group mean fraction of nonzero entries in embedding rows (paper §4.5.1).

    Args:
      effective_table: ``[num_rows, dim]`` effective (masked) embedding table, numpy or TF.
      groups: group id per row, e.g. :func:`popularity_groups` of item popularity.
      num_groups: number of groups (default ``max(groups) + 1``); empty groups give NaN.

    >>> table = np.array([[1, 0], [1, 1], [0, 0], [2, 3]])
    >>> group_density(table, np.array([0, 1, 0, 1])).tolist()
    [0.25, 1.0]
    """
    table = np.asarray(effective_table)
    groups = np.asarray(groups, dtype=np.int64)
    if table.ndim != 2 or groups.shape != (table.shape[0],):
        raise ValueError(f"need a 2-D table and one group per row, got {table.shape} and {groups.shape}")
    num_groups = int(groups.max()) + 1 if num_groups is None else num_groups
    row_density = np.count_nonzero(table, axis=1) / table.shape[1]
    sizes = np.bincount(groups, minlength=num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(groups, weights=row_density, minlength=num_groups) / sizes


def evaluate_by_group(
    score_fn: ScoreFn,
    train_csr: sp.spmatrix,
    test_csr: sp.spmatrix,
    ks: Sequence[int] = (20,),
    num_groups: int = 10,
    users: np.ndarray | None = None,
    chunk_size: int | None = None,
    skip_cold_users: bool = True,
) -> dict[str, np.ndarray]:
    """Recall / NDCG per user-activity group.

    Users (all rows of ``train_csr``) are grouped by their number of training items with
    :func:`popularity_groups` (group ``num_groups - 1`` = most active); the metrics of
    :func:`evaluate_full_ranking` are then averaged within each group.

    Returns:
      ``{"group": int[G], "num_users": int[G] evaluated users per group,
      "recall@K": float[G], "ndcg@K": float[G]}`` (NaN for groups with no evaluated user).
    """
    train = sp.csr_matrix(train_csr)
    activity_groups = popularity_groups(np.diff(train.indptr), num_groups)
    evaluated, per_user = _per_user_metrics(score_fn, train, test_csr, ks, users, chunk_size, skip_cold_users)
    groups = activity_groups[evaluated]
    sizes = np.bincount(groups, minlength=num_groups)
    out = {"group": np.arange(num_groups), "num_users": sizes}
    with np.errstate(invalid="ignore", divide="ignore"):
        for key, values in per_user.items():
            if key.startswith(("recall@", "ndcg@")):
                out[key] = np.bincount(groups, weights=values, minlength=num_groups) / sizes
    return out


def _is_factory(fn: Callable) -> bool:
    """True if ``fn`` can be called with no argument but not with one (a scorer factory)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind()
    except TypeError:
        return False
    try:
        signature.bind(None)
    except TypeError:
        return True
    return False


class RankingEvaluation(tf.keras.callbacks.Callback):
    """Keras callback: full-ranking metrics every ``every_n_epochs`` epochs.

    The metrics (``prefix + "recall@20"`` etc.) are added to the epoch ``logs``, so they
    appear in the ``History`` returned by ``fit`` (only for evaluated epochs) and can
    drive ``EarlyStopping``/``ModelCheckpoint``; with ``log_dir`` they are also written
    as TensorBoard scalars (step = epoch). ``results`` keeps ``(epoch, metrics)`` pairs.

    Args:
      score_fn: a scorer ``f(user_ids) -> scores`` or a factory ``f() -> scorer`` (any
        callable that takes no argument). It is called at evaluation time, so it sees the
        current weights; a factory runs once per evaluation (e.g. to propagate a graph
        model once, then score every chunk from the propagated embeddings).
      train_csr, test_csr, ks: as in :func:`evaluate_full_ranking`.
      every_n_epochs: evaluate after epochs N, 2N, ... (1-based).
      prefix: prepended to metric names in ``logs``.
      log_dir: TensorBoard log directory, or None.
      **eval_kwargs: ``users``, ``chunk_size``, ``skip_cold_users`` for the evaluation.

    >>> import numpy as np, scipy.sparse as sp, tensorflow as tf
    >>> emb = tf.Variable(np.eye(4, dtype=np.float32))
    >>> train = sp.csr_matrix(np.eye(4, dtype=np.float32)[:, ::-1])  # user u saw item 3 - u
    >>> test = sp.csr_matrix(np.eye(4, dtype=np.float32))
    >>> cb = RankingEvaluation(lambda: embedding_score_fn(emb, emb), train, test, ks=(1,))
    >>> logs = {}
    >>> cb.on_epoch_end(0, logs)
    >>> logs["val_recall@1"]
    1.0
    """

    def __init__(
        self,
        score_fn: Callable,
        train_csr: sp.spmatrix,
        test_csr: sp.spmatrix,
        ks: Sequence[int] = (20,),
        every_n_epochs: int = 1,
        prefix: str = "val_",
        log_dir: str | None = None,
        **eval_kwargs,
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        unknown = set(eval_kwargs) - {"users", "chunk_size", "skip_cold_users"}
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        self.score_fn = score_fn
        self.is_factory = _is_factory(score_fn)
        self.train_csr = sp.csr_matrix(train_csr)
        self.test_csr = sp.csr_matrix(test_csr)
        self.ks = tuple(ks)
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.log_dir = log_dir
        self.eval_kwargs = eval_kwargs
        self.results: list[tuple[int, dict[str, float]]] = []
        self.seconds: dict[int, float] = {}  # epoch (0-based) -> wall seconds of its evaluation
        self._writer = None

    def evaluate(self) -> dict[str, float]:
        """Metrics for the current weights, keys prefixed (no logging)."""
        score_fn = self.score_fn() if self.is_factory else self.score_fn
        metrics = evaluate_full_ranking(score_fn, self.train_csr, self.test_csr, self.ks, **self.eval_kwargs)
        return {self.prefix + key: value for key, value in metrics.items() if key != "num_users_evaluated"}

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        start = time.perf_counter()
        metrics = self.evaluate()
        self.seconds[epoch] = time.perf_counter() - start
        self.results.append((epoch, metrics))
        if logs is not None:
            logs.update(metrics)
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(str(self.log_dir))
            with self._writer.as_default():
                for key, value in metrics.items():
                    tf.summary.scalar(key, value, step=epoch)
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
