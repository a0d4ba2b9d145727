"""Export DSL-trained retrieval models as compact TF Serving models (see export/README.md).

>>> import dsl_tf                                   # doctest: +SKIP
>>> from export import export_run
>>> print(export_run("runs/demo", "serving", "demo").report())  # doctest: +SKIP
"""

from export import servable
from export.servable import *  # noqa: F401,F403  (the public API is servable.__all__)

__all__ = list(servable.__all__)
