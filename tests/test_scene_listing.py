"""Segmentation and `embed` read the scenes Pointcept's segmentation datasets list, from the shards pre-training reads.

A root as Pointcept's Concerto preprocessing writes it has split files whose entries are groups of 4 frames
(`<scene>_<k>`), several per scene; the segmentation datasets list the scene folders of ROOT/<split>/ instead, one
sample per scene (pointcept/datasets/defaults.py `get_data_list`, s3dis.py `get_data_name`: "<area>-<room>").
"""

import json
from pathlib import Path

import numpy as np
import pytest

from concerto_ray.cli import main
from concerto_ray.data.layout import list_samples, list_scenes
from concerto_ray.data.pipeline import DRAW_COLUMN, EPOCH_COLUMN, SOURCE_COLUMN, SampleTransform, StreamConfig
from concerto_ray.data.shards import prepare, read_manifest
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.run_config import load_finetune_run, plan_finetune


@pytest.fixture(scope="module")
def concerto_root(tmp_path_factory) -> Path:
    """4 ScanNet scenes of 8 frames: two frame groups per scene in the split files."""
    config = SynthConfig(
        scenes=4,
        seed=3,
        points_per_scene=300,
        views_per_scene=8,
        image_width=16,
        image_height=16,
        splits={"train": 0.5, "val": 0.5},
    )
    return write_synthetic_dataset(tmp_path_factory.mktemp("concerto-root") / "scannet", config, progress=False)


@pytest.fixture(scope="module")
def shards(concerto_root, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("scene-shards") / "scannet"
    prepare(concerto_root, str(dest), progress=False)
    return dest


def _folders(root: Path, split: str) -> list[str]:
    return sorted(p.name for p in (root / split).iterdir() if p.is_dir())


def _run(shards: Path, tmp_path: Path, **overrides):
    values = {"data.shards": str(shards), "run.name": "scenes", "run.storage_path": str(tmp_path / "runs")}
    return load_finetune_run("semseg-tiny-lin", {**values, "train_split": ["train"], "val_split": ["val"], **overrides})


def test_finetuning_trains_and_validates_on_the_scene_folders(concerto_root, shards, tmp_path):
    entries = json.loads((concerto_root / "splits" / "train.json").read_text())
    assert len(entries) == 2 * len(_folders(concerto_root, "train"))  # the split file lists frame groups
    plan = plan_finetune(_run(shards, tmp_path))
    assert plan.train_scenes == _folders(concerto_root, "train") and plan.val_scenes == _folders(concerto_root, "val")
    assert plan.round.samples == 2  # a round is one pass over the scenes, not over the frame groups
    # Pre-training still reads the frame groups of the same shards: one prepare serves both.
    manifest = read_manifest(shards)
    assert [n for s in manifest.splits["train"].shards for n in s.samples] == sorted(entries)
    assert [n for s in manifest.scenes["train"].shards for n in s.samples] == _folders(concerto_root, "train")


def test_a_reference_scene_list_file_names_scene_folders(concerto_root, shards, tmp_path):
    scene = _folders(concerto_root, "train")[1]
    listed = tmp_path / "1.txt"
    listed.write_text(f"{scene}\n")
    plan = plan_finetune(_run(shards, tmp_path, **{"data_efficiency.scene_list_file": str(listed)}))
    assert plan.train_scenes == [scene] and plan.limited_scenes


def test_shards_from_before_the_scene_listing_ask_for_a_new_prepare(shards, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["scenes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="run `concerto-ray prepare` again"):
        plan_finetune(_run(old, tmp_path))


def test_s3dis_rooms_are_named_after_area_and_room(tmp_path):
    # Rooms such as office_1 recur in every area; S3DISDataset names them "<area>-<room>".
    cloud = np.zeros((4, 3), dtype=np.float32)
    for area in ("Area_1", "Area_2"):
        (tmp_path / area / "office_1").mkdir(parents=True)
        np.save(tmp_path / area / "office_1" / "coord.npy", cloud)
    names = [(s.split, s.name) for s in list_scenes(tmp_path, dataset="s3dis")]
    assert names == [("Area_1", "Area_1-office_1"), ("Area_2", "Area_2-office_1")]
    assert [s.name for s in list_samples(tmp_path, dataset="s3dis")] == ["Area_1-office_1", "Area_2-office_1"]
    assert [s.name for s in list_scenes(tmp_path)] == ["office_1", "office_1"]  # another dataset: folder names


def test_samples_of_one_name_in_two_splits_draw_differently():
    transform = SampleTransform(StreamConfig(shards="unused", mode="semseg_train", seed=0))
    row = {"name": "office_1", EPOCH_COLUMN: 0, SOURCE_COLUMN: "s3dis", DRAW_COLUMN: 0}
    draws = [transform.rng({**row, "split": split}).random(4) for split in ("Area_1", "Area_2", "Area_1")]
    assert not np.array_equal(draws[0], draws[1]) and np.array_equal(draws[0], draws[2])


@pytest.mark.parametrize("mode, samples", [("pretrain", 4), ("semseg_train", 2), ("semseg_val", 2)])
def test_stream_inspects_every_mode(ray_local, shards, capsys, mode, samples):
    # Pre-training streams the training split's 4 frame groups; segmentation its 2 scenes.
    assert main(["stream", str(shards), "--mode", mode, "--splits", "train", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert f"streamed {samples} samples in {samples} batches" in out and "no bad samples" in out
