"""Build, write and check TF Serving models of DSL-trained dot-product retrieval models.

A servable is a SavedModel in the TF Serving layout ``BASE/NAME/<version>/`` with four
``tensorflow/serving/predict`` signatures (see ``export/README.md``)::

    serving_default  user_id int64[B]                 -> item_ids int64[B, k], scores float32[B, k]
    score            user_id int64[B], item_id int64[B] -> scores float32[B]
    user_embedding   user_id int64[B]                 -> embedding float32[B, d]
    item_embedding   item_id int64[B]                 -> embedding float32[B, d]

Invalid ids (negative or >= the table's rows) never fail a request: their embedding is the
zero vector, a pair with an invalid id scores 0, and an invalid user's recommendations are
the k most popular training items (``item_popularity``; ids 0..k-1 if unknown) with score 0.

Formats (``fmt``):

* ``"compact"``: both masked tables are stored with :mod:`dsl_tf.compact` (bitmask + packed
  float32/float16 values + row offsets), so the version folder scales with the active
  entries. User/item embedding lookups rebuild only the requested rows. Retrieval over all
  items needs the whole item matrix; ``item_matrix`` chooses how:

  - ``"cache"`` (default): rebuilt ONCE when the model is loaded (a SavedModel resource
    initializer, run by TF Serving / the TF1 loader right after restoring the variables)
    into an in-memory, never-saved float32 ``[num_items, d]`` variable. On disk: compact;
    in memory: compact arrays + the dense item matrix. Requests cost what dense ones do.
  - ``"rebuild"``: rebuilt from the compact arrays on every ``serving_default`` request
    (smallest resident memory, slower requests).

* ``"dense"``: the baseline. The masked user table ``E ⊙ M`` and the final item matrix
  (item tower applied at export time) stored as dense variables.

>>> import dsl_tf                                     # doctest: +SKIP
>>> result = export_model(model, "serving", "demo")   # doctest: +SKIP
>>> print(result.report())                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import dsl_tf  # noqa: F401  (must precede tf.keras)
import numpy as np
import tensorflow as tf

from dsl_tf import compact

__all__ = [
    "ExportError",
    "ExportResult",
    "ServingModule",
    "SessionServable",
    "build_servable",
    "check_ops",
    "export_model",
    "export_run",
    "folder_bytes",
    "graph_ops",
    "read_models_config",
    "read_warmup",
    "split_tower",
    "write_models_config",
]

FORMATS = ("compact", "dense")
ITEM_MATRIX = ("cache", "rebuild")
VALUES = ("float32", "float16")
SIGNATURES = ("serving_default", "score", "user_embedding", "item_embedding")
PREDICT_METHOD = "tensorflow/serving/predict"
FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
WARMUP_FILE = "tf_serving_warmup_requests"
METADATA_FILE = "dsl_export.json"
MAX_WARMUP = 1000
F16_UNIT_ROUNDOFF = 2.0**-11
"""Relative rounding error of float16 (round to nearest): |fl(x) - x| <= 2^-11 |x|."""


class ExportError(RuntimeError):
    """The model cannot be exported (nothing was written)."""


# ============================================================================ towers
def split_tower(tower, side: str):
    """``(MaskedEmbedding, [following Keras layers])`` of a retrieval tower.

    Supported: a bare ``MaskedEmbedding`` or a ``tf.keras.Sequential`` whose first layer is
    one. Raises :class:`ExportError` otherwise.
    """
    if tower is None:
        raise ExportError(
            f"the model has no {side}_tower: only dot-product retrieval models "
            "(two_tower, mf_bpr) can be exported"
        )
    if isinstance(tower, dsl_tf.MaskedEmbedding):
        return tower, []
    if isinstance(tower, tf.keras.Sequential) and tower.layers and isinstance(
        tower.layers[0], dsl_tf.MaskedEmbedding
    ):
        return tower.layers[0], list(tower.layers[1:])
    raise ExportError(
        f"{side}_tower must be a MaskedEmbedding or a tf.keras.Sequential starting with one "
        f"(a model without masked tables cannot be exported compactly); got {type(tower).__name__}"
    )


class _Post(tf.Module):
    """The tower layers after the embedding. Their variables are tracked (saved); the Keras
    layer objects themselves are hidden from tracking so only plain functions are saved."""

    def __init__(self, layers: Sequence[tf.keras.layers.Layer], name: str):
        super().__init__(name=name)
        self.weights = [w for layer in layers for w in layer.weights]
        self.__dict__["_layers"] = tuple(layers)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for layer in self.__dict__["_layers"]:
            x = layer(x)
        return tf.cast(x, tf.float32)


def _valid(ids: tf.Tensor, rows: int) -> tf.Tensor:
    return tf.logical_and(ids >= 0, ids < rows)


class _DenseTable(tf.Module):
    def __init__(self, table: np.ndarray, values: str, name: str):
        super().__init__(name=name)
        self.rows, self.dim = table.shape
        with self.name_scope:
            self.table = tf.Variable(table.astype(values), trainable=False, name="table")

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        safe = tf.clip_by_value(ids, 0, self.rows - 1)
        rows = tf.cast(tf.gather(self.table, safe), tf.float32)
        return rows * tf.cast(_valid(ids, self.rows), tf.float32)[:, None]

    def full(self) -> tf.Tensor:
        return tf.cast(tf.convert_to_tensor(self.table), tf.float32)


class _CompactTable(tf.Module):
    def __init__(self, table: compact.CompactTable, name: str):
        super().__init__(name=name)
        self.rows, self.dim = table.rows, table.dim
        emb = compact.CompactEmbedding(table, name="compact")
        # Track only the three arrays: the CompactEmbedding's own pre-traced functions
        # would add ~35 KB of unused graph to every export.
        self.bitmask, self.values, self.row_offsets = emb.bitmask, emb.values, emb.row_offsets
        self.__dict__["_emb"] = emb

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        return compact.lookup(self.bitmask, self.values, self.row_offsets, ids, self.dim)

    def full(self) -> tf.Tensor:
        return self.__dict__["_emb"].dense()


class _LoadTimeMatrix(tf.saved_model.experimental.TrackableResource):
    """A float32 ``[rows, dim]`` in-memory variable computed by ``compute`` when the
    SavedModel is loaded (resource initializer = part of the SavedModel's init op, run after
    the variables are restored). It is a resource, not a tf.Variable: never checkpointed."""

    def __init__(self, compute: Callable[[], tf.Tensor], rows: int, dim: int):
        self._compute = compute
        self._shape = [int(rows), int(dim)]
        self._shared_name = f"dsl_item_matrix_{uuid.uuid4().hex}"
        super().__init__()
        self._initialize()  # eager: fill it now

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(
            dtype=tf.float32, shape=self._shape, shared_name=self._shared_name, container=""
        )

    def _initialize(self):
        return tf.raw_ops.AssignVariableOp(resource=self.resource_handle, value=self._compute())

    def _destroy_resource(self):
        tf.raw_ops.DestroyResourceOp(resource=self.resource_handle, ignore_lookup_error=True)

    def read(self) -> tf.Tensor:
        out = tf.raw_ops.ReadVariableOp(resource=self.resource_handle, dtype=tf.float32)
        out.set_shape(self._shape)
        return out


class ServingModule(tf.Module):
    """The exported ``tf.Module``; its four ``tf.function`` s become the signatures."""

    def __init__(self, user_tower, item_tower, *, fmt: str = "compact", values: str = "float32",
                 k: int = 20, item_popularity: np.ndarray | None = None,
                 item_matrix: str = "cache"):
        super().__init__(name="dsl_servable")
        if fmt not in FORMATS:
            raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
        if values not in VALUES:
            raise ExportError(f"values must be one of {VALUES}, got {values!r}")
        if item_matrix not in ITEM_MATRIX:
            raise ExportError(f"item_matrix must be one of {ITEM_MATRIX}, got {item_matrix!r}")
        user_emb, user_post = split_tower(user_tower, "user")
        item_emb, item_post = split_tower(item_tower, "item")
        if user_emb.output_dim != item_emb.output_dim:
            raise ExportError("user and item embeddings have different dims")
        self.fmt, self.values_dtype, self.item_matrix_mode = fmt, values, item_matrix
        if int(k) < 1:
            raise ExportError(f"k must be >= 1, got {k}")
        self.num_users, self.num_items = int(user_emb.input_dim), int(item_emb.input_dim)
        self.k = int(min(int(k), self.num_items))  # k > num_items: every item, ranked
        self.user_post = _Post(user_post, "user_post")
        self.item_post = _Post(item_post, "item_post")
        masks = {"user": user_emb.mask.numpy(), "item": item_emb.mask.numpy()}
        if not all(np.isin(m, (0.0, 1.0)).all() for m in masks.values()):
            raise ExportError("masks must be binary")
        self.densities = {
            user_emb.name: float(masks["user"].mean()),
            item_emb.name: float(masks["item"].mean()),
        }
        self.table_names = {"user": user_emb.name, "item": item_emb.name}
        user_table = user_emb.effective_table().numpy()
        item_table = item_emb.effective_table().numpy()
        self.dim = int(user_table.shape[1])
        if fmt == "compact":
            self.user_table = _CompactTable(compact.encode(user_table, masks["user"], values), "user")
            self.item_table = _CompactTable(compact.encode(item_table, masks["item"], values), "item")
            if item_matrix == "cache":
                self.item_cache = _LoadTimeMatrix(
                    lambda: self.item_post(self.item_table.full()), self.num_items, self.dim
                )
        else:
            self.user_table = _DenseTable(user_table, values, "user")
            final_items = self.item_post(tf.constant(item_table)).numpy()
            self.item_table = _DenseTable(final_items, values, "item_matrix")
        popularity = np.zeros(self.num_items) if item_popularity is None else np.asarray(item_popularity)
        if popularity.shape != (self.num_items,):
            raise ExportError(f"item_popularity has shape {popularity.shape}, expected ({self.num_items},)")
        order = np.argsort(-popularity.astype(np.float64), kind="stable")[: self.k]
        self._popular = tf.constant(order.astype(np.int64))  # the k most popular items
        self.popular_items = order.astype(np.int64)
        ids = tf.TensorSpec([None], tf.int64, name="user_id")
        items = tf.TensorSpec([None], tf.int64, name="item_id")
        self.serving_default = tf.function(self._recommend, input_signature=[ids])
        self.score = tf.function(self._score, input_signature=[ids, items])
        self.user_embedding = tf.function(self._user_embedding, input_signature=[ids])
        self.item_embedding = tf.function(self._item_embedding, input_signature=[items])

    # -------------------------------------------------------------- vectors
    def _users(self, user_id: tf.Tensor) -> tf.Tensor:
        vectors = self.user_post(self.user_table.lookup(user_id))
        return vectors * tf.cast(_valid(user_id, self.num_users), tf.float32)[:, None]

    def _items(self, item_id: tf.Tensor) -> tf.Tensor:
        if self.fmt == "dense":
            return self.item_table.lookup(item_id)  # final vectors, zero for invalid ids
        vectors = self.item_post(self.item_table.lookup(item_id))
        return vectors * tf.cast(_valid(item_id, self.num_items), tf.float32)[:, None]

    def item_matrix(self) -> tf.Tensor:
        """Final item vectors ``[num_items, d]`` used for retrieval."""
        if self.fmt == "dense":
            return self.item_table.full()
        if self.item_matrix_mode == "cache":
            return self.item_cache.read()
        return self.item_post(self.item_table.full())

    # -------------------------------------------------------------- signatures
    def _recommend(self, user_id):
        scores = tf.matmul(self._users(user_id), self.item_matrix(), transpose_b=True)
        top = tf.math.top_k(scores, k=self.k)
        valid = _valid(user_id, self.num_users)[:, None]
        item_ids = tf.where(valid, tf.cast(top.indices, tf.int64), self._popular[None, :])
        return {"item_ids": item_ids, "scores": tf.where(valid, top.values, tf.zeros_like(top.values))}

    def _score(self, user_id, item_id):
        return {"scores": tf.reduce_sum(self._users(user_id) * self._items(item_id), axis=-1)}

    def _user_embedding(self, user_id):
        return {"embedding": self._users(user_id)}

    def _item_embedding(self, item_id):
        return {"embedding": self._items(item_id)}

    def signatures(self) -> dict:
        return {name: getattr(self, name) for name in SIGNATURES}


def build_servable(user_tower, item_tower, **kwargs) -> ServingModule:
    """A :class:`ServingModule` (see its arguments), checked against the towers.

    The check compares the module's user/item embeddings with the Keras towers on a sample
    of ids (float32: 1e-5; float16: the rounding bound), so an unsupported tower structure
    fails here instead of serving wrong vectors.
    """
    module = ServingModule(user_tower, item_tower, **kwargs)
    rng = np.random.default_rng(0)
    tol = 1e-5 if module.values_dtype == "float32" else 8 * F16_UNIT_ROUNDOFF
    for side, tower, rows, fn in (("user", user_tower, module.num_users, module._users),
                                  ("item", item_tower, module.num_items, module._items)):
        ids = np.unique(rng.integers(0, rows, size=min(rows, 64))).astype(np.int64)
        want = tf.cast(tower(tf.constant(ids)), tf.float32).numpy()
        got = fn(tf.constant(ids)).numpy()
        scale = np.maximum(np.abs(want).max(), 1.0)
        if not np.allclose(got, want, rtol=0, atol=tol * scale):
            raise ExportError(
                f"the exported {side} vectors differ from {side}_tower(ids) "
                f"(max |diff| {np.abs(got - want).max():.3g}): unsupported tower structure"
            )
    return module


# ============================================================================ files
def folder_bytes(path: str | Path) -> int:
    """Total bytes of the regular files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


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


