"""Export a DSL-trained model as a TF Serving version: build, check, write, check, claim.

:func:`export_model` builds the servable (:func:`build_servable`: :mod:`export.builder`,
:mod:`export.backbones`, :mod:`export.custom`), checks that it answers like the Keras model,
writes it into a scratch folder inside ``OUT/NAME`` (:mod:`export.versions`), checks it
(:mod:`export.checks`: op allow-list; :mod:`export.loader`: a TF1-session load and the
warmup replay) and only then claims its integer version. :func:`export_run` does this for a
``trainers/train.py`` run directory of any backbone, with the run's raw ids, item
popularity and interactions.

>>> import dsl_tf                                     # doctest: +SKIP
>>> result = export_model(model, "serving", "demo")   # doctest: +SKIP
>>> print(result.report())                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import dsl_tf  # noqa: F401  (must precede tf.keras)
import numpy as np
import scipy.sparse as sp
import tensorflow as tf

from export.backbones import AutoencoderServable, NeuMFServable
from export.builder import (F16_UNIT_ROUNDOFF, FORMATS, ITEM_MATRIX, SIGNATURES, VALUES,  # noqa: F401
                            ExportError, RetrievalServable, Servable, split_tower)
from export.custom import CustomServable
from export.checks import (FORBIDDEN_OPS, MAX_WARMUP, METADATA_FILE, WARMUP_FILE, check_ops,  # noqa: F401
                           describe, graph_ops, read_warmup, saved_model_cli, write_warmup)
from export.loader import SessionServable
from export.versions import (claim, folder_bytes, plan_version, read_models_config,  # noqa: F401
                             write_models_config)
from trainers.runs import remove_stale, scratch_dir

PREDICT_METHOD = "tensorflow/serving/predict"


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
    example_users: list  # the first raw user ids (for the REST example and --query)
    example_instances: list  # a serving_default request in REST "instances" rows

    def curl(self, users: Sequence | None = None) -> str:
        """A REST request for ``users`` (raw ids; default: the example request)."""
        rows = self.example_instances if users is None else [{"user_id": u} for u in users]
        body = json.dumps({"instances": rows})
        return f"curl -d '{body}' -X POST http://localhost:8501/v1/models/{self.name}:predict"

    def report(self) -> str:
        ids = self.metadata.get("ids", {})
        custom = self.metadata.get("kind") == "custom"
        lines = [f"exported {self.name} version {self.version} -> {self.path}",
                 f"  {self.metadata.get('kind')} servable, format {self.fmt} (values {self.values}"
                 + (f", item matrix {self.item_matrix}" if self.fmt == "compact" and not custom else "")
                 + ")" + ("" if custom else f", k={self.k}")
                 + f", TensorFlow {self.tensorflow_version}, {self.seconds:.1f}s"]
        size = f"  size: {self.bytes:,} bytes"
        if self.dense_bytes:
            size += f" vs dense export {self.dense_bytes:,} bytes (ratio {self.bytes / self.dense_bytes:.3f})"
        lines.append(size)
        lines.append("  density: " + ", ".join(f"{k}={v:.4f}" for k, v in self.densities.items()))
        if ids:
            lines.append("  raw ids: " + ", ".join(f"{side} {v['dtype']} ({v['count']:,})" for side, v in ids.items())
                         + "; unknown ids: known=false, zero embedding, score 0, most popular items")
        lines.append("  signatures (method tensorflow/serving/predict):")
        for name, (inputs, outputs) in self.signatures.items():
            lines.append(f"    {name}({', '.join(inputs)}) -> {', '.join(outputs)}")
        lines.append(f"  ops: {len(self.ops)} standard TF ops (no custom / PyFunc ops)")
        lines.append("  REST request (tensorflow/serving with --model_config_file=" +
                     str(self.path.parent.parent.resolve() / "models.config") + "):")
        lines.append("    " + self.curl())
        return "\n".join(lines)


def _progress(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[export] {msg}", flush=True)


def servable_class(model, example_inputs=None) -> type[Servable]:
    """The servable of ``model``: a user's model when ``example_inputs`` is given, else the
    trainers' backbone it is (by its documented attributes)."""
    if example_inputs is not None:
        return CustomServable
    if getattr(model, "user_tower", None) is not None or getattr(model, "item_tower", None) is not None:
        return RetrievalServable  # two_tower, mf_bpr, ultragcn, any model with such towers
    if all(hasattr(model, a) for a in ("propagate", "user_table", "item_table")):
        return RetrievalServable  # lightgcn
    if hasattr(model, "user_gmf"):
        return NeuMFServable
    if all(hasattr(model, a) for a in ("item_input", "item_output")):
        return AutoencoderServable  # multvae, cdae
    raise ExportError(
        f"{type(model).__name__} is not one of the trainers' backbones (retrieval towers, lightgcn, neumf, "
        "multvae, cdae): export your own model with example_inputs={feature: batch array} (see export/README.md)")


