"""The command lines print what the user asked for: no TensorFlow C++ log lines, no warnings (issue 14)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

TINY = ["--dataset-arg", "num_users=120", "--dataset-arg", "num_items=150", "--dataset-arg", "dim=4",
        "--dataset-arg", "mean_interactions=12"]
NOISE = re.compile(r"^\s*(?:[IWEF]\d{4} \d\d:\d\d|WARNING:)", re.MULTILINE)  # absl records, Python warnings


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DSL_TF_VERBOSE")}
    return {**env, **extra}


def _run(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=_env(**env))


def _noise(result: subprocess.CompletedProcess) -> list[str]:
    return [m.group(0) for m in NOISE.finditer(result.stdout.replace("\r", "\n") + "\n" + result.stderr)]


def test_train_and_export_clis_print_no_log_noise(tmp_path):
    run = tmp_path / "run"
    train = _run("trainers/train.py", "--method", "dsl", "--epochs", "2", "--dim", "8", "--batch-size", "64",
                 "--update-interval", "8", "--out", str(run), *TINY)
    assert train.returncode == 0, train.stderr[-2000:]
    assert _noise(train) == [], train.stderr[-2000:]
    assert "[train] two_tower/dsl s=0.8: recall@20=" in train.stdout

    serve = _run("export/serve.py", "--run", str(run), "--out", str(tmp_path / "serving"), "--name", "demo",
                 "--query")
    assert serve.returncode == 0, serve.stderr[-2000:]
    assert _noise(serve) == [], serve.stderr[-2000:]
    assert serve.stderr == ""
    assert "v1/models/demo:predict" in serve.stdout
    exported = json.loads((tmp_path / "serving" / "demo" / "1" / "assets.extra" / "dsl_export.json").read_text())
    assert exported["bytes"] > 0 and exported["dense_bytes"] > 0  # what ./run demo's summary reads

    missing = _run("export/serve.py", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "serving"))
    assert missing.returncode == 2
    assert "nowhere" in missing.stderr and "does not exist" in missing.stderr  # real errors stay visible


def test_verbose_switch_brings_tensorflow_lines_back():
    code = "from trainers import quiet_tensorflow; quiet_tensorflow(); import tensorflow as tf; tf.constant(1) + 1"
    quiet = _run("-c", code, PYTHONPATH=str(REPO))
    verbose = _run("-c", code, PYTHONPATH=str(REPO), DSL_TF_VERBOSE="1")
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert _noise(quiet) == [], quiet.stderr
    if not _noise(verbose):
        pytest.skip("this TensorFlow build logs nothing at start-up")
    assert re.search(r"^[IWE]\d{4} ", verbose.stderr, re.MULTILINE)
