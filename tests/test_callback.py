"""DynamicSparsity: validation, Algorithm 1 behaviour, optimizer state, logs, resume."""

import glob
import warnings

import numpy as np
import pytest
import tensorflow as tf

import dsl_tf
from dsl_tf import DynamicSparsity, MaskedEmbedding, masks


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 0.0}, "sparsity must be a float in (0, 1), got 0.0"),
        ({"sparsity": 1.0}, "sparsity must be a float in (0, 1), got 1.0"),
        ({"sparsity": "0.5"}, "sparsity must be a float in (0, 1), got '0.5'"),
        ({"sparsity": {}}, "sparsity must be a float or a non-empty dict, got {}"),
        ({"sparsity": {"users": 1.5}}, "sparsity['users'] must be a float in (0, 1), got 1.5"),
        ({"update_interval": 0}, "update_interval must be an integer >= 1, got 0"),
        ({"update_interval": 2.5}, "update_interval must be an integer >= 1, got 2.5"),
        ({"initial_update_ratio": 0.0}, "initial_update_ratio must be in (0, 1], got 0.0"),
        ({"initial_update_ratio": 1.2}, "initial_update_ratio must be in (0, 1], got 1.2"),
        ({"decay": "step"}, "decay must be one of ['constant', 'cosine', 'linear'] or an UpdateSchedule, got 'step'"),
        ({"end_step": 0}, "end_step must be an integer >= 1, got 0"),
        ({"min_update_ratio": -0.1}, "min_update_ratio must be in [0, initial_update_ratio=0.5], got -0.1"),
        ({"growth": "magnitude"}, "growth must be one of ('gradient', 'momentum', 'random', 'none'), got 'magnitude'"),
        ({"budget": "layer"}, "budget must be one of ('per_layer', 'global', 'per_row'), got 'layer'"),
        ({"budget": "global", "sparsity": {"a": 0.5}},
         "budget='global' needs one float sparsity, got a per-layer dict sparsity={'a': 0.5}"),
        ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"verbose": "yes"}, "verbose must be an integer >= 0, got 'yes'"),
    ],
)
def test_every_validation_error(kwargs, message):
    with pytest.raises(ValueError) as err:
        DynamicSparsity(**kwargs)
    assert str(err.value) == message


def test_no_masked_layer_is_an_error():
    model = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="found no dsl_tf.MaskedEmbedding"):
        model.fit(np.ones((4, 1)), np.ones((4, 1)), verbose=0, callbacks=[DynamicSparsity()])


def test_end_step_cannot_be_inferred_from_unknown_cardinality():
    model = _model(10, 2)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(10)[:, None], np.ones((10, 1)))).batch(5)
    ds = ds.filter(lambda x, y: True)  # unknown cardinality
    with pytest.raises(ValueError, match=r"could not infer end_step .* steps per epoch=None"):
        model.fit(ds, epochs=2, verbose=0, callbacks=[DynamicSparsity(0.5, 1)])
    model.fit(ds, epochs=2, verbose=0, callbacks=[DynamicSparsity(0.5, 1, end_step=4)])


def test_default_update_interval_is_a_twentieth_of_the_planned_steps():
    """update_interval=None: ΔT = end_step // 20 (20 explorations over the schedule), resolved per fit."""
    model = _model(100, 4)
    cb = DynamicSparsity(0.5)
    model.fit(np.arange(100)[:, None], np.ones((100, 1)), batch_size=10, epochs=10, verbose=0, callbacks=[cb])
    assert [e["dsl_step"] for e in cb.explorations] == list(range(5, 100, 5))  # 100 steps: ΔT = 5, 19 before the end
    assert cb.get_config()["update_interval"] is None
    fixed = DynamicSparsity(0.5, 20)
    _model(100, 4).fit(np.arange(100)[:, None], np.ones((100, 1)), batch_size=10, epochs=10, verbose=0,
                       callbacks=[fixed])
    assert [e["dsl_step"] for e in fixed.explorations] == [20, 40, 60, 80]


