"""GPU smoke test of a Concerto pre-training step: forward + backward + AdamW step + EMA, bf16 autocast.

Builds ScanNet-sized synthetic scenes (150k points, 12 frames of 640x480), runs the base config's CPU transforms
(518x518 crops, 2 global + 4 local views, grid 0.02) to make one batch, and times the step of the named model
config on it. The frozen DINOv2 has the config's architecture (ViT-g/14 with registers for the paper's configs) with
random weights: the machine has no network, and the step's cost does not depend on the weight values.

    python benchmarks/gpu_smoke.py --config pretrain-concerto-v1m1-0-base --batch 2 --out smoke.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from concerto_ray.data.collate import collate_concerto
from concerto_ray.data.layout import list_samples, read_sample
from concerto_ray.data.presets import ConcertoPretrainTransformConfig, concerto_pretrain_transform
from concerto_ray.data.record import decode_record
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.model.concerto import Concerto
from concerto_ray.model.configs import get_model_config
from concerto_ray.model.image_encoder import build_untrained_image_encoder
from concerto_ray.model.schedules import SslSchedules


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """Like concerto_ray.data.pipeline.batch_to_device; that module imports Ray, which the accelerator image lacks
    and these benchmarks do not need."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_batch(samples: int, points: int, views: int, seed: int) -> dict:
    root = Path(tempfile.mkdtemp()) / "scenes"
    write_synthetic_dataset(
        root,
        SynthConfig(
            scenes=samples,
            seed=seed,
            points_per_scene=points,
            views_per_scene=views,
            image_width=640,
            image_height=480,
            splits={"train": 1.0},
        ),
        progress=False,
    )
    transform = concerto_pretrain_transform(ConcertoPretrainTransformConfig())
    per_scene = {}
    for files in list_samples(root, ["train"]):  # one sample (4 frames) from each scene
        per_scene.setdefault(files.pointcloud_dir, files)
    rng = np.random.default_rng(seed)
    return collate_concerto([transform(decode_record(read_sample(f, "synth")), rng) for f in per_scene.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pretrain-concerto-v1m1-0-base")
    parser.add_argument("--batch", type=int, default=2, help="scenes per batch")
    parser.add_argument("--points", type=int, default=150_000)
    parser.add_argument("--views", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda")
    start = time.perf_counter()
    batch = make_batch(args.batch, args.points, args.views, seed=0)
    data_seconds = time.perf_counter() - start

    config = get_model_config(args.config)
    torch.manual_seed(0)
    model = Concerto(config, build_untrained_image_encoder(config.image_encoder)).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.04)
    model.set_schedule(SslSchedules.from_config(config, total_steps=1000).at(100))

    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(3 + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch_to_device(batch, device))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher()
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t0)
        losses.append({k: float(v.detach()) for k, v in out.items()})

    points = int(batch["global_coord"].shape[0] + batch["local_coord"].shape[0])
    result = {
        "config": args.config,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "scenes_per_batch": args.batch,
        "points_per_batch": points,
        "global_points": int(batch["global_coord"].shape[0]),
        "images": int(batch["images"].shape[0]),
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "points_per_s": points / statistics.median(times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses_first": losses[0],
        "losses_last": losses[-1],
        "all_finite": all(np.isfinite(list(d.values())).all() for d in losses),
        "batch_build_s": data_seconds,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
