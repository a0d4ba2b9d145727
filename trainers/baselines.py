"""Sparsification methods compared in one harness: dense, DSL, RP, SET, GMP and OMP.

* ``dense``: no mask (the ``MaskedEmbedding`` masks stay all ones).
* ``dsl``: :class:`dsl_tf.DynamicSparsity` with gradient growth (the paper).
* ``rp``: random pruning at initialisation, mask fixed (``growth="none"``).
* ``set``: SET, magnitude prune + random regrowth (``growth="random"``).
* ``gmp``: gradual magnitude pruning with TF Model Optimization's
  ``prune_low_magnitude`` (``PolynomialDecay`` from 0 to s) on plain ``Embedding``
  tables; the final weights and TFMOT's masks are then copied into the
  ``MaskedEmbedding`` model (:func:`gmp_to_masked`).
* ``omp``: one-shot magnitude pruning: dense training, then the largest ``|w|`` of each
  table are kept (:func:`omp_prune`, via ``dsl_tf.selection.magnitude_mask``) and the
  model is fine-tuned with the mask fixed.

>>> METHODS
('dense', 'dsl', 'rp', 'set', 'gmp', 'omp')
"""

from __future__ import annotations

import dsl_tf
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from dsl_tf import masks, selection
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,  # not exported by tfmot's public API; needed to find the wrappers
)

from trainers.models import EmbeddingFactory, Recommender

METHODS = ("dense", "dsl", "rp", "set", "gmp", "omp")
_GROWTH = {"dsl": "gradient", "rp": "none", "set": "random"}


def dynamic_sparsity(
    method: str,
    sparsity: float,
    update_interval: int,
    initial_update_ratio: float,
    decay: str,
    seed: int,
    log_dir: str | None = None,
) -> dsl_tf.DynamicSparsity:
    """The ``DynamicSparsity`` callback of ``method`` in ``("dsl", "rp", "set")``."""
    if method not in _GROWTH:
        raise ValueError(f"method {method!r} has no DynamicSparsity callback; one of {sorted(_GROWTH)}")
    return dsl_tf.DynamicSparsity(
        sparsity=sparsity, update_interval=update_interval, initial_update_ratio=initial_update_ratio,
        decay=decay, growth=_GROWTH[method], seed=seed, log_dir=log_dir,
    )


def gmp_schedule(sparsity: float, total_steps: int, frequency: int, end_fraction: float
                 ) -> tfmot.sparsity.keras.PolynomialDecay:
    """TFMOT ``PolynomialDecay`` 0 → ``sparsity`` from step 0 to ``end_fraction`` of training.

    Masks are updated every ``frequency`` steps; the end step is rounded down to a
    multiple of ``frequency`` (so the final sparsity is reached exactly) and at least one
    ``frequency`` before the last step.
    """
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"gmp end fraction must be in (0, 1], got {end_fraction!r}")
    frequency = max(1, min(frequency, total_steps // 2))
    end = frequency * max(1, min(int(end_fraction * total_steps), total_steps - frequency) // frequency)
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=end, frequency=frequency)


def gmp_embedding_factory(schedule: tfmot.sparsity.keras.PruningSchedule) -> EmbeddingFactory:
    """Embedding factory for :func:`trainers.models.build_model`: TFMOT-wrapped
    ``tf.keras.layers.Embedding`` tables (train with ``UpdatePruningStep``)."""

    def factory(input_dim: int, output_dim: int, name: str, **kwargs) -> tf.keras.layers.Layer:
        table = tf.keras.layers.Embedding(input_dim, output_dim, name=name, **kwargs)
        return tfmot.sparsity.keras.prune_low_magnitude(table, pruning_schedule=schedule)

    return factory


def pruning_wrappers(model: tf.Module) -> list:
    """Every TFMOT ``PruneLowMagnitude`` wrapper inside ``model``."""
    return [m for m in model.submodules if isinstance(m, PruneLowMagnitude)]


def mask_variables(model: tf.Module) -> list[tf.Variable]:
    """The mask variables of all ``MaskedEmbedding`` tables, or else of all TFMOT wrappers."""
    found = [layer.mask for layer in dsl_tf.masked_embeddings(model)]
    found = found or [mask for w in pruning_wrappers(model) for _, mask, _ in w.pruning_vars]
    if not found:
        raise ValueError("model has neither MaskedEmbedding tables nor TFMOT pruning wrappers")
    return found


def density(mask_vars: list[tf.Variable]) -> float:
    """Fraction of active entries over all ``mask_vars``."""
    active = tf.add_n([tf.reduce_sum(tf.cast(m, tf.float32)) for m in mask_vars])
    return float(active) / sum(m.shape.num_elements() for m in mask_vars)


def model_density(model: tf.Module) -> float:
    """Active / total entries over all masked (or TFMOT-pruned) embedding tables."""
    return density(mask_variables(model))


def gmp_to_masked(trained: Recommender, target: Recommender) -> None:
    """Copy a GMP-trained model into ``target``, the same backbone with ``MaskedEmbedding``.

    Does what ``tfmot.sparsity.keras.strip_pruning`` does (it cannot clone subclassed
    models): re-applies each wrapper's mask to its weights and keeps the inner layer's
    weights; every trainable variable is copied in order, and each table gets TFMOT's
    final mask through ``dsl_tf.masks.apply_mask``. Both models must be built.
    """
    wrappers = {w.layer.name: w for w in pruning_wrappers(trained)}
    for wrapper in wrappers.values():
        wrapper.pruning_obj.weight_mask_op()
    src, dst = trained.trainable_variables, target.trainable_variables
    if [v.shape for v in src] != [v.shape for v in dst]:
        raise ValueError("GMP model and target model have different trainable variables")
    for s, d in zip(src, dst):
        d.assign(s)
    for layer in dsl_tf.masked_embeddings(target):
        if layer.name not in wrappers:
            raise ValueError(f"no TFMOT wrapper for table {layer.name!r}; have {sorted(wrappers)}")
        (_, mask, _), = wrappers[layer.name].pruning_vars
        masks.apply_mask(layer, tf.cast(mask, tf.bool))


def omp_prune(model: tf.Module, sparsity: float, seed: int, optimizer=None) -> None:
    """One-shot magnitude pruning: keep the ``budget(size, s)`` largest ``|w|`` of each table."""
    for index, layer in enumerate(dsl_tf.masked_embeddings(model)):
        weights = tf.reshape(layer.embeddings, [-1])
        keep = masks.budget(int(weights.shape[0]), sparsity)
        masks.apply_mask(layer, selection.magnitude_mask(weights, keep, (seed, index)), optimizer)


def table_densities(model: tf.Module) -> dict[str, float]:
    """``{table name: fraction of active entries}``."""
    return {layer.name: float(np.mean(layer.mask.numpy())) for layer in dsl_tf.masked_embeddings(model)}
