"""Tests for dsl_tf.optimizers.LazyAdam: the O(batch) Adam step on IndexedSlices gradients."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import tensorflow as tf

import dsl_tf
from dsl_tf import masks, optimizers
from dsl_tf.optimizers import LazyAdam

LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-7


def reference_step(state: dict, indices, values, step: int, amsgrad: bool = False,
                   lr: float = LR, b1: float = B1, b2: float = B2, eps: float = EPS) -> None:
    """Lazy Adam in numpy (float64), in place on ``state`` = {w, m, v, vhat}; ``step`` from 1."""
    rows, inverse = np.unique(np.asarray(indices), return_inverse=True)
    g = np.zeros((len(rows),) + np.shape(values)[1:])
    np.add.at(g, inverse, np.asarray(values, np.float64))
    w, m, v, vhat = state["w"], state["m"], state["v"], state["vhat"]
    m[rows] = b1 * m[rows] + (1 - b1) * g
    v[rows] = b2 * v[rows] + (1 - b2) * g * g
    denominator = v[rows]
    if amsgrad:
        vhat[rows] = np.maximum(vhat[rows], v[rows])
        denominator = vhat[rows]
    alpha = lr * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    w[rows] -= alpha * m[rows] / (np.sqrt(denominator) + eps)


def _state(init: np.ndarray) -> dict:
    return {"w": init.astype(np.float64), "m": np.zeros(init.shape), "v": np.zeros(init.shape),
            "vhat": np.zeros(init.shape)}


def _slots(opt: LazyAdam, var: tf.Variable) -> dict:
    index = opt._index_dict[opt._var_key(var)]
    slots = {"m": opt._momentums[index].numpy(), "v": opt._velocities[index].numpy()}
    if opt.amsgrad:
        slots["vhat"] = opt._velocity_hats[index].numpy()
    return slots


def _random_slices(rng, shape: tuple, steps: int, batch: int):
    """Per step: indices with repeats (drawn from the first half of the rows) and values."""
    return [(rng.integers(0, shape[0] // 2, batch), rng.normal(size=(batch,) + shape[1:]).astype(np.float32))
            for _ in range(steps)]


@pytest.mark.parametrize("shape", [(12, 3), (20,)], ids=["table", "vector"])
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_matches_numpy_reference_over_steps_with_repeated_indices(shape, mode, amsgrad):
    rng = np.random.default_rng(0)
    init = rng.normal(size=shape).astype(np.float32)
    var = tf.Variable(init)
    opt = LazyAdam(LR, beta_1=B1, beta_2=B2, epsilon=EPS, amsgrad=amsgrad)
    if mode == "xla":
        opt.jit_compile = True  # Keras only turns it on with a GPU; force the XLA update path

    def apply(indices, values):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant(shape, tf.int64)), var)])

    if mode == "function":
        apply = tf.function(apply)
    ref = _state(init)
    for step, (indices, values) in enumerate(_random_slices(rng, shape, steps=6, batch=9), start=1):
        assert len(np.unique(indices)) < len(indices)  # repeated indices in every step
        apply(tf.constant(indices), tf.constant(values))
        reference_step(ref, indices, values, step, amsgrad=amsgrad)
    np.testing.assert_allclose(var.numpy(), ref["w"], rtol=0, atol=1e-6)
    for name, slot in _slots(opt, var).items():
        np.testing.assert_allclose(slot, ref[name], rtol=0, atol=1e-6)
    half = shape[0] // 2  # the second half of the rows is never looked up: bit-identical
    np.testing.assert_array_equal(var.numpy()[half:], init[half:])
    assert not _slots(opt, var)["m"][half:].any()


def test_update_step_alone_sums_repeated_indices():
    """update_step called without apply_gradients' deduplication still sums repeats."""
    var = tf.Variable(tf.zeros([3, 2]))
    opt = LazyAdam(LR)
    opt.build([var])
    values = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], np.float32)
    opt.update_step(tf.IndexedSlices(tf.constant(values), tf.constant([2, 0, 2])), var)
    ref = _state(np.zeros((3, 2)))
    reference_step(ref, [2, 0, 2], values, step=1)
    np.testing.assert_allclose(var.numpy(), ref["w"], atol=1e-6)
    np.testing.assert_allclose(_slots(opt, var)["m"], ref["m"], atol=1e-6)


