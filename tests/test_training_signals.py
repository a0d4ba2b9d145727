"""Training signals that used to fail quietly (issue 10, section 1).

Mixed precision growth scores, fits that cannot explore, empty budgets, non-finite learning
rates, numpy scalars and wrong types, and exact resume of the shuffled trainers pipeline.
"""

import json
import warnings

import numpy as np
import pytest
import tensorflow as tf

import dsl_tf
from dsl_tf import CosineSchedule, DynamicSparsity, LinearSchedule, MaskedEmbedding, masks
from trainers.data import synthetic
from trainers.models import build_model
from trainers.train import TrainConfig


def _toy(rows=200, dim=8, lr=0.01, policy="float32", seed=0):
    """Embedding → Dense regression; ``policy`` is the global dtype policy while building."""
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        tf.keras.utils.set_random_seed(seed)
        layer = MaskedEmbedding(rows, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(0, 0.1, seed=0))
        model = tf.keras.Sequential([
            tf.keras.Input((1,), dtype="int64"), layer, tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=0)),
            tf.keras.layers.Activation("linear", dtype="float32"),
        ])
        model.compile(tf.keras.optimizers.Adam(lr), "mse")  # wrapped in a LossScaleOptimizer if mixed
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    return model, layer


def _toy_data(rows=200, n=2000, scale=30.0):
    rng = np.random.default_rng(0)
    return rng.integers(0, rows, (n, 1)), (rng.normal(size=(n, 1)) * scale).astype(np.float32)


def _fit(model, callbacks, epochs=3, x=None, y=None, **kwargs):
    if x is None:
        x, y = _toy_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=50, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, (UserWarning, RuntimeWarning))
            and "DynamicSparsity" in str(w.message)]


# ------------------------------------------------------------------ 1. mixed precision
def test_tracked_gradients_are_unscaled_and_non_finite_steps_dropped():
    layer = MaskedEmbedding(10, 3)
    ids = tf.constant([2, 4, 2])
    layer(ids)
    layer.score_tracking.assign(True)
    opt = tf.keras.mixed_precision.LossScaleOptimizer(tf.keras.optimizers.SGD())
    assert layer.unscale_scores_by(opt) and not layer.unscale_scores_by(opt)
    weights = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    for factor in (1.0, np.inf):  # the second step overflows: the optimizer skips it, so do scores
        with tf.GradientTape() as tape:
            loss = opt.get_scaled_loss(tf.reduce_sum(layer(ids) * weights * factor))
        tape.gradient(loss, layer.embeddings)
    expected = np.zeros([10, 3], np.float32)
    expected[2] = [8.0, 10.0, 12.0]
    expected[4] = [4.0, 5.0, 6.0]
    assert float(opt.loss_scale) == 32768.0
    np.testing.assert_array_equal(layer.growth_scores.numpy(), expected)
    assert layer.unscale_scores_by(tf.keras.optimizers.SGD())  # back to unscaled


def _mask_run(policy, growth):
    model, layer = _toy(lr=0.001, policy=policy)
    dsl = DynamicSparsity(0.75, update_interval=10, growth=growth, seed=1)
    caught = _fit(model, [dsl], x=_toy_data(scale=300.0)[0], y=_toy_data(scale=300.0)[1])
    return layer.mask.numpy(), [e["dsl_num_swapped"] for e in dsl.explorations], caught, model


def test_mixed_precision_explores_like_float32(tmp_path):
    """Initial loss scale 2^15 overflows the first steps (skipped); scores stay finite and unscaled."""
    mask32, swapped32, caught32, _ = _mask_run("float32", "gradient")
    mask16, swapped16, caught16, model = _mask_run("mixed_float16", "gradient")
    assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert float(model.optimizer.loss_scale) < 32768  # overflowed steps happened
    assert caught32 == caught16 == []
    assert swapped16 == swapped32 and len(swapped32) == 11 and min(swapped32) > 0
    overlap = ((mask32 == 1) & (mask16 == 1)).sum() / mask32.sum()
    assert overlap > 0.975, overlap  # 0.9825 measured; 0.955 before unscaling (first exploration skipped)
    tower = tf.Module()
    tower.layer = model.layers[0]
    tower.lookup = tf.function(lambda ids: tower.layer(ids), input_signature=[tf.TensorSpec([None], tf.int64)])
    tf.saved_model.save(tower, str(tmp_path / "tower"))  # no capture of the optimizer's loss scale
    assert tf.saved_model.load(str(tmp_path / "tower")).lookup(tf.constant([3], tf.int64)).shape == [1, 8]