def test_sparsity_dict_must_name_every_layer():
    model = _two_table_model()
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match=r"missing \['items'\], unknown \['itemz'\]"):
        model.fit(*_two_table_data(), verbose=0,
                  callbacks=[DynamicSparsity({"users": 0.5, "itemz": 0.9}, 2)])


# ----------------------------------------------------------------------------- helpers
def _model(rows, dim, optimizer="adam", lr=0.05, seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([
        tf.keras.Input((1,), dtype="int64"),
        MaskedEmbedding(rows, dim, embeddings_initializer=tf.keras.initializers.RandomNormal(seed=seed)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(1, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed)),
    ])
    if isinstance(optimizer, str):
        optimizer = {"adam": tf.keras.optimizers.Adam(lr),
                     "momentum": tf.keras.optimizers.SGD(lr, momentum=0.9),
                     "adagrad": tf.keras.optimizers.Adagrad(lr)}[optimizer]
    model.compile(optimizer, "mse")
    return model


def _two_table_model():
    u = tf.keras.Input((1,), dtype="int64")
    i = tf.keras.Input((1,), dtype="int64")
    eu = MaskedEmbedding(40, 8, name="users")(u)
    ei = MaskedEmbedding(60, 8, name="items")(i)
    out = tf.reduce_sum(eu * ei, axis=[1, 2])[:, None]
    return tf.keras.Model([u, i], out)


def _two_table_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 40, (n, 1)), rng.integers(0, 60, (n, 1))], rng.normal(size=(n, 1))


class _Invariants(tf.keras.callbacks.Callback):
    """Placed after DynamicSparsity: checks the table and its optimizer slots after every step.

    Pruned entries must be exactly 0; at an exploration, grown entries (0 -> 1 in the mask)
    start from 0 and every slot of an inactive or grown entry holds the optimizer's own
    initial value (``masks.slot_states``).
    """

    def __init__(self, layer, dsl):
        super().__init__()
        self.layer, self.dsl, self.checked, self.explorations_seen = layer, dsl, 0, 0
        self.prev_mask = None
        self.grown_total = 0

    def on_train_batch_end(self, batch, logs=None):
        emb, mask = self.layer.embeddings.numpy(), self.layer.mask.numpy()
        assert np.count_nonzero(emb[mask == 0]) == 0, "pruned weight moved"
        states = masks.slot_states(self.model.optimizer, self.layer.embeddings)
        if len(self.dsl.explorations) > self.explorations_seen:  # an exploration just ran
            self.explorations_seen = len(self.dsl.explorations)
            assert states, "optimizer slots not found"
            grown = (mask == 1) & (self.prev_mask == 0)
            assert grown.sum() <= self.dsl.explorations[-1]["dsl_num_swapped"]
            self.grown_total += grown.sum()
            assert np.all(emb[grown] == 0), "grown weights must start from 0"
            for slot, initial in states:
                s = slot.numpy()
                assert np.all(s[grown] == np.float32(initial)), f"{slot.name}: grown slots not reset"
                assert np.all(s[mask == 0] == np.float32(initial)), f"{slot.name}: inactive slots not reset"
        self.prev_mask = mask
        self.checked += 1


def _optimizer(name, lr=0.05):
    if name == "composite":  # TFRS: one optimizer for the embeddings, another for the rest
        import tensorflow_recommenders as tfrs

        holder = {}
        opt = tfrs.experimental.optimizers.CompositeOptimizer([
            (tf.keras.optimizers.legacy.Adagrad(lr), lambda: holder["model"].layers[0].trainable_variables),
            (tf.keras.optimizers.legacy.Adam(lr), lambda: holder["model"].layers[2].trainable_variables),
        ])
        return opt, holder
    if name.startswith("legacy_"):
        return getattr(tf.keras.optimizers.legacy, name[len("legacy_"):])(lr), None
    kwargs = {"SGD": {"momentum": 0.9}, "RMSprop": {"momentum": 0.5, "centered": True}}.get(name, {})
    return getattr(tf.keras.optimizers, name)(learning_rate=lr, **kwargs), None