def test_untouched_rows_weights_and_moments_are_bit_identical():
    rng = np.random.default_rng(1)
    var = tf.Variable(rng.normal(size=(10, 4)).astype(np.float32))
    lazy, adam = LazyAdam(LR), tf.keras.optimizers.Adam(LR)
    twin = tf.Variable(var.numpy())
    everything = tf.IndexedSlices(tf.constant(rng.normal(size=(10, 4)), tf.float32), tf.range(10))
    for opt, v in ((lazy, var), (adam, twin)):  # every row gets non-zero moments
        opt.apply_gradients([(everything, v)])
    before = {"w": var.numpy(), **_slots(lazy, var)}
    adam_before = _slots(adam, twin)
    touched = [1, 7, 1]
    batch = tf.IndexedSlices(tf.constant(rng.normal(size=(3, 4)), tf.float32), tf.constant(touched))
    lazy.apply_gradients([(batch, var)])
    adam.apply_gradients([(batch, twin)])
    after = {"w": var.numpy(), **_slots(lazy, var)}
    rest = np.setdiff1d(np.arange(10), touched)
    for name in ("w", "m", "v"):
        np.testing.assert_array_equal(after[name][rest], before[name][rest])
        assert np.all(after[name][[1, 7]] != before[name][[1, 7]])
    # Keras Adam decays the moments of every row (what LazyAdam avoids)
    assert np.all(_slots(adam, twin)["m"][rest] != adam_before["m"][rest])


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_dense_gradients_are_exactly_keras_adam(amsgrad):
    rng = np.random.default_rng(2)
    init = rng.normal(size=(6, 5)).astype(np.float32)
    lazy_var, adam_var = tf.Variable(init), tf.Variable(init)
    lazy = LazyAdam(LR, amsgrad=amsgrad)
    adam = tf.keras.optimizers.Adam(LR, amsgrad=amsgrad)
    for _ in range(4):
        grad = tf.constant(rng.normal(size=(6, 5)), tf.float32)
        lazy.apply_gradients([(grad, lazy_var)])
        adam.apply_gradients([(grad, adam_var)])
    np.testing.assert_array_equal(lazy_var.numpy(), adam_var.numpy())
    for name, slot in _slots(lazy, lazy_var).items():
        np.testing.assert_array_equal(slot, _slots(adam, adam_var)[name])


def test_sparse_step_touching_every_row_once_is_bit_identical_to_adam():
    rng = np.random.default_rng(3)
    init = rng.normal(size=(8, 3)).astype(np.float32)
    lazy_var, adam_var = tf.Variable(init), tf.Variable(init)
    lazy, adam = LazyAdam(LR), tf.keras.optimizers.Adam(LR)
    for _ in range(3):
        values = tf.constant(rng.normal(size=(8, 3)), tf.float32)
        order = tf.constant(rng.permutation(8))
        lazy.apply_gradients([(tf.IndexedSlices(tf.gather(values, order), order, tf.constant([8, 3])), lazy_var)])
        adam.apply_gradients([(values, adam_var)])
    np.testing.assert_array_equal(lazy_var.numpy(), adam_var.numpy())


def test_clipnorm_and_weight_decay_are_applied_by_the_base_class():
    rng = np.random.default_rng(4)
    init = rng.normal(size=(6, 2)).astype(np.float32)
    var = tf.Variable(init)
    opt = LazyAdam(LR, clipnorm=0.5, weight_decay=0.1)
    ref = _state(init)
    for step in (1, 2, 3):
        indices = np.array([0, 3, 0])
        values = rng.normal(size=(3, 2)).astype(np.float32) * 4
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(indices)), var)])
        values = values * min(1.0, 0.5 / np.linalg.norm(values))  # clip_by_norm of the slices' values
        ref["w"] -= ref["w"] * 0.1 * LR  # decoupled weight decay of the whole variable
        reference_step(ref, indices, values, step)
    np.testing.assert_allclose(var.numpy(), ref["w"], atol=1e-6)


