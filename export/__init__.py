"""Export DSL-trained retrieval models as compact TF Serving models (see export/README.md).

>>> import dsl_tf                                   # doctest: +SKIP
>>> from export import export_run
>>> print(export_run("runs/demo", "serving", "demo").report())  # doctest: +SKIP
"""

from export.servable import (  # noqa: F401
    ExportError,
    ExportResult,
    ServingModule,
    SessionServable,
    build_servable,
    check_ops,
    export_model,
    export_run,
    folder_bytes,
    graph_ops,
    read_models_config,
    read_warmup,
    split_tower,
    write_models_config,
)

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
