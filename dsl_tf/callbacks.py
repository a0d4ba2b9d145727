"""``DynamicSparsity``: the Keras callback that runs Algorithm 1 of the DSL paper."""

from __future__ import annotations

import time
import warnings
from typing import Mapping

import tensorflow as tf

from dsl_tf import masks, selection
from dsl_tf._validation import is_integer, is_real, to_float
from dsl_tf.layers import MaskedEmbedding, masked_embeddings
from dsl_tf.schedules import SCHEDULES, UpdateSchedule

GROWTH_MODES = ("gradient", "momentum", "random", "none")
BUDGET_MODES = ("per_layer", "global", "per_row")


class DynamicSparsity(tf.keras.callbacks.Callback):
    """Dynamic Sparse Learning (Wang et al., WSDM'24, Algorithm 1) for ``model.fit``.

    At ``on_train_begin`` every :class:`dsl_tf.MaskedEmbedding` in the model (found
    recursively) gets a uniform random mask with exactly ``round((1 − s) · size)`` active
    entries, and its inactive weights are zeroed. Then, after every ``update_interval``-th
    optimizer step (ΔT) before ``end_step``:

    1. ρ_t = ``decay(t, end_step)`` (Eq. 2 for ``"cosine"``);
    2. the ``floor(ρ_t · active)`` active entries with the smallest ``|w|`` are pruned;
    3. as many entries are grown among those inactive after the prune (the paper's and
       RigL's rule), with the largest growth score, and start from 0 with the optimizer's
       initial slot state (0 for Adam, the initial accumulator for Adagrad / Ftrl).

    The active count is unchanged (checked after every exploration). The growth score is
    ``|Σ ∂L/∂(E ⊙ M)|``: the gradient with respect to the *effective* weights, from the
    training step's ``tf.GradientTape``, summed over **all training batches of the
    interval** (a single batch only touches the rows it looks up, so it cannot rank the
    others) and, under a distribution strategy, over replicas.

    With an optimizer whose rows absent from a batch lag behind until looked up
    (:class:`dsl_tf.CatchUpAdam`), it builds the optimizer at ``on_train_begin`` (so that
    compact tables read caught-up rows) and catches every row up before each exploration
    (the prune ranks up-to-date magnitudes), at each epoch's end (before later callbacks),
    before ``fit``'s validation and ``predict``, and at the end of ``fit``.

    Args:
      sparsity: target sparsity s in (0, 1), or a dict ``{layer.name: s}`` covering every
        masked layer (per-layer budgets only).
      update_interval: ΔT ≥ 1, optimizer steps between explorations. ``None`` (default):
        the rule ``max(1, end_step // 20)``, i.e. 20 explorations over the schedule, set at
        each ``fit``'s first batch (on Gowalla, the optimum of ΔT ∈ {T/80, …, T/5}:
        docs/BENCHMARKS.md, Fig. 3); the paper's runs used 2000–20000.
      initial_update_ratio: ρ0 in (0, 1].
      decay: ``"cosine"`` (paper), ``"linear"``, ``"constant"``, or an
        :class:`dsl_tf.UpdateSchedule` (which then carries ρ0 and the floor itself).
      end_step: T_end, the step from which the mask is frozen. Default: the optimizer
        step at which this ``fit`` ends, ``optimizer.iterations`` at its start plus the
        ``(epochs − initial_epoch) × steps_per_epoch`` steps it runs (``epochs ×
        steps_per_epoch`` for a first fit). So a second ``fit`` keeps exploring, on one
        schedule stretched from step 0 to its own end (ρ_t resumes at ρ(t / T_end), not
        at ρ0), as a run planned that long would; a fit continued with ``initial_epoch``
        or resumed by ``BackupAndRestore`` keeps the original end. Pass ``end_step`` to
        keep one schedule over several ``fit`` calls. A ``UserWarning`` names the
        numbers when a ``fit`` will run no exploration at all.
      min_update_ratio: floor of ρ_t before ``end_step`` (the paper's code: 0.005).
      growth: ``"gradient"`` (paper; RigL), ``"momentum"`` (scores decayed by ``momentum``
        across intervals instead of reset), ``"random"`` (SET) or ``"none"`` (static
        random mask: the paper's RP baseline).
      budget: ``"per_layer"`` (each table keeps its own budget), ``"global"`` (one
        budget over all tables, which may trade entries between them) or ``"per_row"``
        (each table keeps its budget, and each row for good the ``budget // rows`` or one more
        entries of its initial mask, columns at random, :func:`dsl_tf.masks.row_balanced_positions`:
        row ``r`` swaps ``ρ_t · k_r`` entries within itself, stochastically rounded,
        :func:`dsl_tf.selection.row_swap`;
        the budget cannot drift to popular rows, and a compact table's row layout stays fixed;
        ``prune_by`` / ``grow_by`` rank within a row as the paper's criteria do).
      momentum: decay of the ``"momentum"`` growth scores, in [0, 1).
      exclude_pruned: ``False`` (the paper's and RigL's rule): grow among all entries
        inactive after the prune, so a just-pruned entry may be regrown (from 0, with
        fresh optimizer state). ``True``: grow only among entries inactive before the
        exploration; the swap is then capped at the inactive count (a ``RuntimeWarning``
        says when the cap bites, e.g. at low sparsity).
      prune_by: ``"magnitude"`` (the paper's: smallest ``|w|``) or ``"row_relative"``
        (smallest ``|w| / ‖row‖₂``: an entry's share of its row, for models that
        L2-normalise the looked-up rows, where a row's raw scale does not reach the score).
      grow_by: ``"score"`` (the paper's: largest ``|growth score|``) or ``"row_scaled"``
        (largest ``|score| · ‖row‖₂``; a row without active entries keeps its scores). Behind an L2 normalisation the gradient of an
        inactive entry is its row's normalised gradient divided by ``‖row‖``; times ``‖row‖``
        it ranks entries by their effect on the normalised row, whatever the row's scale
        (the growth counterpart of ``prune_by="row_relative"``).
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
        update_interval: int | None = None,
        initial_update_ratio: float = 0.5,
        decay: str | UpdateSchedule = "cosine",
        end_step: int | None = None,
        min_update_ratio: float = 0.005,
        growth: str = "gradient",
        budget: str = "per_layer",
        momentum: float = 0.9,
        exclude_pruned: bool = False,
        prune_by: str = "magnitude",
        grow_by: str = "score",
        seed: int = 0,
        verbose: int = 0,
        log_dir: str | None = None,
    ):
        super().__init__()
        if isinstance(sparsity, Mapping):
            if not sparsity:
                raise ValueError("sparsity must be a float or a non-empty dict, got {}")
            sparsity = {name: _check_sparsity(value, f"sparsity[{name!r}]")
                        for name, value in sparsity.items()}
        else:
            sparsity = _check_sparsity(sparsity, "sparsity")
        if update_interval is not None:
            update_interval = _check_int(update_interval, "update_interval", 1)
        if isinstance(decay, UpdateSchedule):
            schedule = decay
        elif decay in SCHEDULES:
            schedule = SCHEDULES[decay](initial_update_ratio, min_update_ratio)
        else:
            raise ValueError(
                f"decay must be one of {sorted(SCHEDULES)} or an UpdateSchedule, got {decay!r}"
            )
        if end_step is not None:
            end_step = _check_int(end_step, "end_step", 1)
        if growth not in GROWTH_MODES:
            raise ValueError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
        if budget not in BUDGET_MODES:
            raise ValueError(f"budget must be one of {BUDGET_MODES}, got {budget!r}")
        if budget == "global" and isinstance(sparsity, dict):
            raise ValueError(
                "budget='global' needs one float sparsity, got a per-layer dict sparsity="
                f"{sparsity!r}"
            )
        if not (is_real(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        seed = _check_int(seed, "seed", 0)
        verbose = _check_int(verbose, "verbose", 0)
        self.sparsity = sparsity
        self.update_interval = update_interval
        self._interval = update_interval  # resolved at each fit's first batch
        self.schedule = schedule
        self.end_step = end_step
        self.growth = growth
        self.budget = budget
        self.momentum = to_float(momentum)
        if not isinstance(exclude_pruned, bool):
            raise ValueError(f"exclude_pruned must be a bool, got {exclude_pruned!r}")
        self.exclude_pruned = exclude_pruned
        if prune_by not in selection.PRUNE_CRITERIA:
            raise ValueError(f"prune_by must be one of {selection.PRUNE_CRITERIA}, got {prune_by!r}")
        self.prune_by = prune_by
        if grow_by not in selection.GROW_CRITERIA:
            raise ValueError(f"grow_by must be one of {selection.GROW_CRITERIA}, got {grow_by!r}")
        self.grow_by = grow_by
        self.seed = int(seed)
        self.verbose = int(verbose)
        self.log_dir = log_dir
        self.explorations: list[dict] = []
        self._layers: list[MaskedEmbedding] = []
        self._budgets: list[int] = []
        self._end_step: int | None = None  # resolved at the first batch of each fit
        self._epoch = 0
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
            "exclude_pruned": self.exclude_pruned,
            "prune_by": self.prune_by,
            "grow_by": self.grow_by,
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
        dense = _steps_touch_whole_variable(self.model.optimizer)
        retrace = prepare_catch_up(self.model)
        retrace = any([layer.unscale_scores_by(self.model.optimizer) for layer in layers]) or retrace
        retrace = any([layer.use_dense_gradients(dense) for layer in layers if masks.is_compact(layer)]) or retrace
        if retrace:
            self.model.make_train_function(force=True)  # the loss scale and gradient density are read when tracing
        if self.end_step is None:
            self._fit_epochs_and_steps()  # fail now if end_step cannot be inferred
        self._end_step, self._epoch = None, 0
        sizes = [layer.input_dim * layer.output_dim for layer in layers]
        sparsities = self._layer_sparsities(layers)
        self._budgets = [masks.budget(n, s) for n, s in zip(sizes, sparsities)]
        _check_nonempty(layers, sizes, sparsities, self._budgets, self.budget)
        self._check_compact(layers)
        initialized = [bool(layer.mask_initialized.numpy()) for layer in layers]
        if not all(initialized):
            if self.budget == "global":
                if any(initialized):
                    raise ValueError(
                        "budget='global' needs all masked layers uninitialised or all "
                        f"initialised, got {dict(zip([l.name for l in layers], initialized))}"
                    )
                new = masks.initial_positions(sizes, masks.budget(sum(sizes), self.sparsity), self.seed, True)
            elif self.budget == "per_row":
                new = [masks.row_balanced_positions(l.input_dim, l.output_dim, b, (self.seed, i))
                       for i, (l, b) in enumerate(zip(layers, self._budgets))]
            else:
                new = masks.initial_positions(sizes, self._budgets, self.seed, chunked=True)
            for layer, done, positions in zip(layers, initialized, new):
                if not done:
                    masks.install_positions(layer, positions, self.model.optimizer)
                    layer.reset_scores()
        active = [masks.active_count(l) for l in layers]
        if self.budget != "global" and active != self._budgets:
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

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self._end_step is None:  # first batch of this fit, after any BackupAndRestore
            self._start_schedule(batch)

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        interval = self._interval
        if step // interval > self._last_step // interval and step < self._end_step:
            self._explore(step)
        self._last_step = step

    def on_epoch_end(self, epoch, logs=None):
        catch_up_optimizer(self.model.optimizer)  # first: later callbacks may read the weights
        if logs is not None and self.explorations:
            logs.update(self.explorations[-1])

    def on_test_begin(self, logs=None):  # fit's validation
        catch_up_optimizer(self.model.optimizer)

    def on_predict_begin(self, logs=None):
        catch_up_optimizer(self.model.optimizer)

    def on_train_end(self, logs=None):
        catch_up_optimizer(self.model.optimizer)
        for layer in self._layers:
            layer.score_tracking.assign(False)
            layer.unscale_scores_by(None)  # functions traced from now on (export) need no optimizer
        if self._writer is not None:
            self._writer.flush()

    # ----------------------------------------------------------------- internals
    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _fit_epochs_and_steps(self) -> tuple[int, int]:
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "DynamicSparsity could not infer end_step from fit(): epochs="
                f"{epochs!r}, steps per epoch={steps!r} (unknown dataset cardinality?). "
                "Pass end_step=... or steps_per_epoch=... to fit()."
            )
        return int(epochs), int(steps)

    def _start_schedule(self, batch: int) -> None:
        """Resolve ``end_step`` at this fit's first batch; warn if it cannot explore.

        By default ``end_step`` is the step at which this fit ends: the current step plus
        the steps left from (epoch, batch), where a fit continued with ``initial_epoch`` or
        resumed by ``BackupAndRestore`` (restored before the first batch) starts.
        """
        step = self._step()
        if self.end_step is not None:
            self._end_step, how = self.end_step, "given"
        else:
            epochs, steps = self._fit_epochs_and_steps()
            remaining = (epochs - self._epoch) * steps - batch
            self._end_step = step + remaining
            how = f"inferred: this fit's last step, {step} + {remaining}"
        self._last_step = step
        self._interval = self.update_interval or max(1, self._end_step // 20)
        first = (step // self._interval + 1) * self._interval
        if self.growth != "none" and first >= self._end_step:
            warnings.warn(
                f"DynamicSparsity: this fit runs no exploration, the masks stay fixed: the "
                f"optimizer is at step {step}, end_step={self._end_step} ({how}), "
                f"update_interval={self._interval}, so the next exploration would be at "
                f"step {first} >= end_step. Pass a later end_step or a smaller update_interval.",
                UserWarning,
            )

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
        catch_up_optimizer(self.model.optimizer)  # the prune ranks up-to-date weights
        ratio = self.schedule(step, self._end_step)
        layers = self._layers
        groups = [list(range(len(layers)))] if self.budget == "global" else [[i] for i in range(len(layers))]
        stats: dict = {"dsl_step": step, "dsl_update_ratio": ratio, "dsl_num_swapped": 0}
        for g, group in enumerate(groups):
            swapped, changed = self._explore_group([layers[i] for i in group], ratio, step, g)
            stats["dsl_num_swapped"] += swapped
            stats.update({f"dsl_mask_changed/{name}": c for name, c in changed.items()})
        active = [masks.active_count(layer) for layer in layers]
        for layer, count, expected in zip(layers, active, self._budgets):
            if self.budget != "global" and count != expected:
                raise RuntimeError(f"budget broken on {layer.name}: {count} active, expected {expected}")
            if self.growth in ("gradient", "momentum"):
                layer.reset_scores(self.momentum if self.growth == "momentum" else 0.0)
        if self.budget == "global" and sum(active) != sum(self._budgets):
            raise RuntimeError(f"global budget broken: {sum(active)} active, expected {sum(self._budgets)}")
        for layer, count in zip(layers, active):
            size = layer.input_dim * layer.output_dim
            stats[f"dsl_density/{layer.name}"] = count / size
            if not masks.is_compact(layer):  # compact storage keeps no history of the mask
                stats[f"dsl_ever_active/{layer.name}"] = masks.count_active(layer.ever_active) / size
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
        if masks.is_compact(layers[0]):
            return self._explore_compact(layers[0], ratio, step, group)
        if self.budget == "per_row":
            return self._explore_rows(layers[0], ratio, step, group)
        mask = tf.concat([tf.reshape(tf.cast(l.mask, tf.bool), [-1]) for l in layers], 0)
        weights = tf.concat([tf.reshape(l.embeddings, [-1]) for l in layers], 0)
        scores = None
        if self.growth in ("gradient", "momentum"):
            scores = tf.concat([tf.reshape(tf.convert_to_tensor(l.growth_scores), [-1]) for l in layers], 0)
        names = [l.name for l in layers]
        if not self._ready(names, step, weights, scores):
            return 0, {name: 0.0 for name in names}
        num = self._swap_count(masks.count_active(mask), int(mask.shape[0]), ratio, step, names)
        if scores is not None and self.grow_by == "row_scaled":  # |score| · ‖row‖: scale-free growth
            scores = tf.concat([tf.reshape(tf.convert_to_tensor(l.growth_scores) * selection.row_scale(
                tf.norm(l.effective_table(), axis=1, keepdims=True)), [-1]) for l in layers], 0)
        if self.prune_by == "row_relative":  # rank each entry by its share of its row
            weights = tf.concat([tf.reshape(selection.row_relative(l.effective_table()), [-1]) for l in layers], 0)
        new_mask, _, grown = selection.prune_and_grow(
            mask, weights, scores, num, (self.seed, step * 97 + group), self.exclude_pruned)
        regrown = tf.logical_and(mask, selection.scatter_flags(tf.size(mask), grown))  # just pruned, grown again
        sizes = [l.input_dim * l.output_dim for l in layers]
        changed = {}
        for layer, old, new, fresh in zip(layers, tf.split(mask, sizes), tf.split(new_mask, sizes),
                                         tf.split(regrown, sizes)):
            changed[layer.name] = int(tf.math.count_nonzero(old != new, dtype=tf.int64)) / old.shape[0]
            masks.apply_mask(layer, new, self.model.optimizer, fresh)
        return num, changed

    def _explore_rows(self, layer: MaskedEmbedding, ratio: float, step: int, group: int
                      ) -> tuple[int, dict[str, float]]:
        """:meth:`_explore_group` with ``budget="per_row"`` (a dense-mask table)."""
        mask = tf.cast(layer.mask, tf.bool)
        scores = tf.convert_to_tensor(layer.growth_scores) if self.growth in ("gradient", "momentum") else None
        if not self._ready([layer.name], step, layer.embeddings, scores):
            return 0, {layer.name: 0.0}
        new, grown = selection.rows_prune_and_grow(mask, layer.embeddings, scores, ratio,
                                                   (self.seed, step * 97 + group), self.exclude_pruned)
        _check_row_counts(layer.name, tf.math.count_nonzero(mask, 1), tf.math.count_nonzero(new, 1))
        changed = int(tf.math.count_nonzero(mask != new, dtype=tf.int64)) / int(tf.size(mask))
        masks.apply_mask(layer, tf.reshape(new, [-1]), self.model.optimizer, tf.reshape(mask & grown, [-1]))
        return int(tf.math.count_nonzero(grown, dtype=tf.int64)), {layer.name: changed}

    def _explore_compact(
        self, layer: MaskedEmbedding, ratio: float, step: int, group: int
    ) -> tuple[int, dict[str, float]]:
        """:meth:`_explore_group` for a compact table: the same ranking (``selection``) on
        its active values, then a new layout, by row chunks: only ``[budget]`` tensors,
        row splits and per-chunk temporaries are made (plus a read of the dense growth
        scores, if kept)."""
        values = tf.convert_to_tensor(layer.values)
        scores, source = None, "random"
        if self.growth in ("gradient", "momentum"):
            source = "window" if layer.growth_scores_mode == "window" else "scores"
            scores = {"dense": lambda: tf.convert_to_tensor(layer.growth_scores),
                      "int8": lambda: layer.score_scale, "window": lambda: layer.window_scores()[1]
                      }[layer.growth_scores_mode]()
        if not self._ready([layer.name], step, values, scores):
            return 0, {layer.name: 0.0}
        size = layer.input_dim * layer.output_dim
        if self.budget == "per_row":
            splits = tf.identity(layer.row_splits)
            keep, grown = selection.compact_rows_prune_and_grow(layer, ratio, (self.seed, step * 97 + group), source,
                                                                self.exclude_pruned)
            num = sum(int(tf.size(g)) for g in grown)
            regrown = masks.apply_compact_update(layer, keep, grown, self.model.optimizer)
            _check_row_counts(layer.name, splits[1:] - splits[:-1], layer.row_splits[1:] - layer.row_splits[:-1])
            return num, {layer.name: 2 * (num - regrown) / size}
        num = self._swap_count(layer.budget, size, ratio, step, [layer.name])
        keys = selection.row_relative_values(values, layer.row_splits) if self.prune_by == "row_relative" else None
        scale = selection.row_scale(selection.row_norms(values, layer.row_splits)) if self.grow_by == "row_scaled" else None
        keep, grown = selection.compact_prune_and_grow(
            layer, num, (self.seed, step * 97 + group), source, self.exclude_pruned, keys, scale)
        regrown = masks.apply_compact_update(layer, keep, grown, self.model.optimizer)
        return num, {layer.name: 2 * (num - regrown) / size}

    def _ready(self, names: list[str], step: int, weights: tf.Tensor, scores: tf.Tensor | None) -> bool:
        """Whether the tables of ``names`` explore now: growth on, weights and scores finite
        (a ``RuntimeWarning`` otherwise; the budget is unchanged)."""
        finite = tf.reduce_all(tf.math.is_finite(weights))
        if scores is not None:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(scores)))
        if not bool(finite.numpy()):
            warnings.warn(
                f"DynamicSparsity: NaN/Inf in the weights or growth scores of {names} at step "
                f"{step}; skipping their mask update (the budget is unchanged).",
                RuntimeWarning,
            )
            return False
        return self.growth != "none"

    def _swap_count(self, active: int, size: int, ratio: float, step: int, names: list[str]) -> int:
        """:func:`dsl_tf.selection.swap_count`, warning when ``exclude_pruned`` caps it."""
        num = selection.swap_count(active, size, ratio, self.exclude_pruned)
        wanted = selection.swap_count(active, size, ratio)
        if num < wanted:
            warnings.warn(
                f"DynamicSparsity: at step {step} only {num} of the {wanted} entries due (rho={ratio:.4f}) of "
                f"{names} could be swapped: exclude_pruned=True caps the swap at the inactive count",
                RuntimeWarning,
            )
        return num

    def _check_compact(self, layers: list[MaskedEmbedding]) -> None:
        """Compact tables have their budget in their shape: it must be the requested one."""
        for layer, expected in zip(layers, self._budgets):
            if not masks.is_compact(layer):
                continue
            if self.budget == "global":
                raise ValueError(f"budget='global' is not supported with compact storage ({layer.name!r})")
            if layer.budget != expected:
                raise ValueError(
                    f"{layer.name!r} stores {layer.budget} active entries (sparsity {layer.sparsity}) but "
                    f"DynamicSparsity asks for {expected}: give both the same sparsity")
            needs = {"gradient": ("dense", "int8", "window"), "momentum": ("dense", "int8")}.get(self.growth)
            if needs and self.budget == "per_row":
                needs = ("dense", "int8")  # a row's exploration reads the scores of all its entries
            if needs and layer.growth_scores_mode not in needs:
                raise ValueError(
                    f"growth={self.growth!r} needs growth_scores in {needs}, but {layer.name!r} was built "
                    f"with growth_scores={layer.growth_scores_mode!r}")


def _check_row_counts(name: str, before: tf.Tensor, after: tf.Tensor) -> None:
    """``budget="per_row"``: every row of table ``name`` kept its count of active entries."""
    moved = tf.where(tf.cast(before, tf.int64) != tf.cast(after, tf.int64))[:, 0]
    if int(tf.size(moved)):
        raise RuntimeError(f"per-row budget broken on {name}: {int(tf.size(moved))} rows changed their count "
                           f"(first: row {int(moved[0])})")


def catch_up_optimizer(optimizer) -> None:
    """``catch_up()`` every optimizer inside ``optimizer`` that has one (e.g.
    :class:`dsl_tf.CatchUpAdam`, whose rows absent from recent batches lag behind until
    caught up): after it, every weight is what the optimizer's step defines. A no-op for
    other optimizers and for None."""
    if optimizer is None:
        return
    for leaf in masks.leaf_optimizers(optimizer):
        catch_up = getattr(leaf, "catch_up", None)
        if catch_up is not None:
            catch_up()


def prepare_catch_up(model: tf.keras.Model) -> bool:
    """Let ``model``'s optimizer ``prepare(model)`` if it has that method (e.g.
    :class:`dsl_tf.CatchUpAdam`: builds its slots so that compact tables read caught-up
    values); True if the training step must be traced again. Only for an optimizer owning
    every variable (itself or inside a ``LossScaleOptimizer``)."""
    leaves = masks.leaf_optimizers(model.optimizer) if model.optimizer is not None else []
    prepare = getattr(leaves[0], "prepare", None) if len(leaves) == 1 else None
    return bool(prepare(model)) if prepare is not None else False


def _steps_touch_whole_variable(optimizer) -> bool:
    """Whether every optimizer owning slots is Keras Adam (not a lazy one): its step on an
    ``IndexedSlices`` gradient decays every moment, so a dense gradient costs it nothing more
    (see :meth:`dsl_tf.CompactMaskedEmbedding.use_dense_gradients`)."""
    adam = (tf.keras.optimizers.Adam, tf.keras.optimizers.legacy.Adam)
    return all(isinstance(leaf, adam) and not getattr(leaf, "lazy", False)
               for leaf in masks.leaf_optimizers(optimizer))


def _check_sparsity(value, name: str) -> float:
    if not (is_real(value) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
    return to_float(value)


def _check_int(value, name: str, minimum: int) -> int:
    if not (is_integer(value) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_nonempty(
    layers: list[MaskedEmbedding], sizes: list[int], sparsities: list[float], budgets: list[int],
    mode: str,
) -> None:
    """A budget of 0 active entries (a tiny table at high sparsity) is an error."""
    if mode == "global":
        if masks.budget(sum(sizes), sparsities[0]) == 0:
            raise ValueError(
                f"sparsity={sparsities[0]} leaves no active entry in the global budget of "
                f"{[l.name for l in layers]} ({sum(sizes)} entries): round((1 - s) * size) = 0"
            )
        return
    for layer, s, size, b in zip(layers, sparsities, sizes, budgets):
        if b == 0:
            raise ValueError(
                f"sparsity={s} leaves table {layer.name!r} ({layer.input_dim} x "
                f"{layer.output_dim} = {size} entries) with no active entry: "
                "round((1 - s) * size) = 0. Give it a lower sparsity (dict sparsity)."
            )

