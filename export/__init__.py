"""Export DSL-trained retrieval models as compact TF Serving models (see export/README.md).

Modules: ``builder`` (the servable ``tf.Module``, raw-id maps), ``versions`` (the
``OUT/NAME/<version>`` layout, exclusive version claims, ``models.config``), ``checks`` (op
allow-list, warmup requests), ``loader`` (TF1-session loading, as TF Serving does),
``servable`` (``export_model`` / ``export_run``), ``serve`` (the CLI).

>>> import dsl_tf                                   # doctest: +SKIP
>>> from export import export_run
>>> print(export_run("runs/demo", "serving", "demo").report())  # doctest: +SKIP
"""

from export.builder import ExportError, IdMap, ServingModule, build_servable, split_tower
from export.checks import check_ops, graph_ops, read_warmup
from export.loader import SessionServable
from export.servable import ExportResult, export_model, export_run
from export.versions import folder_bytes, read_models_config, write_models_config

__all__ = [
    "ExportError",
    "ExportResult",
    "IdMap",
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
