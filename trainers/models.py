"""Recommendation backbones whose id embeddings are :class:`dsl_tf.MaskedEmbedding` tables.

Every model is a ``tfrs.models.Model`` (its ``train_step`` differentiates
:meth:`Recommender.compute_loss` with a ``tf.GradientTape``), so ``model.fit`` plus
:class:`dsl_tf.DynamicSparsity` trains it sparse; without the callback it is the dense
model. Every model exposes:

* ``score_all(user_ids int64[B]) -> float32[B, num_items]`` for full-ranking evaluation;
* ``user_tower`` / ``item_tower``: for dot-product retrieval models (``two_tower``,
  ``mf_bpr``, ``ultragcn``), Keras layers mapping int64 ids ``[B]`` to vectors ``[B, d]`` whose first
  layer is the ``MaskedEmbedding`` (scores are ``user_tower(u) · item_tower(i)``);
  ``None`` for the others;
* ``train_cost(batch_size)`` / ``inference_cost()``: dense forward MACs of the
  embedding-dependent operations (see :class:`Cost`), for the paper's MAC accounting.

``fit``'s ``History`` ``loss`` is the mean of the epoch's batch losses (a running mean
during the epoch, as Keras reports compiled losses), not TFRS's last-batch value.

>>> import dsl_tf
>>> from trainers.models import build_model
>>> model = build_model("mf_bpr", num_users=10, num_items=20, dim=8)
>>> model.score_all(np.array([0, 3])).shape
TensorShape([2, 20])
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from typing import Callable, ClassVar

import dsl_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tf.keras is touched)
import numpy as np
import scipy.sparse as sp
import tensorflow as tf
import tensorflow_recommenders as tfrs
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as sparse_csr  # CSR matmul: not in tf.*

from trainers.evaluation import embedding_score_fn

EmbeddingFactory = Callable[..., tf.keras.layers.Layer]
"""``factory(input_dim, output_dim, name=..., embeddings_initializer=...) -> layer``."""


@dataclasses.dataclass(frozen=True)
class Cost:
    """Dense forward MACs of a model's operations, split by what they scale with.

    ``sparse_*`` are the MACs of operations that read embedding entries (dot products,
    the first layer fed by embeddings, graph propagation of the tables); under sparsity
    they are counted × the tables' density (the paper's accounting). ``dense_per_example``
    are MACs of the other layers (e.g. NeuMF's deeper MLP), always counted in full.
    Per-step costs are paid once per optimizer step / scoring pass (LightGCN's
    propagation), per-example costs once per training example / scored user.
    """

    sparse_per_example: float
    sparse_per_step: float = 0.0
    dense_per_example: float = 0.0

    def macs(self, examples: float, steps: float, density: float) -> float:
        """Forward MACs of ``steps`` steps over ``examples`` examples at ``density``."""
        sparse = self.sparse_per_example * examples + self.sparse_per_step * steps
        return density * sparse + self.dense_per_example * examples


def masked_embedding(input_dim: int, output_dim: int, **kwargs) -> tf.keras.layers.Layer:
    """The default embedding factory: a :class:`dsl_tf.MaskedEmbedding`."""
    return dsl_tf.MaskedEmbedding(input_dim, output_dim, **kwargs)


def step_keyed_batches(
    columns: dict[str, np.ndarray], batch_size: int, seed: int, model: tf.keras.Model, repeat: bool = False
) -> tf.data.Dataset:
    """Batches of the rows of ``columns``, reshuffled every pass over them.

    A pass's order is a stateless permutation keyed by ``(seed, the training step at which
    the pass starts)``, not by how many passes this dataset object has made (as
    ``shuffle(reshuffle_each_iteration=True)`` does): the epochs of a ``fit`` start at
    different steps, so they get different orders, and an epoch replayed after
    ``tf.keras.callbacks.BackupAndRestore`` restored the step gets the order it had in the
    uninterrupted run. The step is read while the training step fetches its batch, so
    ``model``'s step must make its step increment wait for the batch, as
    :meth:`Recommender.train_step` does (Keras' optimizer increments with no data dependency).

    * ``repeat=False``: one pass per iteration, keyed by ``model.optimizer.iterations``
      read when the pass starts (until ``model`` is compiled, by the pass count instead);
      the cardinality is known, ``ceil(rows / batch_size)``: ``model.fit(ds, epochs=E)``.
    * ``repeat=True``: endless passes from one iterator, for ``model.fit(ds, epochs=E,
      steps_per_epoch=ceil(rows / batch_size))``. Keras then keeps one iterator for the
      whole ``fit`` instead of destroying and re-creating it between epochs, which cost
      0.3–4 s per epoch (the iterator's destructor waits for its tf.data threads; issue 15).
      The step is read once, when the iterator starts (at ``fit``'s start, or its resume):
      pass ``p`` is keyed by ``p × steps`` (the step it starts at when every epoch is one
      pass) and a fit resumed mid-pass skips the batches already trained, so the batches
      equal the ``repeat=False`` ones of an uninterrupted run.

    >>> import numpy as np, tensorflow as tf
    >>> model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> ds = step_keyed_batches({"x": np.arange(5)}, 2, seed=0, model=model)
    >>> int(ds.cardinality()), sorted(np.concatenate([b["x"] for b in ds.as_numpy_iterator()]).tolist())
    (3, [0, 1, 2, 3, 4])
    >>> endless = step_keyed_batches({"x": np.arange(5)}, 2, seed=0, model=model, repeat=True)
    >>> [b["x"].tolist() for b in endless.take(3).as_numpy_iterator()] == [
    ...     b["x"].tolist() for b in ds.as_numpy_iterator()]
    True
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rows = len(next(iter(columns.values())))
    steps = -(-rows // batch_size)
    tensors = {name: tf.constant(values) for name, values in columns.items()}
    passes = itertools.count(1)


    def batches(step):  # one pass, in the order keyed by ``step``
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(rows, dtype=tf.int64), tf.stack([tf.constant(seed, tf.int64), step]))
        return tf.data.Dataset.range(steps).map(lambda b: {
            name: tf.gather(t, perm[b * batch_size:(b + 1) * batch_size]) for name, t in tensors.items()})

    def read_step(fallback):  # the training step when the pipeline gets here; ``fallback()`` before compile
        def step() -> np.int64:
            optimizer = getattr(model, "optimizer", None)
            return np.int64(optimizer.iterations.numpy() if optimizer is not None else fallback())
        return tf.reshape(tf.py_function(step, [], tf.int64), [])

    if not repeat:
        ds = tf.data.Dataset.from_tensors(0).map(lambda _: read_step(lambda: -next(passes))).flat_map(batches)
        return ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(tf.data.AUTOTUNE)

    def from_step(start):  # every pass from the one ``start`` falls in, its first batches skipped
        first = start // steps
        return tf.data.Dataset.range(first, tf.int64.max).flat_map(
            lambda p: batches(p * steps).skip(tf.where(p == first, start % steps, 0)))

    ds = tf.data.Dataset.from_tensors(0).map(lambda _: read_step(lambda: 0)).flat_map(from_step)
    return ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)).prefetch(
        tf.data.AUTOTUNE)


class Recommender(tfrs.models.Model):
    """Base class: hyper-parameters, embedding tables, datasets and costs.

    Subclasses set ``HPARAMS`` (name → default), ``REFERENCE`` (the paper) and implement
    ``compute_loss``, ``score_all`` and the costs. ``compute_loss`` calls every table
    exactly once with ``training=training`` (TFMOT's pruning wrappers count steps by
    training calls). Hyper-parameters are validated against
    ``HPARAMS`` and available as ``self.hp.<name>``; ``self.hparams`` is the full dict
    stored in a run's ``config.json``.

    Args:
      num_users, num_items: table sizes.
      embedding_factory: builds every id table (default: ``MaskedEmbedding``); the GMP
        baseline passes TFMOT-wrapped plain ``Embedding`` tables instead.
      **hparams: overrides of ``HPARAMS``.
    """

    HPARAMS: ClassVar[dict] = {}
    REFERENCE: ClassVar[str] = ""
    needs_interactions: ClassVar[bool] = False
    """True if scoring needs the training interactions (graph / user history):
    call :meth:`attach` before training or scoring."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_factory: EmbeddingFactory | None = None,
        **hparams,
    ):
        super().__init__()
        if num_users < 1 or num_items < 1:
            raise ValueError(f"num_users and num_items must be >= 1, got {num_users}, {num_items}")
        unknown = sorted(set(hparams) - set(self.HPARAMS))
        if unknown:
            raise ValueError(
                f"unknown hyper-parameters {unknown} for {type(self).__name__}; "
                f"valid: {sorted(self.HPARAMS)}"
            )
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.hparams = {**self.HPARAMS, **hparams}
        self.hp = types.SimpleNamespace(**self.hparams)
        self._factory = embedding_factory or masked_embedding
        self.user_tower = None
        self.item_tower = None
        self._attached = False
        self._num_tables = 0
        # Not an attribute Keras tracks: checkpoints of earlier runs have no such variables.
        self.__dict__["_epoch_loss"] = tf.keras.metrics.Mean(name="loss")

    @property
    def metrics(self) -> list:
        """Keras resets these at the start of every epoch (the epoch-mean ``loss`` included)."""
        return [*super().metrics, self.__dict__["_epoch_loss"]]

    def train_step(self, inputs) -> dict:
        """TFRS's step, with ``loss`` the running mean over the epoch's batches.

        ``tfrs.models.Model.train_step`` returns the batch's loss, so Keras' ``History`` would
        hold the loss of each epoch's last batch; ``regularization_loss`` and ``total_loss``
        stay per-batch values.

        Every op of the step waits for the batch: the optimizer's step increment has no data
        dependency on it, so it could run before :func:`step_keyed_batches` read the step that
        keys a pass, and that pass was shuffled by step ``s`` or ``s + 1`` depending on thread
        scheduling.
        """
        with tf.control_dependencies(tf.nest.flatten(inputs)):
            logs = super().train_step(inputs)
        mean = self.__dict__["_epoch_loss"]
        mean.update_state(logs["loss"])
        return {**logs, "loss": mean.result()}

    def embedding(self, rows: int, dim: int, name: str) -> tf.keras.layers.Layer:
        """A new id table (``MaskedEmbedding`` unless another factory was given).

        Initialised ``N(0, init_std²)`` from ``(seed, table index)``, so tables differ
        from each other and runs with the same seed start identical.
        """
        seed = self.hp.seed * 1000 + self._num_tables
        self._num_tables += 1
        init = tf.keras.initializers.RandomNormal(stddev=self.hp.init_std, seed=seed)
        return self._factory(rows, dim, name=name, embeddings_initializer=init)

    # ------------------------------------------------------------------ data
    def attach(self, train: sp.csr_matrix) -> None:
        """Give the model the training interactions ``[num_users, num_items]``.

        Required before training (sampling probabilities, graph, histories) and, when
        ``needs_interactions``, before scoring. Not part of the checkpoint.
        """
        if train.shape != (self.num_users, self.num_items):
            raise ValueError(f"interactions have shape {train.shape}, expected {(self.num_users, self.num_items)}")
        self._attach(sp.csr_matrix(train, dtype=np.float32))
        self._attached = True

    def _attach(self, train: sp.csr_matrix) -> None:
        pass

    def _check_attached(self) -> None:
        if not self._attached:
            raise ValueError(f"{type(self).__name__} needs model.attach(train_csr) first")

    def make_dataset(self, data, batch_size: int, seed: int, repeat: bool = False) -> tf.data.Dataset:
        """Training batches: ``{"user_id", "item_id"}`` pairs (one pass over train pairs, or
        endless passes with ``repeat``).

        Reshuffled every epoch, each epoch's order a function of ``(seed, training step)``:
        an interrupted ``fit`` resumed with ``BackupAndRestore`` sees the same batches as an
        uninterrupted one (see :func:`step_keyed_batches`).
        """
        users, items = data.train_pairs()
        return step_keyed_batches({"user_id": users, "item_id": items}, batch_size, seed, self, repeat)

    @staticmethod
    def num_examples(train: sp.csr_matrix) -> int:
        """Training examples per epoch (interactions; users for autoencoders)."""
        return int(train.nnz)

    # ------------------------------------------------------------------ scoring
    def score_all(self, user_ids) -> tf.Tensor:
        """Scores of every item for ``user_ids``: float32 ``[B, num_items]``."""
        raise NotImplementedError

    def scorer(self) -> Callable[[np.ndarray], tf.Tensor]:
        """A ``score_fn`` for ``trainers.evaluation``, valid for the current weights.

        Dot-product models compute every user and item vector once here, not once per
        chunk of evaluated users.
        """
        if self.user_tower is None:
            return self.score_all
        return embedding_score_fn(self.user_tower(self._all(self.num_users)),
                                  self.item_tower(self._all(self.num_items)))

    def train_cost(self, batch_size: int) -> Cost:
        raise NotImplementedError

    def inference_cost(self) -> Cost:
        """Dense MACs of ranking all items: per scored user, plus per scoring pass."""
        raise NotImplementedError

    def _all(self, count: int) -> tf.Tensor:
        return tf.range(count, dtype=tf.int64)

    def _negatives(self, shape) -> tf.Tensor:
        """Uniformly sampled item ids (sampled negatives)."""
        return tf.random.uniform(shape, 0, self.num_items, dtype=tf.int64)


_COMMON = {"dim": 64, "init_std": 0.1, "seed": 0}


# ======================================================================= retrieval
class TwoTower(Recommender):
    """Two-tower retrieval with in-batch softmax and log-q correction.

    Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
    Recommendations", RecSys 2019. User and item towers are id embeddings followed by L2
    normalisation (``normalize``); the loss is ``tfrs.tasks.Retrieval``'s softmax over
    the batch's items with logits ``u·i / temperature − log q(i)``, where ``q(i)`` is the
    item's frequency among training pairs (its probability of being an in-batch
    negative), and accidental hits (the positive item elsewhere in the batch) removed.

    >>> m = TwoTower(5, 7, dim=4)
    >>> m.attach(sp.csr_matrix(np.eye(5, 7, dtype=np.float32)))
    >>> float(m.compute_loss({"user_id": tf.constant([0, 1]), "item_id": tf.constant([0, 1])})) > 0
    True
    """

    HPARAMS = {**_COMMON, "temperature": 0.2, "normalize": True}
    REFERENCE = "Yi et al. 2019, Sampling-bias-corrected neural modeling (RecSys)"

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        d = self.hp.dim
        self.user_tower = self._tower(self.embedding(num_users, d, "user_embedding"))
        self.item_tower = self._tower(self.embedding(num_items, d, "item_embedding"))
        self.task = tfrs.tasks.Retrieval(temperature=self.hp.temperature, remove_accidental_hits=True)
        self._log_q = None

    def _tower(self, table: tf.keras.layers.Layer) -> tf.keras.Sequential:
        layers = [table, tf.keras.layers.UnitNormalization()] if self.hp.normalize else [table]
        return tf.keras.Sequential(layers)

    def _attach(self, train: sp.csr_matrix) -> None:
        counts = np.bincount(train.indices, minlength=self.num_items).astype(np.float64)
        self._log_q = tf.constant(np.maximum(counts, 1.0) / max(train.nnz, 1), tf.float32)

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        self._check_attached()
        items = inputs["item_id"]
        return self.task(
            self.user_tower(inputs["user_id"], training=training),
            self.item_tower(items, training=training),
            candidate_sampling_probability=tf.gather(self._log_q, items),
            candidate_ids=items,
            compute_metrics=False,
        )

    def score_all(self, user_ids) -> tf.Tensor:
        users = self.user_tower(tf.convert_to_tensor(user_ids, tf.int64))
        return tf.matmul(users, self.item_tower(self._all(self.num_items)), transpose_b=True)

    def train_cost(self, batch_size: int) -> Cost:
        return Cost(sparse_per_example=batch_size * self.hp.dim)  # one row of B×B logits

    def inference_cost(self) -> Cost:
        return Cost(sparse_per_example=self.num_items * self.hp.dim)


# ======================================================================= BPR models
class _BPRModel(Recommender):
    """Pairwise BPR loss with one uniformly sampled negative per positive pair.

    ``loss = mean softplus(s(u, j) − s(u, i)) + l2 · mean(‖e_u‖² + ‖e_i‖² + ‖e_j‖²) / 2``
    over the batch, with ``e`` the (masked) looked-up id embeddings of ``user_table`` /
    ``item_table`` and ``s(u, i)`` the dot product of the final vectors from ``_vectors``.
    """

    def _vectors(self, users: tf.Tensor, items: tf.Tensor, training: bool):
        """``(final users, final items, ego users, ego items)`` vectors of the given ids."""
        raise NotImplementedError

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        users, pos = inputs["user_id"], inputs["item_id"]
        neg = self._negatives(tf.shape(pos))
        u, items, ego_u, ego_items = self._vectors(users, tf.concat([pos, neg], 0), training)
        i, j = tf.split(items, 2)
        bpr = tf.reduce_mean(tf.nn.softplus(tf.reduce_sum(u * (j - i), -1)))
        reg = (tf.reduce_sum(tf.square(ego_u)) + tf.reduce_sum(tf.square(ego_items))) / 2.0
        return bpr + self.hp.l2 * reg / tf.cast(tf.shape(users)[0], tf.float32)


class MFBPR(_BPRModel):
    """Matrix factorisation trained with BPR (Rendle et al., UAI 2009).

    ``s(u, i) = e_u · e_i``. ``user_tower`` / ``item_tower`` are the two tables.
    """

    HPARAMS = {**_COMMON, "l2": 1e-4}
    REFERENCE = "Rendle et al. 2009, BPR: Bayesian personalized ranking from implicit feedback (UAI)"

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        self.user_table = self.user_tower = self.embedding(num_users, self.hp.dim, "user_embedding")
        self.item_table = self.item_tower = self.embedding(num_items, self.hp.dim, "item_embedding")

    def _vectors(self, users, items, training):
        u, i = self.user_table(users, training=training), self.item_table(items, training=training)
        return u, i, u, i

    def score_all(self, user_ids) -> tf.Tensor:
        users = self.user_table(tf.convert_to_tensor(user_ids, tf.int64))
        return tf.matmul(users, self.item_table(self._all(self.num_items)), transpose_b=True)

    def train_cost(self, batch_size: int) -> Cost:
        return Cost(sparse_per_example=2 * self.hp.dim)

    def inference_cost(self) -> Cost:
        return Cost(sparse_per_example=self.num_items * self.hp.dim)


class LightGCN(_BPRModel):
    """LightGCN (He et al., SIGIR 2020): linear propagation on the user–item graph.

    ``E⁽ᵏ⁺¹⁾ = Â E⁽ᵏ⁾`` with ``Â = D^{-1/2} A D^{-1/2}`` the normalised adjacency of the
    bipartite graph over ``[users; items]``, final vectors the
    mean of ``E⁽⁰⁾ … E⁽ᴸ⁾``; ``E⁽⁰⁾`` is the concatenation of the user and item
    ``MaskedEmbedding`` tables. ``Â`` is held as a CSR sparse matrix
    (``SparseMatrixMatMul``). Every training step propagates the whole graph.
    """

    HPARAMS = {**_COMMON, "l2": 1e-4, "num_layers": 3}
    REFERENCE = "He et al. 2020, LightGCN: simplifying and powering graph convolution network (SIGIR)"
    needs_interactions = True

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        self.user_table = self.embedding(num_users, self.hp.dim, "user_embedding")
        self.item_table = self.embedding(num_items, self.hp.dim, "item_embedding")
        self._adjacency = None
        self._nnz = 0

    def _attach(self, train: sp.csr_matrix) -> None:
        n = self.num_users + self.num_items
        graph = sp.bmat([[None, train], [train.T, None]], format="coo", dtype=np.float32)
        degree = np.asarray(graph.sum(axis=1)).ravel()
        inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
        values = inv_sqrt[graph.row] * inv_sqrt[graph.col]
        indices = np.stack([graph.row, graph.col], 1).astype(np.int64)
        adjacency = tf.sparse.reorder(tf.SparseTensor(indices, values.astype(np.float32), [n, n]))
        # CSR form: SparseMatrixMatMul is multi-threaded, ~8x faster on CPU than
        # sparse_dense_matmul on Gowalla's graph (0.12 s vs 0.94 s per 64-wide product).
        self._adjacency = sparse_csr.CSRSparseMatrix(adjacency)
        self._nnz = int(graph.nnz)

    def _spmm(self, x: tf.Tensor) -> tf.Tensor:
        """``Â x``; its gradient is ``Â dy`` because ``Â`` is symmetric."""
        adjacency = self._adjacency

        @tf.custom_gradient
        def product(x):
            def grad(dy):
                return sparse_csr.matmul(adjacency, dy)
            return sparse_csr.matmul(adjacency, x), grad

        return product(x)

    def propagate(self, training: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
        """``(final [U + I, d], ego [U + I, d])`` representations of the whole graph
        (users first, then items)."""
        self._check_attached()
        ego = tf.concat([self.user_table(self._all(self.num_users), training=training),
                         self.item_table(self._all(self.num_items), training=training)], 0)
        layer, total = ego, ego
        for _ in range(self.hp.num_layers):
            layer = self._spmm(layer)
            total += layer
        return total / float(self.hp.num_layers + 1), ego

    def _vectors(self, users, items, training):
        final, ego = self.propagate(training)
        items = items + self.num_users
        return tf.gather(final, users), tf.gather(final, items), tf.gather(ego, users), tf.gather(ego, items)

    def scorer(self):
        final, _ = self.propagate()  # once per evaluation
        all_users, all_items = final[: self.num_users], final[self.num_users:]
        return lambda user_ids: tf.matmul(tf.gather(all_users, user_ids), all_items, transpose_b=True)

    def score_all(self, user_ids) -> tf.Tensor:
        return self.scorer()(tf.convert_to_tensor(user_ids, tf.int64))

    def train_cost(self, batch_size: int) -> Cost:
        return Cost(sparse_per_example=2 * self.hp.dim, sparse_per_step=self._propagation_macs())

    def inference_cost(self) -> Cost:
        return Cost(sparse_per_example=self.num_items * self.hp.dim, sparse_per_step=self._propagation_macs())

    def _propagation_macs(self) -> float:
        self._check_attached()
        return float(self.hp.num_layers * self._nnz * self.hp.dim)


# ======================================================================= UltraGCN
def ultragcn_degree_weights(train: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """UltraGCN's constraint factors ``(β_u [U], β_i [I])`` from the training graph's degrees.

    ``β_{u,i} = β_u · β_i`` with ``β_u = sqrt(d_u + 1) / d_u`` and ``β_i = 1 / sqrt(d_i + 1)``
    (``d`` = number of training interactions; Mao et al. 2021, Eq. 8, as the official code
    computes it). Users without training interaction get ``β_u = 0`` (they are in no
    training pair).

    >>> bu, bi = ultragcn_degree_weights(sp.csr_matrix(np.array([[1, 1], [0, 1]], np.float32)))
    >>> bu.astype(float).round(4).tolist(), bi.astype(float).round(4).tolist()
    ([0.866, 1.4142], [0.7071, 0.5774])
    """
    train = sp.csr_matrix(train)
    users = np.diff(train.indptr).astype(np.float64)
    items = np.bincount(train.indices, minlength=train.shape[1]).astype(np.float64)
    beta_u = np.divide(np.sqrt(users + 1.0), users, out=np.zeros_like(users), where=users > 0)
    return beta_u.astype(np.float32), (1.0 / np.sqrt(items + 1.0)).astype(np.float32)


def item_neighbors(train: sp.csr_matrix, k: int, diagonal_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``k`` nearest neighbours on the item–item co-occurrence graph ``G = AᵀA``.

    Weights as the official UltraGCN code computes them (``get_ii_constraint_mat``):
    ``ω_ij = G_ij · sqrt(g_i + 1) / g_i / sqrt(g_j + 1)`` with ``g`` the row sums of ``G``,
    whose diagonal ``G_ii`` (the item's degree) is kept unless ``diagonal_zero`` (the paper's
    Eq. 12 writes ``G_ij / (g_i − G_ii) · sqrt(g_i / g_j)``). Per item the ``k`` largest
    float32 weights, ties to the lower item id (``tf.math.top_k``); an item with fewer than
    ``k`` co-occurring items is padded with itself at weight 0. Rows are ranked in blocks of
    2^25 dense entries (Gowalla's train split, 34.6 M entries in ``G``: ~10 s on 2 cores).

    Returns:
      ``(ids int64 [I, k], weights float32 [I, k])``, weights non-increasing along each row.

    >>> a = sp.csr_matrix(np.array([[1, 1, 0], [0, 1, 1], [0, 1, 0]], np.float32))
    >>> ids, w = item_neighbors(a, 2, diagonal_zero=True)
    >>> ids.tolist(), w.astype(float).round(4).tolist()  # g = [1, 2, 1]: ω_01 = √2/√3, ω_10 = √3/2/√2
    ([[1, 0], [0, 2], [1, 2]], [[0.8165, 0.0], [0.6124, 0.6124], [0.8165, 0.0]])
    """
    num_items = train.shape[1]
    if not 1 <= k <= num_items:
        raise ValueError(f"k must be in [1, {num_items}] (the number of items), got {k}")
    a = sp.csr_matrix(train, dtype=np.float32)  # co-occurrence counts are exact in float32 below 2^24
    graph = (a.T @ a).tocsr()
    if diagonal_zero:
        graph.setdiag(0.0)
        graph.eliminate_zeros()
    g = np.asarray(graph.sum(axis=1, dtype=np.float64)).ravel()
    left = np.divide(np.sqrt(g + 1.0), g, out=np.zeros_like(g), where=g > 0)
    right = 1.0 / np.sqrt(g + 1.0)
    ids = np.empty((num_items, k), np.int64)
    weights = np.empty((num_items, k), np.float32)
    block = max(1, 2**25 // num_items)
    dense = np.zeros((block, num_items), np.float32)
    for start in range(0, num_items, block):
        stop = min(num_items, start + block)
        lo, hi = graph.indptr[start], graph.indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(graph.indptr[start:stop + 1]))
        cols = graph.indices[lo:hi]
        dense[rows, cols] = graph.data[lo:hi] * left[start + rows] * right[cols]
        values, top = tf.math.top_k(dense[: stop - start], k)
        dense[rows, cols] = 0.0
        weights[start:stop] = values.numpy()
        ids[start:stop] = np.where(weights[start:stop] > 0, top.numpy(), np.arange(start, stop)[:, None])
    return ids, weights


