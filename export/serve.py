"""Export a trained run as a TF Serving model (compact by default) and optionally query it.

    python export/serve.py --run runs/demo --out serving --name demo --query

Writes ``serving/demo/<version>/`` (saved_model.pb, variables/, assets.extra/ with the
warmup requests and dsl_export.json) and ``serving/models.config``; see export/README.md.
Exit status: 0 on success, 2 on bad arguments / unexportable models (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # the CLI loads TensorFlow without start-up log lines (DSL_TF_VERBOSE=1: keep them)
    from trainers import quiet_tensorflow  # trainers/__init__: loaded by trainers.runs anyway, imports nothing heavy

    quiet_tensorflow()

import dsl_tf  # noqa: E402,F401  (before tf.keras)
import numpy as np  # noqa: E402

from export.builder import FORMATS, ITEM_MATRIX, VALUES, ExportError  # noqa: E402
from export.loader import SessionServable  # noqa: E402
from export.servable import export_run  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export/serve.py",
        description="Export a DSL-trained model (any trainers/ backbone: two_tower, mf_bpr, ultragcn, lightgcn, "
                    "neumf, multvae, cdae) as a TF Serving SavedModel: OUT/NAME/<version>/ plus OUT/models.config.",
    )
    p.add_argument("--run", required=True, help="run directory written by trainers/train.py (runs/NAME)")
    p.add_argument("--out", default="serving", help="TF Serving base directory (default: serving)")
    p.add_argument("--name", help="model name (default: the run directory's name)")
    p.add_argument("--version", type=int, help="integer version (default: next after the existing ones)")
    p.add_argument("--format", choices=FORMATS, default="compact",
                   help="compact: tables stored as bitmask + packed values (default); dense: baseline")
    p.add_argument("--values", choices=VALUES, default="float32", help="stored value type (default float32)")
    p.add_argument("--item-matrix", choices=ITEM_MATRIX, default="cache",
                   help="compact only, scoring every item: 'sparse' multiplies straight from the compact item "
                        "table (no dense item matrix; default); 'cache' builds the dense item matrix once at "
                        "load (dense memory); 'rebuild' builds it on every request (slow)")
    p.add_argument("--k", type=int, default=20, help="items returned by serving_default (default 20)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    p.add_argument("--exclude-seen", action="store_true",
                   help="serving_default never returns a user's training items (the run's interactions are "
                        "stored in the servable, 4 bytes each)")
    p.add_argument("--no-dense-compare", action="store_true",
                   help="skip writing a temporary dense export to report the size ratio")
    p.add_argument("--query", action="store_true",
                   help="load the written version through a TF1 session and print one user's top-k")
    p.add_argument("--user", default=None,
                   help="raw user id for --query, as in the data files (default: the first user)")
    return p


def _history_request(run: str, result, user) -> dict:
    """An autoencoder's request for a training user: its training items as the history."""
    import scipy.sparse as sp

    from trainers.runs import IdMaps

    ids = IdMaps.load(run)
    dense = {raw: i for i, raw in enumerate(ids.user_ids.tolist())}.get(user)
    train = sp.load_npz(Path(run) / "interactions.npz").tocsr()
    items = [] if dense is None else train.indices[train.indptr[dense]:train.indptr[dense + 1]]
    history = ids.item_ids[items] if len(items) else np.array([-1 if ids.item_ids.dtype.kind in "iu" else ""])
    inputs = {"history": np.asarray(history)[None, :]}
    if result.metadata["kind"] == "cdae":
        inputs["user_id"] = np.array([user])
    return inputs


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # e.g. load_run's "unrestored optimizer values" warnings
    name = args.name or Path(args.run).resolve().name
    if args.k < 1:
        print("error: --k must be >= 1", file=sys.stderr)
        return 2
    try:
        result = export_run(
            args.run, args.out, name, version=args.version, fmt=args.format, values=args.values,
            item_matrix=args.item_matrix, k=args.k, overwrite=args.overwrite,
            compare_dense=not args.no_dense_compare, exclude_seen=args.exclude_seen, verbose=True,
        )
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.report(), flush=True)
    if args.query:
        from trainers.runs import IdMaps

        users = IdMaps.load(args.run).user_ids  # the run's raw user ids (MultVAE's servable has none)
        user = users[0].item() if args.user is None else args.user
        if users.dtype.kind in "iu":
            try:
                user = int(user)
            except ValueError:
                print(f"error: --user {user!r}: this model's user ids are integers", file=sys.stderr)
                return 2
        inputs = {"user_id": np.array([user])}
        if result.metadata["kind"] in ("multvae", "cdae"):
            inputs = _history_request(args.run, result, user)
        shown = ", ".join(f"{key}={value.tolist()!r}" for key, value in inputs.items())
        print(f"[export] query: TF1 session on {result.path}, signature serving_default, {shown}")
        with SessionServable(result.path) as session:
            out = session.run("serving_default", **inputs)
        if not out["known"][0]:
            print(f"  unknown user {user!r}: the {result.k} most popular items, score 0")
        for rank, (item, score) in enumerate(zip(out["item_ids"][0], out["scores"][0]), 1):
            item = item.decode() if isinstance(item, bytes) else int(item)
            print(f"  {rank:>3}. item {item!s:>7}  score {float(score):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
