"""Make ``tf.keras`` resolve to tf_keras (Keras 2) before anything touches it.

TensorFlow Recommenders 0.7.7 and TF Model Optimization 0.8.1 only work with Keras 2,
and TensorFlow 2.16+ picks the Keras flavour the first time ``tf.keras`` is accessed,
from the ``TF_USE_LEGACY_KERAS`` environment variable. This module sets that variable
and then checks that it took effect.
"""

from __future__ import annotations

import os
import sys

_FIX = (
    "dsl_tf needs tf.keras to be Keras 2 (the tf_keras package). Import dsl_tf before "
    "anything accesses tf.keras, or set TF_USE_LEGACY_KERAS=1 in the environment before "
    "starting Python, and install tf-keras matching your TensorFlow version "
    "(pip install 'tf-keras~=2.21.0')."
)


def ensure_legacy_keras():
    """Set ``TF_USE_LEGACY_KERAS=1`` and return ``tf.keras``, guaranteed to be Keras 2.

    Raises:
      ImportError: if ``tf.keras`` was already resolved to Keras 3 in this process, or
        if tf_keras is not installed.
    """
    already = "tensorflow" in sys.modules
    if os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    try:
        import tf_keras  # noqa: F401  (fail early with a clear message)
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(f"tf_keras is not installed. {_FIX}") from err
    import tensorflow as tf

    version = getattr(tf.keras, "__version__", None)
    if version is None:  # tf_keras' v2 API module has no __version__; check its origin.
        is_legacy = tf.keras.layers.Layer.__module__.startswith("tf_keras")
    else:
        is_legacy = str(version).startswith("2.")
    if not is_legacy:
        when = "before dsl_tf was imported" if already else "by the environment"
        raise ImportError(f"tf.keras is Keras {version} (resolved {when}). {_FIX}")
    return tf.keras
