"""Export DSL-trained models as compact TF Serving models (see export/README.md).

Modules: ``tables`` (masked tables as stored: compact or dense, and scoring every row),
``builder`` (the servable base, raw-id maps, dot-product retrieval and LightGCN),
``backbones`` (NeuMF, MultVAE, CDAE), ``custom`` (a user's own Keras model), ``versions``
(the ``OUT/NAME/<version>`` layout, exclusive version claims, ``models.config``), ``checks``
(op allow-list, warmup requests, ``saved_model_cli``), ``loader`` (TF1-session loading, as
TF Serving does), ``servable`` (``export_model`` / ``export_run``), ``serve`` (the CLI).

>>> import dsl_tf                                   # doctest: +SKIP
>>> from export import export_run
>>> print(export_run("runs/demo", "serving", "demo").report())  # doctest: +SKIP
"""

from export.builder import ExportError, IdMap, RetrievalServable, Servable, split_tower
from export.checks import check_ops, graph_ops, read_warmup, saved_model_cli
from export.loader import SessionServable
from export.servable import ExportResult, build_servable, export_model, export_run
from export.versions import folder_bytes, read_models_config, write_models_config

__all__ = [
    "ExportError",
    "ExportResult",
    "IdMap",
    "RetrievalServable",
    "Servable",
    "SessionServable",
    "build_servable",
    "check_ops",
    "export_model",
    "export_run",
    "folder_bytes",
    "graph_ops",
    "read_models_config",
    "read_warmup",
    "saved_model_cli",
    "split_tower",
    "write_models_config",
]
