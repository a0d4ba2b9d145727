"""Issue 13: a run of every training method exports and answers like its Keras model.

``export/serve.py --run DIR`` must work "for a run of every backbone and method": the backbone
tests train DSL runs; here one backbone (mf_bpr, integer raw ids) is trained briefly by each
method of ``trainers.methods.METHODS`` (dense, dsl, rp, set, gmp, omp), exported compact with
``export.export_run`` and served through the TF1 session loader: the same top-k raw ids as the
Keras model, scores within 1e-5, and every stored table exactly as dense as the trained mask
(1.0 for the dense method, whose tables are then stored compact with every entry active).
RP and SET runs failed here before: ``trainers.runs.load_run`` rebuilt their compact tables
with growth scores, which they never keep, so the checkpoint did not match.
"""

from __future__ import annotations

import dsl_tf  # noqa: F401  (before tf.keras)
import numpy as np
import pytest
from dsl_tf import masks

from export import SessionServable, export_run
from export_fixtures import assert_topk, write_triplets
from trainers.methods import METHODS
from trainers.runs import load_run
from trainers.train import TrainConfig, run_training

K = 5
SPARSITY = 0.8


@pytest.fixture(scope="module", params=sorted(METHODS))
def exported_run(request, tmp_path_factory):
    method = request.param
    tmp = tmp_path_factory.mktemp(method)
    rng = np.random.default_rng(2)
    users = [int(k) * 5 + 17 for k in rng.choice(10**5, 40, replace=False)]
    items = [int(k) * 11 + 3 for k in rng.choice(10**6, 50, replace=False)]
    run = tmp / "run"
    run_training(TrainConfig(model="mf_bpr", dataset=str(write_triplets(tmp / "pairs.txt", users, items, 6)),
                             method=method, sparsity=SPARSITY, epochs=4, batch_size=32, dim=8, out=str(run),
                             verbose=0))
    result = export_run(run, tmp / "serving", "m", k=K, compare_dense=False)
    return method, load_run(run), result


def test_every_method_serves_the_keras_top_k_in_raw_ids(exported_run):
    _, (model, _, ids), result = exported_run
    users = np.arange(len(ids.user_ids))
    with SessionServable(result.path) as servable:
        out = servable.run("serving_default", user_id=ids.user_ids[users])
    assert out["known"].all()
    lookup = {raw: row for row, raw in enumerate(ids.item_ids.tolist())}
    rows = np.vectorize(lookup.get)(out["item_ids"])
    assert_topk(rows, out["scores"], model.score_all(users).numpy())


def test_every_method_stores_its_trained_mask(exported_run):
    method, (model, _, _), result = exported_run
    want = {layer.name: masks.active_count(layer) / (layer.input_dim * layer.output_dim)
            for layer in dsl_tf.masked_embeddings(model)}
    tables = result.metadata["tables"]
    assert sorted(tables) == sorted(want)
    assert {t["format"] for t in tables.values()} == {"compact"}
    for name, table in tables.items():
        assert table["density"] == pytest.approx(want[name], abs=1e-9)
        assert table["density"] == pytest.approx(1.0 if method == "dense" else 1 - SPARSITY, abs=0.01)
