"""Cost of one ScanNet frame in `ingest --adapter scannet`: the mesh cast and the 1 cm point search, per frame.

    python benchmarks/mesh_cast.py --device cpu --frames 5 --out mesh_cast.json
    python benchmarks/mesh_cast.py --device cuda --frames 5         (on a GPU machine)

A 6 x 5 x 3 m room (floor and four walls) meshed on a 4 cm grid, about the vertex density of ScanNet's
_vh_clean_2 meshes (61k vertices, 120k triangles), seen at ScanNet's colour size 1296 x 968 (fx = fy = 1170) from
`--frames` random poses inside it. Times `raycast.mesh_depth_image` and `correspondence.nearest_point_correspondences`
(scipy's k-d tree on the CPU, the torch cell search on a GPU); the first frame warms up and is not counted. On a
GPU the first two frames are also cast and searched on the CPU: `against_cpu` says how far the results differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scannet_raw_fixture import grid  # noqa: E402

from concerto_ray.data.correspondence import nearest_point_correspondences  # noqa: E402
from concerto_ray.data.raycast import mesh_depth_image  # noqa: E402
from concerto_ray.data.synth import look_at  # noqa: E402


def room() -> tuple[np.ndarray, np.ndarray]:
    x, y, z = np.array([6.0, 0, 0]), np.array([0, 5.0, 0]), np.array([0, 0, 3.0])
    parts = [grid(np.zeros(3), x, y, 151, 126), grid(np.zeros(3), x, z, 151, 76), grid(y, x, z, 151, 76),
             grid(np.zeros(3), y, z, 126, 76), grid(x, y, z, 126, 76)]  # fmt: skip
    offsets = np.cumsum([0] + [len(p) for p, _ in parts[:-1]])
    vertices = np.concatenate([p for p, _ in parts]).astype(np.float32)
    return vertices, np.concatenate([f + o for (_, f), o in zip(parts, offsets, strict=True)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    vertices, faces = room()
    K = np.array([[1170.0, 0, 647.5], [0, 1170.0, 483.5], [0, 0, 1]], dtype=np.float32)
    rng = np.random.default_rng(0)
    search = None if args.device == "cpu" else args.device
    cast, near, rows, same = [], [], [], []
    for i in range(args.frames + 1):
        pose = look_at(np.array([3, 2.5, 1.5]) + rng.normal(0, 0.3, 3), np.array([*rng.uniform(0, [6, 5]), 0.5]))
        start = time.perf_counter()
        depth = mesh_depth_image(vertices, faces, K, pose, 968, 1296, device=args.device)
        middle = time.perf_counter()
        table = nearest_point_correspondences(vertices, depth, K, pose, device=search)
        if args.device != "cpu":
            torch.cuda.synchronize()
        cast.append(middle - start)
        near.append(time.perf_counter() - middle)
        rows.append(len(table))
        if args.device != "cpu" and i < 2:  # the GPU path's result against the CPU's, for two frames
            cpu_depth = mesh_depth_image(vertices, faces, K, pose, 968, 1296)
            cpu_table = nearest_point_correspondences(vertices, cpu_depth, K, pose)
            differing = np.flatnonzero(~((depth == cpu_depth) | (np.isinf(depth) & np.isinf(cpu_depth))))
            same.append({"pixels_differing": len(differing), "rows": [len(table), len(cpu_table)],
                         "tables_equal": bool(np.array_equal(table, cpu_table))})  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name() if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "vertices": len(vertices),
        "faces": len(faces),
        "frames": args.frames,
        "cast_s": [min(cast[1:]), statistics.median(cast[1:]), max(cast[1:])],
        "search_s": [min(near[1:]), statistics.median(near[1:]), max(near[1:])],
        "rows_median": statistics.median(rows[1:]),
    }
    if same:
        result["against_cpu"] = same  # depth pixels that differ, rows, tables equal
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
