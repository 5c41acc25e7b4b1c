"""Our backbone on the GPU against the CPU at the paper's per-GPU batch (spconv has shown size-dependent trouble).

    python benchmarks/paper_batch.py --samples 12 --out paper.json

The paper's base config trains 96 samples over 8 GPUs: 12 per GPU, each 2 global + 4 local views and 4 images.
This builds such a batch (gpu_smoke.make_batch: synthetic rooms of --points raw points, 12 frames, the base
config's transforms), then runs the base config's backbone (random weights, seed 0; eval, order shuffling off) on
its global views (the teacher's input: 2 x samples views) and its local views, on the GPU (fp32, and bf16 autocast
as in training) and on the CPU (fp32, the reference computation), and compares the outputs (coarsest level, and
the up-cast features the heads see) by relative L2 error and the largest absolute difference.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import gpu_smoke
import torch

from concerto_ray.model.configs import get_model_config
from concerto_ray.model.ptv3 import PointTransformerV3
from concerto_ray.model.sonata import up_cast


def unique_voxels(batch: dict, prefix: str) -> dict:
    """`batch` with the `prefix` views keeping one point per 0.02 m voxel of each view (the first one): the views'
    augmentations (scaling) can put several points in one voxel, where spconv's result depends on the
    implementation (which duplicate wins), so CPU and GPU may legitimately differ there."""
    coord, offset = batch[f"{prefix}_coord"], batch[f"{prefix}_offset"]
    counts = torch.diff(offset, prepend=torch.zeros(1, dtype=offset.dtype))
    view = torch.repeat_interleave(torch.arange(len(offset)), counts)
    grid = torch.div(coord - coord.min(0)[0], batch["grid_size"][0], rounding_mode="trunc").long()
    keys = torch.cat([view[:, None], grid], 1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(keys), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(keys)), reduce="amin"
    )
    keep = torch.sort(first).values
    out = dict(batch)
    for key in (f"{prefix}_coord", f"{prefix}_feat"):
        out[key] = batch[key][keep]
    out[f"{prefix}_offset"] = torch.bincount(view[keep], minlength=len(offset)).cumsum(0)
    # Given explicitly: recomputed from the kept points, the grid origin (their minimum) could move and bin anew.
    out[f"{prefix}_grid_coord"] = grid[keep].int()
    return out


def first_views(batch: dict, prefix: str, views: int) -> dict:
    """The batch's first `views` views of `prefix` as backbone input."""
    offset = batch[f"{prefix}_offset"][:views]
    end = int(offset[-1])
    data = {
        "feat": batch[f"{prefix}_feat"][:end],
        "coord": batch[f"{prefix}_coord"][:end],
        "offset": offset,
        "grid_size": batch["grid_size"][0],
    }
    if f"{prefix}_grid_coord" in batch:
        data["grid_coord"] = batch[f"{prefix}_grid_coord"][:end]
    return data


def run(model, batch: dict, prefix: str, device: torch.device, bf16: bool, up_levels: int, views: int = 0):
    data = first_views(batch, prefix, views or len(batch[f"{prefix}_offset"]))
    data = gpu_smoke.batch_to_device(data, device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        point = model(data)
        coarse = point.feat.float()
        upcast = up_cast(point, up_levels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return coarse.cpu(), (upcast.feat.float().cpu(), upcast.offset.cpu()), time.perf_counter() - start


def per_view_errors(a: torch.Tensor, b: torch.Tensor, offset: torch.Tensor) -> list[float]:
    bounds = [0] + offset.tolist()
    return [((a[s:e] - b[s:e]).double().norm() / b[s:e].double().norm()).item() for s, e in itertools.pairwise(bounds)]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    return {
        "relative_error": ((a - b).norm() / b.norm()).item(),
        "max_abs_diff": (a - b).abs().max().item(),
        "finite": bool(torch.isfinite(a).all()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--points", type=int, default=150_000)
    parser.add_argument("--config", default="pretrain-concerto-v1m1-0-base")
    parser.add_argument("--views", default="global,local")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--unique", action="store_true", help="keep one point per voxel of each view")
    parser.add_argument("--diagnose", action="store_true", help="also compare on the first 1, 2, 4, 8, 16 views")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    batch = gpu_smoke.make_batch(args.samples, args.points, 12, seed=args.samples)
    config = get_model_config(args.config)
    torch.manual_seed(0)
    cpu_model = PointTransformerV3(config.teacher_backbone()).eval()
    cpu_model.set_order_shuffling(False)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    result = {
        "device": torch.cuda.get_device_name(),
        "samples": args.samples,
        "unique_voxels": args.unique,
        "threads": torch.get_num_threads(),
        "batch_build_s": time.perf_counter() - start,
        "views": {},
    }
    for prefix in args.views.split(","):
        if args.unique:
            batch = unique_voxels(batch, prefix)
        counts = torch.diff(batch[f"{prefix}_offset"], prepend=torch.zeros(1, dtype=torch.long))
        coord = batch[f"{prefix}_coord"]
        row = {
            "points": int(coord.shape[0]),
            "views": len(counts),
            "points_per_view_min_max": [int(counts.min()), int(counts.max())],
            "extent_m": (coord.max(0).values - coord.min(0).values).tolist(),
        }
        cpu_coarse, cpu_up, row["cpu_s"] = run(
            cpu_model, batch, prefix, torch.device("cpu"), False, config.up_cast_level
        )
        for precision, bf16 in (("fp32", False), ("bf16", True)):
            coarse, up, seconds = run(gpu_model, batch, prefix, torch.device("cuda"), bf16, config.up_cast_level)
            row[f"gpu_{precision}"] = {
                "seconds": seconds,
                "coarsest": compare(coarse, cpu_coarse),
                "upcast": compare(up[0], cpu_up[0]),
                "upcast_per_view": per_view_errors(up[0], cpu_up[0], cpu_up[1]),
            }
        if args.diagnose:  # GPU fp32 against CPU on the first k views only: does the error depend on the size?
            row["first_views_upcast_relative_error"] = {}
            for views in (1, 2, 4, 8, 16):
                if views < len(counts):
                    cpu = run(cpu_model, batch, prefix, torch.device("cpu"), False, config.up_cast_level, views)
                    gpu = run(gpu_model, batch, prefix, torch.device("cuda"), False, config.up_cast_level, views)
                    row["first_views_upcast_relative_error"][views] = compare(gpu[1][0], cpu[1][0])["relative_error"]
        result["views"][prefix] = row
        print(json.dumps({prefix: row}, indent=1), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
