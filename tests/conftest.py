"""Shared test set-up: import dsl_tf first so that tf.keras is Keras 2 everywhere."""

import os
import subprocess
import sys
from pathlib import Path

import dsl_tf  # noqa: F401  (must precede any tf.keras access)
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (with the repo on sys.path)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def python_subprocess():
    return run_python
