"""Sparsification methods compared in one harness: dense, DSL, RP, SET, GMP and OMP.

* ``dense``: no mask (the ``MaskedEmbedding`` masks stay all ones).
* ``dsl``: :class:`dsl_tf.DynamicSparsity` with gradient growth (the paper).
* ``rp``: random pruning at initialisation, mask fixed (``growth="none"``).
* ``set``: SET, magnitude prune + random regrowth (``growth="random"``).
* ``gmp``: gradual magnitude pruning (Zhu & Gupta 2017) with TF Model Optimization's
  ``prune_low_magnitude`` on plain ``Embedding`` tables, in three stages
  (:func:`gmp_schedule`): dense training for the first half, ``PolynomialDecay`` from 0
  to s until 75 % of training, fine-tuning at s; the final weights and TFMOT's masks
  are then copied into the ``MaskedEmbedding`` model (:func:`gmp_to_masked`).
* ``omp``: one-shot magnitude pruning: dense training, then the largest ``|w|`` of each
  table are kept (:func:`omp_prune`, via ``dsl_tf.selection.magnitude_mask``) and the
  model is fine-tuned with the mask fixed.

Each method is one object in :mod:`trainers.methods`; this module holds their pieces.
"""

from __future__ import annotations

import dsl_tf
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from dsl_tf import masks, selection
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,  # not exported by tfmot's public API; needed to find the wrappers
)

from trainers.models import EmbeddingFactory, Recommender

def gmp_schedule(sparsity: float, total_steps: int, frequency: int, end_fraction: float,
                 begin_fraction: float = 0.5) -> tfmot.sparsity.keras.PolynomialDecay:
    """TFMOT ``PolynomialDecay`` 0 → ``sparsity`` from ``begin_fraction`` to ``end_fraction`` of training.

    Masks are updated every ``frequency`` steps; begin and end steps are rounded down to
    multiples of ``frequency`` (so the final sparsity is reached exactly), the end at
    least one ``frequency`` after the begin and before the last step.

    The dense start matters: TFMOT zeroes pruned weights after every step, so an entry
    pruned once never returns, and magnitudes read near initialisation are noise. Pruning
    from step 0 fixed an almost random mask and scored below popularity on two_tower
    (docs/BENCHMARKS.md, "GMP baseline check"); the default starts pruning with the same
    dense half that OMP trains (``omp_dense_fraction``).

    >>> s = gmp_schedule(0.8, total_steps=1000, frequency=50, end_fraction=0.75)
    >>> s.begin_step, s.end_step, s.frequency
    (500, 750, 50)
    """
    if not 0.0 < end_fraction <= 1.0:
        raise ValueError(f"gmp end fraction must be in (0, 1], got {end_fraction!r}")
    if not 0.0 <= begin_fraction < end_fraction:
        raise ValueError(f"gmp begin fraction must be in [0, end fraction {end_fraction!r}), got {begin_fraction!r}")
    frequency = max(1, min(frequency, total_steps // 2))
    begin = frequency * int(begin_fraction * total_steps // frequency)
    last = max(begin + frequency, min(int(end_fraction * total_steps), total_steps - frequency))
    end = frequency * (last // frequency)
    return tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=begin, end_step=end, frequency=frequency)


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
    """The mask variables of all TFMOT ``PruneLowMagnitude`` wrappers of ``model``."""
    return [mask for w in pruning_wrappers(model) for _, mask, _ in w.pruning_vars]


def model_density(model: tf.Module) -> float:
    """Active / total entries over all masked (either storage) or TFMOT-pruned embedding tables."""
    layers = dsl_tf.masked_embeddings(model)
    if layers:
        active = sum(masks.active_count(layer) for layer in layers)  # int64: exact beyond 2^24
        return active / sum(layer.input_dim * layer.output_dim for layer in layers)
    found = mask_variables(model)
    if not found:
        raise ValueError("model has neither MaskedEmbedding tables nor TFMOT pruning wrappers")
    return sum(masks.count_active(m) for m in found) / sum(m.shape.num_elements() for m in found)


def gmp_to_masked(trained: Recommender, target: Recommender) -> None:
    """Copy a GMP-trained model into ``target``, the same backbone with ``MaskedEmbedding``.

    Does what ``tfmot.sparsity.keras.strip_pruning`` does (it cannot clone subclassed
    models): re-applies each wrapper's mask to its weights and keeps the inner layer's
    weights. Each table is copied from the wrapper of the same name (not by position:
    two tables of equal shape could not be told apart) and gets TFMOT's final mask
    through ``dsl_tf.masks.apply_mask``; the other trainable variables are copied in
    order. Both models must be built.
    """
    wrappers = {w.layer.name: w for w in pruning_wrappers(trained)}
    tables = dsl_tf.masked_embeddings(target)
    if sorted(wrappers) != sorted(layer.name for layer in tables):
        raise ValueError(f"GMP tables {sorted(wrappers)} differ from the target's "
                         f"{sorted(layer.name for layer in tables)}")
    src_tables = {w.layer.embeddings.ref() for w in wrappers.values()}
    dst_tables = {layer.embeddings.ref() for layer in tables}
    src = [v for v in trained.trainable_variables if v.ref() not in src_tables]
    dst = [v for v in target.trainable_variables if v.ref() not in dst_tables]
    if [v.shape for v in src] != [v.shape for v in dst]:
        raise ValueError("GMP model and target model have different trainable variables")
    for s, d in zip(src, dst):
        d.assign(s)
    for layer in tables:
        wrapper = wrappers[layer.name]
        wrapper.pruning_obj.weight_mask_op()
        (weights, mask, _), = wrapper.pruning_vars
        if weights.shape != layer.embeddings.shape:
            raise ValueError(f"table {layer.name!r}: GMP shape {weights.shape} != target shape {layer.embeddings.shape}")
        layer.embeddings.assign(weights)
        masks.apply_mask(layer, tf.cast(mask, tf.bool))


def omp_prune(model: tf.Module, sparsity: float, seed: int, optimizer=None) -> None:
    """One-shot magnitude pruning: keep the ``budget(size, s)`` largest ``|w|`` of each table."""
    for index, layer in enumerate(dsl_tf.masked_embeddings(model)):
        weights = tf.reshape(layer.embeddings, [-1])
        keep = masks.budget(int(weights.shape[0]), sparsity)
        masks.apply_mask(layer, selection.magnitude_mask(weights, keep, (seed, index)), optimizer)


def table_densities(model: tf.Module) -> dict[str, float]:
    """``{table name: fraction of active entries}``."""
    return {layer.name: masks.active_count(layer) / (layer.input_dim * layer.output_dim)
            for layer in dsl_tf.masked_embeddings(model)}