KERAS_OPTIMIZERS = ["Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "Ftrl", "Lion", "Nadam",
                    "RMSprop", "SGD", "legacy_Adagrad", "legacy_Adam", "composite"]


def test_every_keras_optimizer_is_covered():
    public = {n for n in dir(tf.keras.optimizers) if isinstance(getattr(tf.keras.optimizers, n), type)
              and issubclass(getattr(tf.keras.optimizers, n), tf.keras.optimizers.Optimizer)
              and n != "Optimizer"}
    assert public <= set(KERAS_OPTIMIZERS), sorted(public - set(KERAS_OPTIMIZERS))


@pytest.mark.parametrize("name", KERAS_OPTIMIZERS)
def test_pruned_stay_zero_and_grown_start_from_the_optimizers_initial_state(name):
    opt, holder = _optimizer(name)
    model = _model(50, 8, opt)
    if holder is not None:
        holder["model"] = model
    layer = dsl_tf.masked_embeddings(model)[0]
    dsl = DynamicSparsity(0.75, update_interval=3, initial_update_ratio=0.5)
    inv = _Invariants(layer, dsl)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "state not found", no NaN skip
        model.fit(rng.integers(0, 50, (400, 1)), rng.normal(size=(400, 1)), batch_size=20,
                  epochs=2, verbose=0, callbacks=[dsl, inv])
    assert inv.checked == 40 and inv.explorations_seen == 13 and inv.grown_total > 100
    assert masks.count_active(layer.mask) == masks.budget(400, 0.75) == 100
    assert np.isfinite(model.evaluate(rng.integers(0, 50, (40, 1)), rng.normal(size=(40, 1)), verbose=0))


def test_adagrad_inactive_entries_hold_the_initial_accumulator():
    """A grown weight's first Adagrad step is that of a new weight (accumulator 0.1), not ~1000x larger."""
    model = _model(50, 8, "adagrad", lr=0.1)
    layer = dsl_tf.masked_embeddings(model)[0]
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, (400, 1)), rng.normal(size=(400, 1))
    model.fit(x, y, batch_size=20, epochs=1, verbose=0, callbacks=[DynamicSparsity(0.75, update_interval=1000)])
    (accumulator, initial), = masks.slot_states(model.optimizer, layer.embeddings)
    assert initial == pytest.approx(0.1)
    inactive = layer.mask.numpy() == 0
    masks.apply_mask(layer, np.ones((50, 8), bool), model.optimizer)  # grow every inactive entry
    np.testing.assert_array_equal(accumulator.numpy()[inactive], np.float32(0.1))
    before = layer.embeddings.numpy()
    model.fit(x, y, batch_size=400, epochs=1, verbose=0)  # one step
    step = np.abs(layer.embeddings.numpy() - before)
    active_step, grown_step = np.median(step[~inactive & (step > 0)]), np.median(step[inactive & (step > 0)])
    assert grown_step < 20 * active_step


def test_apply_mask_restarts_a_regrown_entry():
    """An entry pruned and grown again in one exploration restarts from 0 and initial slots."""
    model = _model(10, 2, "adam")
    layer = dsl_tf.masked_embeddings(model)[0]
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 10, (40, 1)), rng.normal(size=(40, 1)), batch_size=10, verbose=0)
    before = layer.embeddings.numpy().copy()
    fresh = np.zeros((10, 2), bool)
    fresh[3, 1] = True
    masks.apply_mask(layer, np.ones((10, 2), bool), model.optimizer, fresh)
    after = layer.embeddings.numpy()
    assert after[3, 1] == 0 and before[3, 1] != 0
    np.testing.assert_array_equal(after[~fresh], before[~fresh])
    for slot, initial in masks.slot_states(model.optimizer, layer.embeddings):
        assert slot.numpy()[3, 1] == initial and np.count_nonzero(slot.numpy()[~fresh]) > 0


