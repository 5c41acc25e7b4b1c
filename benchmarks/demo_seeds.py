"""Seed-to-seed spread of the demo's headline: the pre-trained backbone's linear-probe val mIoU minus the random
backbone's (issue 11: the demo test's margin must come from this spread, not from one run).

Runs the whole demo once per seed (the seed fixes the synthetic scenes, the DINOv2 stand-in, pre-training and the
probes), each in its own work folder under --workdir; a rerun reuses the stages a seed already finished. Prints
each seed's two mIoUs and their difference, then the difference's min / median / max and standard deviation.

    PYTHONPATH=. python benchmarks/demo_seeds.py --seeds 0,1,2,3 --out demo_seeds.json   # the demo's defaults
    PYTHONPATH=. python benchmarks/demo_seeds.py --seeds 0,1 --scenes 4 --epochs 1      # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from concerto_ray.demo import RESULTS_FILE, run_demo

ROW = re.compile(r"^(pre-trained|random init)\s+(\d\.\d{3})\s+(\d\.\d{3})\s+(\d\.\d{3})$")


def probe_mious(results_file: Path) -> dict[str, float]:
    """{"pre-trained": mIoU, "random init": mIoU} from a demo's results table."""
    rows = {}
    for line in results_file.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = float(match.group(2))
    if set(rows) != {"pre-trained", "random init"}:
        raise ValueError(f"{results_file}: expected a pre-trained and a random-init row, got {sorted(rows)}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated demo seeds")
    parser.add_argument("--scenes", type=int, default=16, help="synthetic scenes (the demo's default: 16)")
    parser.add_argument("--epochs", type=int, default=30, help="pre-training epochs (the demo's default: 30)")
    parser.add_argument("--workdir", type=Path, default=Path("demo-seeds"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        workdir = args.workdir / f"seed-{seed}"
        if not (workdir / RESULTS_FILE).is_file():
            run_demo(workdir, scenes=args.scenes, seed=seed, pretrain_epochs=args.epochs)
        mious = probe_mious(workdir / RESULTS_FILE)
        runs.append({"seed": seed, **mious, "difference": mious["pre-trained"] - mious["random init"]})
        print(json.dumps(runs[-1]))
    differences = [run["difference"] for run in runs]
    summary = {
        "scenes": args.scenes,
        "epochs": args.epochs,
        "runs": runs,
        "difference_min": min(differences),
        "difference_median": statistics.median(differences),
        "difference_max": max(differences),
        "difference_stdev": statistics.stdev(differences) if len(differences) > 1 else None,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
