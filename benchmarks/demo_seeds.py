"""Seed-to-seed spread of the demo's headline: the pre-trained backbone's linear-probe val mIoU, mAcc and allAcc
minus those of the same backbone before pre-training (issue 11: the demo test's margin must come from this spread,
not from one run).

Runs the whole demo once per seed (the seed fixes the synthetic scenes, the DINOv2 stand-in, pre-training and the
probes), each in its own work folder under --workdir and its own process with a local Ray of --cpus CPUs, --parallel
seeds at a time (on a machine with 16 cores, 8 seeds of 2 CPUs each run as on CI's 2-core machine); a rerun reuses
the stages a seed already finished. Prints each seed's metrics and their differences, then each difference's
min / median / max and standard deviation. --pretrain optim.lr=1e-12 is the control: a pre-training that changes
nothing; --pretrain run.use_gpu=true run.num_workers=1 data.batch_size=2 pre-trains on a GPU (the same samples per
step as the demo's two CPU workers of one sample); --probe run.use_gpu=true runs the probes there too.

    PYTHONPATH=. python benchmarks/demo_seeds.py --seeds 0,1,2,3 --out demo_seeds.json   # the demo's defaults
    PYTHONPATH=. python benchmarks/demo_seeds.py --seeds 0,1 --scenes 4 --epochs 1      # a quick check of the script
    PYTHONPATH=. python benchmarks/demo_seeds.py --seeds 0-7 --parallel 8 --cpus 2 --scenes 4 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ray
import yaml

from concerto_ray import demo
from concerto_ray.demo import RESULTS_FILE, run_demo

ROW = re.compile(r"^(pre-trained|random init)\s+(\d\.\d{3})\s+(\d\.\d{3})\s+(\d\.\d{3})$")
METRICS = ("miou", "macc", "all_acc")


def probe_metrics(results_file: Path) -> dict[str, dict[str, float]]:
    """{"pre-trained": {"miou": .., "macc": .., "all_acc": ..}, "random init": {...}} from a demo's results table."""
    rows = {}
    for line in results_file.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = dict(zip(METRICS, map(float, match.groups()[1:])))
    if set(rows) != {"pre-trained", "random init"}:
        raise ValueError(f"{results_file}: expected a pre-trained and a random-init row, got {sorted(rows)}")
    return rows


def seed_list(text: str) -> list[int]:
    """ "0,1,2" or "0-7"."""
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(seed) for seed in text.split(",")]


def run_seeds(args: argparse.Namespace, seeds: list[int]) -> None:
    """Each unfinished seed's demo in a subprocess of its own (a process joins one Ray), --parallel at a time."""
    pending = [seed for seed in seeds if not (args.workdir / f"seed-{seed}" / RESULTS_FILE).is_file()]
    running: list[tuple[int, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            seed = pending.pop(0)
            workdir = args.workdir / f"seed-{seed}"
            workdir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "--one-seed", str(seed), "--scenes", str(args.scenes)]
            command += ["--epochs", str(args.epochs), "--cpus", str(args.cpus), "--gpus", str(args.gpus)]
            command += ["--workdir", str(args.workdir)]
            if args.pretrain:
                command += ["--pretrain", *args.pretrain]
            if args.probe:
                command += ["--probe", *args.probe]
            with open(workdir / "demo_seeds.out", "w") as out:
                running.append((seed, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT), time.time()))
        time.sleep(2)
        for seed, process, started in list(running):
            if process.poll() is not None:
                running.remove((seed, process, started))
                print(f"seed {seed}: exit {process.returncode} after {time.time() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="demo seeds: comma-separated, or a range such as 0-7")
    parser.add_argument("--scenes", type=int, default=16, help="synthetic scenes (the demo's default: 16)")
    parser.add_argument("--epochs", type=int, default=30, help="pre-training epochs (the demo's default: 30)")
    parser.add_argument("--workdir", type=Path, default=Path("demo-seeds"))
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at the same time")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each seed's local Ray")
    parser.add_argument("--pretrain", nargs="*", default=[], help="section.key=value replacing the tiny pre-training's")
    parser.add_argument("--probe", nargs="*", default=[], help="key=value added to the demo's probe overrides")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs of each seed's local Ray")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one-seed", type=int, help=argparse.SUPPRESS)  # a subprocess's seed
    args = parser.parse_args()

    if args.one_seed is not None:
        workdir = args.workdir / f"seed-{args.one_seed}"
        if args.pretrain:
            config = yaml.safe_load(demo.PRETRAIN_CONFIG.read_text())
            for assignment in args.pretrain:
                key, value = assignment.split("=", 1)
                section, name = key.split(".")
                config[section][name] = yaml.safe_load(value)
            demo.PRETRAIN_CONFIG = workdir / "pretrain.yaml"
            demo.PRETRAIN_CONFIG.write_text(yaml.safe_dump(config))
        for assignment in args.probe:
            key, value = assignment.split("=", 1)
            demo.DEMO_PROBE[key] = yaml.safe_load(value)
        ray.init(num_cpus=args.cpus, num_gpus=args.gpus, log_to_driver=False)
        run_demo(workdir, scenes=args.scenes, seed=args.one_seed, pretrain_epochs=args.epochs)
        return
    seeds = seed_list(args.seeds)
    run_seeds(args, seeds)
    runs = []
    for seed in seeds:
        results = args.workdir / f"seed-{seed}" / RESULTS_FILE
        if not results.is_file():
            print(f"seed {seed}: no results (see {results.with_name('demo_seeds.out')})")
            continue
        rows = probe_metrics(results)
        differences = {metric: rows["pre-trained"][metric] - rows["random init"][metric] for metric in METRICS}
        runs.append({"seed": seed, **rows, "difference": differences})
        print(json.dumps(runs[-1]))
    summary = {
        "scenes": args.scenes,
        "epochs": args.epochs,
        "pretrain": args.pretrain,
        "probe": args.probe,
        "runs": runs,
    }
    for metric in METRICS:
        differences = [run["difference"][metric] for run in runs]
        summary[f"{metric}_difference"] = {
            "min": min(differences, default=None),
            "median": statistics.median(differences) if differences else None,
            "max": max(differences, default=None),
            "stdev": statistics.stdev(differences) if len(differences) > 1 else None,
        }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
