"""The end-to-end demo on embedded defaults: local Ray, synthetic scenes, local storage.

Each stage is resumable: a rerun reuses the scenes and shards already written.
"""

from __future__ import annotations

from pathlib import Path

import ray

from concerto_ray.data.pipeline import StreamConfig, drain
from concerto_ray.data.presets import ConcertoPretrainTransformConfig
from concerto_ray.data.shards import prepare
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

# Small enough for two CPU cores: 126 = 9 patches of 14 pixels, views capped at a few thousand points.
DEMO_TRANSFORM = ConcertoPretrainTransformConfig(crop_h=126, crop_w=126, max_size=8192, enc2d_max_size=8192)


def run_demo(workdir: Path, scenes: int = 12, seed: int = 0) -> None:
    scenes_dir, shards_dir = workdir / "scenes", workdir / "shards"
    if not (scenes_dir / "splits").is_dir():
        print(f"[1/3] writing {scenes} synthetic scenes to {scenes_dir}")
        write_synthetic_dataset(scenes_dir, SynthConfig(scenes=scenes, seed=seed, points_per_scene=20000,
                                                        views_per_scene=8))
    else:
        print(f"[1/3] reusing the synthetic scenes in {scenes_dir}")
    print(f"[2/3] converting them to parquet shards in {shards_dir}")
    print(prepare(scenes_dir, str(shards_dir), target_shard_mb=16).summary())
    print("[3/3] streaming the shards through the Concerto pre-training transforms with Ray Data")
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    stats = drain(StreamConfig(shards=str(shards_dir), splits=["train"], batch_size=2, seed=seed,
                               pretrain=DEMO_TRANSFORM))
    print(stats.summary())
