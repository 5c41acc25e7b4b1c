"""Write tests/data/flavor_reference.npz: small scene folders of every segmentation flavour and what Pointcept's own
dataset classes list and return for them. `tests/test_flavor_reference.py` checks our loader against these arrays in
CI, where no Pointcept checkout exists.

Run once, read-only beside an extracted Pointcept tree (`git archive HEAD pointcept configs | tar -x -C DIR`):

    PYTHONPATH=. python tests/data/make_flavor_reference.py DIR

The scene folders hold random arrays of the shapes and dtypes each flavour's preprocessing writes (flavors.py);
S3DIS has a room name in two areas, Structured3D nests rooms in scenes, HM3D has a scene without labels (which its
class leaves out). The npz keys: "<flavour>/in/<path below the root>/<asset>" for the files and
"<flavour>/out/<i>/<key>" for the i-th item of the reference class in its listing's order (`name` and `split` as
0-d string arrays).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "flavor_reference.npz"
POINTS = 12

# flavour: (Pointcept module, class, splits, {scene folder: label arrays})
LABELS = {
    "scannet": {"segment20": ((), np.int64, 20), "segment200": ((), np.int64, 200), "instance": ((), np.int64, 5)},
    "scannetpp": {"segment": ((3,), np.int16, 100), "instance": ((3,), np.int16, 5)},
    "s3dis": {"segment": ((1,), np.int16, 13), "instance": ((1,), np.int16, 5)},
    "hm3d": {"segment": ((), np.int16, 40)},
    "structured3d": {"segment": ((1,), np.int16, 25), "instance": ((1,), np.int16, 5)},
}
LABELS["scannet200"] = LABELS["scannet"]
FOLDERS = {
    "scannet": {"train": ["scene0000_00", "scene0000_01"], "val": ["scene0100_00"]},
    "scannetpp": {"train": ["0a5c013435", "1ada7a0617"], "val": ["0d2ee665be"]},
    "s3dis": {"Area_1": ["office_1", "hallway_1"], "Area_2": ["office_1"]},
    "hm3d": {"train": ["00000-kfPV7w3FaU5", "00001-UVdNNRcVyV1"], "val": ["00800-TEEsavR23oF"]},
    "structured3d": {"train": ["scene_00000/room_485142", "scene_00000/room_485143"], "val": ["scene_03000/room_1"]},
}
FOLDERS["scannet200"] = FOLDERS["scannet"]
UNLABELLED = {("hm3d", "00001-UVdNNRcVyV1")}  # HM3DDataset (force_label) lists only folders with segment.npy


def scene_files(flavour: str, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    files = {}
    for split, folders in FOLDERS[flavour].items():
        for folder in folders:
            arrays = {
                "coord": rng.normal(size=(POINTS, 3)).astype(np.float32),
                "color": rng.integers(0, 256, size=(POINTS, 3)).astype(np.uint8),
                "normal": rng.normal(size=(POINTS, 3)).astype(np.float32),
            }
            if (flavour, folder) not in UNLABELLED:
                for asset, (columns, dtype, classes) in LABELS[flavour].items():
                    arrays[asset] = rng.integers(-1, classes, size=(POINTS, *columns)).astype(dtype)
            files[f"{split}/{folder}"] = arrays
    return files


def main(checkout: Path) -> None:
    sys.path[:0] = [str(HERE.parent.parent / "benchmarks"), str(HERE.parent)]
    from _reference_shim import _install_stand_ins
    from test_flavors import REFERENCE_CLASSES

    _install_stand_ins(checkout)
    rng = np.random.default_rng(0)
    payload: dict[str, np.ndarray] = {}
    for flavour, (module, cls) in REFERENCE_CLASSES.items():
        files = scene_files(flavour, rng)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for folder, arrays in files.items():
                (root / folder).mkdir(parents=True)
                for asset, array in arrays.items():
                    np.save(root / folder / f"{asset}.npy", array)
                    payload[f"{flavour}/in/{folder}/{asset}"] = array
            dataset_class = getattr(importlib.import_module(f"pointcept.datasets.{module}"), cls)
            reference = dataset_class(split=list(FOLDERS[flavour]), data_root=str(root))
            # The split is the path's first folder below the root. glob's order is the file system's: the items are
            # sorted by (split, name) here, as the test compares them.
            items = sorted(
                (
                    (Path(reference.data_list[i]).relative_to(root).parts[0], reference.get_data(i))
                    for i in range(len(reference.data_list))
                ),
                key=lambda item: (item[0], str(item[1]["name"])),
            )
            for i, (split, item) in enumerate(items):
                for key in ("coord", "color", "normal", "segment", "instance"):
                    payload[f"{flavour}/out/{i}/{key}"] = item[key]
                payload[f"{flavour}/out/{i}/name"] = np.array(str(item["name"]))
                payload[f"{flavour}/out/{i}/split"] = np.array(split)
            print(f"{flavour}: {cls} listed {len(items)} scenes: {[(s, str(d['name'])) for s, d in items]}")
    np.savez_compressed(OUT, **payload)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