class UltraGCN(MFBPR):
    """UltraGCN (Mao et al., CIKM 2021): matrix factorisation trained with the constraint
    losses that approximate infinite-layer graph convolution; scores ``e_u · e_i``.

    Loss per positive pair ``(u, i)`` with negatives ``N`` drawn uniformly over all items,
    summed over the batch and divided by the batch size (the official code sums)::

        (w1 + w2 β_ui) softplus(−e_u·e_i) + negative_weight · mean_{j∈N} (w3 + w4 β_uj) softplus(e_u·e_j)
        + ii_weight · Σ_{j∈S(i)} ω_ij softplus(−e_u·e_j)   +   l2 / 2 · ‖θ‖²

    i.e. the weighted BCE that merges L_O and the user–item constraint loss L_C (β from
    :func:`ultragcn_degree_weights`) plus λ·L_I over the positive item's ``ii_neighbors``
    nearest items ``S(i)`` on the item co-occurrence graph (:func:`item_neighbors`), and L2
    with γ = ``l2``. Defaults are the official Gowalla configuration (dim 64, init std 1e-4,
    w1 = w3 = 1e-6, w2 = w4 = 1, 1,500 negatives at weight 300, γ = 1e-4, λ = 5e-4, 10
    neighbours; trainer defaults batch 512, lr 1e-4). Two choices differ from that code,
    each with the official behaviour one hyper-parameter away:

    * ``negatives="all"`` (default): the negative term's exact expectation over the official
      code's uniform draw, i.e. its mean over every item (a ``[B, I]`` matmul on the whole
      item table; ``num_negatives`` unused). ``"per_pair"``: the official sampling,
      ``num_negatives`` independent draws per pair, ``B·N`` gathered rows (768 k per Gowalla
      step). Same Recall@20 on synthetic data (0.3462 both, 300 users × 400 items, N=50,
      10 epochs); per Gowalla step (batch 512, 2 loaded cores) 0.21 s vs 0.41 s with
      ``MaskedEmbedding`` tables and 0.41 s vs 3.3 s with ``CompactMaskedEmbedding``. One
      draw of N items shared by the batch was tried and dropped (Recall@20 0.098 there).
    * ``l2_scope="batch"`` (default): ``‖θ‖²`` over the rows the step looks up (users,
      positives, negatives, neighbours), O(batch) as the other models; ``"table"``: over
      both whole tables every step, as the official code (O(table) per step).

    ``user_tower`` / ``item_tower`` are the two tables (exported like ``mf_bpr``). The
    constants (β, neighbours) are computed from ``attach`` 's interactions when the loss is
    first traced, so scoring and loading a run do not pay for them.
    """

    HPARAMS = {**_COMMON, "init_std": 1e-4, "l2": 1e-4, "w1": 1e-6, "w2": 1.0, "w3": 1e-6, "w4": 1.0,
               "num_negatives": 1500, "negative_weight": 300.0, "ii_weight": 5e-4, "ii_neighbors": 10,
               "ii_diagonal_zero": False, "negatives": "all", "l2_scope": "batch"}
    REFERENCE = ("Mao et al. 2021, UltraGCN: ultra simplification of graph convolutional networks for "
                 "recommendation (CIKM)")

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        for name, value, choices in (("negatives", self.hp.negatives, ("per_pair", "all")),
                                     ("l2_scope", self.hp.l2_scope, ("batch", "table"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        for name in ("num_negatives", "ii_neighbors"):
            if int(getattr(self.hp, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self.hp, name)!r}")
        self._train = None
        self._constants = None

    def _attach(self, train: sp.csr_matrix) -> None:
        self._train, self._constants = train, None

    def constraint_constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(β_u, β_i, neighbour ids [I, K], neighbour weights [I, K])`` of the attached data."""
        self._check_attached()
        if self._constants is None:
            beta_u, beta_i = ultragcn_degree_weights(self._train)
            with tf.init_scope():  # eager even when first called while tracing the loss
                ids, weights = item_neighbors(self._train, int(self.hp.ii_neighbors), bool(self.hp.ii_diagonal_zero))
            self._constants = beta_u, beta_i, ids, weights
        return self._constants

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        hp = self.hp
        beta_u, beta_i, neighbors, neighbor_weights = (tf.constant(c) for c in self.constraint_constants())
        users, pos = tf.cast(inputs["user_id"], tf.int64), tf.cast(inputs["item_id"], tf.int64)
        batch, count = tf.shape(pos)[0], int(hp.num_negatives)
        neg = self._all(self.num_items) if hp.negatives == "all" else self._negatives([batch, count])
        near = tf.gather(neighbors, pos)  # [B, K]
        u = self.user_table(users, training=training)
        items = self.item_table(tf.concat([pos, tf.reshape(neg, [-1]), tf.reshape(near, [-1])], 0),
                                training=training)  # every table is called once per step
        e_pos, e_neg, e_near = tf.split(items, [batch, tf.size(neg), tf.size(near)])
        if hp.negatives == "all":
            neg_logits = tf.matmul(u, e_neg, transpose_b=True)  # [B, I]
        else:
            neg_logits = tf.einsum("bd,bnd->bn", u, tf.reshape(e_neg, [batch, count, -1]))
        b_u = tf.gather(beta_u, users)
        w_pos = hp.w1 + hp.w2 * b_u * tf.gather(beta_i, pos)
        w_neg = hp.w3 + hp.w4 * b_u[:, None] * tf.gather(beta_i, neg)  # [B, N] or [B, I]
        pos_logits = tf.reduce_sum(u * e_pos, -1)
        loss_l = (w_pos * tf.nn.softplus(-pos_logits)
                  + hp.negative_weight * tf.reduce_mean(w_neg * tf.nn.softplus(neg_logits), -1))
        near_logits = tf.einsum("bd,bkd->bk", u, tf.reshape(e_near, [batch, tf.shape(near)[1], -1]))
        loss_i = tf.reduce_sum(tf.gather(neighbor_weights, pos) * tf.nn.softplus(-near_logits), -1)
        if hp.l2_scope == "batch":
            norm = tf.reduce_sum(tf.square(u)) + tf.reduce_sum(tf.square(items))
        else:
            norm = tf.add_n([tf.reduce_sum(tf.square(w)) for table in (self.user_table, self.item_table)
                             for w in table.trainable_weights])
        total = tf.reduce_sum(loss_l) + hp.ii_weight * tf.reduce_sum(loss_i) + hp.l2 * norm / 2.0
        return total / tf.cast(batch, tf.float32)

    def train_cost(self, batch_size: int) -> Cost:
        negatives = self.num_items if self.hp.negatives == "all" else int(self.hp.num_negatives)
        return Cost(sparse_per_example=(1 + negatives + int(self.hp.ii_neighbors)) * self.hp.dim)


# ======================================================================= NeuMF
class NeuMF(Recommender):
    """Neural matrix factorisation (He et al., WWW 2017): GMF + MLP, pointwise BCE.

    ``logit(u, i) = h · [e^G_u ⊙ e^G_i ; MLP([e^M_u ; e^M_i])]`` with four
    ``MaskedEmbedding`` tables (GMF and MLP, users and items), trained with binary
    cross-entropy on each positive pair and ``num_negatives`` uniform negatives.
    ``mlp_layers`` are the hidden sizes of the MLP tower.
    """

    HPARAMS = {**_COMMON, "mlp_layers": (64, 32), "num_negatives": 4}
    REFERENCE = "He et al. 2017, Neural collaborative filtering (WWW)"

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        d, hidden = self.hp.dim, list(self.hp.mlp_layers)
        if not hidden:
            raise ValueError("mlp_layers must list at least one hidden size")
        self.user_gmf = self.embedding(num_users, d, "user_gmf_embedding")
        self.item_gmf = self.embedding(num_items, d, "item_gmf_embedding")
        self.user_mlp = self.embedding(num_users, d, "user_mlp_embedding")
        self.item_mlp = self.embedding(num_items, d, "item_mlp_embedding")
        # The first MLP layer on [e_u; e_i] is split in two so that scoring all items
        # computes e_u W_u once per user and e_i W_i once per item.
        self.first_user = tf.keras.layers.Dense(hidden[0], use_bias=True)
        self.first_item = tf.keras.layers.Dense(hidden[0], use_bias=False)
        self.mlp = tf.keras.Sequential([tf.keras.layers.Dense(h, activation="relu") for h in hidden[1:]])
        self.head = tf.keras.layers.Dense(1)

    def _logits(self, users: tf.Tensor, items: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Logits for users [B] × items [B, K] → [B, K]."""
        t = training
        gmf = self.user_gmf(users, training=t)[:, None, :] * self.item_gmf(items, training=t)
        first = (self.first_user(self.user_mlp(users, training=t))[:, None, :]
                 + self.first_item(self.item_mlp(items, training=t)))
        mlp = self.mlp(tf.nn.relu(first))
        return tf.squeeze(self.head(tf.concat([gmf, mlp], -1)), -1)

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        users, pos = inputs["user_id"], inputs["item_id"]
        neg = self._negatives([tf.shape(pos)[0], self.hp.num_negatives])
        logits = self._logits(users, tf.concat([pos[:, None], neg], 1), training)
        labels = tf.concat([tf.ones_like(logits[:, :1]), tf.zeros_like(logits[:, 1:])], 1)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))

    def score_all(self, user_ids) -> tf.Tensor:
        users = tf.convert_to_tensor(user_ids, tf.int64)
        items = tf.broadcast_to(self._all(self.num_items), [tf.shape(users)[0], self.num_items])
        return self._logits(users, items)

    def _costs(self) -> tuple[float, float]:
        """(sparse, dense) MACs of one (user, item) logit."""
        d, hidden = self.hp.dim, list(self.hp.mlp_layers)
        sparse = d + 2 * d * hidden[0] + d  # GMF product, first MLP layer, GMF part of head
        dense = sum(a * b for a, b in zip(hidden, hidden[1:])) + hidden[-1]
        return sparse, dense

    def train_cost(self, batch_size: int) -> Cost:
        sparse, dense = self._costs()
        k = 1 + self.hp.num_negatives
        return Cost(sparse_per_example=k * sparse, dense_per_example=k * dense)

    def inference_cost(self) -> Cost:
        sparse, dense = self._costs()
        return Cost(sparse_per_example=self.num_items * sparse, dense_per_example=self.num_items * dense)


# ======================================================================= autoencoders
class _Autoencoder(Recommender):
    """Autoencoders over a user's item history; one training example per user.

    The input layer is an item ``MaskedEmbedding`` ``W_in [num_items, hidden]``: the
    hidden pre-activation is ``Σ_j x_j W_in[j]`` over the user's (dropped-out) history,
    gathered row by row, O(history · hidden). The output layer is another item
    ``MaskedEmbedding`` ``W_out``: ``logits = h W_outᵀ + b``.
    """

    needs_interactions = True

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        self.item_input = self.embedding(num_items, self.hidden_dim, "item_input_embedding")
        self.item_output = self.embedding(num_items, self.hidden_dim, "item_output_embedding")
        self.output_bias = self.add_weight(name="output_bias", shape=(num_items,), initializer="zeros")
        self._history = None
        self._mean_history = 0.0

    @property
    def hidden_dim(self) -> int:
        """Width of the input and output item tables."""
        return self.hp.hidden_dim

    def _attach(self, train: sp.csr_matrix) -> None:
        self._history = tf.RaggedTensor.from_row_splits(
            tf.constant(train.indices, tf.int64), tf.constant(train.indptr, tf.int64))
        self._mean_history = train.nnz / self.num_users

    def make_dataset(self, data, batch_size: int, seed: int, repeat: bool = False) -> tf.data.Dataset:
        users = np.flatnonzero(np.diff(data.train.indptr) > 0).astype(np.int64)
        return step_keyed_batches({"user_id": users}, batch_size, seed, self, repeat)

    @staticmethod
    def num_examples(train: sp.csr_matrix) -> int:
        return int(np.count_nonzero(np.diff(train.indptr)))

    def _encode_history(self, users: tf.Tensor, dropout: float, training: bool, normalize: bool):
        """``Σ_j x_j W_in[j]`` over each user's history [B, hidden], plus the multi-hot x."""
        self._check_attached()
        history = tf.gather(self._history, users)
        items = history.flat_values
        rows = history.value_rowids()
        weights = tf.ones_like(items, tf.float32)
        if training and dropout > 0:
            keep = tf.random.uniform(tf.shape(items)) >= dropout
            weights = tf.cast(keep, tf.float32) / (1.0 - dropout)
        if normalize:
            norm = tf.math.unsorted_segment_sum(tf.square(weights), rows, tf.shape(users)[0])
            weights = weights * tf.gather(tf.math.rsqrt(tf.maximum(norm, 1e-12)), rows)
        rows_in = self.item_input(items, training=training)
        pre = tf.math.unsorted_segment_sum(weights[:, None] * rows_in, rows, tf.shape(users)[0])
        target = tf.scatter_nd(tf.stack([rows, items], 1), tf.ones_like(items, tf.float32),
                               tf.cast([tf.shape(users)[0], self.num_items], tf.int64))
        return pre, target

    def _output_logits(self, hidden: tf.Tensor, training: bool) -> tf.Tensor:
        table = self.item_output(self._all(self.num_items), training=training)
        return tf.matmul(hidden, table, transpose_b=True) + self.output_bias

    def _sparse_costs(self) -> float:
        return (self._mean_history + self.num_items) * self.hidden_dim


class MultVAE(_Autoencoder):
    """Variational autoencoder with multinomial likelihood (Liang et al., WWW 2018).

    ``x → dropout → L2-normalise → tanh(x W_in + b) → (μ, log σ²) → z → tanh(z W + b)
    → softmax(· W_outᵀ + b)``; loss ``−Σ x log softmax + β KL`` with β annealed linearly
    to ``beta_max`` over ``anneal_steps`` optimizer steps. Scoring uses ``z = μ``.
    """

    HPARAMS = {**_COMMON, "hidden_dim": 256, "dropout": 0.5, "beta_max": 0.2, "anneal_steps": 2000}
    REFERENCE = "Liang et al. 2018, Variational autoencoders for collaborative filtering (WWW)"

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        self.input_bias = self.add_weight(name="input_bias", shape=(self.hp.hidden_dim,), initializer="zeros")
        self.latent = tf.keras.layers.Dense(2 * self.hp.dim)
        self.decoder = tf.keras.layers.Dense(self.hp.hidden_dim, activation="tanh")
        self._steps = tf.Variable(0, trainable=False, dtype=tf.int64)

    def _forward(self, users: tf.Tensor, training: bool):
        pre, target = self._encode_history(users, self.hp.dropout, training, normalize=True)
        mu, log_var = tf.split(self.latent(tf.tanh(pre + self.input_bias)), 2, -1)
        z = mu + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mu)) if training else mu
        return self._output_logits(self.decoder(z), training), target, mu, log_var

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        logits, target, mu, log_var = self._forward(inputs["user_id"], training)
        nll = -tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(logits) * target, -1))
        kl = tf.reduce_mean(0.5 * tf.reduce_sum(tf.exp(log_var) + tf.square(mu) - 1.0 - log_var, -1))
        if training:
            self._steps.assign_add(1)
        beta = self.hp.beta_max * tf.minimum(1.0, tf.cast(self._steps, tf.float32) / self.hp.anneal_steps)
        return nll + beta * kl

    def score_all(self, user_ids) -> tf.Tensor:
        return self._forward(tf.convert_to_tensor(user_ids, tf.int64), training=False)[0]

    def _dense_costs(self) -> float:
        return 2 * self.hp.hidden_dim * self.hp.dim + self.hp.dim * self.hp.hidden_dim

    def train_cost(self, batch_size: int) -> Cost:
        return Cost(sparse_per_example=self._sparse_costs(), dense_per_example=self._dense_costs())

    def inference_cost(self) -> Cost:
        return self.train_cost(1)


