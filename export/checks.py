"""Checks of a written version: the op allow-list, warmup requests, signature descriptions.

TF Serving replays ``assets.extra/tf_serving_warmup_requests`` when it loads a version;
ours hold each signature at batch sizes 1, 8 and 64 with the data's raw ids (plus one
unknown id per batch, which must be served, not failed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from export.builder import SIGNATURES, ExportError, ServingModule

FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "dsl_export.json"
MAX_WARMUP = 1000


def graph_ops(saved_model_dir: str | Path) -> set[str]:
    """Every op type in ``saved_model.pb``: graph nodes and function-library nodes."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops: set[str] = set()
    for mg in sm.meta_graphs:
        ops.update(node.op for node in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(node.op for node in fn.node_def)
    return ops


def check_ops(saved_model_dir: str | Path) -> set[str]:
    """:func:`graph_ops`, raising :class:`ExportError` on any op TF Serving may lack:
    namespaced custom ops (``>`` in the name), Python-function ops, or ops not registered
    in this (standard) TensorFlow build."""
    from tensorflow.python.framework import op_def_registry

    ops = graph_ops(saved_model_dir)
    bad = sorted(op for op in ops if ">" in op or op in FORBIDDEN_OPS or op_def_registry.get(op) is None)
    if bad:
        raise ExportError(f"the SavedModel uses ops outside the standard TF op set: {bad}")
    return ops


def warmup_requests(name: str, module: ServingModule, limit: int = 32) -> list:
    """PredictionLog records: each signature at batch sizes 1, 8 and 64 (the batch sizes TF
    Serving will see first), with the data's raw ids plus one unknown id."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rng = np.random.default_rng(0)
    logs = []
    for batch in (1, 8, 64):
        users = module.user_map.raw_ids[rng.integers(0, module.num_users, size=batch)]
        items = module.item_map.raw_ids[rng.integers(0, module.num_items, size=batch)]
        if batch > 1:  # an unknown id: served, not failed
            users = np.concatenate([users[:-1], np.array([module.user_map.unknown_id()], users.dtype)])
        inputs = {"serving_default": {"user_id": users},
                  "score": {"user_id": users, "item_id": items},
                  "user_embedding": {"user_id": users},
                  "item_embedding": {"item_id": items}}
        for signature in SIGNATURES:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
            for key, value in inputs[signature].items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs[: min(limit, MAX_WARMUP)]


def write_warmup(version_dir: Path, name: str, module: ServingModule, limit: int) -> None:
    with tf.io.TFRecordWriter(str(Path(version_dir) / "assets.extra" / WARMUP_FILE)) as writer:
        for log in warmup_requests(name, module, limit):
            writer.write(log.SerializeToString())


def read_warmup(version_dir: str | Path) -> list:
    """The PredictionLog records of ``assets.extra/tf_serving_warmup_requests``."""
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(version_dir) / "assets.extra" / WARMUP_FILE
    records = []
    for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw)
        records.append(log)
    return records


def describe(meta_graph) -> dict:
    """``{signature: (["input:dtype[shape]", ...], ["output:dtype[shape]", ...])}``."""
    out = {}
    for name in SIGNATURES:
        sig = meta_graph.signature_def[name]

        def fmt(info):
            shape = [d.size for d in info.tensor_shape.dim]
            return f"{tf.as_dtype(info.dtype).name}{shape}".replace("-1", "None")

        out[name] = ([f"{k}:{fmt(v)}" for k, v in sorted(sig.inputs.items())],
                     [f"{k}:{fmt(v)}" for k, v in sorted(sig.outputs.items())])
    return out
