"""``import dsl_tf`` arranges Keras 2, or fails clearly if Keras 3 is already in use."""

KERAS3_FIRST = """
import os
os.environ.pop("TF_USE_LEGACY_KERAS", None)
import tensorflow as tf
print(tf.keras.__version__)
try:
    import dsl_tf
except ImportError as err:
    print("ImportError:", err)
"""

DSL_FIRST = """
import os
os.environ.pop("TF_USE_LEGACY_KERAS", None)
import dsl_tf
import tensorflow as tf
import tensorflow_recommenders as tfrs
print(os.environ["TF_USE_LEGACY_KERAS"], type(tf.keras.layers.Dense(1)).__module__)
"""


def test_keras3_already_resolved_raises(python_subprocess):
    proc = python_subprocess(KERAS3_FIRST, env={"TF_USE_LEGACY_KERAS": ""})
    out = proc.stdout.strip().splitlines()
    assert out[0].startswith("3.")
    assert out[1].startswith(f"ImportError: tf.keras is Keras {out[0]} (resolved before dsl_tf was imported)")
    assert "set TF_USE_LEGACY_KERAS=1" in out[1]


def test_import_sets_legacy_keras(python_subprocess):
    proc = python_subprocess(DSL_FIRST, env={"TF_USE_LEGACY_KERAS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "tf_keras.src.layers.core.dense"]