def test_slots_are_found_by_identity_not_by_name():
    """Two same-shaped tables named "emb" in different towers: each touches only its own slots."""
    towers = [tf.keras.Sequential([MaskedEmbedding(20, 4, name="emb")], name=f"tower{i}") for i in range(2)]
    u, i = tf.keras.Input((1,), dtype="int64"), tf.keras.Input((1,), dtype="int64")
    model = tf.keras.Model([u, i], tf.reduce_sum(towers[0](u) * towers[1](i), axis=[1, 2])[:, None])
    model.compile(tf.keras.optimizers.Adam(0.05), "mse")
    rng = np.random.default_rng(0)
    model.fit([rng.integers(0, 20, (80, 1)), rng.integers(0, 20, (80, 1))], rng.normal(size=(80, 1)),
              batch_size=20, verbose=0)
    a, b = (t.layers[0] for t in towers)
    assert a.embeddings.name == b.embeddings.name
    slots_a = masks.optimizer_slots(model.optimizer, a.embeddings)
    slots_b = masks.optimizer_slots(model.optimizer, b.embeddings)
    assert len(slots_a) == len(slots_b) == 2 and not {id(s) for s in slots_a} & {id(s) for s in slots_b}
    b_before = [s.numpy().copy() for s in slots_b]
    masks.apply_mask(a, np.zeros((20, 4), bool), model.optimizer)
    for slot, before in zip(slots_b, b_before):
        np.testing.assert_array_equal(slot.numpy(), before)
    assert all(np.count_nonzero(s.numpy()) == 0 for s in slots_a)


def test_warns_when_table_shaped_optimizer_state_is_not_found():
    class HiddenMomentum(tf.keras.optimizers.SGD):
        """Keeps extra state in a dict: no slot list this library can see."""

        def build(self, var_list):
            super().build(var_list)
            self.hidden = {self._var_key(v): self.add_variable_from_reference(v, "hidden") for v in var_list}

    model = _model(10, 2, HiddenMomentum(0.01, momentum=0.9))
    layer = dsl_tf.masked_embeddings(model)[0]
    model.optimizer.build(model.trainable_variables)
    model.optimizer.momentums = []  # only the dict remains
    with pytest.warns(RuntimeWarning, match="none of it was found as a slot of"):
        masks.apply_mask(layer, np.ones((10, 2), bool), model.optimizer)


def test_growth_scores_accumulate_the_interval_gradient():
    """Scores at an exploration = Σ over the interval's batches of ∂L/∂(E⊙M)."""
    model = _model(30, 4, "momentum", lr=0.0)  # lr 0: weights fixed, gradients reproducible
    layer = dsl_tf.masked_embeddings(model)[0]
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 30, (40, 1)), rng.normal(size=(40, 1)).astype(np.float32)
    seen = {}

    class Spy(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:
                seen["scores"] = layer.growth_scores.numpy().copy()

    dsl = DynamicSparsity(0.5, update_interval=100, end_step=1000)
    model.fit(x, y, batch_size=10, epochs=1, shuffle=False, verbose=0, callbacks=[dsl, Spy()])
    expected = np.zeros([30, 4], np.float32)
    for b in range(4):
        xb, yb = x[b * 10:(b + 1) * 10], y[b * 10:(b + 1) * 10]
        with tf.GradientTape() as tape:
            eff = tf.gather(layer.embeddings * layer.mask, xb[:, 0])
            tape.watch(eff)
            pred = model.layers[2](eff)
            loss = tf.reduce_mean(tf.square(yb - pred))
        g = tape.gradient(loss, eff).numpy()
        np.add.at(expected, xb[:, 0], g)
    np.testing.assert_allclose(seen["scores"], expected, rtol=1e-5, atol=1e-7)


def test_planted_signal_dsl_finds_it_and_rp_does_not():
    """Only 2 of 8 coordinates reach the output; DSL's mask converges onto them."""
    rows, dim, signal = 200, 8, [1, 5]
    head = np.zeros((dim, 1), np.float32)
    head[signal] = 1.0
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(rows, 1)).astype(np.float32) * 2
    coverage = {}
    for growth in ("gradient", "none"):
        tf.keras.utils.set_random_seed(0)
        layer = MaskedEmbedding(rows, dim, embeddings_initializer=tf.keras.initializers.RandomUniform(-0.01, 0.01, seed=0))
        model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), layer, tf.keras.layers.Flatten(),
                                     tf.keras.layers.Dense(1, use_bias=False, trainable=False)])
        model.layers[-1].set_weights([head])
        model.compile(tf.keras.optimizers.Adam(0.05), "mse")
        dsl = DynamicSparsity(0.75, update_interval=10, initial_update_ratio=0.5, growth=growth, seed=3)
        x = np.repeat(np.arange(rows), 4)[:, None]
        model.fit(x, targets[x[:, 0]], batch_size=40, epochs=15, verbose=0, callbacks=[dsl])
        mask = layer.mask.numpy()
        coverage[growth] = mask[:, signal].sum() / mask.sum()
    # RP keeps a random mask: ~ 2/8 of its budget on signal; DSL moves ≥ 90% onto signal.
    assert coverage["none"] < 0.35, coverage
    assert coverage["gradient"] > 0.9, coverage


