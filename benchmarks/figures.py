"""The paper's figures as PNGs, from benchmark results plus a reduced-scale sweep.

* ``fig2_performance_sparsity.png``: Recall@20 vs sparsity per method (dense as a line),
  one panel per model, from ``benchmarks/gowalla.py`` results (paper Fig. 2).
* ``fig3_sweeps.png``: DSL Recall@20 on valid vs the update interval ΔT and vs ρ0 (Fig. 3);
  the runs are trained here (under ``--sweep-out``, reused when already finished) from a base
  configuration (``--sweep KEY=VALUE``: ``TrainConfig`` fields; default ``two_tower`` on the
  built-in synthetic data, s=0.8), ΔT over ``--sweep-intervals`` at ρ0 = 0.5 and ρ0 over
  ``--sweep-ratios`` at ``--sweep-base-interval``, plus the dense model as a line.
* ``fig4_sparsity_popularity.png``: mean density of embedding rows per popularity group
  (10 groups, least popular first) for users and items: RP, GMP, DSL and per-row DSL runs,
  those present (Fig. 4).
* ``fig5_loss_curves.png``: training loss per epoch of dense, RP, DSL and per-row DSL (Fig. 5): the mean
  of the epoch's batch losses (``summary.json`` ``history.loss``; runs written before the
  trainers averaged it hold the epoch's last batch and are drawn dashed, with a warning).

Usage::

    python benchmarks/figures.py --results docs/results/gowalla_two_tower.json \\
        docs/results/gowalla_mf_bpr.json --out docs/figures
    python benchmarks/figures.py --results docs/results/gowalla_converged_mf_bpr.json \\
        docs/results/gowalla_converged_two_tower.json --figures 2 --skip-sweep
    python benchmarks/figures.py --results docs/results/gowalla_converged_mf_bpr.json \\
        --sweep model=mf_bpr dataset=gowalla epochs=38 batch_size=8192 lr=0.003 'hparams={"l2": 0.001}' \\
        --sweep-intervals 47 94 188 376 752 --sweep-base-interval 188 --sweep-out runs/sweeps_gowalla
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from benchmarks.gowalla import label, train_or_reuse  # noqa: E402
from trainers.evaluation import group_density, popularity_groups  # noqa: E402
from trainers.train import TrainConfig, key_values  # noqa: E402

SWEEP_INTERVALS = (8, 16, 32, 64, 128, 256, 640)
SWEEP_RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
SWEEP_BASE = {"model": "two_tower", "dataset": "synthetic", "sparsity": 0.8}
COLORS = {"dense": "black", "dsl": "tab:red", "dsl per-row": "tab:orange", "gmp": "tab:blue", "rp": "tab:gray",
          "set": "tab:green", "omp": "tab:purple"}
FIG4_SERIES = ("rp", "gmp", "dsl", "dsl per-row")
"""Fig. 4's bars, in this order, those with a run at the figure's sparsity."""
FIG5_SERIES = ("dense", "rp", "dsl", "dsl per-row")


def _rows(paths: list[str]) -> list[dict]:
    return [row for path in paths for row in json.loads(Path(path).read_text())["rows"]]


def _models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def fig2(rows: list[dict], out: Path) -> Path:
    models = _models(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        dense = next(r for r in mine if r["method"] == "dense")
        ax.axhline(dense["recall@20"], color=COLORS["dense"], ls="--", label="dense")
        for series in dict.fromkeys(label(r) for r in mine if r["method"] != "dense"):
            points = sorted((r["sparsity"], r["recall@20"]) for r in mine if label(r) == series)
            ax.plot(*zip(*points), marker="o", color=COLORS.get(series), label=series)
        ax.set(title=f"{model} (Gowalla)", xlabel="sparsity s", ylabel="Recall@20 (test)")
        ax.legend()
    return _save(fig, out / "fig2_performance_sparsity.png")


def _sweep(out: Path, base: dict, interval: int, ratio: float, verbose: int, method: str = "dsl") -> float:
    name = f"dt{interval}_rho{ratio:g}" if method == "dsl" else method
    cfg = TrainConfig(**{**base, "method": method, "update_interval": interval, "initial_update_ratio": ratio,
                         "protocol": "valid", "verbose": verbose, "out": str(out / name)})
    summary = train_or_reuse(cfg)
    return summary["metrics"]["recall@20"]


def fig3(sweep_out: Path, out: Path, verbose: int, base: dict | None = None, intervals=SWEEP_INTERVALS,
         ratios=SWEEP_RATIOS, base_interval: int = 64) -> Path:
    """ΔT sweep at ρ0 = 0.5 and ρ0 sweep at ``base_interval``, on valid, from ``base`` (TrainConfig fields)."""
    base = {**SWEEP_BASE, **(base or {})}
    by_interval = [_sweep(sweep_out, base, dt, 0.5, verbose) for dt in intervals]
    by_ratio = [_sweep(sweep_out, base, base_interval, rho, verbose) for rho in ratios]
    dense = _sweep(sweep_out, base, base_interval, 0.5, verbose, method="dense")
    title = f"{base['model']}, {base['dataset']}, s={base['sparsity']:g}"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax in (left, right):
        ax.axhline(dense, color=COLORS["dense"], ls="--", label="dense")
    left.plot(intervals, by_interval, marker="o", color=COLORS["dsl"], label="dsl")
    left.set(xscale="log", xlabel="update interval ΔT (steps; ρ0=0.5)", ylabel="Recall@20 (valid)", title=title)
    left.set_xticks(intervals, [str(dt) for dt in intervals])
    left.minorticks_off()
    right.plot(ratios, by_ratio, marker="o", color=COLORS["dsl"], label="dsl")
    right.set(xlabel=f"initial update ratio ρ0 (ΔT={base_interval})", ylabel="Recall@20 (valid)", title=title)
    left.legend()
    right.legend()
    (out / "fig3_sweeps.json").write_text(json.dumps(
        {"base": base, "dense": dense, "intervals": dict(zip(map(str, intervals), by_interval)),
         "ratios": dict(zip(map(str, ratios), by_ratio))}, indent=2))
    return _save(fig, out / "fig3_sweeps.png")


def _densities(run: Path, num_groups: int) -> dict[str, np.ndarray]:
    masks = np.load(run / "masks.npz")
    train = sp.load_npz(run / "interactions.npz").tocsr()
    counts = {"user": np.diff(train.indptr), "item": np.load(run / "item_popularity.npy")}
    out = {}
    for kind, count in counts.items():
        name = f"{kind}_embedding"
        if name in masks:
            out[kind] = group_density(masks[name], popularity_groups(count, num_groups), num_groups)
    return out


def fig4(rows: list[dict], out: Path, sparsity: float = 0.8, num_groups: int = 10) -> Path:
    models = _models(rows)
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.5 * len(models)), squeeze=False)
    groups = np.arange(1, num_groups + 1)
    for row_axes, model in zip(axes, models):
        found = {series: [r for r in rows if r["model"] == model and label(r) == series and r["sparsity"] == sparsity]
                 for series in FIG4_SERIES}
        found = {series: runs[0] for series, runs in found.items() if runs}
        width = 0.8 / max(len(found), 1)
        for i, (series, row) in enumerate(found.items()):
            offset = (i - (len(found) - 1) / 2) * width
            for ax, (kind, density) in zip(row_axes, _densities(Path(row["run"]), num_groups).items()):
                ax.bar(groups + offset, density, width=width, color=COLORS[series], label=series)
                ax.set(title=f"{model}: {kind} embeddings, s={sparsity:g}", ylabel="density of rows",
                       xlabel=f"{kind} popularity group (1 = least popular)", xticks=groups)
                ax.legend()
    return _save(fig, out / "fig4_sparsity_popularity.png")


def epoch_loss(run: Path) -> tuple[list[float], bool]:
    """A run's per-epoch training loss and whether it is the epoch mean (``loss_reduction``
    in ``summary.json``; older runs recorded the last batch's loss)."""
    summary = json.loads((run / "summary.json").read_text())
    averaged = summary.get("loss_reduction") == "epoch_mean"
    if not averaged:
        warnings.warn(f"{run}: training loss of each epoch's last batch (run predates epoch-mean losses); "
                      "re-run it for Fig. 5", UserWarning, stacklevel=2)
    return summary["history"]["loss"], averaged