def test_model_fit_on_embedding_leaves_rows_absent_from_the_batches_untouched():
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(5)
    emb = tf.keras.layers.Embedding(50, 4)
    model = tf.keras.Sequential([tf.keras.Input((2,), dtype="int32"), emb, tf.keras.layers.Flatten(),
                                 tf.keras.layers.Dense(1)])
    model.compile(LazyAdam(0.05), tf.keras.losses.BinaryCrossentropy(from_logits=True))
    initial = emb.embeddings.numpy()
    everyone = np.stack([rng.permutation(50), rng.permutation(50)], axis=1)  # every row looked up
    model.fit(everyone, (everyone.sum(axis=1) % 2).astype(np.float32), batch_size=25, verbose=0)
    before = {"w": emb.embeddings.numpy(), **_slots(model.optimizer, emb.embeddings)}
    assert np.all(before["w"] != initial) and np.all(before["v"] > 0)  # every row has moments now

    ids = rng.integers(0, 30, size=(256, 2))  # rows 30..49 absent from these batches
    history = model.fit(ids, (ids.sum(axis=1) % 2).astype(np.float32), batch_size=32, epochs=3, verbose=0)
    assert model.optimizer.iterations.numpy() == 2 + 24
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = {"w": emb.embeddings.numpy(), **_slots(model.optimizer, emb.embeddings)}
    for name in ("w", "m", "v"):  # Keras Adam would decay m, v and keep moving the rows
        np.testing.assert_array_equal(after[name][30:], before[name][30:])
        assert np.all(after[name][:30] != before[name][:30])


def test_with_dynamic_sparsity_pruned_entries_stay_zero():
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(8)
    users, items = rng.integers(0, 40, 640), rng.integers(0, 60, 640)
    labels = (rng.random(640) < 0.5).astype(np.float32)
    u, i = tf.keras.Input((), dtype="int64"), tf.keras.Input((), dtype="int64")
    tables = dsl_tf.MaskedEmbedding(40, 8, name="users"), dsl_tf.MaskedEmbedding(60, 8, name="items")
    model = tf.keras.Model([u, i], tf.reduce_sum(tables[0](u) * tables[1](i), axis=-1, keepdims=True))
    model.compile(LazyAdam(0.05), tf.keras.losses.BinaryCrossentropy(from_logits=True))
    callback = dsl_tf.DynamicSparsity(0.75, update_interval=5, seed=1)
    model.fit((users, items), labels, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    assert len(callback.explorations) == 7  # steps 5, 10, ..., 35 of 40
    for table, budget in zip(tables, (80, 120)):
        mask = table.mask.numpy()
        assert int(mask.sum()) == budget
        assert np.count_nonzero(table.embeddings.numpy()[mask == 0]) == 0
        for slot in _slots(model.optimizer, table.embeddings).values():
            assert np.count_nonzero(slot[mask == 0]) == 0


def test_config_round_trip_and_registered_serialization():
    schedule = tf.keras.optimizers.schedules.ExponentialDecay(0.01, 100, 0.5)
    opt = LazyAdam(schedule, beta_1=0.8, beta_2=0.99, epsilon=1e-6, adaptive_epsilon=True, amsgrad=True,
                   clipnorm=1.0, name="lazy")
    config = opt.get_config()
    assert config["adaptive_epsilon"] is True and config["amsgrad"] is True and config["beta_1"] == 0.8
    clone = LazyAdam.from_config(dict(config))  # Keras' from_config edits its argument
    assert clone.get_config() == config
    restored = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt))
    assert type(restored) is LazyAdam and restored.get_config() == config
    assert tf.keras.utils.get_registered_name(LazyAdam) == "dsl_tf>LazyAdam"


def test_checkpoint_round_trip_resumes_exactly_and_slots_are_adams(tmp_path):
    rng = np.random.default_rng(6)
    init = rng.normal(size=(10, 3)).astype(np.float32)
    batches = _random_slices(rng, (10, 3), steps=5, batch=6)

    def step(opt, var, indices, values):
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(indices)), var)])

    var, opt = tf.Variable(init), LazyAdam(LR)
    for batch in batches[:3]:
        step(opt, var, *batch)
    path = tf.train.Checkpoint(var=var, optimizer=opt).write(str(tmp_path / "ckpt"))
    for batch in batches[3:]:
        step(opt, var, *batch)

    var2, opt2 = tf.Variable(tf.zeros_like(init)), LazyAdam(LR)
    opt2.build([var2])  # slots exist, so restore fills them immediately
    tf.train.Checkpoint(var=var2, optimizer=opt2).read(path).assert_consumed()
    assert opt2.iterations.numpy() == 3
    for batch in batches[3:]:
        step(opt2, var2, *batch)
    np.testing.assert_array_equal(var2.numpy(), var.numpy())
    for name, slot in _slots(opt, var).items():
        np.testing.assert_array_equal(_slots(opt2, var2)[name], slot)

    # the same slots as Keras Adam: a LazyAdam checkpoint restores into Adam
    var3, adam = tf.Variable(tf.zeros_like(init)), tf.keras.optimizers.Adam(LR)
    adam.build([var3])
    tf.train.Checkpoint(var=var3, optimizer=adam).read(path).assert_consumed()
    assert np.abs(_slots(adam, var3)["m"]).sum() > 0


