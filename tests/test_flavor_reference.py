"""Our scene listing and loader against what Pointcept's own segmentation dataset classes gave on the same files.

tests/data/flavor_reference.npz holds small scene folders of every segmentation flavour and the reference classes'
output for them (ScanNetDataset, ScanNet200Dataset, ScanNetPPDataset, S3DISDataset, HM3DDataset,
Structured3DDataset), written once by tests/data/make_flavor_reference.py from a Pointcept checkout. So CI checks
against the reference's code, not against our own reading of it.
"""

from pathlib import Path

import numpy as np
import pytest

from concerto_ray.data.flavors import flavor
from concerto_ray.data.layout import list_scenes, read_sample
from concerto_ray.data.record import decode_record

REFERENCE = Path(__file__).resolve().parent / "data" / "flavor_reference.npz"
FLAVOURS = ("scannet", "scannet200", "scannetpp", "s3dis", "hm3d", "structured3d")


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as arrays:
        return dict(arrays)


@pytest.mark.parametrize("name", FLAVOURS)
def test_scenes_and_arrays_equal_the_reference_classes(reference, tmp_path, name):
    for key, array in reference.items():
        if key.startswith(f"{name}/in/"):
            path = tmp_path / (key.removeprefix(f"{name}/in/") + ".npy")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, array)
    count = len({key.split("/")[2] for key in reference if key.startswith(f"{name}/out/")})
    expected = [reference[f"{name}/out/{i}/{k}"] for i in range(count) for k in ("split", "name")]
    ours = sorted(list_scenes(tmp_path, dataset=name), key=lambda s: (s.split, s.name))
    assert [v for s in ours for v in (s.split, s.name)] == [str(v) for v in expected] and ours
    for i, files in enumerate(ours):
        data = decode_record(read_sample(files, name), segment_asset=flavor(name).label_asset, with_frames=False)
        for key in ("coord", "color", "normal", "segment", "instance"):
            theirs = reference[f"{name}/out/{i}/{key}"]
            assert data[key].dtype == theirs.dtype and np.array_equal(data[key], theirs), (name, files.name, key)
