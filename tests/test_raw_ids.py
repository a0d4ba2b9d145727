"""Issue 9: raw ids end to end — data files -> run directory -> servable -> TF1 session.

Two runs are trained by ``trainers.train.run_training`` on triplet files with their own ids
(strings ``"u_17"``/``"sku-9"`` with two_tower; non-contiguous integers with mf_bpr), exported
with ``export.export_run`` and queried the way TF Serving runs them; every signature must
answer for the right raw id (compared with the Keras model through the run's id maps).
"""

from __future__ import annotations

import json

import dsl_tf  # noqa: F401  (before tf.keras)
import numpy as np
import pytest
import tensorflow as tf

from export import SessionServable, export_run, read_warmup
from export.checks import METADATA_FILE
from export_fixtures import assert_topk, write_triplets
from trainers.runs import load_run
from trainers.train import TrainConfig, run_training

K = 10


@pytest.fixture(scope="module", params=["strings", "sparse_ints"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    rng = np.random.default_rng(1)
    if request.param == "strings":
        users = [f"u_{k}" for k in rng.choice(1000, 50, replace=False)]
        items = [f"sku-{k}" for k in rng.choice(1000, 70, replace=False)]
        model = "two_tower"
    else:
        users = [int(k) * 7 + 1000 for k in rng.choice(10**5, 50, replace=False)]
        items = [int(k) * 3 + 5 for k in rng.choice(10**6, 70, replace=False)]
        model = "mf_bpr"
    data = write_triplets(tmp / "pairs.txt", users, items)
    run = tmp / "run"
    run_training(TrainConfig(model=model, dataset=str(data), epochs=2, batch_size=64, dim=8, out=str(run),
                             verbose=0))
    result = export_run(run, tmp / "serving", "m", k=K, compare_dense=False)
    loaded = load_run(run)
    return request.param, loaded, result


def _raw(values):
    return np.array([v.decode() if isinstance(v, bytes) else v for v in np.ravel(values)]).reshape(np.shape(values))


def test_every_signature_answers_for_the_right_raw_id(exported):
    kind, (model, _, ids), result = exported
    raw_users, raw_items = ids.user_ids, ids.item_ids
    assert raw_users.dtype.kind == ("U" if kind == "strings" else "i")
    dense_users = np.arange(len(raw_users))
    scores = model.score_all(dense_users).numpy()
    order = np.random.default_rng(2).permutation(len(raw_users))  # raw ids in any order
    with SessionServable(result.path) as s:
        sig = s.signatures["serving_default"]
        assert tf.as_dtype(sig.inputs["user_id"].dtype) == (tf.string if kind == "strings" else tf.int64)
        out = s.run("serving_default", user_id=raw_users[order])
        dense_of = {v: i for i, v in enumerate(raw_items.tolist())}  # ties may swap (float rounding)
        assert_topk(np.vectorize(dense_of.get)(_raw(out["item_ids"])), out["scores"], scores[order])
        assert out["known"].tolist() == [True] * len(order)
        pairs = np.random.default_rng(3).integers(0, len(raw_items), len(raw_users))
        got = s.run("score", user_id=raw_users[order], item_id=raw_items[pairs])
        np.testing.assert_allclose(got["scores"], scores[order, pairs], atol=1e-5)
        assert got["known"].all()
        want_u = tf.cast(model.user_tower(tf.constant(dense_users[order], tf.int64)), tf.float32).numpy()
        np.testing.assert_allclose(s.run("user_embedding", user_id=raw_users[order])["embedding"], want_u, atol=1e-5)
        want_i = tf.cast(model.item_tower(tf.constant(pairs, tf.int64)), tf.float32).numpy()
        np.testing.assert_allclose(s.run("item_embedding", item_id=raw_items[pairs])["embedding"], want_i, atol=1e-5)


def test_unknown_raw_ids_fall_back_and_say_so(exported):
    kind, (model, _, ids), result = exported
    saved_popularity = np.load(result.metadata["run_dir"] + "/item_popularity.npy")
    popular = ids.item_ids[np.argsort(-saved_popularity, kind="stable")[:K]]
    unknown = np.array(["nope", ids.user_ids[0]]) if kind == "strings" else np.array([-1, ids.user_ids[0]])
    if kind != "strings":
        unknown[0] = int(ids.user_ids.max()) + 1
    with SessionServable(result.path) as s:
        out = s.run("serving_default", user_id=unknown)
        assert out["known"].tolist() == [False, True]
        np.testing.assert_array_equal(_raw(out["item_ids"])[0], popular)
        assert (out["scores"][0] == 0).all()
        emb = s.run("user_embedding", user_id=unknown)
        assert emb["known"].tolist() == [False, True] and (emb["embedding"][0] == 0).all()
        want = tf.cast(model.user_tower(tf.constant([0], tf.int64)), tf.float32).numpy()[0]
        np.testing.assert_allclose(emb["embedding"][1], want, atol=1e-5)
        bad_item = "nope" if kind == "strings" else int(ids.item_ids.max()) + 1
        pair = s.run("score", user_id=unknown[1:], item_id=np.array([bad_item]))
        assert pair["known"].tolist() == [False] and pair["scores"].tolist() == [0.0]


def test_score_requires_equal_lengths(exported):
    _, (_, _, ids), result = exported
    with SessionServable(result.path) as s:
        with pytest.raises(tf.errors.InvalidArgumentError, match="same length"):
            s.run("score", user_id=ids.user_ids[:3], item_id=ids.item_ids[:1])


def test_metadata_warmup_and_report_use_raw_ids(exported, capsys):
    kind, (_, _, ids), result = exported
    meta = json.loads((result.path / "assets.extra" / METADATA_FILE).read_text())
    want = "string" if kind == "strings" else "int64"
    assert meta["ids"] == {"user": {"dtype": want, "count": len(ids.user_ids)},
                           "item": {"dtype": want, "count": len(ids.item_ids)}}
    records = read_warmup(result.path)
    inputs = [r.predict_log.request.inputs for r in records]
    sent = [v for i in inputs if "user_id" in i for v in tf.make_ndarray(i["user_id"]).tolist()]
    sent = [v.decode() if isinstance(v, bytes) else v for v in sent]
    known = set(ids.user_ids.tolist())
    assert sum(v in known for v in sent) >= len(sent) - len(records)  # raw ids, one unknown per batch
    assert any(v not in known for v in sent)
    first = ids.user_ids[0]
    assert json.dumps(first if kind == "strings" else int(first)) in result.curl()


def test_cli_query_takes_a_raw_user_id(exported, capsys):
    from pathlib import Path

    from export import serve

    kind, (model, _, ids), result = exported
    dense_user = 3
    top = tf.math.top_k(model.score_all(np.array([dense_user])), K).indices.numpy()[0]
    out = result.path.parent.parent.parent / "cli"
    argv = ["--run", str(Path(result.metadata["run_dir"])), "--out", str(out), "--name", "c", "--k", str(K),
            "--no-dense-compare", "--query", "--user", str(ids.user_ids[dense_user])]
    assert serve.main(argv) == 0
    printed = [line.split()[2] for line in capsys.readouterr().out.splitlines() if ". item " in line]
    assert printed == [str(v) for v in ids.item_ids[top]]
    if kind != "strings":
        assert serve.main(argv[:-1] + ["not-a-number"]) == 2


def test_exclude_seen_never_returns_a_training_item(exported, tmp_path):
    import scipy.sparse as sp

    _, (model, _, ids), result = exported
    run = result.metadata["run_dir"]
    seen = sp.load_npz(f"{run}/interactions.npz").tocsr()
    scores = model.score_all(np.arange(len(ids.user_ids))).numpy()
    scores[seen.nonzero()] = np.finfo(np.float32).min
    want = tf.math.top_k(scores, K)
    excluded = export_run(run, tmp_path, "x", k=K, compare_dense=False, exclude_seen=True)
    assert excluded.metadata["exclude_seen"] and not result.metadata["exclude_seen"]
    unknown = ids.user_ids.max() + 1 if ids.user_ids.dtype.kind == "i" else "nope"
    with SessionServable(excluded.path) as s:
        out = s.run("serving_default", user_id=ids.user_ids)
        dense_of = {v: i for i, v in enumerate(ids.item_ids.tolist())}  # ties may swap (float rounding)
        assert_topk(np.vectorize(dense_of.get)(_raw(out["item_ids"])), out["scores"], scores)
        returned = want.indices.numpy()
        assert not any(seen[u, i] for u in range(len(returned)) for i in returned[u])
        assert s.run("serving_default", user_id=np.array([unknown]))["known"].tolist() == [False]
    with SessionServable(result.path) as s:  # off by default: training items come back
        plain = _raw(s.run("serving_default", user_id=ids.user_ids)["item_ids"])
    dense_of = {v: i for i, v in enumerate(ids.item_ids.tolist())}
    assert any(seen[u, dense_of[v]] for u in range(len(plain)) for v in plain[u].tolist())
