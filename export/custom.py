"""A user's own Keras / TFRS model as a compact servable (``export_model(model, ..., example_inputs=...)``).

The contract (see export/README.md):

* ``model(features)`` computes the output from a dict of feature tensors (any Keras or
  ``tfrs.Model`` whose ``call`` does that: a ranking model, a scorer, ...; its own
  ``StringLookup`` / ``IntegerLookup`` layers are saved with it);
* every table to store compactly is a :class:`dsl_tf.MaskedEmbedding` or
  :class:`dsl_tf.CompactMaskedEmbedding` that the model *calls* (``layer(ids)``), with
  distinct layer names; nothing reads a masked layer's variables directly;
* ``example_inputs``: a batch of real features (dict of arrays, batch first). It fixes the
  signature (``serving_default``: one input per key, dtype and trailing shape of the
  example, batch dimension ``None``), is the export-time check (the servable must answer
  like ``model(example_inputs)``), and its first rows are the warmup requests.

The servable traces ``model(features)`` with every masked layer answering from its
:class:`export.tables.ServedTable` (compact bitmask + packed values, or the dense masked
table for the baseline). Everything else the model reads (Dense kernels, cross layers,
lookup tables, ...) is saved as it is. Outputs: ``scores`` for a single-tensor output, or
the model's own output names for a dict.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from export.builder import Servable
from export.tables import ExportError, captured_resources, checked_captures, patched_layers, served_tables


def _batch(inputs: dict, rows: slice) -> dict:
    return {name: value[rows] for name, value in inputs.items()}


class CustomServable(Servable):
    kind = "custom"
    signature_names = ("serving_default",)

    def __init__(self, model, example_inputs: dict, *, fmt: str = "compact", values: str = "float32"):
        if not isinstance(example_inputs, dict) or not example_inputs:
            raise ExportError("example_inputs must be a non-empty dict {feature name: batch array}")
        self.example = {name: np.asarray(value) for name, value in example_inputs.items()}
        sizes = {name: value.shape[0] if value.ndim else None for name, value in self.example.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ExportError(f"example_inputs must share one batch dimension, got {sizes}")
        tables = served_tables(model, fmt, values, "rebuild")
        super().__init__(tables=tables, num_items=1, k=1, item_popularity=None, item_ids=None, fmt=fmt,
                         values=values, item_matrix="none")
        specs = {name: tf.TensorSpec([None, *value.shape[1:]], tf.as_dtype(value.dtype), name=name)
                 for name, value in self.example.items()}

        def serve(features):
            out = model(features, training=False)
            if isinstance(out, dict):
                return {name: tf.convert_to_tensor(value) for name, value in out.items()}
            return {"scores": tf.convert_to_tensor(out)}

        with patched_layers(model, tables):
            traced = tf.function(serve, input_signature=[specs]).get_concrete_function()
        # the concrete function traced with the served tables; untracked, so saving never retraces the
        # model's own (dense) table reads: it is saved as the serving_default signature
        self.__dict__["serving_default"] = traced
        owned = [v for table in tables.values() for v in table.variables]
        self.model_variables = checked_captures([traced], model, owned)
        self.model_resources = captured_resources([traced], model)

    def metadata(self) -> dict:
        return {"kind": self.kind, "densities": self.densities,
                "tables": self.table_info,
                "inputs": {name: f"{value.dtype}{list(value.shape[1:])}" for name, value in self.example.items()}}

    @property
    def example_users(self) -> list:
        return []

    def warmup_inputs(self, batch, rng):
        rows = self.example[next(iter(self.example))].shape[0]
        return {"serving_default": _batch(self.example, slice(0, min(batch, rows)))}

    def reference(self, model, rng):
        out = model({name: tf.constant(value) for name, value in self.example.items()}, training=False)
        if isinstance(out, dict):
            return self.example, {name: np.asarray(value) for name, value in out.items()}
        return self.example, np.asarray(out)