class CDAE(_Autoencoder):
    """Collaborative denoising autoencoder (Wu et al., WSDM 2016).

    ``h = sigmoid(Σ_j x̃_j W_in[j] + V_u + b)`` with ``x̃`` the history with items
    dropped at rate ``corruption`` (rescaled), ``V`` a user ``MaskedEmbedding``; output
    ``sigmoid(h W_outᵀ + b')`` trained with binary cross-entropy over all items. The
    hidden size is ``dim``.
    """

    HPARAMS = {**_COMMON, "corruption": 0.2}
    REFERENCE = "Wu et al. 2016, Collaborative denoising auto-encoders for top-N recommender systems (WSDM)"

    def __init__(self, num_users: int, num_items: int, embedding_factory=None, **hparams):
        super().__init__(num_users, num_items, embedding_factory, **hparams)
        self.user_table = self.embedding(num_users, self.hp.dim, "user_embedding")
        self.input_bias = self.add_weight(name="input_bias", shape=(self.hp.dim,), initializer="zeros")

    @property
    def hidden_dim(self) -> int:
        return self.hp.dim

    def _forward(self, users: tf.Tensor, training: bool):
        pre, target = self._encode_history(users, self.hp.corruption, training, normalize=False)
        hidden = tf.sigmoid(pre + self.user_table(users, training=training) + self.input_bias)
        return self._output_logits(hidden, training), target

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        logits, target = self._forward(inputs["user_id"], training)
        return tf.reduce_mean(tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(target, logits), -1))

    def score_all(self, user_ids) -> tf.Tensor:
        return self._forward(tf.convert_to_tensor(user_ids, tf.int64), training=False)[0]

    def train_cost(self, batch_size: int) -> Cost:
        return Cost(sparse_per_example=self._sparse_costs() + self.hp.dim)

    def inference_cost(self) -> Cost:
        return self.train_cost(1)


MODELS: dict[str, type[Recommender]] = {
    "two_tower": TwoTower,
    "mf_bpr": MFBPR,
    "lightgcn": LightGCN,
    "neumf": NeuMF,
    "multvae": MultVAE,
    "cdae": CDAE,
    "ultragcn": UltraGCN,
}


def build_model(
    name: str,
    num_users: int,
    num_items: int,
    embedding_factory: EmbeddingFactory | None = None,
    **hparams,
) -> Recommender:
    """Build backbone ``name`` (a key of :data:`MODELS`) with ``hparams`` overrides.

    >>> build_model("two_tower", 10, 20, dim=8).hparams["dim"]
    8
    >>> build_model("nope", 1, 1)
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'nope'; choose from ['cdae', 'lightgcn', 'mf_bpr', 'multvae', 'neumf', 'two_tower', 'ultragcn']
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](num_users, num_items, embedding_factory, **hparams)
