"""Early stopping on valid: patience, exact restoration of the best model, the CLI, never looking at test."""

import json

import dsl_tf
import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf

import trainers.early_stopping as early_stopping
import trainers.train as train_module
from trainers.data import load_dataset, synthetic
from trainers.early_stopping import ValidationEarlyStopping
from trainers.methods import METHODS, Context, compact_factory
from trainers.models import build_model
from trainers.train import TrainConfig, config_from_args, run_training

TINY = {"num_users": 120, "num_items": 150, "dim": 4, "mean_interactions": 12}


def _scripted_fit(values, epochs, **kwargs):
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(1,))])
    model.compile("sgd", "mse")
    script, evaluated = iter(values), []

    def evaluate(m):
        evaluated.append(len(evaluated))
        return {"recall@20": next(script)}

    stop = ValidationEarlyStopping(evaluate, **kwargs)
    history = model.fit(np.zeros((4, 1)), np.zeros((4, 1)), epochs=epochs, verbose=0, callbacks=[stop])
    return stop, history


@pytest.mark.parametrize("values, kwargs, best, stopped, evaluated_epochs", [
    ([0.1, 0.3, 0.2, 0.25, 0.2, 0.9], {"patience": 3}, 2, 5, [1, 2, 3, 4, 5]),
    ([0.1, 0.3, 0.2, 0.25, 0.2, 0.9], {"patience": 4}, 6, None, [1, 2, 3, 4, 5, 6]),
    ([0.1, 0.2, 0.2, 0.1], {"patience": 2}, 2, 4, [1, 2, 3, 4]),  # a tie is no improvement
    ([0.1, 0.3, 0.305, 0.31], {"patience": 2, "min_delta": 0.01}, 2, 4, [1, 2, 3, 4]),
    ([0.1, 0.3, 0.2, 0.2], {"patience": 2, "every_n_epochs": 2}, 4, 7, [2, 4, 6, 7]),  # + the last epoch
    ([0.9, 0.1, 0.2, 0.15, 0.1], {"patience": 2, "start_epoch": 2}, 3, 5, [1, 2, 3, 4, 5]),
])
def test_stops_after_patience_evaluations(values, kwargs, best, stopped, evaluated_epochs):
    stop, history = _scripted_fit(values, epochs=len(evaluated_epochs) if "every_n_epochs" not in kwargs else 7,
                                  **kwargs)
    assert stop.best_epoch == best and stop.stopped_epoch == stopped
    assert [row["epoch"] for row in stop.curve] == evaluated_epochs
    assert len(history.history["loss"]) == (stopped or max(evaluated_epochs))
    assert history.history["valid_recall@20"] == [row["recall@20"] for row in stop.curve]
    chosen = next(row for row in stop.curve if row["epoch"] == best)
    assert chosen["eligible"] and stop.best_metrics["recall@20"] == chosen["recall@20"]


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="patience must be an integer >= 1, got 0"):
        ValidationEarlyStopping(lambda m: {}, patience=0)
    with pytest.raises(ValueError, match="min_delta must be a finite number >= 0"):
        ValidationEarlyStopping(lambda m: {}, min_delta=-1.0)


def test_restores_the_best_compact_dsl_model_exactly():
    """Weights, masks and the compact layout at the best epoch come back bit for bit."""
    data = synthetic(num_users=60, num_items=90, dim=4, mean_interactions=10, seed=0)
    tf.keras.utils.set_random_seed(0)
    model = build_model("mf_bpr", data.num_users, data.num_items, compact_factory(0.75, "dense"), dim=8)
    model.attach(data.train)
    model.compile(tf.keras.optimizers.Adam(0.01))
    snapshots, script = [], iter([0.1, 0.5, 0.2, 0.3, 0.4])

    def evaluate(m):
        snapshots.append({v.name + str(i): v.numpy().copy() for i, v in enumerate(m.variables)})
        return {"recall@20": next(script)}

    stop = ValidationEarlyStopping(evaluate, patience=10)
    explore = dsl_tf.DynamicSparsity(0.75, update_interval=3, seed=0)
    model.fit(model.make_dataset(data, 32, seed=0), epochs=5, verbose=0, callbacks=[stop, explore])
    assert stop.best_epoch == 2 and stop.stopped_epoch is None and len(snapshots) == 5
    best, last = snapshots[1], snapshots[4]
    layouts = [name for name in best if "col_ids" in name or "row_splits" in name]
    assert len(layouts) == 4 and any(not np.array_equal(best[n], last[n]) for n in layouts)  # explored after epoch 2
    restored = {v.name + str(i): v.numpy() for i, v in enumerate(model.variables)}
    assert restored.keys() == best.keys()
    for name, value in best.items():
        if "score_tracking" not in name:  # DynamicSparsity switches score tracking off at the end of fit
            np.testing.assert_array_equal(restored[name], value, err_msg=name)


def _tiny(tmp_path, **overrides):
    options = dict(model="mf_bpr", dataset_args=TINY, method="dsl", sparsity=0.75, epochs=8, batch_size=64, dim=8,
                   lr=0.01, out=str(tmp_path / "run"), verbose=0, early_stopping=True, es_patience=2)
    return TrainConfig(**{**options, **overrides})