_MIRRORED = """
import json
import numpy as np
import dsl_tf, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(7)
init_t, init_v = rng.normal(size=(12, 3)).astype(np.float32), rng.normal(size=(16,)).astype(np.float32)
# per step, per replica: (indices, values) for the table and for the vector (repeats across replicas)
steps = [[(rng.integers(0, 6, 5), rng.normal(size=(5, 3)).astype(np.float32),
           rng.integers(0, 8, 4), rng.normal(size=(4,)).astype(np.float32)) for _ in range(2)]
         for _ in range(3)]
with strategy.scope():
    table, vector = tf.Variable(init_t), tf.Variable(init_v)
    opt = dsl_tf.LazyAdam(0.01)

@tf.function
def train(per_replica):
    def fn(ti, tv, vi, vv):
        grads = [tf.IndexedSlices(tv, ti, tf.constant([12, 3], tf.int64)),
                 tf.IndexedSlices(vv, vi, tf.constant([16], tf.int64))]
        opt.apply_gradients(zip(grads, [table, vector]))
    strategy.run(fn, args=per_replica)

for parts in steps:
    per_replica = [strategy.experimental_distribute_values_from_function(
        lambda ctx, k=k: tf.constant(parts[ctx.replica_id_in_sync_group][k])) for k in range(4)]
    train(per_replica)
out = {"table": [v.numpy().tolist() for v in table.values], "vector": [v.numpy().tolist() for v in vector.values],
       "steps": [[[a.tolist() for a in part] for part in parts] for parts in steps],
       "init_t": init_t.tolist(), "init_v": init_v.tolist(), "replicas": strategy.num_replicas_in_sync}
print("RESULT" + json.dumps(out))
"""


