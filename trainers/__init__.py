"""Training scripts' support code: interaction data (``trainers.data``), ranking
metrics (``trainers.evaluation``) and models.

Importing this package sets ``TF_USE_LEGACY_KERAS=1`` (unless already set) so that
``tf.keras`` resolves to Keras 2, as required by TensorFlow Recommenders.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
