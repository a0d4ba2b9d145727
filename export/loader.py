"""Load a written version the way TF Serving does (TF1 graph + Session) and run its signatures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


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
