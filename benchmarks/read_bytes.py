"""Bytes read per epoch: a 1 % scene run vs a 100 % run, segmentation vs pre-training, and the checksum pass.

Writes synthetic scenes, prepares parquet shards of a few scenes each, then reads one epoch's samples as the
stream's read tasks do (`sources.read_sample_row`, here in this process so that /proc/self/io counts every byte read
by a system call) and prints them next to what the previous stream read: every shard whole, every epoch, plus a
sha256 pass over every shard before every run. The checksum pass is measured on a first run (every used shard
hashed) and a second one (its markers: nothing hashed again).

    python benchmarks/read_bytes.py [--scenes 100] [--workdir /tmp/read-bytes]   (a rerun reuses the data)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import ray

from concerto_ray.data.shards import VerifiedShards, check_sizes, prepare
from concerto_ray.data.sources import SourceConfig, load_sources, read_sample_row
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.finetune.data_efficiency import select_scenes


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def epoch_bytes(source, with_frames: bool) -> int:
    before = bytes_read()
    for ref in source.samples:
        read_sample_row(source.location, source.format, ref, with_frames)
    return bytes_read() - before


def checksum_bytes(source, markers: VerifiedShards) -> int:
    """Bytes hashed by the checksum pass (in Ray tasks, other processes: counted from the shards' sizes)."""
    hashed = markers.verify(source.location, source.shards, check_sizes(source.location, source.shards))
    return sum(s.bytes for s in hashed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--workdir", default="/tmp/read-bytes")
    args = parser.parse_args()
    work = Path(args.workdir)
    for markers in work.glob("markers-*"):  # a rerun reuses the scenes and shards, not the checksum markers
        shutil.rmtree(markers)
    if not (work / "scenes").exists():
        write_synthetic_dataset(
            work / "scenes",
            SynthConfig(scenes=args.scenes, points_per_scene=20000, views_per_scene=8, splits={"train": 1.0}),
            progress=False,
        )
    manifest = prepare(work / "scenes", str(work / "shards"), target_shard_mb=4, progress=False)
    ray.init(num_cpus=2, include_dashboard=False)

    config = SourceConfig(shards=str(work / "shards"), splits=["train"])
    (everything,) = load_sources([config])
    names = [ref.name for ref in everything.samples]
    (one_percent,) = load_sources([config], scenes=frozenset(select_scenes(names, 1, seed=0)))
    total = manifest.total_bytes
    print(f"{len(names)} scenes in {manifest.total_shards} shards, {total / 2**20:.1f} MiB")
    print(
        "before: every run hashes every shard, every epoch reads every shard whole: "
        f"{total / 2**20:.1f} MiB checksum + {total / 2**20:.1f} MiB per epoch, whatever share of scenes is used"
    )
    print(
        f"{'run':<28} {'samples':>8} {'shards':>7} {'checksum, 1st run':>18} {'2nd run':>8} "
        f"{'epoch, pretrain':>16} {'epoch, segmentation':>20}"
    )
    for label, source in (("100 % of the scenes", everything), ("1 % of the scenes", one_percent)):
        markers = VerifiedShards(work / f"markers-{len(source.samples)}")
        first, second = checksum_bytes(source, markers), checksum_bytes(source, markers)
        print(
            f"{label:<28} {len(source.samples):>8} {len(source.shards):>7} {first / 2**20:>14.2f} MiB "
            f"{second / 2**20:>4.2f} MiB {epoch_bytes(source, True) / 2**20:>12.2f} MiB "
            f"{epoch_bytes(source, False) / 2**20:>16.2f} MiB"
        )


if __name__ == "__main__":
    main()