def test_rp_keeps_the_initial_mask_and_set_changes_it():
    results = {}
    for growth in ("none", "random"):
        model = _model(50, 8)
        layer = dsl_tf.masked_embeddings(model)[0]
        init = masks.initial_masks([400], [100], seed=5)[0].numpy().reshape(50, 8)
        rng = np.random.default_rng(0)
        model.fit(rng.integers(0, 50, (200, 1)), rng.normal(size=(200, 1)), batch_size=20, epochs=2,
                  verbose=0, callbacks=[DynamicSparsity(0.75, 5, growth=growth, seed=5)])
        results[growth] = np.array_equal(layer.mask.numpy() == 1, init)
        assert int(tf.reduce_sum(layer.mask)) == 100
    assert results == {"none": True, "random": False}


def test_global_budget_is_exact_and_can_shift_between_tables():
    model = _two_table_model()
    model.compile(tf.keras.optimizers.Adam(0.05), "mse")
    dsl = DynamicSparsity(0.8, update_interval=2, budget="global", seed=1)
    model.fit(*_two_table_data(), batch_size=20, epochs=3, verbose=0, callbacks=[dsl])
    users, items = dsl_tf.masked_embeddings(model)
    total = int(tf.reduce_sum(users.mask)) + int(tf.reduce_sum(items.mask))
    assert total == masks.budget(40 * 8 + 60 * 8, 0.8) == 160


def test_per_layer_dict_budgets():
    model = _two_table_model()
    model.compile(tf.keras.optimizers.Adam(0.05), "mse")
    model.fit(*_two_table_data(), batch_size=20, epochs=2, verbose=0,
              callbacks=[DynamicSparsity({"users": 0.5, "items": 0.9}, 3)])
    users, items = dsl_tf.masked_embeddings(model)
    assert int(tf.reduce_sum(users.mask)) == 160 and int(tf.reduce_sum(items.mask)) == 48


def test_logs_history_and_tensorboard(tmp_path):
    model = _two_table_model()
    model.compile(tf.keras.optimizers.Adam(0.05), "mse")
    dsl = DynamicSparsity(0.5, update_interval=4, log_dir=str(tmp_path), end_step=100)
    hist = model.fit(*_two_table_data(), batch_size=20, epochs=2, verbose=0, callbacks=[dsl])
    assert [e["dsl_step"] for e in dsl.explorations] == [4, 8, 12, 16, 20]
    h = hist.history
    assert h["dsl_step"] == [8, 20]
    assert h["dsl_density/users"] == [0.5, 0.5] and h["dsl_density/items"] == [0.5, 0.5]
    last = dsl.explorations[-1]
    swapped = last["dsl_num_swapped"]
    ratio = dsl.schedule(20, 100)
    assert last["dsl_update_ratio"] == pytest.approx(ratio)
    assert swapped == int(np.floor(ratio * 160)) + int(np.floor(ratio * 240))
    # each swap flips two mask entries, except a just-pruned entry grown again (paper's rule)
    flipped = last["dsl_mask_changed/users"] * 320 + last["dsl_mask_changed/items"] * 480
    assert 0 < flipped <= 2 * swapped and round(flipped) % 2 == 0
    assert 0.5 < last["dsl_ever_active/users"] <= 1.0
    events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert events
    tags = set()
    for e in tf.compat.v1.train.summary_iterator(events[0]):
        tags.update(v.tag for v in e.summary.value)
    assert {"dsl_update_ratio", "dsl_density/users", "dsl_num_swapped"} <= tags


