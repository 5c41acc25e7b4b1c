"""Write tests/data/s3dis_raw_reference.npz: what Pointcept's own Concerto S3DIS preprocessing writes for the raw
fixture of tests/s3dis_raw_fixture.py. `tests/test_s3dis_raw.py` checks `ingest --adapter s3dis` against these
arrays in CI, where neither Pointcept nor Open3D exists.

Run once, read-only, from an extracted Pointcept tree (`git archive HEAD pointcept | tar -x -C DIR`), with a Python
that has the reference's preprocessing stack (open3d, camtools, trimesh with rtree, scipy, pillow, numpy < 2.3) and
pyyaml and tqdm (the fixture borrows a camera helper from this package):

    cd DIR && PYTHONPATH=/path/to/repo PYTHON_WITH_OPEN3D /path/to/repo/tests/data/make_s3dis_raw_reference.py

It runs `preprocess_s3dis.py` as its shell script does (normals, point clouds and depths on; no alignment angle),
once more with `--align_angle` (its coord and normal arrays stored under "aligned/"), and `splits.get_splits_paths`
on the first result. The npz keys: "<path below the output root>" for every .npy file, "splits/<area>.json" as a
0-d string array, and "copied" (0-d string: the JSON list of the colour and depth files written). The copies are
checked here to equal their sources byte for byte, the rule the test applies to ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from s3dis_raw_fixture import ANGLES, write_raw_s3dis  # noqa: E402

SCRIPTS = Path("pointcept/datasets/preprocessing/concerto/s3dis")
sys.path.insert(0, str(SCRIPTS))
import splits as reference_splits  # noqa: E402


def preprocess(src: Path, frames: Path, out: Path, *flags: str) -> None:
    command = [sys.executable, str(SCRIPTS / "preprocess_s3dis.py"), "--splits", *ANGLES, "--dataset_root", str(src),
               "--output_root", str(out), "--raw_root", str(frames), "--parse_normal", "--parse_pointclouds",
               "--parse_depths", *flags]  # fmt: skip
    subprocess.run(command, check=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, frames = write_raw_s3dis(Path(tmp) / "raw")
        out, aligned = Path(tmp) / "out", Path(tmp) / "aligned"
        preprocess(src, frames, out)
        preprocess(src, frames, aligned, "--align_angle")
        for k in range(1, 7):  # splits.py lists every area's image folder
            (out / "images" / f"Area_{k}").mkdir(parents=True, exist_ok=True)
        reference_splits.get_splits_paths(str(out))
        arrays, copied = {}, []
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out).as_posix()
            if path.suffix == ".npy":
                arrays[rel] = np.load(path)
            elif path.suffix == ".json" and path.stem in ANGLES:
                arrays[rel] = np.array(path.read_text())
            elif path.suffix == ".png":
                kind = "rgb" if "/color/" in rel else "depth"
                area = rel.split("/")[1].lower()  # images/Area_<k>/...: area_<k>, or area_5a / area_5b
                source = next(frames.glob(f"{area}*/data/{kind}/{path.name}"))
                assert path.read_bytes() == source.read_bytes(), rel
                copied.append(rel)
        for path in sorted(aligned.glob("Area_*/*/*.npy")):
            if path.stem in ("coord", "normal"):
                arrays[f"aligned/{path.relative_to(aligned).as_posix()}"] = np.load(path)
        arrays["copied"] = np.array(json.dumps(copied))
        np.savez_compressed(HERE / "s3dis_raw_reference.npz", **arrays)
        print(f"wrote {len(arrays)} arrays to {HERE / 's3dis_raw_reference.npz'}")


if __name__ == "__main__":
    main()