def test_mixed_precision_momentum_growth_explores():
    mask, swapped, caught, _ = _mask_run("mixed_float16", "momentum")
    assert caught == [] and len(swapped) == 11 and min(swapped) > 0
    assert int(mask.sum()) == 400


# ------------------------------------------------------------------ 2. fits that cannot explore
@pytest.mark.parametrize("kwargs, numbers", [
    ({"update_interval": 200}, "the optimizer is at step 0, end_step=120 (inferred: this fit's last step, "
                               "0 + 120), update_interval=200, so the next exploration would be at step 200"),
    ({"update_interval": 10, "end_step": 10}, "end_step=10 (given), update_interval=10, so the next "
                                              "exploration would be at step 10"),
])
def test_a_fit_without_exploration_warns_with_the_numbers(kwargs, numbers):
    model, _ = _toy()
    dsl = DynamicSparsity(0.75, **kwargs)
    caught = _fit(model, [dsl])
    assert dsl.explorations == []
    assert len(caught) == 1 and numbers in caught[0], caught


def test_end_step_behind_the_optimizer_warns_and_rp_does_not():
    model, _ = _toy()
    assert _fit(model, [DynamicSparsity(0.75, 10, growth="none")]) == []  # RP never explores: no warning
    dsl = DynamicSparsity(0.75, 10, end_step=50)
    caught = _fit(model, [dsl], epochs=1)
    assert dsl.explorations == []
    assert len(caught) == 1 and "optimizer is at step 120, end_step=50 (given)" in caught[0], caught


def test_second_fit_keeps_exploring_to_its_own_end():
    """Default end_step = the step at which this fit ends: 120 for the first fit, 120 + 80 next."""
    model, _ = _toy()
    first = DynamicSparsity(0.75, update_interval=25)
    assert _fit(model, [first]) == []
    assert [e["dsl_step"] for e in first.explorations] == [25, 50, 75, 100]
    second = DynamicSparsity(0.75, update_interval=25)
    assert _fit(model, [second], epochs=2) == []
    assert [e["dsl_step"] for e in second.explorations] == [125, 150, 175]
    assert [e["dsl_update_ratio"] for e in second.explorations] == [second.schedule(t, 200) for t in (125, 150, 175)]


def test_fit_continued_with_initial_epoch_keeps_the_end_of_one_fit():
    """fit(epochs=2) then fit(epochs=4, initial_epoch=2): the second ends at step 160, as fit(epochs=4)."""
    x, y = _toy_data()
    whole, _ = _toy()
    one = DynamicSparsity(0.75, update_interval=25)
    _fit(whole, [one], epochs=4, x=x, y=y)
    split, _ = _toy()
    _fit(split, [DynamicSparsity(0.75, update_interval=25)], epochs=2, x=x, y=y)
    two = DynamicSparsity(0.75, update_interval=25)
    _fit(split, [two], epochs=4, x=x, y=y, initial_epoch=2)
    assert [(e["dsl_step"], e["dsl_update_ratio"]) for e in two.explorations] == [
        (e["dsl_step"], e["dsl_update_ratio"]) for e in one.explorations if e["dsl_step"] > 80]
    assert [e["dsl_step"] for e in two.explorations] == [100, 125, 150]