def test_nan_weights_skip_the_update_with_a_warning():
    model = _model(20, 4)
    layer = dsl_tf.masked_embeddings(model)[0]

    class Poison(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                emb = layer.embeddings.numpy()
                active = np.argwhere(layer.mask.numpy() == 1)[0]
                emb[tuple(active)] = np.nan
                layer.embeddings.assign(emb)
                self.mask = layer.mask.numpy().copy()

    poison = Poison()
    dsl = DynamicSparsity(0.5, update_interval=2, end_step=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(np.arange(20)[:, None], np.ones((20, 1)), batch_size=5, epochs=1, verbose=0,
                  callbacks=[poison, dsl])
    assert any("NaN/Inf" in str(w.message) for w in caught)
    assert int(tf.reduce_sum(layer.mask)) == 40


def _resume_run(tmp_path, interrupt_at=None):
    model = _model(60, 8, "adam", seed=7)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 60, (300, 1)), rng.normal(size=(300, 1))
    callbacks = [tf.keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                 DynamicSparsity(0.8, update_interval=7, seed=11)]
    if interrupt_at is not None:
        class Interrupt(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == interrupt_at:
                    raise RuntimeError("interrupted")
        with pytest.raises(RuntimeError, match="interrupted"):
            model.fit(x, y, batch_size=30, epochs=5, shuffle=False, verbose=0,
                      callbacks=callbacks + [Interrupt()])
        model = _model(60, 8, "adam", seed=99)  # a fresh process would rebuild the model
        callbacks = [tf.keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                     DynamicSparsity(0.8, update_interval=7, seed=11)]
    model.fit(x, y, batch_size=30, epochs=5, shuffle=False, verbose=0, callbacks=callbacks)
    layer = dsl_tf.masked_embeddings(model)[0]
    return layer.mask.numpy(), layer.embeddings.numpy(), int(model.optimizer.iterations)


def test_resume_with_backup_and_restore_is_identical(tmp_path):
    mask_a, emb_a, steps_a = _resume_run(tmp_path / "a")
    mask_b, emb_b, steps_b = _resume_run(tmp_path / "b", interrupt_at=3)
    assert steps_a == steps_b == 50
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(emb_a, emb_b)
    assert int(mask_a.sum()) == masks.budget(480, 0.8)


def test_same_seed_same_masks_different_seed_different_masks():
    def run(seed):
        model = _model(40, 4, seed=1)
        rng = np.random.default_rng(0)
        model.fit(rng.integers(0, 40, (100, 1)), rng.normal(size=(100, 1)), batch_size=10, epochs=2,
                  shuffle=False, verbose=0, callbacks=[DynamicSparsity(0.7, 4, seed=seed)])
        return dsl_tf.masked_embeddings(model)[0].mask.numpy()

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_existing_mask_must_match_the_requested_budget():
    model = _model(20, 4)
    layer = dsl_tf.masked_embeddings(model)[0]
    masks.apply_mask(layer, masks.initial_masks([80], [40], seed=0)[0], model.optimizer)
    with pytest.raises(ValueError, match=r"active entries \{'masked_embedding.*': 40\}, budgets \{.*: 16\}"):
        model.fit(np.arange(20)[:, None], np.ones((20, 1)), verbose=0, callbacks=[DynamicSparsity(0.8, 2)])
    model.fit(np.arange(20)[:, None], np.ones((20, 1)), batch_size=5, verbose=0,
              callbacks=[DynamicSparsity(0.5, 2, growth="none")])
    assert int(tf.reduce_sum(layer.mask)) == 40


def test_global_budget_is_counted_exactly_beyond_float32_precision():
    """17,919,997 active entries in one table: a float32 sum reads 17,919,996 (not representable)."""
    rows, dim = 140_000, 128
    size = rows * dim
    sparsity = 3.0 / size  # budget = size - 3: an odd count above 2^24
    expected = masks.budget(size, sparsity)
    assert expected == size - 3 and expected > 2**24
    assert int(tf.reduce_sum(tf.ones([expected], tf.float32))) != expected  # what float32 counting gave
    model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), MaskedEmbedding(rows, dim),
                                 tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
    model.compile(tf.keras.optimizers.SGD(0.01), "mse")
    dsl = DynamicSparsity(sparsity, update_interval=1, budget="global", growth="none", end_step=3)
    model.fit(np.zeros((2, 1), np.int64), np.zeros((2, 1)), batch_size=1, epochs=1, verbose=0, callbacks=[dsl])
    assert len(dsl.explorations) == 2  # each checked the global budget
    assert masks.count_active(model.layers[0].mask) == expected


def test_low_sparsity_swaps_the_full_ratio_and_warns_only_when_capped():
    """s=0.1, rho0=0.5: the paper's rule swaps floor(rho*active); exclude_pruned=True is capped (and says so)."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 90, (90, 1)), rng.normal(size=(90, 1))
    model = _model(90, 8)
    paper = DynamicSparsity(0.1, update_interval=3, end_step=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.fit(x, y, batch_size=30, epochs=1, verbose=0, callbacks=[paper])
    first = paper.explorations[0]
    assert first["dsl_num_swapped"] == int(np.floor(paper.schedule(3, 100) * 648)) == 323
    model = _model(90, 8)
    capped = DynamicSparsity(0.1, update_interval=3, end_step=100, exclude_pruned=True)
    with pytest.warns(RuntimeWarning, match=r"only 72 of the 323 entries due .* caps the swap"):
        model.fit(x, y, batch_size=30, epochs=1, verbose=0, callbacks=[capped])
    assert capped.explorations[0]["dsl_num_swapped"] == 72


class _Plant(tf.keras.callbacks.Callback):
    """After DynamicSparsity's on_train_begin: the active entries take ``weights``; records the mask."""

    def __init__(self, layer, weights):
        super().__init__()
        self.layer, self.weights, self.before = layer, weights, None

    def on_train_begin(self, logs=None):
        mask = self.layer.dense_mask().numpy().astype(bool)
        if isinstance(self.layer, dsl_tf.CompactMaskedEmbedding):
            self.layer.values.assign(self.weights[mask])  # values in flat position order
        else:
            self.layer.embeddings.assign(self.weights * mask)
        self.before = mask


def _rows_of_growing_scale(seed: int, rows: int = 20, dim: int = 8) -> np.ndarray:
    """float32 [rows, dim] of random signs, row r about (r + 1)² in size."""
    rng = np.random.default_rng(seed)
    weights = ((np.arange(rows) + 1.0) ** 2)[:, None] * rng.uniform(0.5, 1.5, (rows, dim)) * rng.choice([-1, 1], (rows, dim))
    return weights.astype(np.float32)


def _frozen_table_model(storage: str, rows: int, dim: int, *head: tf.keras.layers.Layer):
    """(table, model): a masked table of ``storage`` at s=0.5, then ``head``, a Dense(1), SGD(0) (weights stay)."""
    tf.keras.utils.set_random_seed(0)
    table = (dsl_tf.CompactMaskedEmbedding(rows, dim, sparsity=0.5) if storage == "compact"
             else MaskedEmbedding(rows, dim))
    model = tf.keras.Sequential([tf.keras.Input((1,), dtype="int64"), table, tf.keras.layers.Flatten(), *head,
                                 tf.keras.layers.Dense(1)])
    model.compile(tf.keras.optimizers.SGD(0.0), "mse")
    return table, model


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_row_relative_pruning_ranks_each_entry_by_its_share_of_its_row(storage):
    """prune_by="row_relative" prunes the active entries with the smallest |w| / ‖row‖ (rows of very
    different scales: "magnitude" prunes whole small rows instead); both storages choose the same."""
    rows, dim = 20, 8
    weights = _rows_of_growing_scale(3, rows, dim)
    pruned = {}
    for prune_by in ("row_relative", "magnitude"):
        table, model = _frozen_table_model(storage, rows, dim)  # weights stay as planted
        plant = _Plant(table, weights)
        dsl = DynamicSparsity(0.5, update_interval=2, end_step=3, decay="constant", growth="random",
                              exclude_pruned=True, prune_by=prune_by)
        model.fit(np.arange(30)[:, None] % rows, np.zeros((30, 1)), batch_size=10, epochs=1, verbose=0,
                  callbacks=[dsl, plant])
        before, after = plant.before, table.dense_mask().numpy().astype(bool)
        pruned[prune_by] = before & ~after
        assert after.sum() == before.sum() == rows * dim // 2
        assert pruned[prune_by].sum() == rows * dim // 4  # ρ = 0.5 of the 80 active
        share = np.abs(weights * before) / np.linalg.norm(weights * before, axis=1, keepdims=True)
        key = share if prune_by == "row_relative" else np.abs(weights)
        expected = np.zeros_like(before)
        flat = np.flatnonzero(before)
        expected.flat[flat[np.argsort(key.flat[flat])[: rows * dim // 4]]] = True
        np.testing.assert_array_equal(pruned[prune_by], expected)
    assert pruned["magnitude"][:5].sum() > pruned["row_relative"][:5].sum()  # small rows lose less by share
    with pytest.raises(ValueError, match=r"prune_by must be one of \('magnitude', 'row_relative'\), got 'norm'"):
        DynamicSparsity(prune_by="norm")


class _ScoresBeforeExploration(tf.keras.callbacks.Callback):
    """Listed before DynamicSparsity: records the mask, effective weights and growth scores at every batch end,
    i.e. what an exploration at that step ranks."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.seen = layer, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((self.layer.dense_mask().numpy().astype(bool), self.layer.effective_table().numpy(),
                          tf.convert_to_tensor(self.layer.growth_scores).numpy()))


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_row_scaled_growth_ranks_scores_times_the_row_norm(storage):
    """grow_by="row_scaled" grows the free entries with the largest |score| · ‖row‖: behind an L2 normalisation
    the paper's |score| favours small rows (their gradients carry 1 / ‖row‖); both storages choose the same."""
    rows, dim = 20, 8
    weights = _rows_of_growing_scale(5, rows, dim)
    x, y = np.arange(40)[:, None] % rows, np.random.default_rng(5).normal(size=(40, 1)).astype(np.float32)
    grown = {}
    for grow_by in ("row_scaled", "score"):
        table, model = _frozen_table_model(storage, rows, dim, tf.keras.layers.UnitNormalization())
        seen = _ScoresBeforeExploration(table)
        dsl = DynamicSparsity(0.5, update_interval=2, end_step=3, decay="constant", exclude_pruned=True,
                              grow_by=grow_by)
        model.fit(x, y, batch_size=20, epochs=1, shuffle=False, verbose=0,
                  callbacks=[_Plant(table, weights), seen, dsl])
        before, effective, scores = seen.seen[1]  # step 2: the exploration's inputs
        after = table.dense_mask().numpy().astype(bool)
        grown[grow_by] = after & ~before
        assert after.sum() == before.sum() == rows * dim // 2 and grown[grow_by].sum() == rows * dim // 4
        norms = np.linalg.norm(effective, axis=1, keepdims=True)
        key = np.abs(scores) * (np.where(norms > 0, norms, 1.0) if grow_by == "row_scaled" else 1)
        free = np.flatnonzero(~before)
        expected = np.zeros_like(before)
        expected.flat[free[np.argsort(-key.flat[free], kind="stable")[: rows * dim // 4]]] = True
        np.testing.assert_array_equal(grown[grow_by], expected)
    assert grown["row_scaled"][-5:].sum() > grown["score"][-5:].sum()  # large rows gain by their scale
    with pytest.raises(ValueError, match=r"grow_by must be one of \('score', 'row_scaled'\), got 'norm'"):
        DynamicSparsity(grow_by="norm")
