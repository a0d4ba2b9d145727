"""The GMP baseline (trainers.baselines): TFMOT schedule and step counting, the copy into
``MaskedEmbedding`` tables, and a quality floor on synthetic two_tower (issue 16)."""

import dsl_tf
import numpy as np
import pytest
import tensorflow as tf

from trainers import baselines
from trainers.models import build_model
from trainers.train import TrainConfig, run_training

DATA: dict = {}  # the default synthetic data (2,000 users, 3,000 items): 320 steps in 5 epochs
SPARSITY = 0.5


def test_gmp_schedule_has_a_dense_start_and_ends_before_the_last_step():
    schedule = baselines.gmp_schedule(0.8, total_steps=1000, frequency=50, end_fraction=0.75)
    assert (schedule.begin_step, schedule.end_step, schedule.frequency) == (500, 750, 50)
    prune, sparsity = schedule(tf.constant(750, tf.int64))
    assert bool(prune) and float(sparsity) == pytest.approx(0.8)
    assert not bool(schedule(tf.constant(751, tf.int64))[0])  # fixed mask for the last quarter
    assert float(schedule(tf.constant(500, tf.int64))[1]) == 0.0
    with pytest.raises(ValueError, match="begin fraction"):
        baselines.gmp_schedule(0.8, 1000, 50, end_fraction=0.5, begin_fraction=0.5)


def test_gmp_to_masked_copies_each_table_by_name():
    """Two tables of equal shape: a copy by position in ``trainable_variables`` could swap them."""
    schedule = baselines.gmp_schedule(0.5, 100, 10, 0.75)
    gmp = build_model("two_tower", 6, 6, baselines.gmp_embedding_factory(schedule), dim=4)
    target = build_model("two_tower", 6, 6, dim=4)
    for model in (gmp, target):
        model.score_all(np.zeros([1], np.int64))
    wrappers = {w.layer.name: w for w in baselines.pruning_wrappers(gmp)}
    rng = np.random.default_rng(0)
    for wrapper in wrappers.values():
        (weights, mask, _), = wrapper.pruning_vars
        weights.assign(rng.normal(size=weights.shape).astype(np.float32))
        mask.assign((rng.random(mask.shape) < 0.5).astype(np.float32))
    baselines.gmp_to_masked(gmp, target)
    for layer in dsl_tf.masked_embeddings(target):
        (weights, mask, _), = wrappers[layer.name].pruning_vars
        np.testing.assert_array_equal(layer.mask.numpy(), mask.numpy())
        np.testing.assert_array_equal(layer.embeddings.numpy(), (weights * mask).numpy())
    users = np.arange(6)
    np.testing.assert_allclose(target.score_all(users).numpy(), gmp.score_all(users).numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def gmp_and_dense(tmp_path_factory):
    """Dense and GMP two_tower runs; the GMP run's wrapped model is inspected just before the copy."""
    tmp = tmp_path_factory.mktemp("gmp")
    seen: dict = {}
    copy = baselines.gmp_to_masked

    def inspected_copy(trained, target):
        users = np.arange(trained.num_users)
        seen["wrapped_scores"] = trained.score_all(users).numpy()
        seen["pruning_steps"] = [int(w.pruning_step) for w in baselines.pruning_wrappers(trained)]
        seen["iterations"] = int(trained.optimizer.iterations)
        copy(trained, target)
        seen["copied_scores"] = target.score_all(users).numpy()

    def config(method):
        return TrainConfig(model="two_tower", dataset_args=DATA, method=method, sparsity=SPARSITY, epochs=5,
                           out=str(tmp / method), verbose=0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "gmp_to_masked", inspected_copy)
        gmp = run_training(config("gmp"))
    dense = run_training(config("dense"))
    return gmp, dense, seen


def test_gmp_wrapped_and_copied_models_score_alike(gmp_and_dense):
    (model, summary), _, seen = gmp_and_dense
    np.testing.assert_allclose(seen["copied_scores"], seen["wrapped_scores"], atol=1e-6)
    assert seen["pruning_steps"] == [summary["steps"]] * 2 == [seen["iterations"]] * 2  # one count per step
    for layer in dsl_tf.masked_embeddings(model):
        size = layer.mask.shape.num_elements()
        assert int(layer.mask.numpy().sum()) == round((1 - SPARSITY) * size)


def test_gmp_two_tower_stays_near_dense(gmp_and_dense):
    """Pruning from step 0 fixed a nearly random mask: 0.49× dense, below popularity (issue 16)."""
    (_, gmp), (_, dense), _ = gmp_and_dense
    recall = gmp["metrics"]["recall@20"]
    assert recall > 1.2 * gmp["popularity"]["recall@20"]
    assert recall > 0.7 * dense["metrics"]["recall@20"], (recall, dense["metrics"]["recall@20"])
