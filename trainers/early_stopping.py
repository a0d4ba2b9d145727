"""Early stopping on the validation split, restoring the best model exactly.

:class:`ValidationEarlyStopping` evaluates the model (full-ranking Recall@20 on the
validation split in ``trainers/train.py``) every ``every_n_epochs`` epochs and at the last
epoch of each ``fit``, stops after ``patience`` evaluations without an improvement larger
than ``min_delta``, and at the end of training puts back every variable of the model as it
was at the best evaluation: trainable weights *and* the non-trainable state (DSL masks,
compact layouts ``row_splits``/``col_ids``, growth scores, TFMOT masks), so the restored
model is exactly the one that scored best. Epochs before ``start_epoch`` are evaluated
(their values are in the curve) but can be neither chosen nor counted against the patience:
methods whose tables reach their final sparsity late (GMP, OMP) start there.

Keras' ``EarlyStopping`` is not used: it counts patience in epochs (a metric computed every
N epochs is missing from the other epochs' logs) and restores the best weights only when it
stops, not when the epoch budget runs out first.

How ``trainers/train.py --early-stopping`` uses it without ever looking at test, and how
the sparsity schedules follow the chosen length (the rule)::

    1. selection: fit on train, evaluate on valid every --es-every epochs, for at most
       --epochs epochs; best epoch E* (1-based) = the one with the best valid Recall@20.
    2. --protocol valid: the run is the restored best model, its metrics are valid's.
       --protocol test: a fresh model is fit on train+valid for exactly E* epochs and
       evaluated once on test (equivalent: `--protocol test --epochs E* --schedule-epochs
       <the --epochs of step 1>`).
    Schedules are planned over --schedule-epochs (default: --epochs, the budget) in epochs
    of the data being fit: DSL's end_step = schedule_epochs × steps_per_epoch and
    ΔT = max(1, end_step // 20) unless --update-interval is given, ρ0 unchanged (the cosine
    runs over the planned length), GMP prunes from 50 % to --gmp-end-fraction of the
    planned steps, OMP trains dense for --omp-dense-fraction of the planned epochs. The
    retrain keeps step 1's plan and stops after E* epochs, so at every epoch ρ_t, ΔT (in
    epochs) and the GMP/OMP phases are the ones under which E* was chosen.

>>> import numpy as np, tensorflow as tf
>>> model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(1,))])
>>> model.compile("sgd", "mse")
>>> scores = iter([0.1, 0.3, 0.2, 0.25, 0.2])
>>> stop = ValidationEarlyStopping(lambda m: {"recall@20": next(scores)}, patience=2)
>>> _ = model.fit(np.zeros((4, 1)), np.zeros((4, 1)), epochs=10, verbose=0, callbacks=[stop])
>>> stop.best_epoch, stop.stopped_epoch, [row["recall@20"] for row in stop.curve]
(2, 4, [0.1, 0.3, 0.2, 0.25])
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import scipy.sparse as sp
import tensorflow as tf

from trainers.evaluation import evaluate_full_ranking

Evaluate = Callable[[tf.keras.Model], dict]
"""``evaluate(model) -> {"recall@20": float, ...}`` for the model's current weights."""


def valid_evaluator(train_csr: sp.spmatrix, valid_csr: sp.spmatrix) -> Evaluate:
    """Full-ranking metrics of ``model.scorer()`` on ``valid_csr``, ``train_csr`` excluded."""
    def evaluate(model: tf.keras.Model) -> dict:
        metrics = evaluate_full_ranking(model.scorer(), train_csr, valid_csr)
        metrics.pop("num_users_evaluated")
        return metrics

    return evaluate


class ValidationEarlyStopping(tf.keras.callbacks.Callback):
    """Evaluate every ``every_n_epochs`` epochs; stop after ``patience`` evaluations without
    improvement; restore the best model at the end of training.

    Args:
      evaluate: ``evaluate(model) -> metrics dict`` (e.g. :func:`valid_evaluator`).
      monitor: the metric to maximise.
      every_n_epochs: evaluate after epochs N, 2N, ... (1-based) and after a fit's last epoch.
      patience: evaluations (not epochs) without improvement before stopping, >= 1.
      min_delta: an improvement must exceed this.
      start_epoch: first epoch (1-based) that may be chosen and that counts for patience.
      prefix: the metrics go to the epoch ``logs`` (hence ``History``) under this prefix.

    One instance follows one run, across several ``fit`` calls (OMP's two phases): its
    state is not reset by ``on_train_begin``. ``curve`` lists every evaluation
    (``{"epoch", "eligible", **metrics}``); ``best_epoch``/``best_metrics`` the chosen one
    (``None`` before an eligible evaluation); ``stopped_epoch`` the epoch after which it
    stopped training (``None`` if the budget ran out first).
    """

    def __init__(self, evaluate: Evaluate, monitor: str = "recall@20", every_n_epochs: int = 1, patience: int = 5,
                 min_delta: float = 0.0, start_epoch: int = 1, prefix: str = "valid_"):
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("patience", patience), ("start_epoch", start_epoch)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (np.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.evaluate, self.monitor, self.prefix = evaluate, monitor, prefix
        self.every_n_epochs, self.patience, self.min_delta = int(every_n_epochs), int(patience), float(min_delta)
        self.start_epoch = int(start_epoch)
        self.curve: list[dict] = []
        self.seconds: dict[int, float] = {}  # epoch (0-based) -> wall seconds of its evaluation
        self.best_epoch: int | None = None
        self.best_metrics: dict | None = None
        self.stopped_epoch: int | None = None
        self.wait = 0
        self._best_state: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every_n_epochs and done != self.params.get("epochs"):
            return
        start = time.perf_counter()
        metrics = self.evaluate(self.model)
        self.seconds[epoch] = time.perf_counter() - start
        if self.monitor not in metrics:
            raise KeyError(f"evaluation returned {sorted(metrics)}, no {self.monitor!r} to monitor")
        eligible = done >= self.start_epoch
        self.curve.append({"epoch": done, "eligible": eligible, **metrics})
        if logs is not None:
            logs.update({self.prefix + key: value for key, value in metrics.items()})
        if not eligible:
            return
        if self.best_metrics is None or metrics[self.monitor] > self.best_metrics[self.monitor] + self.min_delta:
            self.best_epoch, self.best_metrics, self.wait = done, dict(metrics), 0
            self._best_state = [v.numpy().copy() for v in self.model.variables]
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = done
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._best_state is not None:
            for variable, value in zip(self.model.variables, self._best_state):
                variable.assign(value)

    def summary(self) -> dict:
        """What a run records: settings, the chosen epoch and the whole validation curve."""
        return {"monitor": self.monitor, "every_n_epochs": self.every_n_epochs, "patience": self.patience,
                "min_delta": self.min_delta, "start_epoch": self.start_epoch, "best_epoch": self.best_epoch,
                "best": self.best_metrics, "stopped_epoch": self.stopped_epoch, "curve": self.curve}
