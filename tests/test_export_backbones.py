"""Issue 13: every trainers/ backbone exports as a TF Serving model that answers like Keras.

Each backbone is trained briefly (DSL, compact storage, s=0.8) by ``trainers.train.run_training``
on a small triplet file with its own raw ids (strings for some backbones, sparse integers for
the others), exported compact and dense with ``export.export_run``, loaded through the TF1
session the way TF Serving loads it, and compared with the Keras model: the same top-k ids
(up to float-rounding ties), scores within 1e-5. Every version also passes TensorFlow's own
``saved_model_cli show --all`` and ``saved_model_cli run`` on a warmup request.
"""

from __future__ import annotations

import json

import dsl_tf  # noqa: F401  (before tf.keras)
import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf

from export import SessionServable, export_run, saved_model_cli
from export.checks import METADATA_FILE, graph_ops
from export_fixtures import assert_topk, write_triplets
from trainers.models import MODELS
from trainers.runs import load_run
from trainers.train import TrainConfig, run_training

K = 5
STRING_IDS = {"two_tower", "lightgcn", "multvae"}
HPARAMS = {"multvae": {"hidden_dim": 32}, "ultragcn": {"num_negatives": 20}, "neumf": {"mlp_layers": [16, 8]}}


@pytest.fixture(scope="module", params=sorted(MODELS))
def backbone(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    rng = np.random.default_rng(1)
    if name in STRING_IDS:
        users = [f"u_{k}" for k in rng.choice(1000, 40, replace=False)]
        items = [f"sku-{k}" for k in rng.choice(1000, 50, replace=False)]
    else:
        users = [int(k) * 7 + 1000 for k in rng.choice(10**5, 40, replace=False)]
        items = [int(k) * 3 + 5 for k in rng.choice(10**6, 50, replace=False)]
    run = tmp / "run"
    run_training(TrainConfig(model=name, dataset=str(write_triplets(tmp / "pairs.txt", users, items, 6)), epochs=2,
                             batch_size=64, dim=8, out=str(run), verbose=0, hparams=HPARAMS.get(name, {})))
    exported = {fmt: export_run(run, tmp / "serving", fmt, k=K, fmt=fmt, compare_dense=False)
                for fmt in ("compact", "dense")}
    return name, run, load_run(run), exported


def _dense_ids(raw, ids_of):
    raw = np.asarray([v.decode() if isinstance(v, bytes) else v for v in np.ravel(raw)]).reshape(np.shape(raw))
    lookup = {v: i for i, v in enumerate(ids_of.tolist())}
    return np.vectorize(lookup.get)(raw)


def _histories(run, ids, users, pad):
    train = sp.load_npz(run / "interactions.npz").tocsr()
    lengths = np.diff(train.indptr)[users]
    history = np.full((len(users), lengths.max()), pad, dtype=ids.item_ids.dtype)
    for row, user in enumerate(users):
        history[row, : lengths[row]] = ids.item_ids[train.indices[train.indptr[user]:train.indptr[user + 1]]]
    return history


@pytest.mark.parametrize("fmt", ["compact", "dense"])
def test_serving_default_answers_like_the_keras_model(backbone, fmt):
    name, run, (model, _, ids), exported = backbone
    result = exported[fmt]
    users = np.arange(len(ids.user_ids))
    want = model.score_all(users).numpy()
    inputs = {"user_id": ids.user_ids[users]}
    if name in ("multvae", "cdae"):  # the history is the input; padding is any unknown id
        pad = "" if ids.item_ids.dtype.kind == "U" else -1
        inputs = {"history": _histories(run, ids, users, pad)}
        if name == "cdae":
            inputs["user_id"] = ids.user_ids[users]
    with SessionServable(result.path) as s:
        assert set(s.signatures["serving_default"].inputs) == set(inputs)
        out = s.run("serving_default", **inputs)
    assert out["known"].all()
    assert_topk(_dense_ids(out["item_ids"], ids.item_ids), out["scores"], want)
    meta = json.loads((result.path / "assets.extra" / METADATA_FILE).read_text())
    assert meta["model"] == name and meta["format"] == fmt
    if fmt == "compact":  # every masked table is stored in the compact format, none dense
        layers = dsl_tf.masked_embeddings(model)
        assert sorted(meta["tables"]) == sorted(layer.name for layer in layers)
        assert {t["format"] for t in meta["tables"].values()} == {"compact"}
        assert all(abs(t["density"] - 0.2) < 0.01 for t in meta["tables"].values())


def test_saved_model_cli_shows_and_runs_every_version(backbone):
    results = list(backbone[3].values())
    outputs = saved_model_cli([r.path for r in results])
    for result in results:
        out = outputs[str(result.path)]
        assert "signature_def['serving_default']" in out["show"] and "Concrete Functions" in out["show"]
        assert "Result for output key item_ids" in out["run"] and "Result for output key known" in out["run"]


def test_signatures_per_backbone(backbone):
    name, _, _, exported = backbone
    want = {"neumf": {"serving_default", "score"}, "multvae": {"serving_default"}, "cdae": {"serving_default"}}
    want = want.get(name, {"serving_default", "score", "user_embedding", "item_embedding"})
    for result in exported.values():
        assert set(result.signatures) == want
        assert not graph_ops(result.path) & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


def test_lightgcn_embeddings_are_the_propagated_ones(backbone):
    name, _, (model, _, ids), exported = backbone
    if name != "lightgcn":
        pytest.skip("LightGCN only")
    final = model.propagate()[0].numpy()
    users, items = final[: len(ids.user_ids)], final[len(ids.user_ids):]
    for result in exported.values():
        with SessionServable(result.path) as s:
            got_u = s.run("user_embedding", user_id=ids.user_ids)["embedding"]
            got_i = s.run("item_embedding", item_id=ids.item_ids)["embedding"]
            pair = s.run("score", user_id=ids.user_ids[:3], item_id=ids.item_ids[:3])["scores"]
        np.testing.assert_allclose(got_u, users, atol=1e-5)
        np.testing.assert_allclose(got_i, items, atol=1e-5)
        np.testing.assert_allclose(pair, (users[:3] * items[:3]).sum(1), atol=1e-5)
    meta = exported["compact"].metadata
    assert meta["kind"] == "lightgcn" and set(meta["tables"]) == {"user_embedding", "item_embedding"}


def test_neumf_score_is_the_keras_logit(backbone):
    name, _, (model, _, ids), exported = backbone
    if name != "neumf":
        pytest.skip("NeuMF only")
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, len(ids.user_ids), 30), rng.integers(0, len(ids.item_ids), 30)
    want = model._logits(tf.constant(users), tf.constant(items[:, None])).numpy()[:, 0]
    for result in exported.values():
        with SessionServable(result.path) as s:
            got = s.run("score", user_id=ids.user_ids[users], item_id=ids.item_ids[items])
            unknown = s.run("serving_default", user_id=np.array([ids.user_ids.max() + 1]))
        np.testing.assert_allclose(got["scores"], want, atol=1e-5)
        assert unknown["known"].tolist() == [False] and (unknown["scores"] == 0).all()