def test_mirrored_strategy_two_logical_cpus_matches_reference(python_subprocess):
    proc = python_subprocess(_MIRRORED, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["replicas"] == 2
    table, vector = _state(np.array(out["init_t"])), _state(np.array(out["init_v"]))
    for step, parts in enumerate(out["steps"], start=1):  # gradients summed over the replicas
        reference_step(table, sum((p[0] for p in parts), []), sum((p[1] for p in parts), []), step)
        reference_step(vector, sum((p[2] for p in parts), []), sum((p[3] for p in parts), []), step)
    for replica in range(2):
        np.testing.assert_allclose(out["table"][replica], table["w"], atol=1e-6)
        np.testing.assert_allclose(out["vector"][replica], vector["w"], atol=1e-6)
    np.testing.assert_array_equal(out["table"][0], out["table"][1])


def test_exported_from_package_and_docstring_examples():
    assert dsl_tf.LazyAdam is LazyAdam and "LazyAdam" in dsl_tf.__all__
    results = doctest.testmod(optimizers)
    assert results.attempted >= 5 and results.failed == 0


# ------------------------------------------------------------------ CatchUpAdam
# Tolerance against Keras Adam on the same dense gradients, float32, weights ~N(0, 1), 60 steps
# at lr 0.01: |Δw| <= 5e-6 (float32 rounding of 60 steps differs; LazyAdam is off by ~0.1),
# |Δm|, |Δv| <= 1e-6 (moments up to ~1).
W_ATOL, SLOT_ATOL = 5e-6, 1e-6


def _adam_twins(init: np.ndarray, amsgrad: bool = False):
    """(CatchUpAdam, LazyAdam, Keras Adam), each with its own copy of ``init``."""
    return [(opt, tf.Variable(init)) for opt in (dsl_tf.CatchUpAdam(LR, amsgrad=amsgrad),
                                                  LazyAdam(LR, amsgrad=amsgrad),
                                                  tf.keras.optimizers.Adam(LR, amsgrad=amsgrad))]


def _max_diff(opt, var, ref_opt, ref_var) -> dict:
    ours, theirs = {"w": var.numpy(), **_slots(opt, var)}, {"w": ref_var.numpy(), **_slots(ref_opt, ref_var)}
    return {name: float(np.abs(ours[name] - theirs[name]).max()) for name in ours}


def _sparse_steps(rng, rows: int, steps: int):
    """Row ids per step: repeats within a batch; rows of the second half skipped for the
    first half of the steps, then only now and then; a few rows never."""
    out = []
    for step in range(steps):
        high = rows // 2 if step < steps // 2 else rows - 2
        ids = rng.integers(0, high, rng.integers(2, 9))
        out.append(np.append(ids, ids[0]))
    return out


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("shape", [(30, 4), (40,)], ids=["table", "vector"])
def test_catch_up_adam_equals_keras_adam_on_dense_gradients(shape, amsgrad):
    rng = np.random.default_rng(10)
    init = rng.normal(size=shape).astype(np.float32)
    (ours, var), (lazy, lazy_var), (adam, adam_var) = _adam_twins(init, amsgrad)
    for step, ids in enumerate(_sparse_steps(rng, shape[0], 60)):
        grad = tf.IndexedSlices(tf.constant(rng.normal(size=(len(ids),) + shape[1:]), tf.float32),
                                tf.constant(ids), tf.constant(shape))
        dense = tf.convert_to_tensor(grad)
        ours.apply_gradients([(dense if step == 40 else grad, var)])  # one dense step: catches up all
        lazy.apply_gradients([(grad, lazy_var)])
        adam.apply_gradients([(dense, adam_var)])
    assert _max_diff(ours, var, adam, adam_var)["w"] > 1e-3  # rows not looked up lag behind ...
    ours.catch_up()  # ... until caught up
    diff = _max_diff(ours, var, adam, adam_var)
    assert diff["w"] <= W_ATOL and max(diff[k] for k in diff if k != "w") <= SLOT_ATOL, diff
    assert _max_diff(lazy, lazy_var, adam, adam_var)["w"] > 1e-2  # LazyAdam is not Adam
    np.testing.assert_array_equal(ours._last_steps["0"].numpy(), 60)


def test_catch_up_adam_dense_gradients_catch_up_only_when_rows_lag(monkeypatch):
    """A variable that only gets dense gradients (a Dense kernel) has no lagging row: its step
    skips the whole-variable catch-up pass (counted eagerly: never run) and is Keras Adam's bit
    for bit. After a sparse step, the next dense step catches up the rows it left behind, eagerly
    and traced."""
    calls = []
    catch_up_variable = dsl_tf.CatchUpAdam._catch_up_variable
    monkeypatch.setattr(dsl_tf.CatchUpAdam, "_catch_up_variable",
                        lambda self, *args, **kwargs: calls.append(1) or catch_up_variable(self, *args, **kwargs))
    rng = np.random.default_rng(14)
    init = rng.normal(size=(6, 3)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=(6, 3)), tf.float32) for _ in range(6)]
    sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)), tf.float32), tf.constant([0, 4]),
                              tf.constant([6, 3]))
    for traced in (False, True):
        (ours, var), _, (adam, adam_var) = _adam_twins(init)
        apply = tf.function(ours.apply_gradients) if traced else ours.apply_gradients
        for step, grad in enumerate(grads):
            apply([(sparse if step == 4 else grad, var)])  # rows 1, 2, 3, 5 miss step 5 ...
            adam.apply_gradients([(tf.convert_to_tensor(sparse) if step == 4 else grad, adam_var)])
            if step == 3:
                np.testing.assert_array_equal(var.numpy(), adam_var.numpy())
                assert traced or calls == []  # no row lags: no catch-up pass
        diff = _max_diff(ours, var, adam, adam_var)  # ... and are caught up at step 6, the last one
        assert diff["w"] <= W_ATOL and max(diff["m"], diff["v"]) <= SLOT_ATOL, diff
        np.testing.assert_array_equal(ours._last_steps["0"].numpy(), 6)
        assert traced or calls == [1]


def _compact_table(seed: int) -> dsl_tf.CompactMaskedEmbedding:
    tf.keras.utils.set_random_seed(seed)
    layer = dsl_tf.CompactMaskedEmbedding(30, 8, sparsity=0.6, growth_scores="none")
    layer.build(None)
    rng = np.random.default_rng(seed)  # a random layout with rows of 0..8 active entries
    layer.set_layout(tf.constant(rng.choice(30 * 8, layer.budget, replace=False), tf.int64))
    return layer