def test_valid_protocol_records_the_choice_and_keeps_the_best_model(tmp_path):
    model, summary = run_training(_tiny(tmp_path, protocol="valid"))
    es = summary["early_stopping"]
    assert es["best_epoch"] == max((r for r in es["curve"] if r["eligible"]), key=lambda r: r["recall@20"])["epoch"]
    assert es["epochs_trained"] == len(es["curve"]) == (es["stopped_epoch"] or 8)
    assert es["retrained_epochs"] is None and es["max_epochs"] == 8
    # the run is the restored best model: its final valid metrics are the recorded best, exactly
    assert summary["metrics"]["recall@20"] == es["best"]["recall@20"]
    assert summary["metrics"]["ndcg@20"] == es["best"]["ndcg@20"]
    assert summary["history"]["valid_recall@20"] == [r["recall@20"] for r in es["curve"]]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["early_stopping"]["best_epoch"] == es["best_epoch"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["early_stopping"] is True


def test_test_protocol_selects_on_valid_then_retrains_for_the_chosen_epochs(tmp_path, monkeypatch):
    data = load_dataset("synthetic", **TINY)
    calls = []

    def spy(module):
        original = module.evaluate_full_ranking

        def evaluate(score_fn, train_csr, truth, *args, **kwargs):
            split = [name for name, m in (("valid", data.valid), ("test", data.test))
                     if m.shape == truth.shape and (sp.csr_matrix(truth) != m).nnz == 0]
            calls.append((module.__name__, split[0] if split else "other"))
            return original(score_fn, train_csr, truth, *args, **kwargs)

        monkeypatch.setattr(module, "evaluate_full_ranking", evaluate)

    spy(early_stopping)
    spy(train_module)
    model, summary = run_training(_tiny(tmp_path, es_every=2, update_interval=None))
    es = summary["early_stopping"]
    selection = [c for c in calls if c[0] == "trainers.early_stopping"]
    assert selection and set(selection) == {("trainers.early_stopping", "valid")}
    first_test = next(i for i, c in enumerate(calls) if c[1] == "test")
    assert first_test == len(selection)  # test is read only after the selection ended
    assert calls[first_test:] == [("trainers.train", "test")] * 2  # the model, then the popularity baseline
    # the retrain: E* epochs on train+valid, schedules planned over the 8-epoch budget
    steps_per_epoch = -(-data.merged_train_valid().train.nnz // 64)
    assert es["retrained_epochs"] == es["best_epoch"]
    assert summary["steps"] == es["best_epoch"] * steps_per_epoch
    assert summary["schedule_epochs"] == 8 and summary["update_interval"] == max(1, 8 * steps_per_epoch // 20)
    assert [e["dsl_step"] for e in summary["explorations"]] == list(
        range(summary["update_interval"], summary["steps"] + 1, summary["update_interval"]))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["epochs"], config["schedule_epochs"]) == (es["best_epoch"], 8)
    assert list((tmp_path / "run" / "tensorboard" / "selection").rglob("events.out.tfevents.*"))


def test_flags_reach_the_config():
    cfg = config_from_args(["--early-stopping", "--es-every", "2", "--es-patience", "3", "--es-min-delta", "0.001",
                            "--schedule-epochs", "9", "--epochs", "12"])
    assert (cfg.early_stopping, cfg.es_every, cfg.es_patience, cfg.es_min_delta, cfg.schedule_epochs, cfg.epochs) == (
        True, 2, 3, 0.001, 9, 12)
    assert config_from_args([]).early_stopping is False
    with pytest.raises(SystemExit):
        config_from_args(["--es-patience", "0"])


def test_sparse_baselines_are_chosen_only_at_final_sparsity():
    cfg = TrainConfig(method="omp", epochs=10).resolved()
    ctx = Context(cfg, total_steps=10 * 7, update_interval=5, build=None, steps_per_epoch=7)
    assert METHODS["omp"].selectable_from(ctx) == 6 and METHODS["dsl"].selectable_from(ctx) == 1
    gmp = METHODS["gmp"]
    end = gmp.schedule(ctx).end_step  # 50: pruned to s during step 50, i.e. in epoch 8 (steps 49..55)
    assert (end, gmp.selectable_from(ctx)) == (50, 8)


@pytest.mark.parametrize("method", ["omp", "gmp"])
def test_baselines_choose_an_epoch_at_their_final_sparsity(tmp_path, method):
    """OMP's dense epochs (a first fit) and GMP's pruning phase are evaluated but never chosen."""
    from dsl_tf import masks

    model, summary = run_training(_tiny(tmp_path, method=method, protocol="valid", epochs=6, es_patience=10))
    es = summary["early_stopping"]
    assert [r["epoch"] for r in es["curve"]] == list(range(1, 7))
    assert [r["eligible"] for r in es["curve"]] == [r["epoch"] >= es["start_epoch"] for r in es["curve"]]
    assert 1 < es["start_epoch"] <= es["best_epoch"] <= 6
    for layer in dsl_tf.masked_embeddings(model):
        assert masks.active_count(layer) == masks.budget(layer.input_dim * layer.output_dim, 0.75)
