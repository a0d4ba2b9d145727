"""Issue 13: how a compact servable keeps its load-time and per-request memory small.

* the load-time item matrix is decoded chunk by chunk into one buffer (``InplaceUpdate``),
  never written into the variable with scatter / slice assigns (they switch it to
  copy-on-read: every request would copy the whole matrix);
* a request whose ``[B, num_items]`` scores exceed ``builder.SCORE_ENTRIES`` is scored per
  item chunk, and answers exactly like one ``top_k`` (ties: the lower item first).
"""

from __future__ import annotations

import dsl_tf  # noqa: F401  (before tf.keras)
import numpy as np
import pytest
import scipy.sparse as sp
import tensorflow as tf

from export import builder, tables
from export.servable import SessionServable, export_model, graph_ops
from export_fixtures import random_masked

K = 10
COPY_ON_READ_OPS = {"ResourceScatterUpdate", "ResourceScatterAdd", "ResourceStridedSliceAssign"}


def test_chunked_load_time_tensor_equals_the_whole_matrix():
    matrix = np.arange(70, dtype=np.float32).reshape(10, 7)
    chunked = tables.LoadTimeTensor(lambda start, stop: tf.constant(matrix)[start:stop], [10, 7], chunk_rows=3)
    np.testing.assert_array_equal(chunked.read().numpy(), matrix)


@pytest.mark.parametrize("values", ["float32", "float16"])
def test_decode_rows_equals_the_masked_table_for_any_row_range(values):
    layer = random_masked(5, 40, 12, 0.7, seed=3).item_tower.layers[0]
    layer.mask.assign(tf.tensor_scatter_nd_update(layer.mask, [[i] for i in range(10, 20)], tf.zeros([10, 12])))
    table = tables.ServedTable(layer, "compact", values, "rebuild")
    want = layer.effective_table().numpy().astype(values).astype(np.float32)
    for start, stop in [(0, 40), (0, 7), (10, 20), (15, 31), (39, 40)]:  # (10, 20): rows without values
        np.testing.assert_array_equal(table.decode_rows(start, stop).numpy(), want[start:stop])


def _integer_model():
    """Integer-valued tables (exact dot products, so tied scores tie exactly) in which items
    ``i`` and ``i + 150`` are equal: ties across item chunks."""
    model = random_masked(40, 300, 8, 0.5, seed=1, normalize=False)
    for layer in dsl_tf.masked_embeddings(model):
        layer.embeddings.assign(tf.round(layer.embeddings * 20.0) * layer.mask)
    item = model.item_tower.layers[0]
    for var in (item.embeddings, item.mask):
        var.assign(tf.concat([var[:150], var[:150]], 0))
    return model


@pytest.mark.parametrize("exclude_seen", [False, True])
def test_requests_scored_per_item_chunk_equal_one_top_k(tmp_path, monkeypatch, exclude_seen):
    """With ``SCORE_ENTRIES`` = 40 items × 64 rows, batches above 8 users are scored in 8
    chunks of 40 items; batches of 8 or fewer in one product. Both answer exactly the
    top-k of the Keras model's scores (ties included: integer tables)."""
    monkeypatch.setattr(builder, "SCORE_ENTRIES", 40 * builder.SCORE_CHUNK_BATCH)
    model = _integer_model()
    users = np.arange(40, dtype=np.int64)
    all_scores = (model.user_tower(users).numpy() @ model.item_tower(np.arange(300)).numpy().T).astype(np.float32)
    seen = None
    if exclude_seen:
        rng = np.random.default_rng(0)
        seen = sp.random(40, 300, density=0.1, format="csr", random_state=rng, dtype=np.float32)
        all_scores[seen.nonzero()] = np.finfo(np.float32).min
    want = tf.math.top_k(all_scores, K)
    result = export_model(model, tmp_path, "chunked", k=K, compare_dense=False, seen=seen)
    assert "InplaceUpdate" in graph_ops(result.path) and not graph_ops(result.path) & COPY_ON_READ_OPS
    with SessionServable(result.path) as servable:
        for batch in (users[:8], users):  # one product; per item chunk
            out = servable.run("serving_default", user_id=batch)
            np.testing.assert_array_equal(out["item_ids"], want.indices.numpy()[batch])
            np.testing.assert_array_equal(out["scores"], want.values.numpy()[batch])


def _init_allocations(path, at_least: int) -> list[str]:
    """Nodes of the SavedModel's init op (run as TF Serving runs it, after the restore) that
    allocate, or hold as a (Grappler-folded) constant, an output of ``at_least`` bytes."""
    from tensorflow.python.saved_model import loader_impl

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        loader = loader_impl.SavedModelLoader(str(path))
        saver, _ = loader.load_graph(graph, ["serve"])
        loader.restore_variables(session, saver)
        init = loader.get_meta_graph_def_from_tags(["serve"]).signature_def["__saved_model_init_op"]
        metadata = tf.compat.v1.RunMetadata()
        session.run(init.outputs["__saved_model_init_op"].name, run_metadata=metadata,
                    options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
    found = []
    for device in metadata.step_stats.dev_stats:
        for node in device.node_stats:
            size = sum(o.tensor_description.allocation_description.requested_bytes for o in node.output)
            allocated = sum(m.total_bytes for m in node.memory)
            if size >= at_least and (allocated >= at_least or "= Const(" in node.timeline_label):
                found.append(node.timeline_label)
    return found


def test_load_time_item_matrix_is_allocated_once(tmp_path, monkeypatch):
    """The item matrix is one buffer (``Empty``): before, ``tf.zeros`` of its static shape was
    folded by Grappler into a whole-size ``Const`` the loaded graph keeps (+6.5 MiB at Gowalla
    sizes) and in-place ops cannot reuse."""
    monkeypatch.setattr(tables, "CHUNK_ENTRIES", 64)  # 8 rows per chunk: chunks are far smaller than the matrix
    result = export_model(random_masked(40, 300, 8, 0.8), tmp_path, "cache", k=K, compare_dense=False)
    found = _init_allocations(result.path, 300 * 8 * 4)
    assert len(found) == 1 and "= Empty(" in found[0], found


def test_lightgcn_propagates_into_one_buffer(tmp_path):
    """LightGCN's load-time propagation allocates one ``[users + items, d]`` buffer (the sum of
    the layers, adopted by the variable); its layers are one side each. Before: the decoded
    tables, the layer sums, their concatenation and the division each allocated one."""
    from benchmarks.serving import random_model

    model, train = random_model("lightgcn", 30, 40, 8, 0.8, 300)
    result = export_model(model, tmp_path, "lightgcn", k=K, compare_dense=False, interactions=train)
    found = _init_allocations(result.path, (30 + 40) * 8 * 4)
    assert len(found) == 1 and "= Empty(" in found[0], found


def test_dense_export_holds_no_load_time_tensor(tmp_path):
    """``item_matrix="sparse"`` with ``fmt="dense"`` built a useless load-time ``[items]`` row-norm
    tensor (the dense table's squares: a whole-table transient at load, +11 MiB at Gowalla sizes)."""
    servable = builder.RetrievalServable(random_masked(10, 30, 8, 0.8), fmt="dense", item_matrix="sparse", k=K)
    resources = [obj for obj in tf.train.TrackableView(servable).descendants()
                 if isinstance(obj, tables.LoadTimeTensor)]
    assert resources == []