def test_catch_up_adam_equals_keras_adam_on_a_compact_table():
    """values' IndexedSlices index value positions: their rows come from the layout."""
    rng = np.random.default_rng(11)
    layers = [_compact_table(3) for _ in range(3)]
    opts = [dsl_tf.CatchUpAdam(LR), LazyAdam(LR), tf.keras.optimizers.Adam(LR)]
    steps = _sparse_steps(rng, 30, 60)
    for ids in steps:
        ids = tf.constant(ids)
        target = tf.constant(rng.normal(size=(len(ids), 8)), tf.float32)
        for layer, opt in zip(layers, opts):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(layer(ids) - target))
            grad = tape.gradient(loss, layer.values)
            assert isinstance(grad, tf.IndexedSlices)
            opt.apply_gradients([(grad if opt is not opts[2] else tf.convert_to_tensor(grad), layer.values)])
    (ours, lazy, adam), (table, lazy_table, adam_table) = opts, layers
    assert ours._last_steps["0"].shape == [30]  # one step counter per row, not per value
    ours.catch_up()
    diff = _max_diff(ours, table.values, adam, adam_table.values)
    assert diff["w"] <= W_ATOL and diff["m"] <= SLOT_ATOL and diff["v"] <= SLOT_ATOL, diff
    assert _max_diff(lazy, lazy_table.values, adam, adam_table.values)["w"] > 1e-2


def test_catch_up_adam_step_touches_only_the_looked_up_rows():
    rng = np.random.default_rng(12)
    var = tf.Variable(rng.normal(size=(10, 3)).astype(np.float32))
    opt = dsl_tf.CatchUpAdam(LR)
    everything = tf.IndexedSlices(tf.constant(rng.normal(size=(10, 3)), tf.float32), tf.range(10))
    opt.apply_gradients([(everything, var)])  # every row has moments
    before = {"w": var.numpy(), **_slots(opt, var), "last": opt._last_steps["0"].numpy()}
    touched = [4, 2, 4]
    opt.apply_gradients([(tf.IndexedSlices(tf.constant(rng.normal(size=(3, 3)), tf.float32),
                                           tf.constant(touched)), var)])
    after = {"w": var.numpy(), **_slots(opt, var), "last": opt._last_steps["0"].numpy()}
    rest = np.setdiff1d(np.arange(10), touched)
    for name in before:
        np.testing.assert_array_equal(after[name][rest], before[name][rest])
        assert np.all(after[name][[2, 4]] != before[name][[2, 4]])
    assert after["last"].tolist() == [1, 1, 2, 1, 2, 1, 1, 1, 1, 1]


def _dsl_fit(optimizer, storage: str) -> tuple[list, tf.keras.Model]:
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(13)
    users, items = rng.zipf(1.5, 480) % 40, rng.zipf(1.3, 480) % 60  # skewed: rows skipped for many steps
    labels = rng.normal(size=480).astype(np.float32)
    u, i = tf.keras.Input((), dtype="int64"), tf.keras.Input((), dtype="int64")
    make = (lambda n, name: dsl_tf.CompactMaskedEmbedding(n, 8, sparsity=0.75, name=name)) if storage == "compact" \
        else (lambda n, name: dsl_tf.MaskedEmbedding(n, 8, name=name))
    tables = [make(n, name) for n, name in ((40, "u"), (60, "i"))]
    model = tf.keras.Model([u, i], tf.reduce_sum(tables[0](u) * tables[1](i), axis=-1))
    model.compile(optimizer, "mse")
    callback = dsl_tf.DynamicSparsity(0.75, update_interval=7, seed=1)
    model.fit((users, items), labels, batch_size=32, epochs=3, verbose=0, shuffle=False, callbacks=[callback])
    assert len(callback.explorations) == 6  # steps 7, 14, ..., 42 of 45
    return [_state_of(t) for t in tables], model


def _state_of(table) -> dict:
    if masks.is_compact(table):
        return {"row_splits": table.row_splits.numpy(), "col_ids": table.col_ids.numpy(), "w": table.values.numpy()}
    return {"mask": table.mask.numpy(), "w": table.embeddings.numpy()}


