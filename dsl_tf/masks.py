"""Masks: exact budgets, random initialisation and applying a mask to a table.

Applying a mask is the only place that writes a layer's table, mask and optimizer slots
together, so that pruned entries are exactly 0 and cannot be revived by optimizer state.
"""

from __future__ import annotations

import warnings
import weakref

import numpy as np
import tensorflow as tf

from dsl_tf import selection
from dsl_tf.layers import MaskedEmbedding, row_chunks, table_budget


budget = table_budget  # round((1 − s) · size), halves rounded up: ``budget(1000, 0.8) == 200``


def initial_positions(
    sizes: list[int], budgets: list[int] | int, seed: int, chunked: bool = False
) -> list[tf.Tensor] | list[list[tf.Tensor]]:
    """Uniform random active positions (flat int64, any order) with an exact budget per table.

    ``budgets`` is either one budget per table, or a single int: one global budget spread
    uniformly at random over the concatenation of all tables. Table ``i``'s positions
    depend only on ``(seed, i)`` (per-table budgets), so they are reproducible and
    identical on every replica and worker. No tensor of a table's size is made
    (:func:`dsl_tf.selection.random_positions`), so compact tables install them directly;
    ``chunked=True`` gives each table's positions as a list of per-chunk tensors (what
    :func:`install_positions` takes for tables of billions of entries).
    """
    if isinstance(budgets, int):
        flat = selection.random_positions(sum(sizes), budgets, (seed, -1))
        bounds = np.cumsum([0] + list(sizes))
        tables = [tf.boolean_mask(flat, (flat >= lo) & (flat < hi)) - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        return [[t] for t in tables] if chunked else tables
    return [selection.random_positions(size, b, (seed, i), chunked) for i, (size, b) in enumerate(zip(sizes, budgets))]


def row_balanced_positions(rows: int, dim: int, budget: int, seed: tuple[int, int]) -> list[tf.Tensor]:
    """The initial mask of ``DynamicSparsity(budget="per_row")``: ``budget`` flat positions
    (int64, per row chunk of :func:`dsl_tf.layers.row_chunks`) with every row holding
    ``budget // rows`` or one more (those rows drawn at random), its columns uniformly at random.
    A row keeps its count for good under that budget, so none may start empty by chance.

    >>> positions = tf.concat(row_balanced_positions(4, 8, 10, (0, 0)), 0)
    >>> sorted(np.bincount(positions.numpy() // 8, minlength=4).tolist())
    [2, 2, 3, 3]
    """
    if not 0 <= budget <= rows * dim:
        raise ValueError(f"budget must be in [0, {rows * dim}] ({rows} x {dim} entries), got {budget!r}")
    extra = selection.scatter_flags(rows, selection.random_positions(rows, budget % rows, seed))
    counts = budget // rows + tf.cast(extra, tf.int64)
    columns_seed = tf.constant(seed, tf.int64) + [0, 1]
    out = []
    for c, (r0, r1) in enumerate(row_chunks(rows, dim, selection.CHUNK)):
        chunk_seed = tf.random.experimental.stateless_fold_in(columns_seed, c)
        keys = tf.random.stateless_uniform([r1 - r0, dim], seed=chunk_seed)
        ranks = tf.argsort(tf.argsort(keys, axis=1), axis=1)  # a random permutation of the columns per row
        chosen = tf.where(tf.reshape(tf.cast(ranks, tf.int64) < counts[r0:r1, None], [-1]))[:, 0]
        out.append(chosen + r0 * dim)
    return out


def initial_masks(sizes: list[int], budgets: list[int] | int, seed: int) -> list[tf.Tensor]:
    """The flat bool masks of :func:`initial_positions`."""
    return [selection.scatter_flags(size, positions)
            for size, positions in zip(sizes, initial_positions(sizes, budgets, seed))]


def count_active(mask: tf.Tensor | tf.Variable) -> int:
    """Number of non-zero entries of ``mask``, counted in int64 (exact beyond 2^24).

    >>> count_active(tf.constant([1.0, 0.0, 1.0]))
    2
    """
    return int(tf.math.count_nonzero(mask, dtype=tf.int64).numpy())


def leaf_optimizers(optimizer) -> list:
    """The optimizers that own slots: ``optimizer`` itself, or the ones it wraps
    (``LossScaleOptimizer.inner_optimizer``, TFRS ``CompositeOptimizer.optimizers``)."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return leaf_optimizers(inner)
    composed = getattr(optimizer, "optimizers", None)
    if isinstance(composed, (list, tuple)):
        return [leaf for opt in composed for leaf in leaf_optimizers(opt)]
    return [optimizer]


def optimizer_slots(optimizer, variable: tf.Variable) -> list[tf.Variable]:
    """The optimizer's per-entry slot variables (momentum, Adam moments, ...) of ``variable``.

    Found by variable identity (never by name), in Keras 2 optimizers, legacy optimizers
    and wrappers (``LossScaleOptimizer``, TFRS ``CompositeOptimizer``). Slots that do not
    exist yet (before the first step) are absent: the optimizer creates them in their
    initial state. Slots of another shape (Adafactor's factored moments) are not per-entry
    state and are left out.
    """
    return [slot for slot, _ in slot_states(optimizer, variable)]


def slot_states(optimizer, variable: tf.Variable) -> list[tuple[tf.Variable, float]]:
    """``(slot, initial value)`` for every per-entry slot of ``variable``.

    The initial value is the one the optimizer itself gives a new slot (0 for Adam's
    moments, ``initial_accumulator_value`` for Adagrad and Ftrl, ...), read from a clone
    of the optimizer built on a one-entry variable.
    """
    for opt in leaf_optimizers(optimizer):
        slots = _named_slots(opt, variable)
        if slots:
            initial = _initial_slot_values(opt, variable)
            return [(slot, initial.get(name, 0.0)) for name, slot in slots]
    return []


def has_unfound_slots(optimizer, variable: tf.Variable) -> bool:
    """Whether ``optimizer`` holds variables shaped like ``variable`` although none is
    found as ``variable``'s slot: per-entry state this module cannot reset."""
    if slot_states(optimizer, variable):
        return False
    held = optimizer.variables
    held = held() if callable(held) else held
    return any(v.shape == variable.shape for v in held)


def _named_slots(optimizer, variable: tf.Variable) -> list[tuple[str, tf.Variable]]:
    if hasattr(optimizer, "get_slot_names"):  # legacy optimizer: slots keyed by variable
        found = []
        for name in optimizer.get_slot_names():
            try:
                slot = optimizer.get_slot(variable, name)
            except KeyError:
                continue
            if slot is not None and slot.shape == variable.shape:
                found.append((name, slot))
        return found
    index_of = getattr(optimizer, "_index_dict", None)
    if not index_of:
        return []
    key = optimizer._var_key(variable)
    if key not in index_of:
        return []
    index, count = index_of[key], len(index_of)
    found = []
    for name, value in sorted(vars(optimizer).items()):
        if name in ("_variables", "_trainable_variables") or not isinstance(value, list) or len(value) != count:
            continue
        slot = value[index]
        if (isinstance(slot, tf.Variable) and slot.shape == variable.shape
                and optimizer._var_key(slot) != key):
            found.append((name, slot))
    return found


_INITIAL_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _initial_slot_values(optimizer, variable: tf.Variable) -> dict[str, float]:
    """``{slot name: initial value}`` of ``optimizer``'s per-entry slots for a variable of
    ``variable``'s rank and dtype (empty for stateless optimizers such as plain SGD)."""
    cache = _INITIAL_VALUES.setdefault(optimizer, {})
    key = (variable.shape.rank, variable.dtype.name)
    if key not in cache:
        clone = type(optimizer).from_config(optimizer.get_config())
        probe = tf.Variable(tf.zeros([1] * max(variable.shape.rank, 1), variable.dtype), name="probe")
        if hasattr(clone, "get_slot_names"):
            clone._create_all_weights([probe])
        else:
            clone.build([probe])
        cache[key] = {name: float(tf.reshape(slot, [-1])[0]) for name, slot in _named_slots(clone, probe)}
    return cache[key]


def apply_mask(
    layer: MaskedEmbedding,
    new_mask: tf.Tensor,
    optimizer=None,
    fresh: tf.Tensor | None = None,
) -> None:
    """Install ``new_mask`` (bool, table-shaped or flat) on ``layer``.

    Only entries active both before and after keep their weight and optimizer slots;
    pruned, newly grown and inactive entries are set to exactly 0 in the table and every
    slot goes back to the optimizer's initial value (0 for Adam, the initial accumulator
    for Adagrad/Ftrl), so grown weights start from 0 with fresh slots and no optimizer
    state can move a pruned weight. ``fresh`` (bool, same shape) marks entries that
    restart from scratch even though they were active before (a just-pruned entry that
    was regrown).

    Warns (``RuntimeWarning``) if the optimizer holds table-shaped state but none of it is
    found as the table's slot (see :func:`has_unfound_slots`): that state is not reset.
    """
    shape = layer.embeddings.shape
    new_mask = tf.reshape(tf.cast(new_mask, tf.bool), shape)
    keep = tf.logical_and(new_mask, tf.cast(layer.mask, tf.bool))
    if fresh is not None:
        keep = tf.logical_and(keep, tf.logical_not(tf.reshape(tf.cast(fresh, tf.bool), shape)))
    table = layer.embeddings
    table.assign(tf.where(keep, table, tf.zeros([], table.dtype)))
    if optimizer is not None:
        states = slot_states(optimizer, table)
        for slot, initial in states:
            slot.assign(tf.where(keep, slot, tf.constant(initial, slot.dtype)))
        if not states and has_unfound_slots(optimizer, table):
            warnings.warn(
                f"optimizer {type(optimizer).__name__} holds table-shaped state, but none of it was found "
                f"as a slot of {layer.name!r}: its pruned and grown entries keep stale optimizer state",
                RuntimeWarning,
            )
    layer.mask.assign(tf.cast(new_mask, layer.mask.dtype))
    # The first mask replaces the all-ones initial state; later ones add to the history.
    if bool(layer.mask_initialized.numpy()):
        new_mask = tf.logical_or(layer.ever_active, new_mask)
    layer.ever_active.assign(new_mask)
    layer.mask_initialized.assign(True)


def is_compact(layer: MaskedEmbedding) -> bool:
    """Whether ``layer`` stores only its active entries (``CompactMaskedEmbedding``)."""
    return getattr(layer, "storage", "dense") == "compact"


def active_count(layer: MaskedEmbedding) -> int:
    """Active entries of ``layer``'s table (int64-exact), for either storage."""
    if is_compact(layer):
        return int(layer.row_splits[-1].numpy())
    return count_active(layer.mask)


def install_positions(layer: MaskedEmbedding, positions: tf.Tensor | list[tf.Tensor], optimizer=None) -> None:
    """A layer's first mask, given as its active flat positions (any order; or a list of
    such tensors): for dense storage :func:`apply_mask`; for compact storage they become the
    layout (chunk by chunk) and the (element-wise drawn) initial values stay."""
    pieces = positions if isinstance(positions, list) else [positions]
    count = sum(int(tf.size(p)) for p in pieces)
    if not is_compact(layer):
        apply_mask(layer, selection.scatter_flags(layer.input_dim * layer.output_dim,
                                                  tf.concat([tf.zeros([0], tf.int64)] + pieces, 0)), optimizer)
        return
    if count != layer.budget:
        raise ValueError(f"{layer.name}: a mask of {count} active entries does not fit its compact budget of "
                         f"{layer.budget}")
    layer.set_layout(pieces)
    layer.mask_initialized.assign(True)


def apply_compact_update(layer: MaskedEmbedding, keep: tf.Tensor, grown: tf.Tensor | list[tf.Tensor],
                         optimizer=None) -> int:
    """Prune and grow a compact layer: ``keep`` (bool [budget]) marks the values that stay,
    ``grown`` (int64 flat positions, as many as pruned; or a list of such tensors) the new
    entries. Returns how many grown entries had just been pruned (regrown from scratch).

    Kept values keep their value and optimizer slots (moved to their new index in the
    position order); grown ones start at 0 with the optimizer's initial slot state. Only
    ``[budget]``-sized and per-chunk tensors are made (:meth:`~dsl_tf.CompactMaskedEmbedding.rebuild_layout`),
    one variable at a time.
    """
    keep = tf.convert_to_tensor(keep, tf.bool)
    grown = grown if isinstance(grown, list) else [grown]
    kept, added = int(tf.math.count_nonzero(keep, dtype=tf.int64)), sum(int(tf.size(g)) for g in grown)
    if kept + added != layer.budget:
        raise ValueError(f"{layer.name}: {kept} kept + {added} grown entries do not make its budget of "
                         f"{layer.budget}")
    source, regrown = layer.rebuild_layout(keep, grown)
    layer.values.assign(_moved(layer.values, source, tf.zeros([], layer.values.dtype)))
    if optimizer is not None:
        for slot, initial in slot_states(optimizer, layer.values):
            slot.assign(_moved(slot, source, tf.constant(initial, slot.dtype)))
    return regrown


@tf.function(reduce_retracing=True)
def _moved(variable, source, initial):
    """``variable`` gathered at ``source`` (``initial`` where it is −1)."""
    return tf.where(source < 0, initial, tf.gather(variable, tf.maximum(source, 0)))