def test_autoencoders_serve_unseen_users_from_their_history(backbone):
    """A user not in the training data, with a history of raw ids (one unknown, padding):
    the servable answers as the Keras model would for a user with that history."""
    name, run, (model, _, ids), exported = backbone
    if name not in ("multvae", "cdae"):
        pytest.skip("autoencoders only")
    pad = "" if ids.item_ids.dtype.kind == "U" else -1
    picked = np.array([3, 11, 17])
    history = np.array([list(ids.item_ids[picked]) + [pad, "nope" if pad == "" else 10**9]], ids.item_ids.dtype)
    # Keras: the same forward pass with that history as a (new) user's only interactions
    shape = (model.num_users, model.num_items)
    probe = sp.csr_matrix((np.ones(3, np.float32), (np.zeros(3, int), picked)), shape=shape)
    model.attach(probe)
    want = model.score_all(np.array([0])).numpy()
    if name == "cdae":  # an unseen user has no user vector: zero it for the reference
        saved = [w.numpy() for w in model.user_table.weights]
        for w in model.user_table.weights:
            if w.dtype.is_floating and w.shape.rank >= 1:
                w.assign(tf.zeros_like(w))
        want = model.score_all(np.array([0])).numpy()
        for w, value in zip(model.user_table.weights, saved):
            w.assign(value)
    model.attach(sp.load_npz(run / "interactions.npz").tocsr())
    inputs = {"history": history}
    if name == "cdae":
        inputs["user_id"] = np.array(["nobody" if ids.user_ids.dtype.kind == "U" else -5])
    for result in exported.values():
        with SessionServable(result.path) as s:
            out = s.run("serving_default", **inputs)
            empty = s.run("serving_default", **{**inputs, "history": np.array([[pad, pad]], history.dtype)})
        assert out["known"].tolist() == [True]
        assert_topk(_dense_ids(out["item_ids"], ids.item_ids), out["scores"], want)
        assert empty["known"].tolist() == [False] and (empty["scores"] == 0).all()


