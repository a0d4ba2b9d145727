"""Export a DSL-trained retrieval model as a TF Serving version: build, write, check, claim.

:func:`export_model` builds the servable (:mod:`export.builder`), writes it into a scratch
folder inside ``OUT/NAME`` (:mod:`export.versions`), checks it (:mod:`export.checks`: op
allow-list; :mod:`export.loader`: a TF1-session load and the warmup replay) and only then
claims its integer version. :func:`export_run` does this for a ``trainers/train.py`` run
directory, with the run's raw ids and item popularity.

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

from export.builder import (F16_UNIT_ROUNDOFF, FORMATS, ITEM_MATRIX, SIGNATURES, VALUES,  # noqa: F401
                            ExportError, ServingModule, build_servable, split_tower)
from export.checks import (FORBIDDEN_OPS, MAX_WARMUP, METADATA_FILE, WARMUP_FILE, check_ops,  # noqa: F401
                           describe, graph_ops, read_warmup, write_warmup)
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

    def curl(self, users: Sequence | None = None) -> str:
        """A REST request for ``users`` (raw ids; default: the first two users)."""
        users = self.example_users if users is None else list(users)
        body = json.dumps({"instances": [{"user_id": u} for u in users]})
        return f"curl -d '{body}' -X POST http://localhost:8501/v1/models/{self.name}:predict"

    def report(self) -> str:
        ids = self.metadata.get("ids", {})
        lines = [f"exported {self.name} version {self.version} -> {self.path}",
                 f"  format {self.fmt} (values {self.values}"
                 + (f", item matrix {self.item_matrix}" if self.fmt == "compact" else "")
                 + f"), k={self.k}, TensorFlow {self.tensorflow_version}, {self.seconds:.1f}s"]
        size = f"  size: {self.bytes:,} bytes"
        if self.dense_bytes:
            size += f" vs dense export {self.dense_bytes:,} bytes (ratio {self.bytes / self.dense_bytes:.3f})"
        lines.append(size)
        lines.append("  density: " + ", ".join(f"{k}={v:.4f}" for k, v in self.densities.items()))
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


def _save(module: ServingModule, directory: Path, name: str, metadata: dict, warmup: int) -> None:
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
    run_info: dict | None = None,
    compare_dense: bool = True,
    warmup: int = 32,
    verbose: bool = False,
) -> ExportResult:
    """Export a retrieval model (``model.user_tower`` / ``model.item_tower``) to
    ``out/name/<version>/`` and update ``out/models.config``.

    ``user_ids`` / ``item_ids``: the raw id of every dense id (strings or integers; ``None``:
    the dense ids themselves); the servable takes and returns raw ids. ``seen`` (a scipy CSR
    ``[num_users, num_items]`` of training interactions): ``serving_default`` excludes each
    user's seen items (``--exclude-seen``). The version is written
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
    user_tower, item_tower = getattr(model, "user_tower", None), getattr(model, "item_tower", None)
    split_tower(user_tower, "user"), split_tower(item_tower, "item")  # fail before writing

    _progress(verbose, f"building the {fmt} servable (values {values}, k={k})")
    kwargs = dict(values=values, k=k, item_popularity=item_popularity, item_matrix=item_matrix,
                  user_ids=user_ids, item_ids=item_ids, seen=seen)
    module = build_servable(user_tower, item_tower, fmt=fmt, **kwargs)
    created_out, created_model_dir = not out.exists(), not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale(model_dir):
        _progress(verbose, f"removed {stale.name}, left by a dead export")
    tmp = scratch_dir(model_dir, "tmp")
    try:
        metadata = {
            **(run_info or {}), "model_name": name, "version": None, "format": fmt,
            "values": values, "item_matrix": item_matrix if fmt == "compact" else "dense",
            "k": module.k, "num_users": module.num_users, "num_items": module.num_items,
            "dim": module.dim, "densities": module.densities,
            "ids": {"user": module.user_map.describe(), "item": module.item_map.describe()},
            "exclude_seen": module.exclude_seen,
            "popular_items": module.popular_items.tolist(), "tensorflow_version": tf.__version__,
            "dsl_tf_version": dsl_tf.__version__,
            "unknown_ids": "known=false; zero embedding; score 0; recommendations = most popular items, score 0",
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
            _progress(verbose, "writing a dense export to a scratch folder to measure its size")
            dense = build_servable(user_tower, item_tower, fmt="dense", **{**kwargs, "values": "float32"})
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
        item_matrix=item_matrix if fmt == "compact" else "dense", k=module.k, bytes=size,
        dense_bytes=dense_bytes, densities=module.densities, signatures=describe(meta_graph),
        ops=ops, tensorflow_version=tf_version, seconds=time.perf_counter() - start,
        metadata=metadata, example_users=module.user_map.raw_ids[:2].tolist(),
    )


def export_run(run_dir: str | Path, out: str | Path, name: str, verbose: bool = False, exclude_seen: bool = False,
               **kwargs) -> ExportResult:
    """:func:`export_model` of the model of a run directory (``trainers.runs.load_run``),
    with the run's raw ids (``id_maps.npz``) and ``item_popularity.npy`` for unknown users;
    ``exclude_seen``: recommendations skip the run's training interactions
    (``interactions.npz``)."""
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
    seen = sp.load_npz(run / "interactions.npz").tocsr() if exclude_seen else None
    return export_model(model, out, name, item_popularity=popularity, run_info=info, verbose=verbose,
                        user_ids=ids.user_ids, item_ids=ids.item_ids, seen=seen, **kwargs)
