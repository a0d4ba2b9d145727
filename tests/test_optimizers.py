"""Tests for dsl_tf.optimizers.LazyAdam: the O(batch) Adam step on IndexedSlices gradients."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import tensorflow as tf

import dsl_tf
from dsl_tf import optimizers
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