# ------------------------------------------------------------------ 3. empty budgets, bad lr
@pytest.mark.filterwarnings("ignore:DynamicSparsity. this fit runs no exploration")  # 1-step fits
def test_a_table_with_no_active_entry_is_an_error():
    u, i = tf.keras.Input((1,), dtype="int64"), tf.keras.Input((1,), dtype="int64")
    big, tiny = MaskedEmbedding(50, 4, name="users"), MaskedEmbedding(2, 2, name="flags")
    model = tf.keras.Model([u, i], tf.reduce_sum(big(u), axis=[1, 2])[:, None] + tf.reduce_sum(tiny(i), axis=[1, 2])[:, None])
    model.compile("sgd", "mse")
    x, y = [np.zeros((4, 1), np.int64)] * 2, np.zeros((4, 1))
    with pytest.raises(ValueError) as err:
        model.fit(x, y, verbose=0, callbacks=[DynamicSparsity(0.9, 2)])
    assert str(err.value) == ("sparsity=0.9 leaves table 'flags' (2 x 2 = 4 entries) with no active entry: "
                              "round((1 - s) * size) = 0. Give it a lower sparsity (dict sparsity).")
    with pytest.raises(ValueError, match=r"sparsity=0.999 leaves no active entry in the global budget of "
                                         r"\['users', 'flags'\] \(204 entries\)"):
        model.fit(x, y, verbose=0, callbacks=[DynamicSparsity(0.999, 2, budget="global")])
    model.fit(x, y, verbose=0, callbacks=[DynamicSparsity({"users": 0.9, "flags": 0.5}, 2)])
    assert [int(l.mask.numpy().sum()) for l in dsl_tf.masked_embeddings(model)] == [20, 2]


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -float("inf"), 0.0])
def test_non_finite_learning_rate_is_rejected_before_training(lr):
    with pytest.raises(ValueError, match=f"lr must be a positive finite number, got {lr}"):
        TrainConfig(lr=lr, out="unused").resolved()


# ------------------------------------------------------------------ 4. numpy scalars, wrong types
def test_numpy_scalars_are_accepted_like_python_numbers():
    kwargs = dict(sparsity=0.9, update_interval=5, initial_update_ratio=0.3, end_step=40,
                  min_update_ratio=0.01, momentum=0.8, seed=3, verbose=0)
    as_numpy = {k: (np.float32(v) if isinstance(v, float) else np.int64(v)) for k, v in kwargs.items()}
    runs = []
    for args in (kwargs, as_numpy):
        dsl = DynamicSparsity(**args, growth="momentum")
        assert json.dumps(dsl.get_config()) == json.dumps(DynamicSparsity(**kwargs, growth="momentum").get_config())
        layer = MaskedEmbedding(np.int64(5), np.int64(3))  # 15 entries: 1 active; float32 0.9 would give 2
        assert layer.get_config()["input_dim"] == 5 and type(layer.get_config()["input_dim"]) is int
        model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), layer])
        model.compile("sgd", "mse")
        _fit(model, [dsl], epochs=10, x=np.zeros((250, 1), np.int64), y=np.zeros((250, 1, 3)))
        assert len(dsl.explorations) == 7  # steps 5, 10, ..., 35 < end_step 40
        runs.append(int(layer.mask.numpy().sum()))
    assert runs == [masks.budget(15, 0.9)] * 2 == [1, 1]
    assert masks.budget(15, float(np.float32(0.9))) == 2
    assert DynamicSparsity(sparsity={"a": np.float64(0.5)}).sparsity == {"a": 0.5}
    assert CosineSchedule(np.float32(0.3), np.float32(0.01))(np.int64(50), np.int64(100)) == CosineSchedule(0.3, 0.01)(50, 100)
    assert LinearSchedule(np.float16(0.5)).initial_ratio == 0.5
    assert masks.budget(np.int64(1000), np.float32(0.8)) == 200