@pytest.mark.parametrize("storage", ["compact", "dense"])
def test_dynamic_sparsity_with_catch_up_adam_gives_keras_adams_masks_and_values(storage, monkeypatch):
    """The forward pass reads caught-up rows and the prune ranks caught-up magnitudes:
    DynamicSparsity builds the optimizer first, catches up before each exploration and at
    the end of fit."""
    adam_tables, _ = _dsl_fit(tf.keras.optimizers.Adam(0.05), storage)
    tables, model = _dsl_fit(dsl_tf.CatchUpAdam(0.05), storage)
    for ours, theirs in zip(tables, adam_tables):
        for name in ours:
            if name == "w":
                np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=2e-5)
            else:
                np.testing.assert_array_equal(ours[name], theirs[name])
    assert min(int(tf.reduce_min(s)) for s in model.optimizer._last_steps.values()) == 45

    monkeypatch.setattr(dsl_tf.callbacks, "catch_up_optimizer", lambda optimizer: None)
    stale, _ = _dsl_fit(dsl_tf.CatchUpAdam(0.05), storage)  # without catching up: other masks
    assert any(np.any(s[k] != t[k]) for s, t in zip(stale, adam_tables) for k in s if k != "w")


def test_catch_up_adam_config_checkpoint_and_errors(tmp_path):
    opt = dsl_tf.CatchUpAdam(0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6, adaptive_epsilon=True, amsgrad=True)
    config = opt.get_config()
    assert config["name"] == "CatchUpAdam" and config["adaptive_epsilon"] is True
    restored = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(opt))
    assert type(restored) is dsl_tf.CatchUpAdam and restored.get_config() == config
    assert tf.keras.utils.get_registered_name(dsl_tf.CatchUpAdam) == "dsl_tf>CatchUpAdam"
    for kwargs, named in (({"weight_decay": 0.1}, "weight_decay=0.1"), ({"use_ema": True}, "use_ema=True"),
                          ({"beta_1": 0.95, "beta_2": 0.9}, "beta_1=0.95")):
        with pytest.raises(ValueError, match=named):
            dsl_tf.CatchUpAdam(**kwargs)

    rng = np.random.default_rng(14)
    batches = [(rng.integers(0, 4, 3), rng.normal(size=(3, 2)).astype(np.float32)) for _ in range(6)]

    def run(opt, var, part):
        for ids, values in part:
            opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(ids), tf.constant([8, 2])), var)])

    var, opt = tf.Variable(tf.ones([8, 2])), dsl_tf.CatchUpAdam(LR)
    run(opt, var, batches[:3])
    path = tf.train.Checkpoint(var=var, optimizer=opt).write(str(tmp_path / "ckpt"))
    run(opt, var, batches[3:])
    var2, opt2 = tf.Variable(tf.zeros([8, 2])), dsl_tf.CatchUpAdam(LR)
    opt2.build([var2])
    tf.train.Checkpoint(var=var2, optimizer=opt2).read(path).assert_consumed()  # row steps included
    run(opt2, var2, batches[3:])
    for o, v in ((opt, var), (opt2, var2)):
        o.catch_up()
    np.testing.assert_array_equal(var2.numpy(), var.numpy())


_MIRRORED_CATCH_UP = """
import json
import numpy as np
import dsl_tf, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(15)
init = rng.normal(size=(12, 3)).astype(np.float32)
steps = [[(rng.integers(0, 6 if s < 5 else 12, 3), rng.normal(size=(3, 3)).astype(np.float32)) for _ in range(2)]
         for s in range(10)]
with strategy.scope():
    table = tf.Variable(init)
    opt = dsl_tf.CatchUpAdam(0.01)
twin, adam = tf.Variable(init), tf.keras.optimizers.Adam(0.01)

@tf.function
def train(ids, values):
    strategy.run(lambda i, v: opt.apply_gradients([(tf.IndexedSlices(v, i, tf.constant([12, 3], tf.int64)), table)]),
                 args=(ids, values))

for parts in steps:
    ids, values = (strategy.experimental_distribute_values_from_function(
        lambda ctx, k=k: tf.constant(parts[ctx.replica_id_in_sync_group][k])) for k in range(2))
    train(ids, values)
    dense = sum(tf.convert_to_tensor(tf.IndexedSlices(tf.constant(v), tf.constant(i), tf.constant([12, 3])))
                for i, v in parts)  # gradients summed over the replicas
    adam.apply_gradients([(dense, twin)])
opt.catch_up()
print("RESULT" + json.dumps({"replicas": [v.numpy().tolist() for v in table.values], "adam": twin.numpy().tolist()}))
"""