def write_models_config(serving_dir: str | Path) -> Path:
    """Write ``serving_dir/models.config``: a ModelServerConfig listing every model folder
    (a folder with at least one integer version) under ``serving_dir``."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    serving_dir = Path(serving_dir).resolve()
    config = model_server_config_pb2.ModelServerConfig()
    for model_dir in sorted(p for p in serving_dir.iterdir() if p.is_dir()):
        if _versions(model_dir):
            entry = config.model_config_list.config.add()
            entry.name = model_dir.name
            entry.base_path = str(model_dir)
            entry.model_platform = "tensorflow"
    path = serving_dir / "models.config"
    tmp = serving_dir / ".models.config.tmp"
    tmp.write_text(text_format.MessageToString(config))
    read_models_config(tmp)  # must parse back
    os.replace(tmp, path)
    return path


def read_models_config(path: str | Path):
    """Parse a ModelServerConfig text proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(Path(path).read_text(), model_server_config_pb2.ModelServerConfig())


def _warmup_requests(name: str, module: ServingModule, limit: int = 32) -> list:
    """PredictionLog records: each signature at batch sizes 1 and 64 (the batch sizes TF
    Serving will see first), with in-range ids plus one invalid id."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rng = np.random.default_rng(0)
    logs = []
    for batch in (1, 8, 64):
        users = rng.integers(0, module.num_users, size=batch).astype(np.int64)
        items = rng.integers(0, module.num_items, size=batch).astype(np.int64)
        if batch > 1:
            users[-1] = module.num_users  # an invalid id: served, not failed
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


# ============================================================================ session
class SessionServable:
    """A written version folder loaded the way TF Serving loads it: a TF1 graph + Session
    via ``tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)``, signatures run by
    feeding/fetching the SignatureDef tensor names.

    >>> with SessionServable("serving/demo/1") as s:   # doctest: +SKIP
    ...     s.run("serving_default", user_id=[0])["item_ids"]
    """

    def __init__(self, version_dir: str | Path, intra_threads: int = 0):
        self.path = str(version_dir)
        self.graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_threads,
                                          inter_op_parallelism_threads=intra_threads)
        self.session = tf.compat.v1.Session(graph=self.graph, config=config)
        from tensorflow.python.util import deprecation

        with self.graph.as_default(), deprecation.silence():  # TF Serving's loader is the TF1 one
            self.meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], self.path)
        self.signatures = dict(self.meta_graph.signature_def)
        self._callables: dict = {}

    def run(self, signature: str, **inputs) -> dict:
        sig = self.signatures[signature]
        if set(inputs) != set(sig.inputs):
            raise ValueError(f"{signature} takes inputs {sorted(sig.inputs)}, got {sorted(inputs)}")
        feed = {sig.inputs[k].name: np.asarray(v, tf.as_dtype(sig.inputs[k].dtype).as_numpy_dtype)
                for k, v in inputs.items()}
        names = sorted(sig.outputs)
        values = self.session.run([sig.outputs[n].name for n in names], feed_dict=feed)
        return dict(zip(names, values))

    def callable(self, signature: str, output: str | None = None):
        """A fast ``f(*inputs in sorted input-name order) -> outputs`` (Session.make_callable)."""
        sig = self.signatures[signature]
        keys = sorted(sig.inputs)
        fetches = [sig.outputs[n].name for n in sorted(sig.outputs)] if output is None else sig.outputs[output].name
        with self.graph.as_default():
            return self.session.make_callable(fetches, [sig.inputs[k].name for k in keys])

    def replay(self, log) -> dict:
        """Run one warmup ``PredictionLog`` (predict_log.request)."""
        request = log.predict_log.request
        signature = request.model_spec.signature_name or "serving_default"
        return self.run(signature, **{k: tf.make_ndarray(v) for k, v in request.inputs.items()})

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ============================================================================ export
@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    name: str
    version: int
    fmt: str
    values: str
    item_matrix: str
    k: int
    bytes: int
    dense_bytes: int | None
    densities: dict
    signatures: dict
    ops: set
    tensorflow_version: str
    seconds: float
    metadata: dict

    def curl(self, users: Sequence[int] = (0, 1)) -> str:
        body = json.dumps({"instances": [{"user_id": int(u)} for u in users]})
        return f"curl -d '{body}' -X POST http://localhost:8501/v1/models/{self.name}:predict"

    def report(self) -> str:
        lines = [f"exported {self.name} version {self.version} -> {self.path}",
                 f"  format {self.fmt} (values {self.values}"
                 + (f", item matrix {self.item_matrix}" if self.fmt == "compact" else "")
                 + f"), k={self.k}, TensorFlow {self.tensorflow_version}, {self.seconds:.1f}s"]
        size = f"  size: {self.bytes:,} bytes"
        if self.dense_bytes:
            size += f" vs dense export {self.dense_bytes:,} bytes (ratio {self.bytes / self.dense_bytes:.3f})"
        lines.append(size)
        lines.append("  density: " + ", ".join(f"{k}={v:.4f}" for k, v in self.densities.items()))
        lines.append("  signatures (method tensorflow/serving/predict):")
        for name, (inputs, outputs) in self.signatures.items():
            lines.append(f"    {name}({', '.join(inputs)}) -> {', '.join(outputs)}")
        lines.append(f"  ops: {len(self.ops)} standard TF ops (no custom / PyFunc ops)")
        lines.append("  REST request (tensorflow/serving with --model_config_file=" +
                     str(self.path.parent.parent.resolve() / "models.config") + "):")
        lines.append("    " + self.curl())
        return "\n".join(lines)


def _describe(meta_graph) -> dict:
    out = {}
    for name in SIGNATURES:
        sig = meta_graph.signature_def[name]

        def fmt(info):
            shape = [d.size for d in info.tensor_shape.dim]
            return f"{tf.as_dtype(info.dtype).name}{shape}".replace("-1", "None")

        out[name] = ([f"{k}:{fmt(v)}" for k, v in sorted(sig.inputs.items())],
                     [f"{k}:{fmt(v)}" for k, v in sorted(sig.outputs.items())])
    return out


def _progress(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[export] {msg}", flush=True)


def _save(module: ServingModule, directory: Path, name: str, metadata: dict, warmup: int) -> None:
    """Write the SavedModel, warmup file and metadata into ``directory`` (must not exist)."""
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, str(directory), signatures=module.signatures(), options=options)
    extra = directory / "assets.extra"
    extra.mkdir()
    if warmup:
        with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
            for log in _warmup_requests(name, module, warmup):
                writer.write(log.SerializeToString())
    (extra / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))


def _target(out: Path, name: str, version: int | None, overwrite: bool) -> tuple[int, Path]:
    """The version number and folder to write, or ExportError (name, existing version)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ExportError(f"invalid model name {name!r} (letters, digits, '-', '_', '.')")
    if version is not None and int(version) < 0:
        raise ExportError(f"version must be a non-negative integer, got {version}")
    existing = _versions(Path(out) / name)
    version = int(version) if version is not None else (existing[-1] + 1 if existing else 1)
    final = Path(out) / name / str(version)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} already exists; pass --overwrite (or another --version)")
    return version, final