def _tolerance(module: Servable, want: np.ndarray) -> float:
    scale = max(float(np.abs(want).max(initial=0.0)), 1.0)
    return (1e-5 if module.values_dtype == "float32" else 16 * F16_UNIT_ROUNDOFF) * scale


def build_servable(model, *, example_inputs=None, fmt: str = "compact", rng_seed: int = 0, **kwargs) -> Servable:
    """The servable of ``model`` (:func:`servable_class`), checked against the Keras model on a
    sample (float32 values: 1e-5 relative to the largest score; float16: the rounding bound),
    so an unsupported structure fails here instead of serving wrong answers."""
    cls = servable_class(model, example_inputs)
    if cls is CustomServable:
        module = cls(model, example_inputs, fmt=fmt, **kwargs)
    else:
        module = cls(model, fmt=fmt, **kwargs)
    inputs, want = module.reference(model, np.random.default_rng(rng_seed))
    tensors = {key: tf.constant(value) for key, value in inputs.items()}
    got = module.serving_default(tensors) if cls is CustomServable else module.serving_default(**tensors)
    if cls is CustomServable:
        pairs = want.items() if isinstance(want, dict) else [("scores", want)]
        diffs = {key: np.abs(got[key].numpy() - value).max(initial=0.0) - _tolerance(module, value)
                 for key, value in pairs}
    else:
        top = np.sort(want, axis=1)[:, ::-1][:, : module.k]
        diffs = {"scores": np.abs(got["scores"].numpy() - top).max(initial=0.0) - _tolerance(module, top)}
    bad = {key: diff for key, diff in diffs.items() if diff > 0}
    if bad:
        raise ExportError(f"the {module.kind} servable does not answer like the Keras model (outputs {sorted(bad)} "
                          "differ beyond the tolerance): unsupported model structure")
    return module


