"""Train a recommendation backbone dense or sparse and write a run directory.

Command line (``python trainers/train.py --help``)::

    python trainers/train.py --out runs/demo          # two_tower + DSL (s=0.8) on synthetic data
    python trainers/train.py --model lightgcn --dataset gowalla --method dsl --sparsity 0.8 \\
        --epochs 50 --out runs/lgcn_dsl

In-process: ``summary = train(TrainConfig(model="mf_bpr", epochs=5, out="runs/x"))``.

Protocol: ``--protocol test`` (default, the paper's) fits on train+valid and evaluates on
test; ``--protocol valid`` fits on train and evaluates on valid (for tuning). Metrics are
full-ranking Recall / NDCG / HR / Precision @20 with training items excluded.

Update interval: ``--update-interval`` (ΔT) defaults to ``max(1, total_steps // 20)``
(about 20 explorations per run), the paper's ΔT = 2000–20000 being meant for runs of
10⁵+ steps. GMP updates its masks every ΔT steps as well. ``total_steps`` is the planned
length, ``--schedule-epochs`` (default ``--epochs``) × steps per epoch: DSL's ``end_step``,
GMP's pruning phase and OMP's dense phase are placed in it, even if the fit stops earlier.

Early stopping (``--early-stopping``, :mod:`trainers.early_stopping`): a selection fit on
train evaluates Recall@20 on valid every ``--es-every`` epochs for at most ``--epochs``,
stops after ``--es-patience`` evaluations without improvement and restores the best model
(epoch E*). ``--protocol valid``: that model is the run. ``--protocol test``: a fresh model
is then fit on train+valid for E* epochs with the selection's plan (``--schedule-epochs`` =
the budget) and evaluated once on test; test is never read during selection. The same as
``--protocol test --epochs E* --schedule-epochs <budget>`` after a ``--protocol valid``
run. ``summary.json`` records the chosen epoch and the validation curve (``early_stopping``).

Run directory ``--out`` (read back by :func:`trainers.runs.load_run`). The config and the
data are checked first; the run is written to a hidden scratch sibling and renamed to
``--out`` only when complete, so a failed or interrupted run (with ``--overwrite`` too)
never leaves a partial directory nor removes the previous run::

    config.json          everything needed to rebuild the model (model, sizes, hparams, ...)
    weights/ckpt*        tf.train.Checkpoint(model=model)
    masks.npz            table name -> bool mask
    item_popularity.npy  training interactions per item (int64)
    interactions.npz     the training interactions the model was fit on (scipy csr)
    id_maps.npz          user_ids / item_ids: the raw id of every dense id (strings or ints)
    tensorboard/         Keras, DynamicSparsity and evaluation scalars
    summary.json         metrics, densities, active parameters, MACs, memory, time,
                         popularity baseline and the DynamicSparsity exploration log

MAC accounting (the paper's, after Evci et al. / Chen et al.): each backbone reports the
dense forward MACs of its embedding-dependent operations (``trainers.models.Cost``:
dot products, the first layer fed by embeddings, graph propagation), which are
multiplied by the density of the tables (active / total entries) at each step; other
layers count in full. Training MACs = 3 × forward MACs (forward + backward ≈ 2 ×
forward) summed over all training steps with the density of each step, so the dense
phases of GMP / OMP count as dense. Inference MACs are for ranking all items for every
evaluated user with the final model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import resource
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # the CLI loads TensorFlow without start-up log lines (DSL_TF_VERBOSE=1: keep them)
    from trainers import quiet_tensorflow

    quiet_tensorflow()

import dsl_tf  # noqa: E402  (must precede tf.keras)
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainers import baselines, runs  # noqa: E402
from trainers.data import load_dataset  # noqa: E402
from trainers.early_stopping import ValidationEarlyStopping, valid_evaluator  # noqa: E402
from trainers.evaluation import RankingEvaluation, evaluate_full_ranking  # noqa: E402
from trainers.methods import METHODS, Context, DynamicSparse  # noqa: E402
from trainers.models import MODELS, Recommender, build_model  # noqa: E402

STORAGES = ("compact", "dense")
GROWTH_SCORES = ("dense", "int8", "window")
BUDGETS = ("per_layer", "per_row")  # dsl_tf.DynamicSparsity(budget=...) modes the trainers offer
OPTIMIZERS = {"lazy_adam": dsl_tf.LazyAdam, "adam": tf.keras.optimizers.Adam, "catch_up_adam": dsl_tf.CatchUpAdam}
"""``--optimizer``: the optimizer class of every method, called with the learning rate."""

MODEL_DEFAULTS: dict[str, dict] = {
    "two_tower": {"epochs": 20, "batch_size": 1024, "lr": 0.005},
    "mf_bpr": {"epochs": 30, "batch_size": 2048, "lr": 0.005},
    "lightgcn": {"epochs": 20, "batch_size": 1024, "lr": 0.01},
    "neumf": {"epochs": 10, "batch_size": 1024, "lr": 0.002},
    "multvae": {"epochs": 50, "batch_size": 128, "lr": 0.005},
    "cdae": {"epochs": 50, "batch_size": 128, "lr": 0.01},
    "ultragcn": {"epochs": 50, "batch_size": 512, "lr": 1e-4},  # the official Gowalla batch and lr
}
"""Per-model defaults for the fields left ``None`` in :class:`TrainConfig`."""

METRIC_KEYS = ("recall@20", "ndcg@20", "hr@20", "precision@20")


@dataclasses.dataclass
class TrainConfig:
    """Options of one run (the CLI flags; ``None`` = the model's default).

    ``hparams`` override the backbone's hyper-parameters (``dim`` and ``seed`` are set
    from ``dim``/``seed``); ``dataset_args`` go to ``trainers.data.load_dataset``.
    ``storage`` is that of the DSL/RP/SET tables (``"compact"``: only active entries are
    stored and trained, ``dsl_tf.CompactMaskedEmbedding``; ``"dense"``: table + mask),
    ``growth_scores`` that of compact DSL tables (``"dense"``: exact, ``"int8"``: quantised to
    a byte per entry, ``"window"``: the last rows only), ``optimizer`` the one of every method (``"adam"``: Keras Adam, the default;
    ``"lazy_adam"``: ``dsl_tf.LazyAdam``, O(batch) steps, but 10–22 % lower Recall@20 on
    synthetic two_tower at 5 epochs with the same learning rate; ``"catch_up_adam"``: ``dsl_tf.CatchUpAdam``,
    Keras Adam's result with O(batch) steps on compact tables). ``schedule_epochs``: the
    length the sparsity schedules are planned over (default ``epochs``); ``early_stopping``
    and ``es_*``: see the module docstring (``epochs`` is then the budget). ``explore_until``:
    the fraction of the planned steps after which DSL and SET stop exploring (their
    ``end_step``; 1.0, the paper's, explores to the end). ``prune_by``: DSL/SET's pruning
    criterion (``DynamicSparsity(prune_by=...)``: ``"magnitude"``, the paper's, or
    ``"row_relative"``, ``|w| / ‖row‖``, for L2-normalised towers); ``grow_by``: DSL's growth
    criterion (``DynamicSparsity(grow_by=...)``: ``"score"``, the paper's, or ``"row_scaled"``,
    ``|score| · ‖row‖``, its counterpart); ``budget``: DSL/SET/RP's
    ``DynamicSparsity(budget=...)``, ``"per_layer"`` (the paper's) or ``"per_row"`` (every row keeps
    ``budget // rows`` or one more active entries).
    """

    model: str = "two_tower"
    dataset: str = "synthetic"
    dataset_args: dict = dataclasses.field(default_factory=dict)
    method: str = "dsl"
    sparsity: float = 0.8
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    dim: int = 64
    update_interval: int | None = None
    initial_update_ratio: float = 0.5
    decay: str = "cosine"
    seed: int = 0
    eval_every: int = 0
    protocol: str = "test"
    out: str = "runs/demo"
    overwrite: bool = False
    hparams: dict = dataclasses.field(default_factory=dict)
    storage: str = "compact"
    optimizer: str = "adam"
    growth_scores: str = "dense"
    omp_dense_fraction: float = 0.5
    gmp_end_fraction: float = 0.75
    explore_until: float = 1.0
    prune_by: str = "magnitude"
    grow_by: str = "score"
    budget: str = "per_layer"
    verbose: int = 1
    schedule_epochs: int | None = None
    early_stopping: bool = False
    es_every: int = 1
    es_patience: int = 5
    es_min_delta: float = 0.0

    def resolved(self) -> TrainConfig:
        """A validated copy with the per-model defaults filled in."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {sorted(MODELS)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {list(METHODS)}")
        for name, value, choices in (("storage", self.storage, STORAGES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("growth_scores", self.growth_scores, GROWTH_SCORES),
                                     ("prune_by", self.prune_by, dsl_tf.selection.PRUNE_CRITERIA),
                                     ("grow_by", self.grow_by, dsl_tf.selection.GROW_CRITERIA),
                                     ("budget", self.budget, BUDGETS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        if self.protocol not in ("test", "valid"):
            raise ValueError(f"protocol must be 'test' or 'valid', got {self.protocol!r}")
        if self.method != "dense" and not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1) (fraction of pruned entries), got {self.sparsity}")
        filled = {k: v if v is not None else MODEL_DEFAULTS[self.model][k]
                  for k, v in (("epochs", self.epochs), ("batch_size", self.batch_size), ("lr", self.lr))}
        out = dataclasses.replace(self, **filled)
        for name in ("epochs", "batch_size", "dim"):
            if getattr(out, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(out, name)}")
        if not (np.isfinite(out.lr) and out.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {out.lr}")
        if out.update_interval is not None and out.update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {out.update_interval}")
        if out.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {out.eval_every}")
        if out.method == "omp" and out.epochs < 2:
            raise ValueError("method 'omp' needs epochs >= 2 (dense training, then fine-tuning)")
        if not 0.0 < out.explore_until <= 1.0:
            raise ValueError(f"explore_until must be in (0, 1], got {out.explore_until}")
        if not 0.0 < out.omp_dense_fraction < 1.0:
            raise ValueError(f"omp_dense_fraction must be in (0, 1), got {out.omp_dense_fraction}")
        for name in ("schedule_epochs", "es_every", "es_patience"):
            if getattr(out, name) is not None and getattr(out, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(out, name)}")
        if not (np.isfinite(out.es_min_delta) and out.es_min_delta >= 0):
            raise ValueError(f"es_min_delta must be a finite number >= 0, got {out.es_min_delta}")
        return out


class MacCounter(tf.keras.callbacks.Callback):
    """Accumulates training MACs: 3 × forward cost × density, step by step.

    ``cost`` is the model's :class:`trainers.models.Cost` per step and example; the
    density of the tables is taken at the start of every step (so dense phases count as
    dense), averaged per epoch and multiplied by the epoch's examples and steps. Masks
    change only at the start of a ``fit`` and around mask-update steps (DSL explores after
    step ``k·every − 1``, TFMOT prunes during step ``k·every``), so the whole-table density
    is re-read only then: ordinary steps never touch the tables.
    """

    def __init__(self, cost, examples_per_epoch: int, steps_per_epoch: int, mask_update_every: int):
        super().__init__()
        self.cost, self.examples, self.steps = cost, examples_per_epoch, steps_per_epoch
        self.every = mask_update_every
        self.training_macs = 0.0
        self._densities: list[float] = []
        self._density = 1.0
        self._step = 0

    def on_train_begin(self, logs=None):
        self._step = int(self.model.optimizer.iterations)
        self._density = baselines.model_density(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        if self._step % self.every in (0, 1):
            self._density = baselines.model_density(self.model)
        self._densities.append(self._density)
        self._step += 1

    def on_epoch_end(self, epoch, logs=None):
        density = float(np.mean(self._densities)) if self._densities else 1.0
        self.training_macs += 3.0 * self.cost.macs(self.examples, self.steps, density)
        self._densities = []


class EpochTimer(tf.keras.callbacks.Callback):
    """Wall seconds of every epoch and of its training steps (first in the callback list).

    A step runs from this callback's ``on_train_batch_begin`` to its ``on_train_batch_end``,
    which Keras calls before the other callbacks' (so a ``DynamicSparsity`` exploration is
    not in it); an epoch runs from one ``on_epoch_begin`` to the next (or to
    ``on_train_end``), so whatever happens between two epochs (other callbacks'
    ``on_epoch_end``, evaluation, TensorBoard, the dataset iterator's teardown and
    creation) is counted in it. :func:`time_breakdown` adds explorations and the rest.
    To say where the rest went, each epoch also records its largest gap between one
    step's end and the next one's start (the other callbacks' batch hooks; before batch 0:
    from the epoch's start) and the time after its last step.
    """

    def __init__(self):
        super().__init__()
        self.epochs: list[dict] = []
        self._epoch: dict | None = None
        self._batch_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._close()
        now = time.perf_counter()
        self._epoch = {"epoch": epoch, "start": now, "steps": 0, "step_seconds": 0.0,
                       "first_step": int(self.model.optimizer.iterations.numpy()),
                       "largest_gap_seconds": 0.0, "largest_gap_before_batch": 0}
        self._batch_end = now

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()
        gap = self._batch_start - self._batch_end  # other callbacks' batch hooks, or the epoch's start
        if gap > self._epoch["largest_gap_seconds"]:
            self._epoch.update(largest_gap_seconds=gap, largest_gap_before_batch=batch)

    def on_train_batch_end(self, batch, logs=None):
        self._batch_end = time.perf_counter()
        self._epoch["step_seconds"] += self._batch_end - self._batch_start
        self._epoch["steps"] += 1

    def on_train_end(self, logs=None):
        self._close()

    def _close(self) -> None:
        if self._epoch is not None:
            now = time.perf_counter()
            self._epoch["wall_seconds"] = now - self._epoch.pop("start")
            self._epoch["after_last_step_seconds"] = now - self._batch_end  # epoch end hooks, evaluation, ...
            self.epochs.append(self._epoch)
            self._epoch = None


def time_breakdown(epochs: list[dict], explorations: list[dict], evaluations: dict[int, float] | None = None) -> dict:
    """Per epoch and in total: wall = steps + explorations + evaluation + other (seconds).

    ``evaluations`` maps an epoch (0-based) to the seconds its end-of-epoch evaluation took
    (``RankingEvaluation.seconds``, ``ValidationEarlyStopping.seconds``).
    """
    evaluations = evaluations or {}
    rows = []
    for epoch in epochs:
        last = epoch["first_step"] + epoch["steps"]
        explored = sum(e["dsl_seconds"] for e in explorations if epoch["first_step"] < e["dsl_step"] <= last)
        evaluated = evaluations.get(epoch["epoch"], 0.0)
        rows.append({**epoch, "exploration_seconds": explored, "evaluation_seconds": evaluated,
                     "other_seconds": epoch["wall_seconds"] - epoch["step_seconds"] - explored - evaluated})
    total = {key: sum(r[key] for r in rows) for key in
             ("wall_seconds", "step_seconds", "exploration_seconds", "evaluation_seconds", "other_seconds")}
    total["wall_over_steps"] = ((total["wall_seconds"] - total["evaluation_seconds"])
                                / max(total["step_seconds"] + total["exploration_seconds"], 1e-9))
    return {"epochs": rows, "total": total}


class EpochTensorBoard(tf.keras.callbacks.TensorBoard):
    """``TensorBoard`` writing epoch scalars only (``update_freq="epoch"``, no profiling).

    Keras calls every callback's batch hooks once any callback has one (``MacCounter``,
    ``DynamicSparsity``), and TensorBoard's would then build per-batch ``tf.summary`` ops
    with no writer to record them: no output, ~0.03–0.3 s on the first batch (Keras'
    "on_train_batch_end is slow" warning) and a little on every batch. They are skipped.
    """

    def __init__(self, log_dir: str):
        super().__init__(log_dir, write_graph=False, profile_batch=0, update_freq="epoch")

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"run directory {out} exists and is not empty; pass --overwrite to replace it")


def _prepare_out(out: Path) -> Path:
    """A fresh scratch sibling of ``out`` to write the run into (scratch siblings left by dead
    processes are removed first); ``runs.replace_dir`` moves it to ``out`` once complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.remove_stale(out.parent, f"{out.name}.")
    return runs.scratch_dir(out.parent, f"{out.name}.tmp")


def _data_line(data) -> str:
    """The loader's counts, printed at the start of a run."""
    stats = data.stats()
    return (f"[train] data {stats['name']}: {stats['num_users']} users, {stats['num_items']} items; "
            f"train/valid/test {stats['num_train']}/{stats['num_valid']}/{stats['num_test']} interactions; "
            f"{stats.get('duplicates_removed', 0)} duplicates removed, "
            f"{stats.get('overlaps_removed', 0)} pairs dropped as already in an earlier split; "
            f"{stats['users_without_train']} users without training items; "
            f"{stats['cold_test_items']} test-only items (no training interaction)")


def _popularity_metrics(popularity: np.ndarray, train_csr, test_csr) -> dict:
    scores = popularity.astype(np.float32)[None, :]
    return evaluate_full_ranking(lambda users: np.repeat(scores, len(users), 0), train_csr, test_csr)


def _build(cfg: TrainConfig, data, factory=None) -> Recommender:
    hparams = {**cfg.hparams, "dim": cfg.dim, "seed": cfg.seed}
    model = build_model(cfg.model, data.num_users, data.num_items, factory, **hparams)
    model.attach(data.train)
    model.score_all(np.zeros([1], np.int64))  # create every variable
    return model


def train(config: TrainConfig | dict) -> dict:
    """Train one run and write its run directory; returns the summary dict.

    >>> summary = train(TrainConfig(epochs=2, out="/tmp/doc_run", overwrite=True, verbose=0,
    ...                             dataset_args={"num_users": 200, "num_items": 300}))  # doctest: +SKIP
    >>> summary["metrics"]["recall@20"] > summary["popularity"]["recall@20"]  # doctest: +SKIP
    True
    """
    return run_training(config)[1]


def run_training(config: TrainConfig | dict) -> tuple[Recommender, dict]:
    """:func:`train`, also returning the trained (``MaskedEmbedding``) model."""
    if isinstance(config, dict):
        config = TrainConfig(**config)
    cfg = config.resolved()
    start = time.time()
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)  # config, then data, are validated before anything is written
    data = load_dataset(cfg.dataset, embedding_dim=cfg.dim, **cfg.dataset_args)
    if cfg.verbose:
        print(_data_line(data), flush=True)
    work = _prepare_out(out)
    try:
        model, summary = _train(cfg, data, start, out, work)
        _check_out(out, cfg.overwrite)  # again: another process may have written it meanwhile
        runs.replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return model, summary


@dataclasses.dataclass
class _Fit:
    """One fitted model of a run and what its fit measured."""

    cfg: TrainConfig
    model: Recommender
    history: list
    sparsity_cb: dsl_tf.DynamicSparsity | None
    timer: EpochTimer
    macs: MacCounter
    update_interval: int
    seconds: float
    cpu_seconds: float
    stopper: ValidationEarlyStopping | None
    evaluation_seconds: dict[int, float]


def _fit(cfg: TrainConfig, fit_data, eval_csr, tb_dir: Path, select_on=None) -> _Fit:
    """Build and fit ``cfg`` 's model on ``fit_data``; with ``select_on`` (a valid csr), early
    stopping on it (``--eval-every`` curves on ``eval_csr`` otherwise)."""
    tf.keras.utils.set_random_seed(cfg.seed)
    method = METHODS[cfg.method]
    examples = MODELS[cfg.model].num_examples(fit_data.train)
    steps_per_epoch = -(-examples // cfg.batch_size)
    total_steps = (cfg.schedule_epochs or cfg.epochs) * steps_per_epoch
    update_interval = cfg.update_interval or max(1, total_steps // 20)
    ctx = Context(cfg, total_steps, update_interval, lambda factory: _build(cfg, fit_data, factory),
                  str(tb_dir / "dsl"), steps_per_epoch)
    model = method.build(ctx)
    model.compile(optimizer=OPTIMIZERS[cfg.optimizer](cfg.lr))
    dataset = model.make_dataset(fit_data, cfg.batch_size, cfg.seed, repeat=True)  # one iterator per fit
    macs = MacCounter(model.train_cost(cfg.batch_size), examples, steps_per_epoch, method.mask_update_every(ctx))
    timer = EpochTimer()
    callbacks: list = [timer, dsl_tf.CatchUp(), macs, EpochTensorBoard(str(tb_dir))]  # weights caught up first
    stopper = evaluator = None
    if select_on is not None:
        start_epoch = method.selectable_from(ctx)
        if start_epoch > cfg.epochs:
            raise ValueError(f"early stopping: {cfg.method} reaches its final sparsity after epoch {start_epoch - 1} "
                             f"of the {ctx.planned_epochs} planned, beyond the budget of {cfg.epochs} epochs")
        stopper = ValidationEarlyStopping(valid_evaluator(fit_data.train, select_on), every_n_epochs=cfg.es_every,
                                          patience=cfg.es_patience, min_delta=cfg.es_min_delta,
                                          start_epoch=start_epoch)
        callbacks.append(stopper)
    elif cfg.eval_every:
        evaluator = RankingEvaluation(model.scorer, fit_data.train, eval_csr, every_n_epochs=cfg.eval_every,
                                      prefix=f"{cfg.protocol}_", log_dir=str(tb_dir / "eval"))
        callbacks.append(evaluator)
    fit_start, fit_cpu_start = time.time(), time.process_time()
    fit = functools.partial(model.fit, x=dataset, steps_per_epoch=steps_per_epoch, verbose=cfg.verbose)
    model, history, sparsity_cb = method.fit(model, ctx, fit, callbacks)
    return _Fit(cfg, model, history, sparsity_cb, timer, macs, update_interval, time.time() - fit_start,
                time.process_time() - fit_cpu_start, stopper, getattr(stopper or evaluator, "seconds", {}))


def _select(cfg: TrainConfig, data, tb_dir: Path) -> _Fit:
    """Early stopping's selection fit: train on train, choose the epoch on valid."""
    if data.valid.nnz == 0:
        raise ValueError(f"dataset {cfg.dataset!r} has no valid interactions: --early-stopping needs a "
                         "validation split")
    selection = _fit(cfg, data, data.valid, tb_dir, select_on=data.valid)
    stopper = selection.stopper
    if cfg.verbose:
        stopped = f"stopped after epoch {stopper.stopped_epoch}" if stopper.stopped_epoch else "ran the whole budget"
        print(f"[train] early stopping: best epoch {stopper.best_epoch} of {cfg.epochs} (valid recall@20="
              f"{stopper.best_metrics['recall@20']:.4f}), {stopped}", flush=True)
    return selection


def _train(cfg: TrainConfig, data, start: float, out: Path, work: Path) -> tuple[Recommender, dict]:
    """The run itself; everything is written into the scratch directory ``work``."""
    if cfg.protocol == "test":
        fit_data, eval_csr = data.merged_train_valid(), data.test
    else:
        fit_data, eval_csr = data, data.valid
    if eval_csr.nnz == 0:
        raise ValueError(f"dataset {cfg.dataset!r} has no {cfg.protocol} interactions to evaluate on")

    tb_dir = work / "tensorboard"
    selection = None
    if cfg.early_stopping:
        selection = _select(cfg, data, tb_dir if cfg.protocol == "valid" else tb_dir / "selection")
    if selection is not None and cfg.protocol == "valid":
        run = selection
    elif selection is not None:
        retrain = dataclasses.replace(cfg, epochs=selection.stopper.best_epoch, early_stopping=False,
                                      schedule_epochs=cfg.schedule_epochs or cfg.epochs)
        run = _fit(retrain, fit_data, eval_csr, tb_dir)
    else:
        run = _fit(cfg, fit_data, eval_csr, tb_dir)
    model, history, sparsity_cb, macs, update_interval = (run.model, run.history, run.sparsity_cb, run.macs,
                                                           run.update_interval)
    train_seconds = run.seconds
    timing = time_breakdown(run.timer.epochs, sparsity_cb.explorations if sparsity_cb is not None else [],
                            run.evaluation_seconds)
    eval_start = time.time()

    metrics = evaluate_full_ranking(model.scorer(), fit_data.train, eval_csr)
    timing["total"]["final_evaluation_seconds"] = time.time() - eval_start
    popularity = fit_data.item_popularity()
    density = baselines.model_density(model)
    layers = dsl_tf.masked_embeddings(model)
    inference = model.inference_cost().macs(metrics["num_users_evaluated"], 1, density)
    summary = {
        "model": cfg.model,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "protocol": cfg.protocol,
        "sparsity": cfg.sparsity if cfg.method != "dense" else 0.0,
        "metrics": {k: metrics[k] for k in METRIC_KEYS},
        "num_users_evaluated": metrics["num_users_evaluated"],
        "popularity": {k: v for k, v in _popularity_metrics(popularity, fit_data.train, eval_csr).items()
                       if k in METRIC_KEYS},
        "table_density": baselines.table_densities(model),
        "density": density,
        "active_parameters": sum(dsl_tf.masks.active_count(l) for l in layers),
        "embedding_parameters": sum(l.input_dim * l.output_dim for l in layers),
        "training_macs": macs.training_macs,
        "inference_macs": inference,
        "inference_macs_per_user": model.inference_cost().macs(1, 0, density),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "train_seconds": train_seconds,
        "train_cpu_seconds": run.cpu_seconds,  # the fit's CPU time, all threads: less sensitive to other load
        "time": timing,
        "steps": sum(epoch["steps"] for epoch in run.timer.epochs),
        "update_interval": update_interval,
        "schedule_epochs": run.cfg.schedule_epochs or run.cfg.epochs,
        "loss_reduction": "epoch_mean",  # history.loss: mean of each epoch's batch losses
        "history": {k: [float(v) for h in history for v in h.history.get(k, [])]
                    for k in sorted({k for h in history for k in h.history})},
        "explorations": sparsity_cb.explorations if sparsity_cb is not None else [],
    }
    if selection is not None:
        summary["early_stopping"] = {
            **selection.stopper.summary(), "max_epochs": cfg.epochs, "epochs_trained": len(selection.timer.epochs),
            "selection_train_seconds": selection.seconds,
            "retrained_epochs": run.cfg.epochs if run is not selection else None,
        }
    _write_run(work, run.cfg, model, fit_data, popularity, update_interval, summary)
    summary["wall_seconds"] = time.time() - start
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if cfg.verbose:
        line = ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items())
        pop = summary["popularity"]["recall@20"]
        print(f"[train] {cfg.model}/{cfg.method} s={summary['sparsity']}: {line} (popularity recall@20={pop:.4f}); "
              f"density={density:.4f}; {summary['wall_seconds']:.1f}s -> {out}")
        t = timing["total"]
        print(f"[train] time: {len(timing['epochs'])} epochs {t['wall_seconds']:.1f}s = steps {t['step_seconds']:.1f}s "
              f"+ explorations {t['exploration_seconds']:.1f}s + evaluations {t['evaluation_seconds']:.1f}s "
              f"+ other {t['other_seconds']:.1f}s (epoch wall without evaluations / steps and explorations "
              f"{t['wall_over_steps']:.2f}); final evaluation {t['final_evaluation_seconds']:.1f}s")
    return model, summary


def _write_run(out: Path, cfg: TrainConfig, model: Recommender, fit_data, popularity, update_interval: int,
               summary: dict) -> None:
    config = {
        "model": cfg.model,
        "num_users": model.num_users,
        "num_items": model.num_items,
        "hparams": json.loads(json.dumps(dict(model.hparams), default=list)),
        "method": cfg.method,
        "sparsity": summary["sparsity"],
        "dataset": cfg.dataset,
        "dataset_args": cfg.dataset_args,
        "protocol": cfg.protocol,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "update_interval": update_interval,
        "schedule_epochs": cfg.schedule_epochs or cfg.epochs,
        "early_stopping": cfg.early_stopping,
        "initial_update_ratio": cfg.initial_update_ratio,
        "decay": cfg.decay,
        "explore_until": cfg.explore_until,
        "prune_by": cfg.prune_by,
        "grow_by": cfg.grow_by,
        "budget": cfg.budget,
        "storage": cfg.storage if isinstance(METHODS[cfg.method], DynamicSparse) else "dense",
        "growth_scores": cfg.growth_scores,
        "optimizer": cfg.optimizer,
        "tables": {l.name: [l.input_dim, l.output_dim] for l in dsl_tf.masked_embeddings(model)},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tf.train.Checkpoint(model=model).write(str(out / "weights" / "ckpt"))
    np.savez(out / "masks.npz", **{l.name: l.dense_mask().numpy() for l in dsl_tf.masked_embeddings(model)})
    np.save(out / "item_popularity.npy", popularity.astype(np.int64))
    sp.save_npz(out / "interactions.npz", sp.csr_matrix(fit_data.train))
    runs.IdMaps.of(fit_data.user_ids, fit_data.item_ids, model.num_users, model.num_items).save(out)


# ------------------------------------------------------------------------------- CLI
def key_values(items: list[str], flag: str) -> dict:
    """``KEY=VALUE`` strings as a dict, values parsed as JSON where they are JSON."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainers/train.py",
        description="Train a recommendation backbone dense or sparse (DSL and baselines) and write a run "
                    "directory (config.json, weights/, masks.npz, summary.json, tensorboard/).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="two_tower", choices=sorted(MODELS), help="backbone")
    p.add_argument("--dataset", default="synthetic", help="'synthetic', 'gowalla', or a dataset path")
    p.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra loader argument, e.g. num_users=500 for synthetic (repeatable)")
    p.add_argument("--method", default="dsl", choices=list(METHODS), help="sparsification method")
    p.add_argument("--storage", default="compact", choices=STORAGES,
                   help="DSL/RP/SET tables: compact (only active entries stored and trained) or dense (table + mask)")
    p.add_argument("--growth-scores", default="dense", choices=list(GROWTH_SCORES),
                   help="compact DSL growth scores: exact over the table (4 bytes per entry), int8 (1 byte per "
                        "entry), or over the last looked-up rows only")
    p.add_argument("--optimizer", default="adam", choices=list(OPTIMIZERS),
                   help="every method: Keras adam, lazy_adam (O(batch) steps on embedding rows; "
                        "lower Recall at the same lr so far) or catch_up_adam (Adam, O(batch) steps)")
    p.add_argument("--sparsity", type=float, default=0.8, help="target fraction of pruned embedding entries")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: per model)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: per model)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per model)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--update-interval", type=int, default=None,
                   help="ΔT, steps between explorations (default: max(1, total_steps // 20))")
    p.add_argument("--initial-update-ratio", type=float, default=0.5, help="ρ0, initial fraction swapped")
    p.add_argument("--decay", default="cosine", choices=["cosine", "linear", "constant"], help="ρ_t decay")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, init, masks)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--protocol", default="test", choices=["test", "valid"],
                   help="test: fit train+valid, evaluate test; valid: fit train, evaluate valid")
    p.add_argument("--early-stopping", action="store_true",
                   help="choose the epoch count on valid (at most --epochs); with --protocol test, then refit on "
                        "train+valid for that many epochs and evaluate on test")
    p.add_argument("--es-every", type=int, default=1, help="early stopping: evaluate valid Recall@20 every N epochs")
    p.add_argument("--es-patience", type=int, default=5,
                   help="early stopping: evaluations without improvement before stopping")
    p.add_argument("--es-min-delta", type=float, default=0.0, help="early stopping: smallest improvement counted")
    p.add_argument("--schedule-epochs", type=int, default=None,
                   help="epochs the sparsity schedules (DSL end_step and ΔT, GMP, OMP) are planned over "
                        "(default: --epochs)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="backbone hyper-parameter, e.g. temperature=0.05 (repeatable)")
    p.add_argument("--omp-dense-fraction", type=float, default=0.5, help="OMP: fraction of epochs trained dense")
    p.add_argument("--explore-until", type=float, default=1.0,
                   help="DSL/SET: fraction of the planned steps after which masks stay fixed (end_step)")
    p.add_argument("--prune-by", default="magnitude", choices=list(dsl_tf.selection.PRUNE_CRITERIA),
                   help="DSL/SET pruning criterion: |w| (paper) or |w| / row norm (for L2-normalised towers)")
    p.add_argument("--grow-by", default="score", choices=list(dsl_tf.selection.GROW_CRITERIA),
                   help="DSL growth criterion: |growth score| (paper) or |score| x row norm (with --prune-by row_relative)")
    p.add_argument("--budget", default="per_layer", choices=list(BUDGETS),
                   help="DSL/SET/RP: one budget per table (paper), or also a fixed count of active entries per row")
    p.add_argument("--gmp-end-fraction", type=float, default=0.75,
                   help="GMP: fraction of training after which sparsity is final")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Keras fit verbosity")
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The resolved :class:`TrainConfig` of command-line arguments: every flag is the field of
    the same name (``--dataset-arg``/``--hparam`` fill ``dataset_args``/``hparams``)."""
    args = vars(parser().parse_args(argv))
    try:
        args["dataset_args"] = key_values(args.pop("dataset_arg"), "--dataset-arg")
        args["hparams"] = key_values(args.pop("hparam"), "--hparam")
        return TrainConfig(**args).resolved()
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser().error(str(err))


def main(argv: list[str] | None = None) -> dict:
    config = config_from_args(argv)
    try:
        return train(config)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"trainers/train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
