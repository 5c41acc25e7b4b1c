"""`concerto-ray ingest` throughput: scenes per second, and per CPU core, on a local Ray of `--cpus` CPUs.

    python benchmarks/ingest_throughput.py --scenes 32 --points 150000 --cpus 2 --format ply

Writes `--scenes` random clouds of `--points` points (colours, normals, labels; ScanNet rooms hold about 150k) as
files of `--format` into a temporary folder, then times `run_ingest` over them, `--repeats` times into fresh output
folders (min / median / max). The files' own writing is not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import laspy
import numpy as np
import ray
from plyfile import PlyData, PlyElement

from concerto_ray.ingest import IngestConfig, run_ingest


def write_cloud(path: Path, n: int, seed: int, fmt: str) -> None:
    rng = np.random.default_rng(seed)
    coord = rng.uniform(0, 8, (n, 3))
    color = rng.integers(0, 256, (n, 3))
    normal = rng.normal(size=(n, 3))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    label = rng.integers(-1, 20, n)
    if fmt == "ply":
        names = ("x", "y", "z", "red", "green", "blue", "nx", "ny", "nz", "label")
        types = ("f4",) * 3 + ("u1",) * 3 + ("f4",) * 3 + ("i4",)
        vertex = np.empty(n, dtype=list(zip(names, types)))
        for i, name in enumerate(names[:9]):
            vertex[name] = np.concatenate([coord, color, normal], axis=1)[:, i]
        vertex["label"] = label
        PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    elif fmt == "las":
        header = laspy.LasHeader(point_format=3, version="1.2")
        header.scales = np.array([0.001, 0.001, 0.001])
        las = laspy.LasData(header)
        las.x, las.y, las.z = coord[:, 0], coord[:, 1], coord[:, 2]
        las.red, las.green, las.blue = (color * 257).T
        las.classification = (label % 32).astype(np.uint8)
        las.write(str(path))
    else:
        np.savez(path, coord=coord.astype(np.float32), color=color.astype(np.uint8), segment=label)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--points", type=int, default=150_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--format", choices=("ply", "las", "npz"), default="ply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON result file")
    args = parser.parse_args()

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "src" / "train"
        src.mkdir(parents=True)
        for i in range(args.scenes):
            write_cloud(src / f"scene{i:04d}.{args.format}", args.points, i, args.format)
        seconds = []
        for repeat in range(args.repeats):
            config = IngestConfig(str(src.parent), str(Path(folder) / f"out{repeat}"), labels=True)
            start = time.perf_counter()
            summary = run_ingest(config, progress=False)
            seconds.append(time.perf_counter() - start)
            assert summary.ingested == args.scenes
    rates = sorted(args.scenes / s for s in seconds)
    result = {
        "format": args.format,
        "scenes": args.scenes,
        "points": args.points,
        "cpus": args.cpus,
        "scenes_per_s": {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]},
        "scenes_per_s_per_core": statistics.median(rates) / args.cpus,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
