"""``DynamicSparsity``: the Keras callback that runs Algorithm 1 of the DSL paper."""

from __future__ import annotations

import time
import warnings
from typing import Mapping

import tensorflow as tf

from dsl_tf import masks, selection
from dsl_tf.layers import MaskedEmbedding, masked_embeddings
from dsl_tf.schedules import SCHEDULES, UpdateSchedule

GROWTH_MODES = ("gradient", "momentum", "random", "none")
BUDGET_MODES = ("per_layer", "global")


class DynamicSparsity(tf.keras.callbacks.Callback):
    """Dynamic Sparse Learning (Wang et al., WSDM'24, Algorithm 1) for ``model.fit``.

    At ``on_train_begin`` every :class:`dsl_tf.MaskedEmbedding` in the model (found
    recursively) gets a uniform random mask with exactly ``round((1 − s) · size)`` active
    entries, and its inactive weights are zeroed. Then, after every ``update_interval``-th
    optimizer step (ΔT) before ``end_step``:

    1. ρ_t = ``decay(t, end_step)`` (Eq. 2 for ``"cosine"``);
    2. the ``floor(ρ_t · active)`` active entries with the smallest ``|w|`` are pruned;
    3. as many entries are grown among those that were inactive before this step, with
       the largest growth score, and start from 0 with zeroed optimizer slots.

    The active count is unchanged (checked after every exploration). The growth score is
    ``|Σ ∂L/∂(E ⊙ M)|``: the gradient with respect to the *effective* weights, from the
    training step's ``tf.GradientTape``, summed over **all training batches of the
    interval** (a single batch only touches the rows it looks up, so it cannot rank the
    others) and, under a distribution strategy, over replicas.

    Args:
      sparsity: target sparsity s in (0, 1), or a dict ``{layer.name: s}`` covering every
        masked layer (per-layer budgets only).
      update_interval: ΔT ≥ 1, optimizer steps between explorations.
      initial_update_ratio: ρ0 in (0, 1].
      decay: ``"cosine"`` (paper), ``"linear"``, ``"constant"``, or an
        :class:`dsl_tf.UpdateSchedule` (which then carries ρ0 and the floor itself).
      end_step: T_end, the step after which the mask is frozen. Default: ``epochs ×
        steps_per_epoch`` of the ``fit`` call, read at ``on_train_begin``.
      min_update_ratio: floor of ρ_t before ``end_step`` (the paper's code: 0.005).
      growth: ``"gradient"`` (paper; RigL), ``"momentum"`` (scores decayed by ``momentum``
        across intervals instead of reset), ``"random"`` (SET) or ``"none"`` (static
        random mask: the paper's RP baseline).
      budget: ``"per_layer"`` (each table keeps its own budget) or ``"global"`` (one
        budget over all tables, which may trade entries between them).
      momentum: decay of the ``"momentum"`` growth scores, in [0, 1).
      seed: seed of the initial masks and random tie-breaking / growth. Masks depend only
        on ``(seed, step)``, so runs are reproducible and replicas agree.
      verbose: 0 silent, 1 one line per exploration.
      log_dir: if given, TensorBoard scalars of every exploration are written there.

    Each exploration's statistics (step, ρ_t, swapped count, per-table density, fraction
    of the mask changed, fraction of entries ever active, wall seconds it took) are appended to
    ``self.explorations`` and the latest ones are added to the epoch ``logs`` (so they
    land in ``History``) under keys starting with ``dsl_``.

    Example:

    >>> import dsl_tf, numpy as np, tensorflow as tf
    >>> model = tf.keras.Sequential([
    ...     tf.keras.Input((1,), dtype="int64"), dsl_tf.MaskedEmbedding(100, 8),
    ...     tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
    >>> model.compile("adam", "mse")
    >>> cb = dsl_tf.DynamicSparsity(sparsity=0.75, update_interval=5)
    >>> x, y = np.arange(100)[:, None], np.random.rand(100, 1)
    >>> _ = model.fit(x, y, batch_size=10, epochs=2, callbacks=[cb], verbose=0)
    >>> int(tf.reduce_sum(model.layers[0].mask))
    200
    """

    _supports_tf_logs = True

    def __init__(
        self,
        sparsity: float | Mapping[str, float] = 0.8,
        update_interval: int = 2000,
        initial_update_ratio: float = 0.5,
        decay: str | UpdateSchedule = "cosine",
        end_step: int | None = None,
        min_update_ratio: float = 0.005,
        growth: str = "gradient",
        budget: str = "per_layer",
        momentum: float = 0.9,
        seed: int = 0,
        verbose: int = 0,
        log_dir: str | None = None,
    ):
        super().__init__()
        if isinstance(sparsity, Mapping):
            if not sparsity:
                raise ValueError("sparsity must be a float or a non-empty dict, got {}")
            for name, value in sparsity.items():
                _check_sparsity(value, f"sparsity[{name!r}]")
            sparsity = dict(sparsity)
        else:
            _check_sparsity(sparsity, "sparsity")
        _check_int(update_interval, "update_interval", 1)
        if isinstance(decay, UpdateSchedule):
            schedule = decay
        elif decay in SCHEDULES:
            schedule = SCHEDULES[decay](initial_update_ratio, min_update_ratio)
        else:
            raise ValueError(
                f"decay must be one of {sorted(SCHEDULES)} or an UpdateSchedule, got {decay!r}"
            )
        if end_step is not None:
            _check_int(end_step, "end_step", 1)
        if growth not in GROWTH_MODES:
            raise ValueError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
        if budget not in BUDGET_MODES:
            raise ValueError(f"budget must be one of {BUDGET_MODES}, got {budget!r}")
        if budget == "global" and isinstance(sparsity, dict):
            raise ValueError(
                "budget='global' needs one float sparsity, got a per-layer dict sparsity="
                f"{sparsity!r}"
            )
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        _check_int(seed, "seed", 0)
        _check_int(verbose, "verbose", 0)
        self.sparsity = sparsity
        self.update_interval = int(update_interval)
        self.schedule = schedule
        self.end_step = end_step
        self.growth = growth
        self.budget = budget
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.verbose = int(verbose)
        self.log_dir = log_dir
        self.explorations: list[dict] = []
        self._layers: list[MaskedEmbedding] = []
        self._budgets: list[int] = []
        self._end_step: int = 0
        self._last_step = 0
        self._writer = None

    def get_config(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "update_interval": self.update_interval,
            "decay": {"class_name": type(self.schedule).__name__,
                      "config": self.schedule.get_config()},
            "end_step": self.end_step,
            "growth": self.growth,
            "budget": self.budget,
            "momentum": self.momentum,
            "seed": self.seed,
            "verbose": self.verbose,
            "log_dir": self.log_dir,
        }

    # ----------------------------------------------------------------- fit hooks
    def on_train_begin(self, logs=None):
        layers = masked_embeddings(self.model)
        if not layers:
            raise ValueError(
                "DynamicSparsity found no dsl_tf.MaskedEmbedding in the model: replace the "
                "tf.keras.layers.Embedding layers to sparsify with dsl_tf.MaskedEmbedding."
            )
        for layer in layers:
            if not layer.built:
                layer.build(None)
        self._layers = layers
        self._end_step = self._resolve_end_step()
        sizes = [int(layer.embeddings.shape.num_elements()) for layer in layers]
        sparsities = self._layer_sparsities(layers)
        self._budgets = [masks.budget(n, s) for n, s in zip(sizes, sparsities)]
        initialized = [bool(layer.mask_initialized.numpy()) for layer in layers]
        if not all(initialized):
            if self.budget == "global":
                if any(initialized):
                    raise ValueError(
                        "budget='global' needs all masked layers uninitialised or all "
                        f"initialised, got {dict(zip([l.name for l in layers], initialized))}"
                    )
                new = masks.initial_masks(sizes, masks.budget(sum(sizes), self.sparsity), self.seed)
            else:
                new = masks.initial_masks(sizes, self._budgets, self.seed)
            for layer, done, mask in zip(layers, initialized, new):
                if not done:
                    masks.apply_mask(layer, mask, self.model.optimizer)
                    layer.growth_scores.assign(tf.zeros_like(layer.growth_scores))
        active = [int(tf.reduce_sum(tf.cast(l.mask, tf.int64)).numpy()) for l in layers]
        if self.budget == "per_layer" and active != self._budgets:
            raise ValueError(
                "existing masks do not match the requested sparsity: active entries "
                f"{dict(zip([l.name for l in layers], active))}, budgets "
                f"{dict(zip([l.name for l in layers], self._budgets))}"
            )
        self._budgets = active
        tracking = self.growth in ("gradient", "momentum")
        for layer in layers:  # restored/continued runs keep their interval's scores
            layer.score_tracking.assign(tracking)
        self._last_step = self._step()
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        interval = self.update_interval
        if step // interval > self._last_step // interval and step < self._end_step:
            self._explore(step)
        self._last_step = step

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.explorations:
            logs.update(self.explorations[-1])

    def on_train_end(self, logs=None):
        for layer in self._layers:
            layer.score_tracking.assign(False)
        if self._writer is not None:
            self._writer.flush()

    # ----------------------------------------------------------------- internals
    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _resolve_end_step(self) -> int:
        if self.end_step is not None:
            return self.end_step
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "DynamicSparsity could not infer end_step from fit(): epochs="
                f"{epochs!r}, steps per epoch={steps!r} (unknown dataset cardinality?). "
                "Pass end_step=... or steps_per_epoch=... to fit()."
            )
        return int(epochs) * int(steps)

    def _layer_sparsities(self, layers: list[MaskedEmbedding]) -> list[float]:
        if not isinstance(self.sparsity, dict):
            return [float(self.sparsity)] * len(layers)
        names = [layer.name for layer in layers]
        missing = [n for n in names if n not in self.sparsity]
        unknown = [n for n in self.sparsity if n not in names]
        if missing or unknown:
            raise ValueError(
                f"sparsity dict must name every masked layer exactly: missing {missing}, "
                f"unknown {unknown}; masked layers are {names}"
            )
        return [float(self.sparsity[n]) for n in names]

    def _explore(self, step: int) -> None:
        start = time.perf_counter()
        ratio = self.schedule(step, self._end_step)
        layers = self._layers
        groups = [list(range(len(layers)))] if self.budget == "global" else [[i] for i in range(len(layers))]
        stats: dict = {"dsl_step": step, "dsl_update_ratio": ratio, "dsl_num_swapped": 0}
        for g, group in enumerate(groups):
            swapped, changed = self._explore_group([layers[i] for i in group], ratio, step, g)
            stats["dsl_num_swapped"] += swapped
            stats.update({f"dsl_mask_changed/{name}": c for name, c in changed.items()})
        for layer, expected in zip(layers, self._budgets):
            if self.budget == "per_layer":
                _check_budget(layer, expected)
            if self.growth == "gradient":
                layer.growth_scores.assign(tf.zeros_like(layer.growth_scores))
            elif self.growth == "momentum":
                layer.growth_scores.assign(layer.growth_scores * self.momentum)
        if self.budget == "global":
            total = sum(int(tf.reduce_sum(l.mask).numpy()) for l in layers)
            if total != sum(self._budgets):
                raise RuntimeError(f"global budget broken: {total} active, expected {sum(self._budgets)}")
        for layer in layers:
            size = layer.embeddings.shape.num_elements()
            stats[f"dsl_density/{layer.name}"] = float(tf.reduce_sum(layer.mask).numpy()) / size
            stats[f"dsl_ever_active/{layer.name}"] = (
                float(tf.reduce_sum(tf.cast(layer.ever_active, tf.float32)).numpy()) / size
            )
        stats["dsl_seconds"] = time.perf_counter() - start
        self.explorations.append(stats)
        if self.verbose:
            dens = ", ".join(f"{l.name}={stats[f'dsl_density/{l.name}']:.4f}" for l in layers)
            print(f"DynamicSparsity step {step}: rho={ratio:.4f} swapped "
                  f"{stats['dsl_num_swapped']} (pruned = grown); density {dens}")
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for key, value in stats.items():
                    if key != "dsl_step":
                        tf.summary.scalar(key, value)

    def _explore_group(
        self, layers: list[MaskedEmbedding], ratio: float, step: int, group: int
    ) -> tuple[int, dict[str, float]]:
        """Prune and grow over the concatenated tables of ``layers``.

        Returns the number of entries swapped and, per layer, the fraction of its mask
        that changed.
        """
        mask = tf.concat([tf.reshape(tf.cast(l.mask, tf.bool), [-1]) for l in layers], 0)
        weights = tf.concat([tf.reshape(l.embeddings, [-1]) for l in layers], 0)
        scores = None
        if self.growth in ("gradient", "momentum"):
            scores = tf.concat([tf.reshape(tf.convert_to_tensor(l.growth_scores), [-1]) for l in layers], 0)
        finite = tf.reduce_all(tf.math.is_finite(weights))
        if scores is not None:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(scores)))
        names = [l.name for l in layers]
        if not bool(finite.numpy()):
            warnings.warn(
                f"DynamicSparsity: NaN/Inf in the weights or growth scores of {names} at step "
                f"{step}; skipping their mask update (the budget is unchanged).",
                RuntimeWarning,
            )
            return 0, {name: 0.0 for name in names}
        if self.growth == "none":
            num = 0
            new_mask = mask
        else:
            num = selection.num_updates(mask, ratio)
            new_mask, _, _ = selection.prune_and_grow(mask, weights, scores, num, (self.seed, step * 97 + group))
            num = int(num.numpy())
        sizes = [l.embeddings.shape.num_elements() for l in layers]
        changed = {}
        for layer, old, new in zip(layers, tf.split(mask, sizes), tf.split(new_mask, sizes)):
            changed[layer.name] = float(tf.reduce_mean(tf.cast(old != new, tf.float32)).numpy())
            masks.apply_mask(layer, new, self.model.optimizer)
        return num, changed


def _check_sparsity(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_budget(layer: MaskedEmbedding, expected: int) -> None:
    active = int(tf.reduce_sum(tf.cast(layer.mask, tf.int64)).numpy())
    if active != expected:
        raise RuntimeError(f"budget broken on {layer.name}: {active} active, expected {expected}")
