"""Throughput of the Concerto pre-training data pipeline on ScanNet-sized synthetic scenes, on CPU.

Usage:
    python benchmarks/pipeline_throughput.py [--scenes 8] [--points 150000] [--views 12] [--cores 1 2]
        [--epochs 3] [--workdir /tmp/concerto-bench] [--pointcept PATH] [--out FILE]

Data: `--scenes` synthetic scenes of `--points` points and `--views` 640x480 frames each (Pointcept's split files
group a scene's frames four at a time, so a scene gives ceil(views / 4) samples, each with the whole point cloud),
written as parquet shards. Both are cached under `--workdir`, in a folder named by the sizes, and reused.
Transforms: the Concerto base config's values (518x518 crops, patch 14, grid 0.02, 2 global + 4 local views).

Measurements (MB = 10^6 bytes of the sample's files, i.e. its payload in the shard):
1. One process, no Ray: per sample, shard row -> record -> decoded arrays -> transformed sample. Every sample is
   timed once per pass for `--epochs` passes after one untimed warm-up call; reported are the medians of wall and
   CPU seconds per sample, samples/s per core (1 / median CPU s) and MB/s per core (median of bytes / CPU s).
2. The Ray Data pipeline (`concerto_ray.data.pipeline.drain`: shard reading, transforms in Ray tasks, collation)
   under `ray.init(num_cpus=K)` for each K in `--cores`: one warm-up epoch, then the median over `--epochs` epochs
   of samples/s, MB/s and samples/s per core.
3. With `--pointcept` (an extracted Pointcept source tree): Pointcept's own `DefaultImagePointDataset` with the
   transform list of configs/concerto/pretrain-concerto-v1m1-0-base.py, on the same synthetic root, its
   `__getitem__` timed per sample in this same process, interleaved with ours sample by sample. It reads the
   scene files from disk (page cache after the warm-up) where ours decodes the shard row's bytes. The ratio
   reported is ours / reference in samples/s per core (above 1: ours is faster).
   Stand-ins for what Pointcept imports but is not installed here (see benchmarks/_reference_shim.py):
   `torchvision.transforms` (Resize = PIL bilinear resize of the PIL image; ToTensor = HWC uint8 -> CHW float32
   / 255; GaussianBlur = uniform sigma per call, 2-D Gaussian kernel, reflect padding, grouped conv2d;
   Normalize = (x - mean) / std; functional.crop = in-bounds slicing; Compose; InterpolationMode), and empty
   `pointcept`, `pointcept.utils`, `pointcept.datasets` packages so that Pointcept's package `__init__` files
   (which import every model and dataset) are skipped; its registry, logger and dataset modules are its own.
   Its split files hold paths relative to Pointcept's working directory, so a copy with absolute paths into the
   synthetic root is written under the work dir.

numpy's BLAS and torch run one thread per process, as in Ray's workers, so that one process is one core.
With only a few samples per epoch, the Ray numbers mostly measure the per-epoch start-up of Ray Data.
"""

from __future__ import annotations

import os

# BLAS reads these when numpy loads, hence before the imports below.
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from concerto_ray.data.pipeline import StreamConfig, drain
from concerto_ray.data.presets import ConcertoPretrainTransformConfig, concerto_pretrain_transform
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.shards import prepare, read_manifest
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

MB = 1e6
IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480  # ScanNet colour frames as Pointcept's Concerto preprocessing stores them


@dataclass
class Timing:
    wall_s: float
    cpu_s: float
    input_bytes: int


def prepare_data(workdir: Path, scenes: int, points: int, views: int, shard_mb: float) -> tuple[Path, Path]:
    """The synthetic root and its parquet shards, written on first use."""
    base = workdir / f"scenes{scenes}-points{points}-views{views}"
    synth_root, shard_root = base / "synth", base / "shards"
    if not (synth_root / "splits").is_dir():  # the split files are written last, so their folder marks a full set
        write_synthetic_dataset(
            synth_root,
            SynthConfig(
                scenes=scenes,
                points_per_scene=points,
                views_per_scene=views,
                image_width=IMAGE_WIDTH,
                image_height=IMAGE_HEIGHT,
            ),
        )
    # Small shards: a shard is the unit of parallelism of Ray Data's read (one task per file).
    prepare(synth_root, shard_root, target_shard_mb=shard_mb, progress=False)  # a no-op when complete
    return synth_root, shard_root


