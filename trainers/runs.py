"""Read a run directory written by ``trainers/train.py`` back into a model.

>>> model, config = load_run("runs/demo")  # doctest: +SKIP
>>> model.score_all(np.array([0, 1])).shape  # doctest: +SKIP
TensorShape([2, 3000])
"""

from __future__ import annotations

import json
from pathlib import Path

import dsl_tf
import numpy as np
import scipy.sparse as sp
import tensorflow as tf

from trainers.models import Recommender, build_model

REQUIRED = ("config.json", "weights", "masks.npz", "item_popularity.npy", "interactions.npz")


def load_run(run_dir: str | Path) -> tuple[Recommender, dict]:
    """Rebuild the model of ``run_dir`` with ``build_model`` and restore its checkpoint.

    The model gets the run's training interactions (``model.attach``), so it can score
    right away; its masks are checked against ``masks.npz``.

    Raises:
      FileNotFoundError: the directory or one of its files is missing.
      ValueError: the checkpoint does not match the rebuilt model.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    missing = [name for name in REQUIRED if not (run / name).exists()]
    if missing or not (run / "weights" / "ckpt.index").exists():
        missing = missing or ["weights/ckpt.index"]
        raise FileNotFoundError(f"run directory {run} is incomplete: missing {missing} (was training interrupted?)")
    config = json.loads((run / "config.json").read_text())
    model = build_model(config["model"], config["num_users"], config["num_items"], **config["hparams"])
    model.attach(sp.load_npz(run / "interactions.npz").tocsr())
    model.score_all(np.zeros([1], np.int64))  # create every variable before restoring
    try:
        tf.train.Checkpoint(model=model).read(str(run / "weights" / "ckpt")).assert_existing_objects_matched()
    except AssertionError as err:
        raise ValueError(f"checkpoint of {run} does not match a rebuilt {config['model']!r} model: {err}") from err
    saved = np.load(run / "masks.npz")
    for layer in dsl_tf.masked_embeddings(model):
        if not np.array_equal(layer.mask.numpy().astype(bool), saved[layer.name]):
            raise ValueError(f"{run}: restored mask of {layer.name!r} differs from masks.npz")
    return model, config