def _save(module: Servable, directory: Path, name: str, metadata: dict, warmup: int) -> None:
    """Write the SavedModel, warmup file and metadata into the empty ``directory``."""
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    tf.saved_model.save(module, str(directory), signatures=module.signatures(), options=options)
    (directory / "assets.extra").mkdir()
    if warmup:
        write_warmup(directory, name, module, warmup)
    (directory / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))


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
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
    seen=None,
    interactions=None,
    example_inputs: dict | None = None,
    run_info: dict | None = None,
    compare_dense: bool = True,
    warmup: int = 32,
    verbose: bool = False,
) -> ExportResult:
    """Export ``model`` to ``out/name/<version>/`` and update ``out/models.config``.

    ``model``: a trainers backbone (two_tower, mf_bpr, ultragcn, lightgcn, neumf, multvae,
    cdae, or any model with ``user_tower`` / ``item_tower``), or, with ``example_inputs``
    (``{feature: batch array}``), your own Keras model called on a features dict (see
    :mod:`export.custom`). ``item_matrix``: how retrieval scores every item from the compact
    item table (``"sparse"``, ``"cache"``, ``"rebuild"``; :mod:`export.tables`).
    ``user_ids`` / ``item_ids``: the raw id of every dense id (strings or integers; ``None``:
    the dense ids themselves); the servable takes and returns raw ids. ``seen`` (a scipy CSR
    ``[num_users, num_items]`` of training interactions): ``serving_default`` excludes each
    user's seen items (``--exclude-seen``; autoencoders: the request's history).
    ``interactions`` (the training CSR): the graph LightGCN stores, the histories the
    autoencoders' export check replays. The version is written
    to a hidden scratch folder in ``out/name``, checked (ops, signatures, a TF1-session load
    and the warmup replay) and claimed under a lock (:func:`export.versions.claim`): the
    number is chosen at that moment, so concurrent exports never share one, and an existing
    version is replaced only with ``overwrite``. On any error nothing is left behind.
    ``compare_dense`` also writes the dense export to a scratch folder next to it to report
    its exact size.
    """
    start = time.perf_counter()
    out = Path(out)
    model_dir = out / name
    plan_version(out, name, version, overwrite)  # fail fast
    servable_class(model, example_inputs)  # fail before writing
    _progress(verbose, f"building the {fmt} servable (values {values}, k={k})")
    kwargs = dict(values=values, example_inputs=example_inputs)
    if example_inputs is None:
        kwargs.update(item_matrix=item_matrix, k=k, item_popularity=item_popularity, user_ids=user_ids,
                      item_ids=item_ids, seen=seen, interactions=interactions)
    module = build_servable(model, fmt=fmt, **kwargs)
    created_out, created_model_dir = not out.exists(), not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale(model_dir):
        _progress(verbose, f"removed {stale.name}, left by a dead export")
    tmp = scratch_dir(model_dir, "tmp")
    try:
        metadata = {
            **(run_info or {}), "model_name": name, "version": None, "format": fmt,
            "values": values, "item_matrix": module.item_matrix_mode, **module.metadata(),
            "tensorflow_version": tf.__version__, "dsl_tf_version": dsl_tf.__version__,
        }
        if module.kind != "custom":
            metadata["unknown_ids"] = ("known=false; zero embedding; score 0; "
                                       "recommendations = most popular items, score 0")
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
            _progress(verbose, "writing a dense export to a scratch folder to measure its size")
            dense = build_servable(model, fmt="dense", **{**kwargs, "values": "float32"})
            scratch = scratch_dir(model_dir, "dense")
            try:
                _save(dense, scratch, name, metadata, warmup)
                dense_bytes = folder_bytes(scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        size = 0

        def finalize(number: int) -> None:  # under the version lock: record the claimed number
            nonlocal size
            size = folder_bytes(tmp)
            for _ in range(5):  # "bytes" counts this file too: iterate to the fixed point
                metadata.update(version=number, bytes=size, dense_bytes=dense_bytes)
                (tmp / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
                size, previous = folder_bytes(tmp), size
                if size == previous:
                    break

        number, final = claim(tmp, model_dir, version, overwrite, finalize)
        _progress(verbose, f"updating {out / 'models.config'}")
        write_models_config(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_model_dir and model_dir.exists() and not any(model_dir.iterdir()):
            model_dir.rmdir()
        if created_out and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    return ExportResult(
        path=final, name=name, version=number, fmt=fmt, values=values,
        item_matrix=module.item_matrix_mode, k=module.k, bytes=size,
        dense_bytes=dense_bytes, densities=module.densities, signatures=describe(meta_graph),
        ops=ops, tensorflow_version=tf_version, seconds=time.perf_counter() - start,
        metadata=metadata, example_users=module.example_users, example_instances=_instances(module),
    )


def _instances(module: Servable) -> list:
    """REST rows of a 2-row ``serving_default`` request of known ids (1 row for history inputs)."""
    inputs = module.warmup_inputs(2, np.random.default_rng(0))["serving_default"]
    if module.user_map is not None and "user_id" in inputs:
        inputs["user_id"] = module.user_map.raw_ids[: len(inputs["user_id"])]
    rows = len(next(iter(inputs.values())))
    return [{key: np.asarray(value[row]).tolist() for key, value in inputs.items()} for row in range(rows)]


def export_run(run_dir: str | Path, out: str | Path, name: str, verbose: bool = False, exclude_seen: bool = False,
               **kwargs) -> ExportResult:
    """:func:`export_model` of the model of a run directory (``trainers.runs.load_run``, any
    backbone), with the run's raw ids (``id_maps.npz``), ``item_popularity.npy`` for unknown
    users and ``interactions.npz`` (LightGCN's graph; ``exclude_seen``: recommendations skip
    the training interactions)."""
    from trainers.runs import load_run

    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"run directory {run} does not exist")
    plan_version(Path(out), name, kwargs.get("version"), kwargs.get("overwrite", False))  # fail fast
    _progress(verbose, f"loading run {run}")
    try:
        model, config, ids = load_run(run)
    except (FileNotFoundError, ValueError) as err:
        raise ExportError(str(err)) from err
    popularity = kwargs.pop("item_popularity", None)
    if popularity is None and (run / "item_popularity.npy").exists():
        popularity = np.load(run / "item_popularity.npy")
    info = {"run": run.name, "run_dir": str(run.resolve()),
            **{k: config.get(k) for k in ("model", "method", "sparsity", "dataset", "seed")}}
    interactions = sp.load_npz(run / "interactions.npz").tocsr()
    return export_model(model, out, name, item_popularity=popularity, run_info=info, verbose=verbose,
                        user_ids=ids.user_ids, item_ids=ids.item_ids, seen=interactions if exclude_seen else None,
                        interactions=interactions, **kwargs)