def load_rows(shard_root: Path) -> list[dict]:
    """Every shard row as Python objects, the form in which Ray Data hands rows to the transform."""
    manifest = read_manifest(shard_root)
    return [
        row
        for split in manifest.splits.values()
        for shard in split.shards
        for row in pq.read_table(shard_root / shard.path).to_pylist()
    ]


def timed(call: Callable[[], object], input_bytes: int) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu, input_bytes)


def summarize(timings: list[Timing]) -> dict:
    cpu = statistics.median(t.cpu_s for t in timings)
    return {
        "timed_calls": len(timings),
        "median_wall_s_per_sample": statistics.median(t.wall_s for t in timings),
        "median_cpu_s_per_sample": cpu,
        "samples_per_s_per_core": 1.0 / cpu,
        "mb_per_s_per_core": statistics.median(t.input_bytes / MB / t.cpu_s for t in timings),
    }


def measure_single_process(rows: list[dict], sizes: list[int], passes: int, reference=None) -> dict:
    """Per-sample cost of ours (and of Pointcept's dataset, interleaved sample by sample) in this process."""
    transform = concerto_pretrain_transform(ConcertoPretrainTransformConfig())

    def ours(row: dict, seed: list[int]) -> dict:  # what the pipeline's SampleTransform does per row
        return transform(decode_record(row_to_record(row), with_frames=True), np.random.default_rng(seed))

    names = [row["name"] for row in rows]
    reference_index = {}
    if reference is not None:
        reference_index = {name: i for i, name in enumerate(reference.data_name)}
        missing = [name for name in names if name not in reference_index]
        if missing:
            raise SystemExit(f"Pointcept's dataset lacks samples {missing} that the shards hold")
        # Warm-up, and a check that both produce the same image tensor, i.e. do comparable work.
        ours_images = tuple(ours(rows[0], [0, 0])["images"].shape)
        reference_images = tuple(reference[reference_index[names[0]]]["images"].shape)
        if ours_images != reference_images:
            raise SystemExit(f"image tensors differ: ours {ours_images}, Pointcept {reference_images}")
    else:
        ours(rows[0], [0, 0])  # warm-up: first-call imports and allocations stay out of the timings

    our_timings, reference_timings = [], []
    for epoch in range(passes):
        for i, (row, name, size) in enumerate(zip(rows, names, sizes)):
            our_timings.append(timed(lambda row=row, draw=[epoch + 1, i]: ours(row, draw), size))
            if reference is not None:
                reference_timings.append(timed(lambda name=name: reference[reference_index[name]], size))
    result = {"ours": summarize(our_timings), "reference": None, "ours_over_reference_per_core": None}
    if reference is not None:
        result["reference"] = summarize(reference_timings)
        result["ours_over_reference_per_core"] = (
            result["ours"]["samples_per_s_per_core"] / result["reference"]["samples_per_s_per_core"]
        )
    return result


