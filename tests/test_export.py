"""Tests for export/: TF Serving servables of DSL-trained retrieval models.

The 12-point checklist (no model-server binary needed): (1) integer version folder via a
temporary rename; (2) saved_model.pb + all variable shards; (3) "serve" tag with
serving_default; (4) dense known dtypes; (5) outputs rank >= 1 sharing dim 0; (6) method
names; (7) op allow-list (+ a py_function model rejected); (8) TF1-session results equal the
Keras towers'; (9) warmup records replay; (10) models.config parses; (11) TF version
recorded; (12) compact smaller than dense by the density-driven ratio. Plus bad inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dsl_tf  # noqa: F401  (before tf.keras)
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from dsl_tf import compact
from export import servable as sv
from export.servable import ExportError, SessionServable, export_model
from export_fixtures import assert_topk, random_masked, train_tiny, write_run_dir

K = 10
F32_TOL = 1e-5
# float16 values: each stored entry has relative error <= u = 2^-11. For L2-normalised towers
# ||a' - a|| <= 2u·(1 + O(u)) per vector, so |a'·b' - a·b| <= ||a'-a|| + ||b'-b|| <= 4u = 2^-9
# (Cauchy-Schwarz, unit vectors), plus float32 rounding of the dot product (~1e-6).
F16_TOL = 4 * sv.F16_UNIT_ROUNDOFF + 1e-5


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def exports(trained, serving):
    """One export per variant of the trained tiny model, keyed by variant name."""
    model, popularity = trained
    variants = {
        "compact": dict(fmt="compact"),
        "compact_sparse": dict(fmt="compact", item_matrix="sparse"),
        "compact_rebuild": dict(fmt="compact", item_matrix="rebuild"),
        "compact_f16": dict(fmt="compact", values="float16"),
        "dense": dict(fmt="dense"),
    }
    return {name: export_model(model, serving, name, k=K, item_popularity=popularity,
                               compare_dense=False, **kw)
            for name, kw in variants.items()}


def _saved_model(path) -> saved_model_pb2.SavedModel:
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    return sm


def _reference(model, users):
    """Top-k ids/scores computed by the trained Keras towers themselves."""
    u = model.user_tower(tf.constant(users, tf.int64)).numpy()
    items = model.item_tower(tf.range(model.item_tower.layers[0].input_dim, dtype=tf.int64)).numpy()
    scores = u @ items.T
    top = tf.math.top_k(scores, K)
    return top.indices.numpy(), top.values.numpy(), scores, u, items


# --------------------------------------------------------------------------- (1)-(2)
def test_version_folder_is_an_integer_renamed_from_a_temporary(trained, tmp_path, monkeypatch):
    model, popularity = trained
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((Path(a), Path(b))), real_rename(a, b)))
    first = export_model(model, tmp_path, "m", k=K, compare_dense=False, warmup=0)
    second = export_model(model, tmp_path, "m", k=K, compare_dense=False, warmup=0)
    assert (first.version, second.version) == (1, 2)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]  # no temp left
    assert [b.name for _, b in renames] == ["1", "2"]
    for src, dst in renames:
        assert src.parent == dst.parent and not src.name.isdigit()  # TF Serving ignores it
    third = export_model(model, tmp_path, "m", version=7, k=K, compare_dense=False, warmup=0)
    assert third.path == tmp_path / "m" / "7"


def test_saved_model_and_all_variable_shards_present(exports):
    for result in exports.values():
        assert (result.path / "saved_model.pb").is_file()
        variables = result.path / "variables"
        assert (variables / "variables.index").is_file()
        shards = sorted(variables.glob("variables.data-*-of-*"))
        assert shards
        total = int(shards[0].name.rsplit("-of-", 1)[1])
        assert [s.name for s in shards] == [f"variables.data-{i:05d}-of-{total:05d}" for i in range(total)]
        assert (result.path / "assets.extra" / sv.WARMUP_FILE).is_file()


# --------------------------------------------------------------------------- (3)-(6)
def test_signatures_tags_dtypes_shapes_and_methods(exports):
    for result in exports.values():
        sm = _saved_model(result.path)
        serve = [mg for mg in sm.meta_graphs if "serve" in mg.meta_info_def.tags]
        assert len(serve) == 1
        sigs = serve[0].signature_def
        assert set(sv.SIGNATURES) <= set(sigs)
        expected_outputs = {"serving_default": {"item_ids", "scores", "known"}, "score": {"scores", "known"},
                            "user_embedding": {"embedding", "known"}, "item_embedding": {"embedding", "known"}}
        for name in sv.SIGNATURES:
            sig = sigs[name]
            assert sig.method_name == "tensorflow/serving/predict"  # (6)
            assert set(sig.outputs) == expected_outputs[name]
            for info in list(sig.inputs.values()) + list(sig.outputs.values()):  # (4)
                assert info.dtype != types_pb2.DT_INVALID
                assert tf.as_dtype(info.dtype) in (tf.int64, tf.float32, tf.bool)
                assert not info.tensor_shape.unknown_rank
            for info in sig.inputs.values():
                assert tf.as_dtype(info.dtype) == tf.int64
                assert [d.size for d in info.tensor_shape.dim] == [-1]
            dims0 = set()
            for info in sig.outputs.values():  # (5)
                dims = [d.size for d in info.tensor_shape.dim]
                assert len(dims) >= 1
                dims0.add(dims[0])
            assert dims0 == {-1}
        assert [d.size for d in sigs["serving_default"].outputs["item_ids"].tensor_shape.dim] == [-1, K]


# --------------------------------------------------------------------------- (7)
def test_op_allow_list(exports):
    for result in exports.values():
        ops = sv.graph_ops(result.path)
        assert "TopKV2" in ops and ops & {"MatMul", "SparseTensorDenseMatMul"}
        assert sv.check_ops(result.path) == ops
        assert not any(">" in op for op in ops) and not ops & sv.FORBIDDEN_OPS


def test_a_py_function_model_is_rejected(tmp_path):
    class PyModel(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def __call__(self, x):
            return {"y": tf.py_function(lambda v: v * 2, [x], tf.int64)}

    module = PyModel()
    tf.saved_model.save(module, str(tmp_path / "py"), signatures={"serving_default": module.__call__})
    assert "EagerPyFunc" in sv.graph_ops(tmp_path / "py")
    with pytest.raises(ExportError, match="EagerPyFunc"):
        sv.check_ops(tmp_path / "py")


# --------------------------------------------------------------------------- (8)
@pytest.mark.parametrize("variant", ["compact", "compact_sparse", "compact_rebuild", "dense"])
def test_tf1_session_matches_the_keras_towers_float32(trained, exports, variant):
    model, _ = trained
    users = np.arange(model.user_tower.layers[0].input_dim, dtype=np.int64)
    want_ids, want_scores, all_scores, u, items = _reference(model, users)
    with SessionServable(exports[variant].path) as s:
        out = s.run("serving_default", user_id=users)
        assert_topk(out["item_ids"], out["scores"], all_scores, atol=F32_TOL)
        pairs = np.random.default_rng(1).integers(0, items.shape[0], users.shape[0])
        np.testing.assert_allclose(s.run("score", user_id=users, item_id=pairs)["scores"],
                                   all_scores[users, pairs], rtol=0, atol=F32_TOL)
        np.testing.assert_allclose(s.run("user_embedding", user_id=users)["embedding"], u, atol=F32_TOL)
        item_ids = np.arange(items.shape[0], dtype=np.int64)
        np.testing.assert_allclose(s.run("item_embedding", item_id=item_ids)["embedding"], items, atol=F32_TOL)


def test_tf1_session_float16_within_the_rounding_bound(trained, exports):
    model, _ = trained
    users = np.arange(model.user_tower.layers[0].input_dim, dtype=np.int64)
    _, want_scores, all_scores, _, _ = _reference(model, users)
    with SessionServable(exports["compact_f16"].path) as s:
        out = s.run("serving_default", user_id=users)
    # Scores of the returned items agree with the float32 model within the bound ...
    true_of_returned = np.take_along_axis(all_scores, out["item_ids"], axis=1)
    err = np.abs(out["scores"] - true_of_returned).max()
    assert err <= F16_TOL, err
    # ... and the returned set is the true top-k up to items within 2·bound of the k-th score.
    assert (true_of_returned >= want_scores[:, -1:] - 2 * F16_TOL).all()
    np.testing.assert_allclose(out["scores"], want_scores, rtol=0, atol=2 * F16_TOL)


def test_invalid_ids_are_served_not_failed(trained, exports):
    model, popularity = trained
    rows = model.user_tower.layers[0].input_dim
    bad = np.array([-1, rows, 2**40], np.int64)
    popular = np.argsort(-popularity, kind="stable")[:K]
    for variant in ("compact", "compact_sparse", "compact_rebuild", "dense"):
        with SessionServable(exports[variant].path) as s:
            out = s.run("serving_default", user_id=bad)
            assert (out["item_ids"] == popular).all() and (out["scores"] == 0).all()
            assert (s.run("user_embedding", user_id=bad)["embedding"] == 0).all()
            assert (s.run("item_embedding", item_id=np.array([-5, 10**6]))["embedding"] == 0).all()
            pair = s.run("score", user_id=np.array([0, -1, 0]), item_id=np.array([-1, 0, 1]))
            assert pair["scores"][:2].tolist() == [0, 0] and pair["known"].tolist() == [False, False, True]
            assert s.run("serving_default", user_id=bad)["known"].tolist() == [False] * 3
            empty = s.run("serving_default", user_id=np.zeros([0], np.int64))
            assert empty["item_ids"].shape == (0, K)


# --------------------------------------------------------------------------- (9)-(11)
def test_warmup_records_parse_and_replay(exports):
    for result in exports.values():
        records = sv.read_warmup(result.path)
        assert 0 < len(records) <= 1000
        assert {r.predict_log.request.model_spec.signature_name for r in records} == set(sv.SIGNATURES)
        with SessionServable(result.path) as s:
            for record in records:
                outputs = s.replay(record)
                assert outputs and all(v.shape[0] == next(iter(record.predict_log.request.inputs.values())).tensor_shape.dim[0].size
                                       for v in outputs.values())


def test_models_config_parses_back_with_every_model(exports, serving):
    config = sv.read_models_config(serving / "models.config")
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == set(exports)
    for name, entry in entries.items():
        assert entry.model_platform == "tensorflow"
        assert Path(entry.base_path).is_absolute() and Path(entry.base_path) == (serving / name).resolve()


def test_exporting_tf_version_is_recorded(exports):
    for result in exports.values():
        sm = _saved_model(result.path)
        assert sm.meta_graphs[0].meta_info_def.tensorflow_version == tf.__version__
        assert result.tensorflow_version == tf.__version__
        meta = json.loads((result.path / "assets.extra" / sv.METADATA_FILE).read_text())
        assert meta["tensorflow_version"] == tf.__version__
        assert meta["k"] == K and meta["bytes"] == result.bytes
        assert set(meta["densities"]) == {"user_embedding", "item_embedding"}


# --------------------------------------------------------------------------- (12)
@pytest.mark.parametrize("values", ["float32", "float16"])
def test_compact_is_smaller_than_dense_by_the_density_ratio(tmp_path, values):
    users, items, dim, sparsity = 4000, 6000, 64, 0.8
    model = random_masked(users, items, dim, sparsity)
    result = export_model(model, tmp_path, "m", values=values, k=K, warmup=0)
    nnz = {l.name: int(l.mask.numpy().sum()) for l in dsl_tf.masked_embeddings(model)}
    want_vars = (compact.compact_nbytes(users, dim, nnz["user_embedding"], values, offsets=False)
                 + compact.compact_nbytes(items, dim, nnz["item_embedding"], values, offsets=False))
    dense_vars = 4 * (users + items) * dim
    data = sum(f.stat().st_size for f in (result.path / "variables").glob("variables.data-*"))
    assert want_vars <= data <= want_vars * 1.01 + 4096  # the variables are the compact arrays
    expected = want_vars / dense_vars  # 0.231 (float32) / 0.131 (float16) at s=0.8, d=64: no row offsets stored
    ratio = result.bytes / result.dense_bytes
    # the graph (saved_model.pb, ~0.1 MB) and the warmup file are a fixed overhead
    overhead = (result.bytes - data) / result.dense_bytes
    assert ratio <= expected + overhead + 0.01, (ratio, expected, overhead)
    assert ratio <= {"float32": 0.30, "float16": 0.20}[values], ratio


# --------------------------------------------------------------------------- bad inputs
def test_existing_version_needs_overwrite(trained, tmp_path):
    model, _ = trained
    first = export_model(model, tmp_path, "m", k=K, compare_dense=False, warmup=0)
    before = {p: p.stat().st_mtime_ns for p in first.path.rglob("*")}
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, tmp_path, "m", version=1, k=K, compare_dense=False, warmup=0)
    assert {p: p.stat().st_mtime_ns for p in first.path.rglob("*")} == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]
    again = export_model(model, tmp_path, "m", version=1, k=5, overwrite=True, compare_dense=False, warmup=0)
    assert again.version == 1 and json.loads((again.path / "assets.extra" / sv.METADATA_FILE).read_text())["k"] == 5
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_model_without_masked_tables_is_rejected_and_nothing_written(tmp_path):
    class Plain(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.user_tower = tf.keras.Sequential([tf.keras.layers.Embedding(10, 4)])
            self.item_tower = tf.keras.Sequential([tf.keras.layers.Embedding(12, 4)])

    with pytest.raises(ExportError, match="MaskedEmbedding"):
        export_model(Plain(), tmp_path / "out", "m")
    no_towers = tf.keras.Model()
    no_towers.user_tower = no_towers.item_tower = None
    with pytest.raises(ExportError, match="retrieval"):
        export_model(no_towers, tmp_path / "out", "m")
    assert not (tmp_path / "out").exists()


def test_a_failed_export_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    model, _ = trained
    export_model(model, tmp_path, "keep", k=K, compare_dense=False, warmup=0)

    def boom(path):
        raise ExportError("injected failure")

    monkeypatch.setattr(sv, "check_ops", boom)
    with pytest.raises(ExportError, match="injected"):
        export_model(model, tmp_path, "m", k=K, compare_dense=False)
    with pytest.raises(ExportError, match="injected"):
        export_model(model, tmp_path, "keep", k=K, compare_dense=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "models.config"]
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["1"]


def test_cli_bad_run_dir(tmp_path, capsys):
    from export import serve

    assert serve.main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "serving")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "serving").exists()


# --------------------------------------------------------------------------- CLI --run
def test_cli_exports_a_run_dir_and_queries_it(tmp_path, capsys):
    pytest.importorskip("trainers.runs")
    run = write_run_dir(tmp_path / "runs" / "tiny")
    from export import serve
    from trainers.runs import load_run

    out = tmp_path / "serving"
    assert serve.main(["--run", str(run), "--out", str(out), "--name", "tiny", "--k", "5", "--query"]) == 0
    text = capsys.readouterr().out
    assert "curl -d '{\"instances\": [{\"user_id\": 0}" in text and "localhost:8501/v1/models/tiny:predict" in text
    assert "vs dense export" in text and "user_embedding=0.2000" in text and "serving_default(" in text
    assert "    1. item" in text
    model, _, _ = load_run(run)
    want = tf.math.top_k(model.score_all(np.array([0], np.int64)), 5)
    with SessionServable(out / "tiny" / "1") as s:
        got = s.run("serving_default", user_id=[0])
    np.testing.assert_array_equal(got["item_ids"], want.indices.numpy())
    np.testing.assert_allclose(got["scores"], want.values.numpy(), atol=F32_TOL)
    meta = json.loads((out / "tiny" / "1" / "assets.extra" / sv.METADATA_FILE).read_text())
    assert meta["run"] == "tiny" and meta["model"] == "two_tower" and meta["format"] == "compact"
    # the same version again without --overwrite: clear error, nothing changed
    assert serve.main(["--run", str(run), "--out", str(out), "--name", "tiny", "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_saved_model_cli_executable_shows_and_runs(exports):
    """TensorFlow's own tool: the ``saved_model_cli`` executable on the default variant,
    the tool's parser and functions in one process for the others."""
    out = sv.saved_model_cli(exports["compact"].path)[str(exports["compact"].path)]
    assert "signature_def['score']" in out["show"] and "Result for output key item_ids" in out["run"]
    others = [r.path for name, r in exports.items() if name != "compact"]
    for path, out in sv.saved_model_cli(others).items():
        assert "signature_def['serving_default']" in out["show"] and "Result for output key scores" in out["run"]


def test_sparse_retrieval_keeps_no_dense_item_matrix(trained, exports):
    """Issue 13: ``item_matrix="sparse"`` scores straight from the compact item table: its graph
    holds no float32 [num_items, d] variable or load-time tensor (the default, ``cache``, does)."""
    model, _ = trained
    items, dim = model.item_tower.layers[0].input_dim, model.item_tower.layers[0].output_dim

    def dense_item_matrices(path):
        found = []
        for mg in _saved_model(path).meta_graphs:
            nodes = list(mg.graph_def.node) + [n for fn in mg.graph_def.library.function for n in fn.node_def]
            for node in nodes:
                if node.op == "VarHandleOp" and node.attr["dtype"].type == types_pb2.DT_FLOAT:
                    if [d.size for d in node.attr["shape"].shape.dim] == [items, dim]:
                        found.append(node.name)
        return found

    assert exports["compact_sparse"].item_matrix == "sparse" and exports["compact"].item_matrix == "cache"
    assert not dense_item_matrices(exports["compact_sparse"].path)
    assert "SparseTensorDenseMatMul" in sv.graph_ops(exports["compact_sparse"].path)
    assert dense_item_matrices(exports["compact"].path)  # the default builds one at load
