"""Cost of one S3DIS room in `ingest --adapter s3dis` besides its frames (benchmarks/mesh_cast.py times those).

    python benchmarks/s3dis_room.py --points 1000000 --repeats 3 --out s3dis_room.json

The room of mesh_cast.py (6 x 5 x 3 m, a 4 cm grid: 61k vertices, 120k triangles) written as a 2D-3D-S OBJ mesh,
and `--points` points on its surface (5 mm noise, millimetres, as Stanford3dDataset_v1.2 writes them; a room there
holds about 1 M) as one object file. Times, per repeat: `read_room_points` (the text files), `read_obj` (once per
area and worker in the adapter; an area mesh holds several rooms' worth), `room_mesh`'s crop and
`nearest_face_normals` (trimesh's nearest-face query for every point). min / median / max over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh_cast import room  # noqa: E402

from concerto_ray.data import s3dis_raw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    vertices, faces = room()
    rng = np.random.default_rng(0)
    corners = vertices[faces[rng.integers(0, len(faces), args.points)]].astype(np.float64)
    weights = rng.dirichlet(np.ones(3), args.points)[:, :, None]
    points = (weights * corners).sum(axis=1) + rng.normal(0, 0.005, (args.points, 3))
    times: dict[str, list[float]] = {"read_room_points": [], "read_obj": [], "crop": [], "nearest_face_normals": []}
    with tempfile.TemporaryDirectory() as tmp:
        room_dir, obj = Path(tmp) / "Area_1" / "office_1", Path(tmp) / "area_1" / "3d" / "rgb.obj"
        (room_dir / "Annotations").mkdir(parents=True)
        obj.parent.mkdir(parents=True)
        colors = rng.integers(0, 256, (args.points, 3))
        np.savetxt(room_dir / "Annotations" / "clutter_1.txt", np.column_stack([points, colors]),
                   fmt="%.3f %.3f %.3f %d %d %d")  # fmt: skip
        mesh = np.column_stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]])  # z-up -> the meshes' y-up
        lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh] + [f"f {a} {b} {c}" for a, b, c in faces + 1]
        obj.write_text("\n".join(lines) + "\n")
        for _ in range(args.repeats):
            start = time.perf_counter()
            coord = s3dis_raw.read_room_points(room_dir)["coord"]
            times["read_room_points"].append(time.perf_counter() - start)
            s3dis_raw.area_mesh.cache_clear()
            start = time.perf_counter()
            s3dis_raw.area_mesh(Path(tmp), "Area_1")
            times["read_obj"].append(time.perf_counter() - start)
            start = time.perf_counter()
            room_vertices, room_faces = s3dis_raw.room_mesh(Path(tmp), "Area_1", coord)
            times["crop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            s3dis_raw.nearest_face_normals(room_vertices, room_faces, coord)
            times["nearest_face_normals"].append(time.perf_counter() - start)
    result = {
        "points": args.points,
        "vertices": len(vertices),
        "faces": len(faces),
        "seconds": {k: [min(v), statistics.median(v), max(v)] for k, v in times.items()},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
