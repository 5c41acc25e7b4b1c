"""Write tests/data/scannet_raw_reference.npz: what Pointcept's own Concerto ScanNet preprocessing writes for the raw
fixture of tests/scannet_raw_fixture.py. `tests/test_scannet_raw.py` checks `ingest --adapter scannet` against
these arrays in CI, where neither Pointcept nor Open3D exists.

Run once, read-only, from an extracted Pointcept tree (`git archive HEAD pointcept | tar -x -C DIR`), with a Python
that has the reference's preprocessing stack (open3d, camtools, opencv-python-headless, plyfile, imageio, pandas,
scipy, numpy < 2.3) and pyyaml and tqdm (the fixture borrows a camera helper from this package):

    cd DIR && PYTHONPATH=/path/to/repo PYTHON_WITH_OPEN3D /path/to/repo/tests/data/make_scannet_raw_reference.py

It runs `preprocess_scannet.handle_process` on every fixture scene (point clouds, normals, depth frames on, the
fixture's frame gap) and `splits.get_splits_paths` on the result. The npz keys: "<path below the output root>" for
every .npy file and depth PNG, and "splits/<split>.json" as a 0-d string array. Colour PNGs are not stored (the
fixture's JPEG bytes depend on the Pillow that writes them); instead this script asserts that each one equals
Pillow's decoding of its frame's JPEG, the rule the test applies to ours.
"""

from __future__ import annotations

import glob
import io
import os
import sys
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from scannet_raw_fixture import FRAME_SKIP, write_raw_scannet  # noqa: E402

sys.path.insert(0, "pointcept/datasets/preprocessing/concerto/scannet")
import preprocess_scannet as reference  # noqa: E402
import splits as reference_splits  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        write_raw_scannet(raw)
        labels = pd.read_csv(raw / "scannetv2-labels.combined.tsv", sep="\t", header=0)
        train = (raw / "scannetv2_train.txt").read_text().splitlines()
        val = (raw / "scannetv2_val.txt").read_text().splitlines()
        for scene_path in sorted(glob.glob(f"{raw}/scans*/scene*")):
            reference.handle_process(scene_path, str(out), str(out), labels, train, val, FRAME_SKIP, True, True, True)
            check_colours(Path(scene_path), out)
        reference_splits.get_splits_paths(str(out))
        arrays = {}
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out).as_posix()
            if path.suffix == ".npy":
                arrays[rel] = np.load(path)
            elif path.suffix == ".png" and "/depth/" in rel:
                arrays[rel] = imageio.imread(path)
            elif path.suffix == ".json":
                arrays[rel] = np.array(path.read_text())
        np.savez_compressed(HERE / "scannet_raw_reference.npz", **arrays)
        print(f"wrote {len(arrays)} arrays to {HERE / 'scannet_raw_reference.npz'}")


def check_colours(scene_path: Path, out: Path) -> None:
    sens = reference.SensorData(str(scene_path / f"{scene_path.name}.sens"))
    for png in glob.glob(f"{out}/images/*/{scene_path.name}/color/*.png"):
        frame = sens.frames[int(os.path.basename(png).split(".")[0])]
        pillow = np.asarray(Image.open(io.BytesIO(frame.color_data)).convert("RGB"))
        assert np.array_equal(imageio.imread(png), pillow), png


if __name__ == "__main__":
    main()
