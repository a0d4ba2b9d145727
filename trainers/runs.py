"""Run directories written by ``trainers/train.py``: read them back, and write them safely.

>>> model, config, ids = load_run("runs/demo")  # doctest: +SKIP
>>> model.score_all(np.array([0, 1])).shape  # doctest: +SKIP
TensorShape([2, 3000])
>>> ids.user_ids[:3]  # raw id of dense users 0, 1, 2  # doctest: +SKIP
array([0, 1, 2])

Directories are never half-replaced: new contents are written to a hidden scratch sibling
(:func:`scratch_dir`, named with the host and pid of the writer) and renamed into place
when complete; scratch folders of dead processes are removed by :func:`remove_stale`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

REQUIRED = ("config.json", "weights", "masks.npz", "item_popularity.npy", "interactions.npz", "id_maps.npz")
ID_MAPS = "id_maps.npz"

_SCRATCH = re.compile(r"^\.(?P<tag>.+?)-pid(?P<pid>[0-9]+)-[0-9a-f]{8}-(?P<host>.+)$")


class IdMaps(NamedTuple):
    """Raw ids of the dense ids: ``user_ids[dense] == raw`` (strings or int64, as in the data)."""

    user_ids: np.ndarray
    item_ids: np.ndarray

    @classmethod
    def of(cls, user_ids, item_ids, num_users: int, num_items: int) -> IdMaps:
        """Maps from a dataset's ``user_ids``/``item_ids`` (``None``: raw ids are the dense ids)."""
        users = np.arange(num_users, dtype=np.int64) if user_ids is None else np.asarray(user_ids)
        items = np.arange(num_items, dtype=np.int64) if item_ids is None else np.asarray(item_ids)
        return cls(users, items)

    def save(self, run_dir: str | Path) -> None:
        np.savez(Path(run_dir) / ID_MAPS, user_ids=self.user_ids, item_ids=self.item_ids)

    @classmethod
    def load(cls, run_dir: str | Path) -> IdMaps:
        with np.load(Path(run_dir) / ID_MAPS, allow_pickle=False) as saved:
            return cls(saved["user_ids"], saved["item_ids"])


class LoadedRun(NamedTuple):
    """What :func:`load_run` returns: ``model, config, ids = load_run(dir)``."""

    model: object  # trainers.models.Recommender
    config: dict
    ids: IdMaps


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the model of ``run_dir`` with ``build_model`` and restore its checkpoint.

    The model gets the run's training interactions (``model.attach``), so it can score
    right away; its masks are checked against ``masks.npz``. ``ids`` maps the model's dense
    ids to the data's raw ids (``id_maps.npz``).

    Raises:
      FileNotFoundError: the directory or one of its files is missing.
      ValueError: the checkpoint or the id maps do not match the rebuilt model.
    """
    import dsl_tf
    import scipy.sparse as sp
    import tensorflow as tf

    from trainers.models import build_model

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    missing = [name for name in REQUIRED if not (run / name).exists()]
    if missing or not (run / "weights" / "ckpt.index").exists():
        missing = missing or ["weights/ckpt.index"]
        raise FileNotFoundError(
            f"run directory {run} is incomplete: missing {missing} (was training interrupted, or was it written "
            "by an older trainers/train.py? train it again)"
        )
    config = json.loads((run / "config.json").read_text())
    ids = IdMaps.load(run)
    if (len(ids.user_ids), len(ids.item_ids)) != (config["num_users"], config["num_items"]):
        raise ValueError(f"{run / ID_MAPS}: {len(ids.user_ids)} users / {len(ids.item_ids)} items, config.json says "
                         f"{config['num_users']} / {config['num_items']}")
    factory = None
    if config.get("storage") == "compact":
        from trainers.methods import METHODS, compact_factory  # only DSL, RP and SET store compact tables

        factory = compact_factory(config["sparsity"], METHODS[config["method"]].growth_scores(config["growth_scores"]))
    model = build_model(config["model"], config["num_users"], config["num_items"], factory, **config["hparams"])
    model.attach(sp.load_npz(run / "interactions.npz").tocsr())
    model.score_all(np.zeros([1], np.int64))  # create every variable before restoring
    try:
        tf.train.Checkpoint(model=model).read(str(run / "weights" / "ckpt")).assert_existing_objects_matched()
    except AssertionError as err:
        raise ValueError(f"checkpoint of {run} does not match a rebuilt {config['model']!r} model: {err}") from err
    saved = np.load(run / "masks.npz")
    for layer in dsl_tf.masked_embeddings(model):
        if not np.array_equal(layer.dense_mask().numpy(), saved[layer.name]):
            raise ValueError(f"{run}: restored mask of {layer.name!r} differs from masks.npz")
    return LoadedRun(model, config, ids)


# ------------------------------------------------------------------ scratch directories
def scratch_dir(parent: str | Path, tag: str) -> Path:
    """A new, unique hidden directory ``parent/.<tag>-pid<pid>-<hex>-<host>`` (created).

    >>> import tempfile
    >>> scratch_dir(tempfile.mkdtemp(), "tmp").name.startswith(".tmp-pid")
    True
    """
    path = Path(parent) / f".{tag}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"
    path.mkdir(parents=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(parent: str | Path, tag_prefix: str = "") -> list[Path]:
    """Delete the :func:`scratch_dir` folders in ``parent`` (tag starting with ``tag_prefix``)
    left by processes of this host that are no longer running; returns them. Folders of
    live processes and of other hosts are kept."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    host = socket.gethostname()
    for entry in parent.iterdir():
        match = _SCRATCH.match(entry.name)
        if (match and match["tag"].startswith(tag_prefix) and match["host"] == host and entry.is_dir()
                and not _pid_alive(int(match["pid"]))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def replace_dir(new: Path, final: Path) -> None:
    """Move the complete directory ``new`` to ``final`` (same file system), replacing an
    existing ``final``: the old one is renamed aside first and deleted only after ``new``
    is in place (if the second rename fails, it is put back)."""
    old = None
    if final.exists():
        old = scratch_dir(final.parent, f"{final.name}.old")
        os.rename(final, old / final.name)
    try:
        os.rename(new, final)
    except BaseException:
        if old is not None:
            os.rename(old / final.name, final)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