@pytest.mark.parametrize("build, message", [
    (lambda: DynamicSparsity(initial_update_ratio="0.5"), "initial_update_ratio must be in (0, 1], got '0.5'"),
    (lambda: DynamicSparsity(min_update_ratio=None), "min_update_ratio must be in [0, initial_update_ratio=0.5], got None"),
    (lambda: DynamicSparsity(momentum="0.9"), "momentum must be in [0, 1), got '0.9'"),
    (lambda: DynamicSparsity(momentum=np.float32(np.nan)), "momentum must be in [0, 1), got np.float32(nan)"),
    (lambda: DynamicSparsity(sparsity=np.bool_(True)), "sparsity must be a float in (0, 1), got np.True_"),
    (lambda: DynamicSparsity(end_step=100.0), "end_step must be an integer >= 1, got 100.0"),
    (lambda: DynamicSparsity(update_interval=np.float64(5)), "update_interval must be an integer >= 1, got np.float64(5.0)"),
    (lambda: DynamicSparsity(seed="1"), "seed must be an integer >= 0, got '1'"),
    (lambda: CosineSchedule("high"), "initial_update_ratio must be in (0, 1], got 'high'"),
    (lambda: CosineSchedule()(5, "10"), "end_step must be positive, got '10'"),
    (lambda: MaskedEmbedding("10", 4), "input_dim must be a positive integer, got '10'"),
    (lambda: MaskedEmbedding(10, 4.0), "output_dim must be a positive integer, got 4.0"),
])
def test_wrong_types_are_clear_errors(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message


# ------------------------------------------------------------------ 5. resume of the shuffled pipeline
def _two_tower_run(data, backup, interrupt_at=None, repeat=False):
    """two_tower (deterministic step: in-batch softmax) on make_dataset's shuffled batches
    (endless with ``repeat``, as ``trainers/train.py`` fits)."""

    def build():
        tf.keras.utils.set_random_seed(0)
        model = build_model("two_tower", data.num_users, data.num_items, dim=8, seed=0)
        model.attach(data.train)
        model.score_all(np.zeros([1], np.int64))  # create every variable
        model.compile(tf.keras.optimizers.Adam(0.05))
        return model, model.make_dataset(data, 128, seed=5, repeat=repeat)

    per_epoch = {"steps_per_epoch": int(data.as_dataset(128).cardinality())} if repeat else {}

    def callbacks():
        return [tf.keras.callbacks.BackupAndRestore(str(backup)), DynamicSparsity(0.8, update_interval=7, seed=2)]

    model, ds = build()
    if interrupt_at is not None:
        class Interrupt(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == interrupt_at:
                    raise RuntimeError("interrupted")

        with pytest.raises(RuntimeError, match="interrupted"):
            model.fit(ds, epochs=4, verbose=0, callbacks=callbacks() + [Interrupt()], **per_epoch)
        model, ds = build()  # a new process: fresh model, fresh dataset object
    class FirstStep(tf.keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.step = getattr(self, "step", int(self.model.optimizer.iterations))

    first = FirstStep()
    model.fit(ds, epochs=4, verbose=0, callbacks=callbacks() + [first], **per_epoch)
    return {v.name: v.numpy() for v in model.variables}, first.step, int(model.optimizer.iterations)


@pytest.mark.parametrize("repeat", [False, True])
def test_interrupted_resumed_fit_of_the_shuffled_pipeline_is_identical(tmp_path, repeat):
    data = synthetic(num_users=80, num_items=120, mean_interactions=20, seed=0)
    whole, start, steps = _two_tower_run(data, tmp_path / "a", repeat=repeat)
    resumed, start_resumed, steps_resumed = _two_tower_run(data, tmp_path / "b", interrupt_at=(2, 3),  # mid-epoch 2
                                                           repeat=repeat)
    per_epoch = int(data.as_dataset(128).cardinality())
    assert (start, start_resumed) == (0, 2 * per_epoch)  # restored at the end of epoch 1
    assert steps == steps_resumed == 4 * per_epoch
    assert sorted(whole) == sorted(resumed) and any("mask" in name for name in whole)
    for name in whole:
        np.testing.assert_allclose(resumed[name], whole[name], atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("repeat", [False, True])
def test_fit_trains_each_pass_in_the_order_of_the_step_it_starts_at(repeat):
    """The step that keys a pass is read before the step's own increment: Keras' optimizer
    increments ``iterations`` with no data dependency on the batch, so without an ordering the
    read gave ``s + 1`` (or ``s``, by thread scheduling), which made runs differ (CI)."""
    data = synthetic(num_users=80, num_items=120, mean_interactions=20, seed=0)
    tf.keras.utils.set_random_seed(0)
    model = build_model("two_tower", data.num_users, data.num_items, dim=8, seed=0)
    model.attach(data.train)
    model.compile(tf.keras.optimizers.Adam(0.05))
    steps = int(data.as_dataset(128).cardinality())
    seen = []

    def record(batch):
        users = tf.numpy_function(lambda u: (seen.append(u.copy()), u)[1], [batch["user_id"]], batch["user_id"].dtype)
        return {**batch, "user_id": tf.ensure_shape(users, batch["user_id"].shape)}

    ds = model.make_dataset(data, 128, seed=5, repeat=repeat)
    model.fit(ds.map(record), epochs=3, verbose=0, **({"steps_per_epoch": steps} if repeat else {}))
    expected = []
    for start in (0, steps, 2 * steps):  # each pass as the pipeline gives it at its first step
        model.optimizer.iterations.assign(start)
        expected += [b["user_id"] for b in model.make_dataset(data, 128, seed=5).as_numpy_iterator()]
    assert len(seen) >= 3 * steps
    for got, want in zip(seen[:3 * steps], expected):
        np.testing.assert_array_equal(got, want)


def test_make_dataset_order_is_keyed_by_seed_and_step():
    data = synthetic(num_users=40, num_items=60, mean_interactions=10, seed=1)
    for name in ("two_tower", "cdae"):
        model = build_model(name, data.num_users, data.num_items, dim=4)
        model.compile(tf.keras.optimizers.SGD())

        def epoch(ds, step):
            model.optimizer.iterations.assign(step)
            return np.concatenate([b["user_id"] for b in ds.as_numpy_iterator()])

        ds = model.make_dataset(data, 32, seed=3)
        first, again, later = epoch(ds, 0), epoch(model.make_dataset(data, 32, seed=3), 0), epoch(ds, 10)
        other_seed = epoch(model.make_dataset(data, 32, seed=4), 0)
        assert np.array_equal(first, again) and not np.array_equal(first, later)
        assert np.array_equal(epoch(model.make_dataset(data, 32, seed=3), 10), later)  # not keyed by pass count
        assert np.array_equal(epoch(ds, 0), first)
        assert not np.array_equal(first, other_seed)
        expected = data.train_pairs()[0] if name == "two_tower" else np.flatnonzero(data.user_activity())
        assert sorted(first.tolist()) == sorted(expected.tolist())  # one pass over every example
        assert int(ds.cardinality()) == -(-len(expected) // 32)


def test_endless_batches_equal_the_per_epoch_ones_and_resume_mid_pass():
    """``repeat=True`` (one iterator per fit, issue 15) yields exactly the passes that
    ``repeat=False`` yields epoch by epoch, and a fit starting mid-pass skips what was trained."""
    data = synthetic(num_users=40, num_items=60, mean_interactions=10, seed=1)
    model = build_model("mf_bpr", data.num_users, data.num_items, dim=4)
    model.compile(tf.keras.optimizers.SGD())
    steps = int(model.make_dataset(data, 32, seed=3).cardinality())

    def ids(batches):
        return [b["user_id"].tolist() + b["item_id"].tolist() for b in batches]

    def epoch_at(step):
        model.optimizer.iterations.assign(step)
        return ids(model.make_dataset(data, 32, seed=3).as_numpy_iterator())

    per_epoch = [epoch_at(0), epoch_at(steps), epoch_at(2 * steps)]
    endless = model.make_dataset(data, 32, seed=3, repeat=True)
    assert int(endless.cardinality()) == tf.data.INFINITE_CARDINALITY
    model.optimizer.iterations.assign(0)
    assert ids(endless.take(3 * steps).as_numpy_iterator()) == per_epoch[0] + per_epoch[1] + per_epoch[2]
    model.optimizer.iterations.assign(steps + 2)  # resumed two batches into the second pass
    assert ids(endless.take(2 * steps - 2).as_numpy_iterator()) == per_epoch[1][2:] + per_epoch[2]