def export_model(
    model,
    out: str | Path,
    name: str,
    *,
    version: int | None = None,
    fmt: str = "compact",
    values: str = "float32",
    item_matrix: str = "cache",
    k: int = 20,
    overwrite: bool = False,
    item_popularity: np.ndarray | None = None,
    run_info: dict | None = None,
    compare_dense: bool = True,
    warmup: int = 32,
    verbose: bool = False,
) -> ExportResult:
    """Export a retrieval model (``model.user_tower`` / ``model.item_tower``) to
    ``out/name/<version>/`` and update ``out/models.config``.

    The version is written to a hidden non-numeric sibling and renamed into place after
    every check passed (ops, signatures, a TF1-session load and the warmup replay); on any
    error nothing is left behind. ``compare_dense`` also writes the dense export to a
    temporary directory to report its exact size.
    """
    start = time.perf_counter()
    out = Path(out)
    model_dir = out / name
    version, final = _target(out, name, version, overwrite)
    user_tower, item_tower = getattr(model, "user_tower", None), getattr(model, "item_tower", None)
    split_tower(user_tower, "user"), split_tower(item_tower, "item")  # fail before writing

    _progress(verbose, f"building the {fmt} servable (values {values}, k={k})")
    kwargs = dict(values=values, k=k, item_popularity=item_popularity, item_matrix=item_matrix)
    module = build_servable(user_tower, item_tower, fmt=fmt, **kwargs)
    created_out, created_model_dir = not out.exists(), not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        metadata = {
            **(run_info or {}), "model_name": name, "version": version, "format": fmt,
            "values": values, "item_matrix": item_matrix if fmt == "compact" else "dense",
            "k": module.k, "num_users": module.num_users, "num_items": module.num_items,
            "dim": module.dim, "densities": module.densities,
            "popular_items": module.popular_items.tolist(), "tensorflow_version": tf.__version__,
            "dsl_tf_version": dsl_tf.__version__,
            "invalid_ids": "zero embedding; score 0; recommendations = most popular items, score 0",
        }
        _progress(verbose, f"writing SavedModel to {tmp}")
        _save(module, tmp, name, metadata, warmup)
        _progress(verbose, "checking ops (standard TF only)")
        ops = check_ops(tmp)
        _progress(verbose, "loading through a TF1 session and replaying the warmup requests")
        with SessionServable(tmp) as session:
            for log in read_warmup(tmp) if warmup else []:
                session.replay(log)
            meta_graph = session.meta_graph
            tf_version = meta_graph.meta_info_def.tensorflow_version
        dense_bytes = None
        if compare_dense and fmt == "compact":
            _progress(verbose, "writing a dense export to a temporary directory to measure its size")
            dense = build_servable(user_tower, item_tower, fmt="dense",
                                   **{**kwargs, "values": "float32"})
            with tempfile.TemporaryDirectory(prefix="dsl_dense_") as scratch:
                _save(dense, Path(scratch) / "1", name, metadata, warmup)
                dense_bytes = folder_bytes(Path(scratch) / "1")
        size = folder_bytes(tmp)
        for _ in range(5):  # "bytes" counts this file too: iterate to the fixed point
            metadata.update(bytes=size, dense_bytes=dense_bytes)
            (tmp / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
            size, previous = folder_bytes(tmp), size
            if size == previous:
                break
        if final.exists():  # overwrite: swap atomically-ish, then delete the old one
            old = model_dir / f".old-{version}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _progress(verbose, f"updating {out / 'models.config'}")
        write_models_config(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.rename(old, final)
        if created_model_dir and model_dir.exists() and not any(model_dir.iterdir()):
            model_dir.rmdir()
        if created_out and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    return ExportResult(
        path=final, name=name, version=version, fmt=fmt, values=values,
        item_matrix=item_matrix if fmt == "compact" else "dense", k=module.k, bytes=size,
        dense_bytes=dense_bytes, densities=module.densities, signatures=_describe(meta_graph),
        ops=ops, tensorflow_version=tf_version, seconds=time.perf_counter() - start,
        metadata=metadata,
    )


def export_run(run_dir: str | Path, out: str | Path, name: str, verbose: bool = False, **kwargs) -> ExportResult:
    """:func:`export_model` of the model of a run directory (``trainers.runs.load_run``),
    with the run's ``item_popularity.npy`` for invalid users."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run directory {run} does not exist")
    _target(Path(out), name, kwargs.get("version"), kwargs.get("overwrite", False))  # fail fast
    _progress(verbose, f"loading run {run}")
    from trainers.runs import load_run  # lazy: export stays importable without trainers

    try:
        model, config = load_run(run)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(str(err)) from err
    popularity = kwargs.pop("item_popularity", None)
    if popularity is None and (run / "item_popularity.npy").exists():
        popularity = np.load(run / "item_popularity.npy")
    info = {"run": run.name, "run_dir": str(run.resolve()),
            **{k: config.get(k) for k in ("model", "method", "sparsity", "dataset", "seed")}}
    return export_model(model, out, name, item_popularity=popularity, run_info=info,
                        verbose=verbose, **kwargs)
