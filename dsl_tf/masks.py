"""Masks: exact budgets, random initialisation and applying a mask to a table.

Applying a mask is the only place that writes a layer's table, mask and optimizer slots
together, so that pruned entries are exactly 0 and cannot be revived by optimizer state.
"""

from __future__ import annotations

import math

import tensorflow as tf

from dsl_tf import selection
from dsl_tf.layers import MaskedEmbedding


def budget(size: int, sparsity: float) -> int:
    """Active entries kept at ``sparsity``: ``round((1 − s) · size)``, halves rounded up.

    >>> budget(1000, 0.8), budget(5, 0.5)
    (200, 3)
    """
    return int(math.floor((1.0 - sparsity) * size + 0.5))


def initial_masks(
    sizes: list[int], budgets: list[int] | int, seed: int
) -> list[tf.Tensor]:
    """Uniform random flat bool masks with an exact budget.

    ``budgets`` is either one budget per table, or a single int: one global budget spread
    uniformly at random over the concatenation of all tables. Table ``i``'s mask depends
    only on ``(seed, i)`` (per-table budgets), so it is reproducible and identical on
    every replica and worker.
    """
    if isinstance(budgets, int):
        flat = selection.random_mask(sum(sizes), budgets, (seed, -1))
        return list(tf.split(flat, sizes))
    return [
        selection.random_mask(size, b, (seed, i))
        for i, (size, b) in enumerate(zip(sizes, budgets))
    ]


def optimizer_slots(optimizer, variable: tf.Variable) -> list[tf.Variable]:
    """The optimizer's slot variables (momentum, Adam moments, ...) of ``variable``.

    Supports tf.keras (Keras 2) optimizers, legacy optimizers and wrappers such as
    ``LossScaleOptimizer``. Slots that do not exist yet (before the first step) are
    simply absent: they will be created as zeros.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if hasattr(optimizer, "get_slot_names"):  # legacy optimizer
        slots = (optimizer.get_slot(variable, n) for n in optimizer.get_slot_names())
        try:
            return [s for s in slots if s is not None]
        except KeyError:
            return []
    suffix = "/" + variable._shared_name  # name pattern of add_variable_from_reference
    return [
        v
        for v in optimizer.variables()
        if v.shape == variable.shape and v._shared_name.endswith(suffix)
    ]


def apply_mask(layer: MaskedEmbedding, new_mask: tf.Tensor, optimizer=None) -> None:
    """Install ``new_mask`` (bool, table-shaped or flat) on ``layer``.

    Only entries active both before and after keep their weight and optimizer slots;
    pruned entries, newly grown ones and inactive ones are set to exactly 0 in the table
    and in every slot, so grown weights start from 0 with fresh slots and no optimizer
    state can move a pruned weight.
    """
    shape = layer.embeddings.shape
    new_mask = tf.reshape(tf.cast(new_mask, tf.bool), shape)
    keep = tf.logical_and(new_mask, tf.cast(layer.mask, tf.bool))
    layer.embeddings.assign(tf.where(keep, layer.embeddings, tf.zeros_like(layer.embeddings)))
    if optimizer is not None:
        for slot in optimizer_slots(optimizer, layer.embeddings):
            slot.assign(tf.where(keep, slot, tf.zeros_like(slot)))
    layer.mask.assign(tf.cast(new_mask, layer.mask.dtype))
    # The first mask replaces the all-ones initial state; later ones add to the history.
    if bool(layer.mask_initialized.numpy()):
        new_mask = tf.logical_or(layer.ever_active, new_mask)
    layer.ever_active.assign(new_mask)
    layer.mask_initialized.assign(True)