def fig5(rows: list[dict], out: Path, sparsity: float = 0.8) -> Path:
    models = _models(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for series in FIG5_SERIES:
            found = [r for r in rows if r["model"] == model and label(r) == series
                     and (series == "dense" or r["sparsity"] == sparsity)]
            if found:
                loss, averaged = epoch_loss(Path(found[0]["run"]))
                ax.plot(np.arange(1, len(loss) + 1), loss, marker="o", markersize=3, color=COLORS[series],
                        ls="-" if averaged else "--", label=series if averaged else f"{series} (last batch)")
        ax.set(title=f"{model} (Gowalla), s={sparsity:g}", xlabel="epoch", ylabel="training loss (epoch mean)")
        ax.legend()
    return _save(fig, out / "fig5_loss_curves.png")


FROM_RESULTS = {"2": fig2, "4": fig4, "5": fig5}
"""The figures drawn from ``benchmarks/gowalla.py`` results, by number."""


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"[figures] wrote {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", nargs="+", required=True, help="JSON files written by benchmarks/gowalla.py")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--sweep-out", default="runs/sweeps", help="run directories of the Fig. 3 sweep")
    p.add_argument("--figures", nargs="+", default=list(FROM_RESULTS), choices=list(FROM_RESULTS),
                   help="which figures to draw from --results (Fig. 4 and 5 read the rows' run directories)")
    p.add_argument("--skip-sweep", action="store_true", help="do not train or draw the Fig. 3 sweep")
    p.add_argument("--sweep", nargs="*", default=[], metavar="KEY=VALUE",
                   help="Fig. 3 base configuration (TrainConfig fields, JSON values), e.g. model=mf_bpr "
                        "dataset=gowalla epochs=38")
    p.add_argument("--sweep-intervals", nargs="+", type=int, default=list(SWEEP_INTERVALS))
    p.add_argument("--sweep-ratios", nargs="+", type=float, default=list(SWEEP_RATIOS))
    p.add_argument("--sweep-base-interval", type=int, default=64, help="ΔT of the ρ0 sweep and the dense run")
    p.add_argument("--verbose", type=int, default=0, choices=[0, 1, 2])
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(args.results)
    for name in args.figures:
        FROM_RESULTS[name](rows, out)
    if not args.skip_sweep:
        fig3(Path(args.sweep_out), out, args.verbose, key_values(args.sweep, "--sweep"), args.sweep_intervals,
             args.sweep_ratios, args.sweep_base_interval)


if __name__ == "__main__":
    main()