def measure_ray(shard_root: Path, cores: int, epochs: int, mean_sample_bytes: float) -> dict:
    ray.init(num_cpus=cores, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = StreamConfig(shards=str(shard_root), mode="pretrain")
        drain(config)  # warm-up epoch: worker start-up and the first shard reads stay out of the timings
        rates, steady, latency = [], [], []
        for _ in range(epochs):
            stats = drain(config)
            rates.append(stats.samples / stats.seconds)
            steady.append(stats.steady_samples_per_s)
            latency.append(stats.first_batch_seconds)
    finally:
        ray.shutdown()
    rate, steady_rate = statistics.median(rates), statistics.median(steady)
    return {
        "cores": cores,
        "samples_per_s": rate,
        "mb_per_s": rate * mean_sample_bytes / MB,
        "samples_per_s_per_core": rate / cores,
        "epoch_samples_per_s": rates,
        "steady_samples_per_s": steady_rate,
        "steady_samples_per_s_per_core": steady_rate / cores,
        "steady_mb_per_s_per_core": steady_rate * mean_sample_bytes / MB / cores,
        "first_batch_s": statistics.median(latency),
    }


def print_table(result: dict) -> None:
    data = result["dataset"]
    print(
        f"\n{data['samples']} samples ({data['scenes']} scenes x {data['points_per_scene']} points, "
        f"{data['frames_per_sample']} frames of {IMAGE_WIDTH}x{IMAGE_HEIGHT} per sample), "
        f"{data['mean_sample_mb']:.1f} MB per sample"
    )
    print("\none process, one thread    wall s/sample  cpu s/sample  samples/s/core  MB/s/core")
    single = result["single_process"]
    for name in ("ours", "reference"):
        row = single[name]
        if row is not None:
            print(
                f"  {name:24s} {row['median_wall_s_per_sample']:13.3f} {row['median_cpu_s_per_sample']:13.3f} "
                f"{row['samples_per_s_per_core']:15.3f} {row['mb_per_s_per_core']:10.1f}"
            )
    if single["ours_over_reference_per_core"] is not None:
        print(f"  ours / reference (samples/s per core): {single['ours_over_reference_per_core']:.2f}")
    print(
        "\nRay Data pipeline (drain)  cores  samples/s   MB/s  samples/s/core  first batch s  "
        "steady samples/s/core  steady MB/s/core"
    )
    for row in result["ray"]:
        print(
            f"  {'':24s} {row['cores']:5d} {row['samples_per_s']:10.3f} {row['mb_per_s']:6.1f} "
            f"{row['samples_per_s_per_core']:15.3f} {row['first_batch_s']:14.1f} "
            f"{row['steady_samples_per_s_per_core']:22.3f} {row['steady_mb_per_s_per_core']:17.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--points", type=int, default=150000, help="points per scene")
    parser.add_argument("--views", type=int, default=12, help="camera frames per scene")
    parser.add_argument("--shard-mb", type=float, default=16, help="target shard size")
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="num_cpus for each Ray run")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes / epochs, after one warm-up")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/concerto-bench"))
    parser.add_argument("--pointcept", type=Path, help="extracted Pointcept source tree, to time the reference")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.epochs < 1 or min(args.cores) < 1:
        parser.error("--epochs and every --cores value must be >= 1")
    if args.pointcept is not None and not (args.pointcept / "pointcept/datasets/defaults.py").is_file():
        parser.error(f"--pointcept {args.pointcept}: no pointcept/datasets/defaults.py there")

    torch.set_num_threads(1)
    synth_root, shard_root = prepare_data(args.workdir, args.scenes, args.points, args.views, args.shard_mb)
    rows = load_rows(shard_root)
    sizes = [row_to_record(row).nbytes() for row in rows]
    mean_sample_bytes = statistics.fmean(sizes)

    reference = None
    if args.pointcept is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _reference_shim import reference_dataset

        # Pointcept draws its augmentations from the global generators; seeded, reruns repeat them.
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        reference = reference_dataset(
            args.pointcept.resolve(), synth_root.resolve(), synth_root.parent / "pointcept_root"
        )

    result = {
        "dataset": {
            "scenes": args.scenes,
            "points_per_scene": args.points,
            "frames_per_scene": args.views,
            "frames_per_sample": max(len(row["frame_names"]) for row in rows),
            "samples": len(rows),
            "mean_sample_mb": mean_sample_bytes / MB,
            "shards": str(shard_root),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
        },
        "single_process": measure_single_process(rows, sizes, args.epochs, reference),
        "ray": [measure_ray(shard_root, cores, args.epochs, mean_sample_bytes) for cores in args.cores],
    }
    print_table(result)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
