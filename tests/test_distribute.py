"""DynamicSparsity under MirroredStrategy (2 logical CPUs) and MultiWorkerMirroredStrategy
(2 worker processes on 127.0.0.1): masks identical on every replica, scores reduced."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsl_tf import masks

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "CUDA_VISIBLE_DEVICES": ""}


def _check(result: dict) -> None:
    assert int(result["explorations"]) == 9  # steps 6, 12, ..., 54 of 60
    for name, rows in (("users", 50), ("items", 80)):
        replicas = result[f"{name}_masks"]
        assert len(replicas) >= 1
        for mask in replicas:
            np.testing.assert_array_equal(mask, replicas[0])
            assert int(mask.sum()) == masks.budget(rows * 8, 0.75)
        for table in result[f"{name}_tables"]:
            np.testing.assert_array_equal(table, result[f"{name}_tables"][0])
            assert np.count_nonzero(table[replicas[0] == 0]) == 0


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_mirrored_strategy_two_logical_cpus(tmp_path, storage):
    out = tmp_path / "m.npz"
    proc = subprocess.run([sys.executable, str(HERE / "dist_worker.py"), "mirrored", str(out), storage],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = dict(np.load(out))
    assert result["users_masks"].shape[0] == 2
    _check(result)
    np.testing.assert_allclose(result["scores_reduced"], result["scores_parts_sum"], rtol=1e-6)
    assert np.abs(result["scores_reduced"]).sum() > 0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_multi_worker_mirrored_strategy_two_processes(tmp_path, storage):
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "dist_worker.py"), "multiworker", str(tmp_path / f"w{index}.npz"), storage],
            env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    w0, w1 = (dict(np.load(tmp_path / f"w{i}.npz")) for i in range(2))
    _check(w0)
    _check(w1)
    for key in ("users_masks", "items_masks", "users_tables", "items_tables"):
        np.testing.assert_array_equal(w0[key][0], w1[key][0])
    # each worker reads the growth scores reduced over both workers: the same on both
    np.testing.assert_allclose(w0["scores_reduced"], w1["scores_reduced"], rtol=1e-6)


@pytest.mark.parametrize("scores", ["int8", "window"])
def test_single_replica_score_modes_refuse_several_replicas(scores):
    code = (
        "import dsl_tf, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "with tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1']).scope():\n"
        "    try:\n"
        f"        dsl_tf.CompactMaskedEmbedding(10, 4, growth_scores={scores!r}, name='t').build(None)\n"
        "    except ValueError as error:\n"
        "        print('ERROR', error)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert f"ERROR t: growth_scores={scores!r} works on one replica, the strategy has 2" in proc.stdout, proc.stderr[-2000:]
