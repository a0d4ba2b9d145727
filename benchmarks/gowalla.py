"""Dense vs DSL vs RP vs SET vs GMP (vs OMP) on real data, side by side in one run.

Every run is ``trainers.train.run_training`` with the paper's protocol (fit on
train+valid, full-ranking Recall/NDCG@20 on test) and writes its run directory under
``--out`` (``<model>_dense`` and ``<model>_<method>_s<sparsity>``). A run whose
``summary.json`` exists with the same configuration is reused, so an interrupted
benchmark resumes where it stopped. After every run the results table is rewritten to
``--json`` (rows: model, method, sparsity, metrics, retention = recall / dense recall,
training / inference MACs relative to dense, seconds).

Converged grid (``--select-epochs``): the dense model is trained first with early stopping
on valid (``trainers/train.py --early-stopping``: fit train, Recall@20 on valid every
``--es-every`` epochs, at most ``--epochs``, best epoch E*), then refit on train+valid for E*
epochs and evaluated on test; every sparse method then trains exactly E* epochs on
train+valid with the same settings (its schedules planned over those E* epochs) and is
evaluated once on test. Test is never read while choosing E*.

Usage::

    python benchmarks/gowalla.py --models two_tower mf_bpr --epochs two_tower=4 mf_bpr=10 \\
        --lr mf_bpr=0.01 \\
        --sparsities 0.8 0.5 0.9 --out runs/bench --json docs/results/gowalla.json
    python benchmarks/gowalla.py --models mf_bpr --select-epochs --epochs 100 --batch-size 8192 \\
        --lr 0.003 --hparam mf_bpr:l2=1e-3 --methods dsl rp set gmp omp --out runs/converged \\
        --json docs/results/gowalla_converged_mf_bpr.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsl_tf  # noqa: E402,F401  (before tf.keras)

from trainers.methods import METHODS  # noqa: E402
from trainers.train import BUDGETS, TrainConfig, key_values, run_training  # noqa: E402


def _run_dir(out: Path, model: str, method: str, sparsity: float, budget: str = "per_layer") -> Path:
    if method == "dense":
        return out / f"{model}_dense"
    return out / (f"{model}_{method}_s{sparsity:g}" if budget == "per_layer" else f"{model}_{method}_{budget}_s{sparsity:g}")


def train_or_reuse(cfg: TrainConfig) -> dict:
    """Train ``cfg`` unless its run directory already holds a finished run of the same
    configuration (every ``TrainConfig`` field but ``out``/``overwrite``/``verbose``, kept by
    this benchmark in ``bench_config.json`` beside the run's ``summary.json``). A field the marker
    lacks (added to ``TrainConfig`` after the run) counts as its default, which is what the run used."""
    cfg = cfg.resolved()
    run = Path(cfg.out)
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite", "verbose")}
    marker = run / "bench_config.json"
    if (run / "summary.json").exists() and marker.exists() and _stored(json.loads(marker.read_text())) == key:
        print(f"[bench] reusing {run}", flush=True)
        return json.loads((run / "summary.json").read_text())
    cfg.overwrite = True
    summary = run_training(cfg)[1]
    marker.write_text(json.dumps(key, indent=2))
    return summary


def _stored(marker: dict) -> dict:
    """A ``bench_config.json`` with the defaults of ``TrainConfig`` fields it predates."""
    return {**{k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in ("out", "overwrite", "verbose")},
            **marker}


def _row(summary: dict, dense: dict, run: Path, budget: str = "per_layer") -> dict:
    recall = summary["metrics"]["recall@20"]
    return {
        "model": summary["model"],
        "method": summary["method"],
        "sparsity": summary["sparsity"],
        "budget": budget,
        **summary["metrics"],
        "retention": recall / dense["metrics"]["recall@20"],
        "density": summary["density"],
        "training_macs_vs_dense": summary["training_macs"] / dense["training_macs"],
        "inference_macs_vs_dense": summary["inference_macs"] / dense["inference_macs"],
        "train_seconds": summary["train_seconds"],
        "train_cpu_seconds": summary.get("train_cpu_seconds"),
        "epochs": len(summary["time"]["epochs"]),
        "steps": summary["steps"],
        "run": str(run),
    }


def label(row: dict) -> str:
    """A result row's series: its method, plus ``per-row`` for ``DynamicSparsity(budget="per_row")`` runs.

    >>> label({"method": "dsl", "budget": "per_row"}), label({"method": "dsl"})
    ('dsl per-row', 'dsl')
    """
    return f"{row['method']} per-row" if row.get("budget") == "per_row" else row["method"]


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| model | method | s | Recall@20 | NDCG@20 | Recall vs dense | train MACs vs dense | train s | train CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {label(r)} | {r['sparsity']:g} | {r['recall@20']:.4f} | "
                     f"{r['ndcg@20']:.4f} | {r['retention']:.3f} | {r['training_macs_vs_dense']:.3f} | "
                     f"{r['train_seconds']:.0f} | {r['train_cpu_seconds'] or float('nan'):.0f} |")
    return "\n".join(lines)


def _per_model(items: list[str], cast=int) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        out[key if sep else "*"] = cast(value if sep else key)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["two_tower"])
    p.add_argument("--methods", nargs="+", default=["dsl", "gmp", "rp", "set"], choices=list(METHODS)[1:],
                   help="sparse methods (dense always runs once per model)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.5, 0.9])
    p.add_argument("--dsl-budgets", nargs="+", default=["per_layer"], choices=BUDGETS,
                   help="DSL runs once per budget mode (DynamicSparsity(budget=...)); per_layer is the paper's")
    p.add_argument("--epochs", nargs="*", default=[], metavar="[MODEL=]N",
                   help="epochs for all models (N) or per model (MODEL=N); default: the model's")
    p.add_argument("--lr", nargs="*", default=[], metavar="[MODEL=]LR",
                   help="Adam learning rate for all models or per model; default: the model's")
    p.add_argument("--batch-size", nargs="*", default=[], metavar="[MODEL=]N",
                   help="batch size for all models or per model; default: the model's")
    p.add_argument("--hparam", nargs="*", default=[], metavar="MODEL:KEY=VALUE",
                   help="backbone hyper-parameter of one model, e.g. mf_bpr:l2=1e-3")
    p.add_argument("--select-epochs", action="store_true",
                   help="choose the epoch count by the dense model's early stopping on valid (--epochs is its "
                        "budget), then train every method for that many epochs")
    p.add_argument("--es-every", type=int, default=2, help="--select-epochs: evaluate valid every N epochs")
    p.add_argument("--es-patience", type=int, default=3, help="--select-epochs: evaluations without improvement")
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench", help="parent of the run directories")
    p.add_argument("--json", default="docs/results/gowalla.json", help="results table (rewritten after each run)")
    p.add_argument("--verbose", type=int, default=2, choices=[0, 1, 2])
    args = p.parse_args(argv)
    epochs, lrs, batches = _per_model(args.epochs), _per_model(args.lr, float), _per_model(args.batch_size)
    hparams: dict[str, dict] = {}
    for item in args.hparam:
        model, sep, assignment = item.partition(":")
        if not sep:
            raise SystemExit(f"--hparam expects MODEL:KEY=VALUE, got {item!r}")
        hparams.setdefault(model, {}).update(key_values([assignment], "--hparam"))
    out, table = Path(args.out), Path(args.json)
    table.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    start = time.time()
    for model in args.models:
        def config(method: str, sparsity: float, budget: str = "per_layer", **changes) -> TrainConfig:
            options = dict(model=model, dataset=args.dataset, method=method, sparsity=sparsity, budget=budget,
                           epochs=epochs.get(model, epochs.get("*")), batch_size=batches.get(model, batches.get("*")),
                           lr=lrs.get(model, lrs.get("*")), hparams=hparams.get(model, {}), seed=args.seed,
                           verbose=args.verbose, out=str(_run_dir(out, model, method, sparsity, budget)))
            return TrainConfig(**{**options, **changes})

        selection = dict(early_stopping=True, es_every=args.es_every, es_patience=args.es_patience)
        dense_cfg = config("dense", 0.8, **(selection if args.select_epochs else {}))
        dense = train_or_reuse(dense_cfg)
        if args.select_epochs:  # every method gets the dense model's chosen length
            chosen = dense["early_stopping"]["best_epoch"]
            print(f"[bench] {model}: dense early stopping chose {chosen} epochs", flush=True)
            config = functools.partial(config, epochs=chosen)
        rows.append(_row(dense, dense, Path(dense_cfg.out)))
        for sparsity in args.sparsities:
            for method, budget in [(m, b) for m in args.methods for b in (args.dsl_budgets if m == "dsl" else
                                                                          ["per_layer"])]:
                cfg = config(method, sparsity, budget)
                rows.append(_row(train_or_reuse(cfg), dense, Path(cfg.out), budget))
                table.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
                print(f"[bench] {len(rows)} runs, {time.time() - start:.0f}s\n{markdown(rows)}", flush=True)
    table.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