def test_catch_up_adam_under_mirrored_strategy_equals_keras_adam(python_subprocess):
    proc = python_subprocess(_MIRRORED_CATCH_UP, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for replica in out["replicas"]:
        np.testing.assert_allclose(replica, out["adam"], rtol=0, atol=W_ATOL)
    np.testing.assert_array_equal(out["replicas"][0], out["replicas"][1])


def _traced_compact_fit(opt, lookups: int, reorder: bool = False, steps: int = 30) -> np.ndarray:
    """A compact table trained by ``opt`` in a ``tf.function`` step that looks it up ``lookups``
    times (``reorder``: the gradient's entries reversed); its values once caught up."""
    rng = np.random.default_rng(14)
    layer = _compact_table(4)
    opt.build([layer.values])  # installs the caught-up reader before the step is traced
    getattr(opt, "prepare", lambda module: False)(layer)  # LazyAdam's reader

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 8], tf.float32)])
    def step(ids, target):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(tf.square(layer(ids + k) - target)) for k in range(lookups))
        grad = tape.gradient(loss, layer.values)
        if reorder:
            grad = tf.IndexedSlices(grad.values[::-1], grad.indices[::-1], grad.dense_shape)
        opt.apply_gradients([(grad if isinstance(opt, LazyAdam) else tf.convert_to_tensor(grad), layer.values)])

    for ids in _sparse_steps(rng, 29, steps):
        step(tf.constant(ids), tf.constant(rng.normal(size=(len(ids), 8)), tf.float32))
    getattr(opt, "catch_up", lambda: None)()
    return layer.values.numpy()


@pytest.mark.parametrize("lookups, reorder", [(1, False), (2, False), (1, True)],
                         ids=["one_lookup", "two_lookups", "reordered_gradient"])
def test_catch_up_adam_step_takes_the_state_its_lookups_caught_up(lookups, reorder, monkeypatch):
    """A gradient over this step's lookups (one, or several with shared entries): the update
    takes their caught-up entries and rows (no row search, no second catch-up), checked here by
    breaking the searched path; any other gradient (here reordered): the update searches the
    rows itself. Both equal Keras Adam."""
    adam = _traced_compact_fit(tf.keras.optimizers.Adam(LR), lookups, reorder)
    np.testing.assert_allclose(_traced_compact_fit(dsl_tf.CatchUpAdam(LR), lookups, reorder), adam,
                               rtol=0, atol=W_ATOL)
    monkeypatch.setattr(dsl_tf.CatchUpAdam, "_read_rows", lambda self, variable, slot, indices: tuple(
        tf.zeros_like(x) if x is not None else None for x in LazyAdam._read_rows(self, variable, slot, indices)))
    broken = np.abs(_traced_compact_fit(dsl_tf.CatchUpAdam(LR), lookups, reorder) - adam).max()
    assert broken > 1e-2 if reorder else broken <= W_ATOL


@pytest.mark.parametrize("lookups, reorder", [(1, False), (2, False), (1, True)],
                         ids=["one_lookup", "two_lookups", "reordered_gradient"])
def test_lazy_adam_step_takes_the_entries_and_values_of_a_single_lookup(lookups, reorder, monkeypatch):
    """A gradient over the table's one lookup in this step (distinct entries): the update takes
    that lookup's entries and the values it read, with no deduplication and no second gather,
    checked by breaking the searched path (which two lookups, with shared entries, and a gradient
    in another order take). The values are those of the searched path, bit for bit."""
    with monkeypatch.context() as patch:
        patch.setattr(optimizers._LookedUp, "put", lambda self, slot, state: None)
        searched = _traced_compact_fit(LazyAdam(LR), lookups, reorder)  # nothing handed over
    np.testing.assert_array_equal(_traced_compact_fit(LazyAdam(LR), lookups, reorder), searched)
    monkeypatch.setattr(LazyAdam, "_step_summed", lambda self, gradient, variable, slot: None)
    broken = _traced_compact_fit(LazyAdam(LR), lookups, reorder)
    assert np.array_equal(broken, searched) == (lookups == 1 and not reorder)
