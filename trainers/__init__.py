"""Training scripts' support code: interaction data (``trainers.data``), ranking
metrics (``trainers.evaluation``) and models.

Importing this package sets ``TF_USE_LEGACY_KERAS=1`` (unless already set) so that
``tf.keras`` resolves to Keras 2, as required by TensorFlow Recommenders.
"""

import logging
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

_ABSL_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]+\] ")  # "I0000 00:00:17.5  7 f.cc:1] "
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def quiet_tensorflow() -> None:
    """Load TensorFlow for a command line without its start-up log lines; call it first thing.

    Used by ``trainers/train.py`` and ``export/serve.py`` (it lives here, next to the other
    environment set-up that must precede TensorFlow, because this module imports nothing
    heavy and ``export`` already loads it through ``trainers.runs``). Importing ``trainers`` or
    ``dsl_tf`` never calls it: a library user's logging is left alone.

    * ``TF_CPP_MIN_LOG_LEVEL=3`` unless set: TensorFlow's C++ log lines ("failed call to
      cuInit" on CPU-only machines, oneDNN notices) are not printed. Failures still raise
      Python exceptions carrying TensorFlow's message.
    * Lines logged while TensorFlow's libraries load ignore that level (absl writes them to
      stderr before it is configured), so stderr is captured during ``import tensorflow`` and
      only lines at or above the level, or not from absl, are written back (all of them if
      the import fails).

    * Keras' "Callback method ... is slow compared to the batch time" warning is dropped: it
      compares the first five batches' callback hooks (``MacCounter`` reads the masks' density
      at the first steps) with batch times of ~1 ms on the built-in synthetic data.

    ``DSL_TF_VERBOSE=1`` in the environment turns all three off.
    """
    if os.environ.get("DSL_TF_VERBOSE", "0") not in ("", "0") or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        level = 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            level = -1
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            sys.stderr.write(absl_lines_at_least(captured.read().decode(errors="replace"), level))
            sys.stderr.flush()
    logging.getLogger("tensorflow").addFilter(_not_callback_timing)


def _not_callback_timing(record: logging.LogRecord) -> bool:
    return "is slow compared to the batch time" not in record.getMessage()


def absl_lines_at_least(text: str, level: int) -> str:
    """``text`` without absl log records below ``level`` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL).

    A record's continuation lines (indented, or cpu_feature_guard's "To enable ...") go with
    it; absl's "before InitializeLog" banner is dropped when ``level`` > 0; other lines stay.

    >>> absl_lines_at_least("I0000 00:00:1795536559.6 14053 port.cc:153] oneDNN on\\nhello\\n", 1)
    'hello\\n'
    """
    kept, keep = [], True
    for line in text.splitlines(keepends=True):
        record = _ABSL_LINE.match(line)
        if record:
            keep = "IWEF".index(record.group(1)) >= level
        elif line.startswith(_ABSL_BANNER):
            keep = level <= 0
        elif not line.startswith((" ", "To enable the following instructions")):
            keep = True
        if keep:
            kept.append(line)
    return "".join(kept)
