"""Backbone inference throughput (points per second), as an embedding command would run it.

    python benchmarks/embed_throughput.py --configs base,large --shapes 1x150000,4x150000,1x600000 --out embed.json

Our PT-v3m2 encoder of the named pre-training config (random weights: the time does not depend on their values),
eval, `torch.no_grad`, order shuffling off, on synthetic rooms grid-sampled at 0.02 m (gpu_step.scene_batch, so
`RxP` = R rooms of P raw points in one batch). One inference = the backbone forward plus the up-cast of every
pooled level back onto the grid-sampled points (all five levels concatenated: 1232 channels for base, 1728 for
large), as the reference's Sonata/Concerto inference demo does before mapping features to the raw points (that
final gather is left out). Under bf16 and fp16 autocast, and fp32. Median of --steps after --warmup, CUDA
synchronised around each call; points/s counts grid-sampled points.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gpu_smoke
import gpu_step
import torch

from concerto_ray.model.configs import get_model_config
from concerto_ray.model.ptv3 import PointTransformerV3
from concerto_ray.model.sonata import up_cast

CONFIGS = {
    "base": "pretrain-concerto-v1m1-0-base",
    "large": "pretrain-concerto-v1m1-1-large-base",
    "tiny": "tiny-concerto",
}
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def infer(model: PointTransformerV3, batch: dict, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        point = model(dict(batch))
        return up_cast(point, len(model.config.stride)).feat


def measure(model, batch, device, dtype, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        infer(model, batch, device, dtype)
    gpu_step.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        feat = infer(model, batch, device, dtype)
        gpu_step.synchronize(device)
        times.append(time.perf_counter() - start)
    points = int(batch["offset"][-1])
    median = statistics.median(times)
    result = {
        "ms_median": 1000 * median,
        "ms_min": 1000 * min(times),
        "ms_max": 1000 * max(times),
        "points_per_s": points / median,
        "feature_channels": int(feat.shape[1]),
        "finite": bool(torch.isfinite(feat).all()),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default="base,large")
    parser.add_argument("--shapes", default="1x150000,4x150000,1x600000", help="ROOMSxRAW_POINTS, comma-separated")
    parser.add_argument("--precisions", default="bf16,fp16,fp32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": [],
    }
    batches = {}
    for shape in args.shapes.split(","):
        rooms, points = (int(v) for v in shape.split("x"))
        gpu_step.SCENES = rooms  # scene_batch builds gpu_step.SCENES rooms
        batches[shape] = gpu_smoke.batch_to_device(gpu_step.scene_batch(points, seed=rooms), device)
    print(
        f"{'config':6s} {'shape':>10s} {'points':>8s} {'prec':5s} {'median ms':>9s} {'Mpoints/s':>9s} {'peak GiB':>8s}"
    )
    for name in args.configs.split(","):
        torch.manual_seed(0)
        model = PointTransformerV3(get_model_config(CONFIGS[name]).teacher_backbone()).to(device).eval()
        model.set_order_shuffling(False)
        for shape, batch in batches.items():
            for precision in args.precisions.split(","):
                row = {"config": name, "shape": shape, "points": int(batch["offset"][-1]), "precision": precision}
                row.update(measure(model, batch, device, PRECISIONS[precision], args.steps, args.warmup))
                result["rows"].append(row)
                print(
                    f"{name:6s} {shape:>10s} {row['points']:8d} {precision:5s} {row['ms_median']:9.1f} "
                    f"{row['points_per_s'] / 1e6:9.3f} {row.get('peak_memory_gib', float('nan')):8.2f}",
                    flush=True,
                )
                if args.out:
                    args.out.write_text(json.dumps(result, indent=1))
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
