"""trainers/train.py end to end: CLI, run directory, load_run, every method's sparsity and MACs."""

import dataclasses
import json
import os
from pathlib import Path
import subprocess
import sys

import dsl_tf
import numpy as np
import pytest
from dsl_tf import masks

from conftest import REPO
from trainers.methods import METHODS, Context
from trainers.evaluation import evaluate_full_ranking
from trainers.runs import load_run
from trainers.train import TrainConfig, run_training

TINY = {"num_users": 120, "num_items": 150, "dim": 4, "mean_interactions": 12}
TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--dataset-arg", f"{key}={value}")]
SPARSITY = 0.75


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / "trainers" / "train.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def _config(tmp_path, method, **overrides):
    options = dict(model="two_tower", dataset_args=TINY, method=method, sparsity=SPARSITY, epochs=4,
                   batch_size=64, dim=8, lr=0.01, out=str(tmp_path / method), verbose=0)
    return TrainConfig(**{**options, **overrides})


def test_help():
    result = _cli("--help")
    assert result.returncode == 0
    for flag in ("--model", "--method", "--sparsity", "--update-interval", "--protocol", "--overwrite"):
        assert flag in result.stdout


def test_bad_sparsity_fails_clearly(tmp_path):
    result = _cli("--sparsity", "1.5", "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert "sparsity must be in (0, 1)" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_writes_complete_run_dir_and_load_run_restores_it(tmp_path):
    out = tmp_path / "run"
    result = _cli("--model", "two_tower", "--method", "dsl", "--sparsity", "0.8", "--epochs", "2", "--dim", "8",
                  "--batch-size", "128", "--eval-every", "1", "--verbose", "0", "--out", str(out), *TINY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.json", "masks.npz", "item_popularity.npy", "summary.json", "weights/ckpt.index",
                 "id_maps.npz"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "two_tower" and config["method"] == "dsl" and config["sparsity"] == 0.8
    assert (config["num_users"], config["num_items"]) == (120, 150) and config["hparams"]["dim"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["active_parameters"] == sum(masks.budget(n * 8, 0.8) for n in (120, 150))
    assert summary["explorations"] and summary["training_macs"] > 0 and summary["peak_rss_mb"] > 0
    assert set(summary["metrics"]) == {"recall@20", "ndcg@20", "hr@20", "precision@20"}

    model, loaded_config, ids = load_run(out)
    assert ids.user_ids.tolist() == list(range(120))  # synthetic: raw ids are the dense ids
    assert loaded_config == config
    # The restored model reproduces the run's final metrics exactly (same scores).
    from trainers.data import load_dataset

    data = load_dataset("synthetic", **TINY)
    metrics = evaluate_full_ranking(model.scorer(), data.merged_train_valid().train, data.test)
    for key, value in summary["metrics"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-12)
    saved = np.load(out / "masks.npz")
    for layer in dsl_tf.masked_embeddings(model):
        assert int(saved[layer.name].sum()) == masks.budget(layer.input_dim * layer.output_dim, 0.8)

    again = _cli("--epochs", "1", "--out", str(out), *TINY_ARGS)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_load_run_scores_equal_trained_model(tmp_path):
    model, summary = run_training(_config(tmp_path, "dsl", model="lightgcn", epochs=2))
    restored, _, _ = load_run(tmp_path / "dsl")
    users = np.arange(20, dtype=np.int64)
    np.testing.assert_array_equal(restored.score_all(users).numpy(), model.score_all(users).numpy())


def test_load_run_rejects_incomplete_dir(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_run(tmp_path / "partial")


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    return {method: run_training(_config(tmp, method, eval_every=2)) for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_method_reaches_final_sparsity(method, method_runs):
    model, summary = method_runs[method]
    layers = dsl_tf.masked_embeddings(model)
    compact = method in ("dsl", "rp", "set")  # the default storage of DynamicSparsity methods
    for layer in layers:
        assert isinstance(layer, dsl_tf.CompactMaskedEmbedding) == compact
        mask = layer.dense_mask().numpy()
        size = mask.size
        expected = size if method == "dense" else masks.budget(size, SPARSITY)
        assert int(mask.sum()) == expected, (layer.name, int(mask.sum()), expected)
        assert np.all(layer.effective_table().numpy()[~mask] == 0.0)
        if compact:
            assert layer.values.shape == [expected]
    assert summary["active_parameters"] == sum(int(l.dense_mask().numpy().sum()) for l in layers)
    assert summary["metrics"]["recall@20"] > 0


def test_training_macs_follow_density(method_runs):
    dense = method_runs["dense"][1]["training_macs"]
    macs = {m: run[1]["training_macs"] / dense for m, run in method_runs.items()}
    density = 1 - SPARSITY
    for method in ("dsl", "rp", "set"):  # sparse from the first step
        assert macs[method] == pytest.approx(density, rel=1e-6)
    assert macs["omp"] == pytest.approx(0.5 * 1 + 0.5 * density, rel=1e-6)  # 2 dense + 2 sparse epochs
    assert density < macs["gmp"] < 1.0
    inference = {m: run[1]["inference_macs"] for m, run in method_runs.items()}
    for method in list(METHODS)[1:]:
        assert inference[method] == pytest.approx(density * inference["dense"], rel=1e-6)


def test_dsl_explores_but_rp_keeps_its_mask(method_runs):
    dsl, rp = method_runs["dsl"][1]["explorations"], method_runs["rp"][1]["explorations"]
    assert sum(e["dsl_num_swapped"] for e in dsl) > 0
    assert all(e["dsl_num_swapped"] == 0 for e in rp)


def test_same_seed_reproduces_the_run(tmp_path, method_runs):
    first, first_summary = method_runs["dsl"]
    again, again_summary = run_training(_config(tmp_path, "dsl"))
    assert again_summary["metrics"] == first_summary["metrics"]
    for a, b in zip(dsl_tf.masked_embeddings(first), dsl_tf.masked_embeddings(again)):
        np.testing.assert_array_equal(a.dense_mask().numpy(), b.dense_mask().numpy())
        np.testing.assert_array_equal(a.effective_table().numpy(), b.effective_table().numpy())
    other, _ = run_training(_config(tmp_path, "dsl", seed=1, overwrite=True))
    assert not np.array_equal(dsl_tf.masked_embeddings(other)[0].dense_mask().numpy(),
                              dsl_tf.masked_embeddings(first)[0].dense_mask().numpy())


# ------------------------------------------------------------------ issue 9: never lose a run, id maps
def _run_files(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_with_bad_data_or_failed_training_keeps_the_old_run(tmp_path, monkeypatch):
    import trainers.train as T

    out = tmp_path / "run"
    run_training(_config(tmp_path, "dsl", epochs=1, out=str(out)))
    before = _run_files(out)
    # a bad dataset: fails before anything is touched
    with pytest.raises(FileNotFoundError):
        run_training(_config(tmp_path, "dsl", epochs=1, out=str(out), overwrite=True, dataset=str(tmp_path / "no")))
    assert _run_files(out) == before
    # a failure in the middle of training: the old run is intact, no scratch folder is left
    def boom(*args, **kwargs):
        raise RuntimeError("injected failure while writing the run")

    monkeypatch.setattr(T, "_popularity_metrics", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_training(_config(tmp_path, "dsl", epochs=1, out=str(out), overwrite=True))
    assert _run_files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    # a successful overwrite replaces it completely (seed 1: other weights), still no scratch left
    run_training(_config(tmp_path, "dsl", epochs=1, out=str(out), overwrite=True, seed=1))
    after = _run_files(out)
    assert {p for p in after if "tensorboard" not in str(p)} == {p for p in before if "tensorboard" not in str(p)}
    assert after[Path("masks.npz")] != before[Path("masks.npz")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_scratch_runs_of_dead_processes_are_removed(tmp_path):
    import os
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".run.tmp-pid{int(dead.stdout)}-0123abcd-{host}"
    live = tmp_path / f".run.tmp-pid{os.getpid()}-0123abcd-{host}"
    stale.mkdir(), live.mkdir()
    run_training(_config(tmp_path, "dense", epochs=1, out=str(tmp_path / "run")))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "run"])


def test_run_dir_keeps_raw_id_maps_and_load_run_returns_them(tmp_path, capsys):
    rng = np.random.default_rng(0)
    users = [f"u_{k}" for k in rng.choice(1000, 40, replace=False)]
    items = [int(v) for v in rng.choice(10**6, 60, replace=False)]
    lines = sorted({f"{u} {items[j]}" for i, u in enumerate(users) for j in rng.choice(60, 8, replace=False)})
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines) + "\n" + lines[0] + "\n")  # one duplicate line
    out = tmp_path / "run"
    run_training(TrainConfig(model="mf_bpr", dataset=str(path), epochs=1, batch_size=64, dim=4, out=str(out),
                             verbose=1))
    printed = capsys.readouterr().out
    assert "[train] data pairs: 40 users, 60 items" in printed and "1 duplicates removed" in printed
    assert "0 users without training items" in printed and "test-only items" in printed
    _, config, ids = load_run(out)
    assert ids.user_ids.tolist() == sorted(users) and ids.item_ids.tolist() == sorted(items)
    assert ids.item_ids.dtype == np.int64 and ids.user_ids.dtype.kind == "U"
    synthetic_ids = load_run(_synthetic_run(tmp_path)).ids
    assert synthetic_ids.user_ids.tolist() == list(range(120)) and synthetic_ids.item_ids.tolist() == list(range(150))


def _synthetic_run(tmp_path):
    run_training(_config(tmp_path, "dense", epochs=1, out=str(tmp_path / "syn")))
    return tmp_path / "syn"


def test_cli_bad_dataset_arguments_fail_clearly_before_touching_the_run(tmp_path):
    out = tmp_path / "r"
    bogus = _cli("--dataset-arg", "bogus=1", "--out", str(out))
    assert bogus.returncode == 2 and "Traceback" not in bogus.stderr
    assert "unknown dataset argument 'bogus' for synthetic; accepted: num_users, num_items" in bogus.stderr
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "train.txt").write_text("0 1\n2000000000 3\n")
    result = _cli("--dataset", str(huge), "--model", "mf_bpr", "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{huge / 'train.txt'}:2: user id 2000000000 implies a 2000000001 x 64 float32 table" in result.stderr
    assert not out.exists()


def test_every_flag_reaches_the_config():
    """--storage/--optimizer/--growth-scores were parsed but dropped once: every flag must land in TrainConfig."""
    from trainers.train import config_from_args

    cfg = config_from_args(["--storage", "dense", "--optimizer", "lazy_adam", "--growth-scores", "window",
                            "--sparsity", "0.6", "--epochs", "3", "--hparam", "temperature=0.1",
                            "--dataset-arg", "num_users=50", "--gmp-end-fraction", "0.5", "--seed", "4",
                            "--prune-by", "row_relative", "--grow-by", "row_scaled", "--budget", "per_row"])
    assert (cfg.storage, cfg.optimizer, cfg.growth_scores, cfg.sparsity, cfg.epochs, cfg.seed) == (
        "dense", "lazy_adam", "window", 0.6, 3, 4)
    assert cfg.hparams == {"temperature": 0.1} and cfg.dataset_args == {"num_users": 50}
    assert cfg.gmp_end_fraction == 0.5 and (cfg.prune_by, cfg.grow_by) == ("row_relative", "row_scaled")
    callback = METHODS["dsl"].callback(Context(cfg, 100, 5, None, None, 10))
    assert (callback.prune_by, callback.grow_by, callback.budget) == ("row_relative", "row_scaled", "per_row")
    with pytest.raises(ValueError, match="budget must be one of"):
        dataclasses.replace(cfg, budget="global").resolved()  # not offered: compact tables have one budget each


def test_summary_breaks_every_epoch_down(method_runs):
    """Issue 15: each epoch's wall time = steps + explorations + evaluation + other, recorded per run."""
    for method in ("dense", "dsl", "omp"):
        summary = method_runs[method][1]
        epochs, total = summary["time"]["epochs"], summary["time"]["total"]
        assert [e["epoch"] for e in epochs] == list(range(summary["history"]["loss"].__len__()))
        assert sum(e["steps"] for e in epochs) == summary["steps"]
        for e in epochs:
            assert 0 < e["step_seconds"] < e["wall_seconds"]
            assert e["other_seconds"] == pytest.approx(
                e["wall_seconds"] - e["step_seconds"] - e["exploration_seconds"] - e["evaluation_seconds"])
            assert (e["evaluation_seconds"] > 0) == (e["epoch"] % 2 == 1)  # --eval-every 2
        explored = sum(x["dsl_seconds"] for x in summary["explorations"])
        assert total["exploration_seconds"] == pytest.approx(explored)
        assert (explored > 0) == (method == "dsl")
        assert total["wall_over_steps"] >= 1.0 and total["final_evaluation_seconds"] > 0
        # the fit's CPU time (all threads, in-fit evaluations included): positive, below cores x wall
        assert 0 < summary["train_cpu_seconds"] <= (os.cpu_count() or 1) * summary["train_seconds"] + 0.5


def test_fig5_reads_the_epoch_mean_loss(method_runs, tmp_path):
    """Runs record History's loss, the mean of each epoch's batch losses; Fig. 5 draws it and flags older runs."""
    from benchmarks.figures import epoch_loss

    summary = dict(method_runs["dsl"][1])
    assert summary["loss_reduction"] == "epoch_mean" and len(summary["history"]["loss"]) == 4
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    assert epoch_loss(run) == (summary["history"]["loss"], True)
    del summary["loss_reduction"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.warns(UserWarning, match="last batch"):
        assert epoch_loss(run) == (summary["history"]["loss"], False)


def test_fig3_sweeps_the_given_base_configuration(tmp_path):
    """Fig. 3 trains its ΔT and ρ0 sweep from a base config on valid, one run per point, reused when run again."""
    from benchmarks.figures import fig3

    base = dict(dataset_args=TINY, epochs=2, batch_size=64, dim=8, lr=0.01)
    fig3(tmp_path / "runs", tmp_path, 0, base, intervals=(4, 8), ratios=(0.3,), base_interval=8)
    drawn = json.loads((tmp_path / "fig3_sweeps.json").read_text())
    recall = {run.name: json.loads((run / "summary.json").read_text())["metrics"]["recall@20"]
              for run in (tmp_path / "runs").iterdir()}
    assert sorted(recall) == ["dense", "dt4_rho0.5", "dt8_rho0.3", "dt8_rho0.5"]
    assert drawn["intervals"] == {"4": recall["dt4_rho0.5"], "8": recall["dt8_rho0.5"]}
    assert drawn["ratios"] == {"0.3": recall["dt8_rho0.3"]} and drawn["dense"] == recall["dense"]
    config = json.loads((tmp_path / "runs" / "dt8_rho0.3" / "config.json").read_text())
    assert (config["protocol"], config["update_interval"], config["initial_update_ratio"]) == ("valid", 8, 0.3)
    stamps = {run.name: (run / "summary.json").stat().st_mtime_ns for run in (tmp_path / "runs").iterdir()}
    fig3(tmp_path / "runs", tmp_path, 0, base, intervals=(4, 8), ratios=(0.3,), base_interval=8)
    assert stamps == {run.name: (run / "summary.json").stat().st_mtime_ns for run in (tmp_path / "runs").iterdir()}


def test_explore_until_stops_dsl_explorations_at_that_fraction(tmp_path, method_runs):
    """--explore-until 0.5: no exploration after half the planned steps (the default explores to the end)."""
    _, summary = run_training(_config(tmp_path, "dsl", explore_until=0.5))
    steps = summary["steps"]
    explored = [e["dsl_step"] for e in summary["explorations"]]
    assert explored and max(explored) <= steps // 2
    assert max(e["dsl_step"] for e in method_runs["dsl"][1]["explorations"]) > steps // 2
    assert json.loads((tmp_path / "dsl" / "config.json").read_text())["explore_until"] == 0.5
    with pytest.raises(ValueError, match="explore_until must be in"):
        _config(tmp_path, "dsl", explore_until=0.0).resolved()


def test_bench_reuses_a_run_whose_marker_predates_a_new_config_field(tmp_path, monkeypatch):
    """A finished run is reused when its bench_config.json lacks a field added since (default = what it ran with),
    and retrained when a recorded field differs."""
    import benchmarks.gowalla as bench

    cfg = _config(tmp_path, "dsl", epochs=1)
    first = bench.train_or_reuse(cfg)
    marker = tmp_path / "dsl" / "bench_config.json"
    stored = json.loads(marker.read_text())
    del stored["prune_by"]  # as written before TrainConfig had the field
    marker.write_text(json.dumps(stored))
    monkeypatch.setattr(bench, "run_training", lambda c: pytest.fail("retrained a finished run"))
    assert bench.train_or_reuse(cfg) == first
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        bench.train_or_reuse(_config(tmp_path, "dsl", epochs=1, prune_by="row_relative"))


def test_bench_runs_dsl_once_per_budget_mode(tmp_path, monkeypatch):
    """--dsl-budgets per_layer per_row: DSL runs once per mode (the others once), each in its own directory,
    and every row records its budget."""
    import benchmarks.gowalla as bench

    seen = []

    def fake(cfg):
        seen.append((cfg.method, cfg.budget, Path(cfg.out).name))
        return {"model": cfg.model, "method": cfg.method, "sparsity": cfg.sparsity, "density": 1.0, "steps": 1,
                "metrics": {"recall@20": 0.1, "ndcg@20": 0.1}, "training_macs": 1, "inference_macs": 1,
                "train_seconds": 1.0, "time": {"epochs": [1.0]}}

    monkeypatch.setattr(bench, "train_or_reuse", fake)
    rows = bench.main(["--models", "mf_bpr", "--methods", "dsl", "gmp", "--sparsities", "0.8", "--epochs", "1",
                       "--dsl-budgets", "per_layer", "per_row", "--out", str(tmp_path), "--json",
                       str(tmp_path / "rows.json"), "--verbose", "0"])
    assert seen == [("dense", "per_layer", "mf_bpr_dense"), ("dsl", "per_layer", "mf_bpr_dsl_s0.8"),
                    ("dsl", "per_row", "mf_bpr_dsl_per_row_s0.8"), ("gmp", "per_layer", "mf_bpr_gmp_s0.8")]
    assert [(r["method"], r["budget"]) for r in rows] == [(m, b) for m, b, _ in seen]
    assert json.loads((tmp_path / "rows.json").read_text())["rows"] == rows


def test_figures_draw_per_row_dsl_as_its_own_series(tmp_path, monkeypatch):
    """A per-row DSL run is its own series (``dsl per-row``) in Fig. 2, 4 and 5, not a second point of ``dsl``;
    Fig. 4's bars are each run's row densities by popularity tenth."""
    import scipy.sparse as sp
    from benchmarks import figures

    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((20, 30)) < np.linspace(0.05, 0.9, 20)[:, None]).astype(np.float32))
    densities = {("rp", None): 0.2, ("dsl", None): 0.5, ("dsl", "per_row"): 0.25, ("dense", None): 1.0}
    rows = []
    for (method, budget), keep in densities.items():
        run = tmp_path / f"{method}_{budget}"
        run.mkdir()
        user = np.arange(8)[None, :].repeat(20, 0) < round(8 * keep)  # every row at the run's density
        item = np.arange(8)[None, :].repeat(30, 0) < round(8 * keep)
        np.savez(run / "masks.npz", user_embedding=user, item_embedding=item)
        sp.save_npz(run / "interactions.npz", train)
        np.save(run / "item_popularity.npy", np.asarray(train.sum(0)).ravel())
        loss = [1.0 / keep, 0.5 / keep]
        (run / "summary.json").write_text(json.dumps({"history": {"loss": loss}, "loss_reduction": "epoch_mean"}))
        rows.append({"model": "mf_bpr", "method": method, "sparsity": 0.0 if method == "dense" else 0.8,
                     "recall@20": keep / 10, "run": str(run), **({"budget": budget} if budget else {})})
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault(path.name, fig))
    for name in ("2", "4", "5"):
        figures.FROM_RESULTS[name](rows, tmp_path)

    def series(fig, ax=0):
        return [t.get_text() for t in fig.axes[ax].get_legend().get_texts()]

    assert series(drawn["fig2_performance_sparsity.png"]) == ["dense", "rp", "dsl", "dsl per-row"]
    fig2_lines = {line.get_label(): list(np.ravel(line.get_ydata()))
                  for line in drawn["fig2_performance_sparsity.png"].axes[0].lines}
    assert fig2_lines["dsl per-row"] == [0.025] and fig2_lines["dsl"] == [0.05]
    fig4 = drawn["fig4_sparsity_popularity.png"]
    assert series(fig4) == ["rp", "dsl", "dsl per-row"]
    heights = {c.get_label(): sorted({round(b.get_height(), 6) for b in c}) for c in fig4.axes[0].containers}
    assert heights == {"rp": [0.25], "dsl": [0.5], "dsl per-row": [0.25]}  # round(8 · 0.2) = 2 of 8
    fig5 = {line.get_label(): list(np.ravel(line.get_ydata())) for line in drawn["fig5_loss_curves.png"].axes[0].lines}
    assert fig5 == {"dense": [1.0, 0.5], "rp": [5.0, 2.5], "dsl": [2.0, 1.0], "dsl per-row": [4.0, 2.0]}


def test_figures_draws_only_the_figures_asked_for(tmp_path):
    """--figures 2 draws Fig. 2 from the results alone: Fig. 4 and 5, which read run directories, are not drawn."""
    from benchmarks.figures import main

    rows = [{"model": "mf_bpr", "method": m, "sparsity": s, "recall@20": r, "run": str(tmp_path / "absent")}
            for m, s, r in (("dense", 0.0, 0.12), ("dsl", 0.5, 0.11), ("dsl", 0.8, 0.10))]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    main(["--results", str(tmp_path / "results.json"), "--out", str(tmp_path / "figs"), "--figures", "2",
          "--skip-sweep"])
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["fig2_performance_sparsity.png"]
    with pytest.raises(FileNotFoundError):  # Fig. 4 needs the runs' masks
        main(["--results", str(tmp_path / "results.json"), "--out", str(tmp_path / "figs"), "--figures", "4",
              "--skip-sweep"])
