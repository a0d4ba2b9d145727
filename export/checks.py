"""Checks of a written version: the op allow-list, warmup requests, signature descriptions,
and TensorFlow's own ``saved_model_cli`` (``show --all``, ``run`` on a warmup request).

TF Serving replays ``assets.extra/tf_serving_warmup_requests`` when it loads a version;
ours hold each signature at batch sizes 1, 8 and 64 with the data's raw ids (plus one
unknown id per batch, which must be served, not failed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from export.builder import ExportError, Servable

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


def warmup_requests(name: str, module: Servable, limit: int = 32) -> list:
    """PredictionLog records: each signature at batch sizes 1, 8 and 64 (the batch sizes TF
    Serving will see first), with the data's raw ids (plus one unknown id per batch)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    rng = np.random.default_rng(0)
    logs = []
    for batch in (1, 8, 64):
        for signature, inputs in module.warmup_inputs(batch, rng).items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name=signature))
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs[: min(limit, MAX_WARMUP)]


def write_warmup(version_dir: Path, name: str, module: Servable, limit: int) -> None:
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
    for name in sorted(meta_graph.signature_def, key=lambda n: (n != "serving_default", n)):
        if name.startswith("__"):  # __saved_model_init_op
            continue
        sig = meta_graph.signature_def[name]

        def fmt(info):
            shape = [d.size for d in info.tensor_shape.dim]
            return f"{tf.as_dtype(info.dtype).name}{shape}".replace("-1", "None")

        out[name] = ([f"{k}:{fmt(v)}" for k, v in sorted(sig.inputs.items())],
                     [f"{k}:{fmt(v)}" for k, v in sorted(sig.outputs.items())])
    return out


_CLI_RUNNER = r"""
import json, sys
from tensorflow.python.tools import saved_model_cli as cli
from absl import flags
for argv in json.load(open(sys.argv[1])):
    flags.FLAGS.unparse_flags()
    args = cli.create_parser().parse_args(argv)  # what the saved_model_cli entry point does
    print("<<<saved_model_cli " + " ".join(argv) + ">>>", flush=True)
    args.func()
    sys.stdout.flush()
"""


def saved_model_cli(version_dirs, timeout: float = 600) -> dict:
    """TensorFlow's ``saved_model_cli show --all`` and ``saved_model_cli run`` (tag ``serve``,
    signature ``serving_default``, the first warmup request's inputs as ``.npy`` files) on
    each version of ``version_dirs`` (one path or several); returns ``{path: {"show":
    stdout, "run": stdout}}``. With several versions the commands run in one Python process
    through the tool's own parser and functions (``saved_model_cli.create_parser()``),
    importing TensorFlow once; a single version runs the ``saved_model_cli`` executable
    itself. Raises :class:`ExportError` with the tool's output if a command fails."""
    import json
    import tempfile

    paths = [str(version_dirs)] if isinstance(version_dirs, (str, Path)) else [str(p) for p in version_dirs]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory(prefix="dsl_cli_") as tmp:
        commands = []
        for number, path in enumerate(paths):
            request = next(log.predict_log.request for log in read_warmup(path)
                           if log.predict_log.request.model_spec.signature_name in ("", "serving_default"))
            inputs = []
            for key, proto in request.inputs.items():
                value = tf.make_ndarray(proto)
                npy = Path(tmp) / f"{number}-{key}.npy"
                np.save(npy, value.astype(str) if value.dtype == object else value)
                inputs.append(f"{key}={npy}")
            commands += [["show", "--all", "--dir", path],
                         ["run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
                          "--inputs", ";".join(inputs)]]
        cli = Path(sys.executable).with_name("saved_model_cli")
        if len(paths) == 1 and cli.exists():
            outputs = []
            for args in commands:
                done = subprocess.run([str(cli)] + args, capture_output=True, text=True, env=env, timeout=timeout)
                if done.returncode != 0:
                    raise ExportError(f"saved_model_cli {' '.join(args)} failed:\n{done.stdout[-2000:]}"
                                      f"{done.stderr[-3000:]}")
                outputs.append(done.stdout)
        else:
            (Path(tmp) / "commands.json").write_text(json.dumps(commands))
            done = subprocess.run([sys.executable, "-c", _CLI_RUNNER, str(Path(tmp) / "commands.json")],
                                  capture_output=True, text=True, env=env, timeout=timeout)
            if done.returncode != 0:
                raise ExportError(f"saved_model_cli failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
            outputs = done.stdout.split("<<<saved_model_cli ")[1:]
            if len(outputs) != len(commands):
                raise ExportError(f"saved_model_cli ran {len(outputs)} of {len(commands)} commands:\n"
                                  f"{done.stdout[-2000:]}")
    return {path: {"show": outputs[2 * i], "run": outputs[2 * i + 1]} for i, path in enumerate(paths)}
