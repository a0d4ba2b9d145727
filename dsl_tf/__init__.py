"""dsl_tf: Dynamic Sparse Learning (Wang et al., WSDM'24) for TensorFlow / Keras 2.

Train recommendation models sparse from scratch at a fixed parameter budget:

>>> import dsl_tf, tensorflow as tf
>>> emb = dsl_tf.MaskedEmbedding(1000, 16)
>>> model = tf.keras.Sequential([emb, tf.keras.layers.Flatten(), tf.keras.layers.Dense(1)])
>>> cb = dsl_tf.DynamicSparsity(sparsity=0.8, update_interval=100)

Importing this package sets ``TF_USE_LEGACY_KERAS=1`` so that ``tf.keras`` is Keras 2
(required by TensorFlow Recommenders and TF Model Optimization); it raises ImportError if
``tf.keras`` was already resolved to Keras 3 in this process.
"""

from dsl_tf._keras import ensure_legacy_keras as _ensure_legacy_keras

_ensure_legacy_keras()

from dsl_tf.layers import CompactMaskedEmbedding, MaskedEmbedding, masked_embeddings  # noqa: E402
from dsl_tf.schedules import (  # noqa: E402
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    UpdateSchedule,
)
from dsl_tf.callbacks import DynamicSparsity  # noqa: E402
from dsl_tf.optimizers import CatchUp, CatchUpAdam, LazyAdam  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CatchUp",
    "CatchUpAdam",
    "CompactMaskedEmbedding",
    "ConstantSchedule",
    "CosineSchedule",
    "DynamicSparsity",
    "LazyAdam",
    "LinearSchedule",
    "MaskedEmbedding",
    "UpdateSchedule",
    "masked_embeddings",
]
