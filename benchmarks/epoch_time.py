"""Where a training epoch's wall time goes (issue 15): steps, explorations and the rest.

Runs ``trainers/train.py`` on Gowalla for each backbone and method, one run at a time, and
collects each run's ``summary.json["time"]`` (recorded by ``trainers.train.EpochTimer``).
Target: epoch wall time ≤ 1.1 × the sum of its step times.

    PYTHONPATH=. python benchmarks/epoch_time.py --json docs/results/epoch_time.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import quiet_tensorflow  # noqa: E402

quiet_tensorflow()

from trainers.train import TrainConfig, train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mf_bpr", "two_tower", "lightgcn"])
    p.add_argument("--methods", nargs="+", default=["dense", "dsl"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="runs/epoch_time")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    done = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    results = {"command": "PYTHONPATH=. python benchmarks/epoch_time.py " + " ".join(argv or sys.argv[1:]),
               "runs": done.get("runs", {})}
    for model in args.models:
        for method in args.methods:
            key = f"{model}/{method}"
            if key in results["runs"]:  # resumable: keep what was measured
                continue
            summary = train(TrainConfig(model=model, dataset="gowalla", method=method, epochs=args.epochs,
                                        out=f"{args.out}/{model}_{method}", overwrite=True, verbose=0))
            results["runs"][key] = summary["time"]
            t = summary["time"]["total"]
            print(f"{key}: wall {t['wall_seconds']:.1f}s = steps {t['step_seconds']:.1f}s + explorations "
                  f"{t['exploration_seconds']:.1f}s + other {t['other_seconds']:.1f}s; wall/steps "
                  f"{t['wall_over_steps']:.3f}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
