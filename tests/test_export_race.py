"""Issue 9: a served version is never lost — concurrent exports, stale temporary folders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import dsl_tf  # noqa: F401  (before tf.keras)
import tensorflow as tf

from conftest import REPO
from export import export_model
from export_fixtures import random_masked

WORKER = """
import json, pathlib, sys, time
sys.path.insert(0, {tests!r})
import dsl_tf
from export_fixtures import random_masked
from export import export_model
model = random_masked(40, 60, 8, 0.8, seed={seed})
barrier = pathlib.Path({barrier!r})
(barrier / "{seed}").touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.005)
result = export_model(model, {out!r}, "m", k=5, compare_dense=False, warmup=2, run_info={{"writer": {seed}}})
print(json.dumps({{"version": result.version}}))
"""


def test_two_processes_exporting_the_same_name_never_share_a_version(tmp_path):
    barrier, out = tmp_path / "barrier", tmp_path / "serving"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {seed: subprocess.Popen([sys.executable, "-c", WORKER.format(tests=str(REPO / "tests"), seed=seed,
                                                                          barrier=str(barrier), out=str(out))],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for seed in (1, 2)}
    versions = {}
    for seed, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        versions[seed] = json.loads(stdout.strip().splitlines()[-1])["version"]
    assert sorted(versions.values()) == [1, 2]
    assert sorted(p.name for p in (out / "m").iterdir() if not p.name.startswith(".")) == ["1", "2"]
    for seed, version in versions.items():  # each process's version holds its own model
        meta = json.loads((out / "m" / str(version) / "assets.extra" / "dsl_export.json").read_text())
        assert meta["writer"] == seed and meta["version"] == version
    assert not [p for p in (out / "m").iterdir() if p.name.startswith(".") and p.is_dir()]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def test_stale_temporary_folders_are_cleaned_and_dense_scratch_stays_in_the_target(tmp_path, monkeypatch):
    host = socket.gethostname()
    model_dir = tmp_path / "serving" / "m"
    stale = model_dir / f".tmp-pid{_dead_pid()}-0123abcd-{host}"
    live = model_dir / f".tmp-pid{os.getpid()}-89abcdef-{host}"
    other_host = model_dir / f".tmp-pid{_dead_pid()}-0123abcd-{host}x"
    for path in (stale, live, other_host):
        (path / "variables").mkdir(parents=True)
    saved = []
    real_save = tf.saved_model.save
    monkeypatch.setattr(tf.saved_model, "save", lambda obj, path, *a, **kw: (saved.append(Path(path)),
                                                                              real_save(obj, path, *a, **kw))[1])
    result = export_model(random_masked(30, 40, 8, 0.8), tmp_path / "serving", "m", k=5, warmup=2)
    assert result.dense_bytes and result.version == 1
    assert len(saved) == 2 and all(model_dir in p.parents for p in saved), saved  # no system-temp folders
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["1", live.name, other_host.name])