def test_cli_exports_and_queries_every_backbone(backbone, tmp_path, capsys):
    """``export/serve.py --run DIR --query``: the first user's printed top-k are the Keras model's."""
    from export import serve

    name, run, (model, _, ids), _ = backbone
    argv = ["--run", str(run), "--out", str(tmp_path), "--name", "q", "--k", str(K), "--no-dense-compare", "--query"]
    assert serve.main(argv) == 0
    text = capsys.readouterr().out
    assert f"{name if name in ('lightgcn', 'neumf', 'multvae', 'cdae') else 'retrieval'} servable" in text
    printed = [line.split()[2] for line in text.splitlines() if ". item " in line]
    scores = model.score_all(np.array([0])).numpy()[0]
    got = scores[[list(map(str, ids.item_ids.tolist())).index(item) for item in printed]]
    np.testing.assert_allclose(got, np.sort(scores)[::-1][:K], atol=1e-5)


def test_lightgcn_stores_packed_tables_and_an_elias_fano_graph(tmp_path):
    """LightGCN's compact servable stores exactly: each base table's bitmask and its float32
    values packed (``compact.pack_floats``; no row offsets: recomputed at load), and the graph
    as the Elias–Fano code of its sorted edge keys ``user * items + item`` (no row pointers,
    no per-edge item ids, no degrees). Before: ``row_offsets`` per table, ``graph_indptr`` and
    ``graph_items`` (uint16), and raw float32 values: 0.348 of the dense export at Gowalla
    size, now 0.289. The served vectors are still the propagated ones."""
    from benchmarks.serving import random_model
    from dsl_tf import compact
    from export import export_model
    from export.servable import build_servable
    from export.tables import ExportError

    users, items, dim = 300, 400, 32
    model, train = random_model("lightgcn", users, items, dim, 0.8, 6000)
    result = export_model(model, tmp_path, "lgcn", k=K, interactions=train, compare_dense=False, warmup=0)
    reader = tf.train.load_checkpoint(str(result.path / "variables" / "variables"))
    stored = {name.split("/.ATTRIBUTES")[0]: shape for name, shape in reader.get_variable_to_shape_map().items()
              if "/.ATTRIBUTES" in name}
    keys = np.repeat(np.arange(users), np.diff(train.indptr)) * items + train.indices
    edges = compact.encode_sorted(keys, users * items)
    want = {"graph_upper": [edges.upper.size], "graph_lower": [edges.lower.size]}
    for side, layer in (("user", model.user_table), ("item", model.item_table)):
        packed = compact.pack_floats(compact.from_layer(layer).values)
        want.update({f"{side}_table/bitmask": [layer.input_dim, dim // 8],
                     f"{side}_table/values_low": [3 * packed.count],
                     f"{side}_table/values_exponents": [packed.exponents.size]})
    assert stored == want
    # ~5,850 distinct edges among 120,000 keys: 4 low bits + unary high parts, 6.3 bits per edge (entropy ~5.7)
    assert edges.low_bits == 4 and edges.nbytes == -(-(train.nnz + 7500) // 8) + -(-train.nnz * 4 // 8)
    assert edges.nbytes < 0.4 * (2 * train.nnz + 4 * (users + 1))  # the CSR it replaces: uint16 ids + int32 row pointers
    data = sum(f.stat().st_size for f in (result.path / "variables").glob("variables.data-*"))
    table_bytes = sum(int(np.prod(shape)) for shape in want.values())  # every stored array is uint8
    assert table_bytes <= data <= table_bytes + 2048  # + the object graph
    final = model.propagate()[0].numpy()
    with SessionServable(result.path) as s:
        got = s.run("user_embedding", user_id=np.arange(users))["embedding"]
    np.testing.assert_allclose(got, final[:users], atol=1e-5)
    with pytest.raises(ExportError, match="load-only"):  # base tables answer no request themselves
        build_servable(model, interactions=train, k=K).user_table.lookup(tf.constant([0]))
