"""`concerto-ray embed` and `viz`: per-point features of every scene on a real local Ray, checked against a direct
forward of the backbone; checkpoint layouts; resuming; bad scenes; the PNG pictures; the MLflow picture hook."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from concerto_ray.cli import main
from concerto_ray.config import to_dict
from concerto_ray.data import storage
from concerto_ray.data.layout import list_scenes, read_sample
from concerto_ray.data.record import decode_record
from concerto_ray.data.shards import prepare, read_manifest
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.embed import (
    EmbedConfig,
    load_backbone_spec,
    preprocess,
    read_scene_features,
    run_embed,
    scene_features,
    scene_path,
    scene_rng,
    scene_table,
    write_atomically,
)
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.model.checkpoint import ray_to_pointcept
from concerto_ray.model.configs import get_model_config
from concerto_ray.model.sonata import Sonata
from concerto_ray.train.state import save_model
from concerto_ray.viz import FeatureImages, images_from_checkpoint, pca_colors

MODEL = "tiny-sonata"
UP_CAST_LEVELS = 2  # tiny-sonata's up_cast_level


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three synthetic scenes (two train, one val) as shards, with their decoded scenes by name."""
    root = tmp_path_factory.mktemp("embed")
    write_synthetic_dataset(
        root / "scenes",
        SynthConfig(
            scenes=3,
            points_per_scene=1500,
            views_per_scene=1,
            image_width=32,
            image_height=24,
            splits={"train": 0.67, "val": 0.33},
        ),
        progress=False,
    )
    prepare(root / "scenes", str(root / "shards"), progress=False)
    # one feature file per scene folder (the split files list two frame groups per scene)
    scenes = {f.name: decode_record(read_sample(f, "synth"), with_frames=False) for f in list_scenes(root / "scenes")}
    return root, scenes


@pytest.fixture(scope="module")
def sonata():
    torch.manual_seed(0)
    return Sonata(get_model_config(MODEL))


@pytest.fixture(scope="module")
def checkpoint(data, sonata):
    """A concerto-ray pre-training checkpoint (student / teacher / heads, no `module.` prefix)."""
    path = data[0] / "model.pt"
    torch.save({"state_dict": sonata.state_dict()}, path)
    return path


def reference_features(backbone, scene: dict) -> np.ndarray:
    """The reference demo's steps written out: forward, concatenate 2 coarser levels, copy down to the grid-sampled
    points, then through the grid sampling's inverse to every input point."""
    sample = preprocess(scene, 0.02, scene_rng(0, scene["name"]))
    backbone.eval()
    backbone.set_order_shuffling(False)
    with torch.no_grad():
        point = backbone(
            {
                "feat": torch.from_numpy(sample["feat"]),
                "grid_coord": torch.from_numpy(sample["grid_coord"]),
                "offset": torch.tensor([len(sample["feat"])]),
            }
        )
        for _ in range(UP_CAST_LEVELS):
            parent = point.pop("pooling_parent")
            parent.feat = torch.cat([parent.feat, point.feat[point.pop("pooling_inverse")]], dim=-1)
            point = parent
        while "pooling_parent" in point:
            parent = point.pop("pooling_parent")
            parent.feat = point.feat[point.pop("pooling_inverse")]
            point = parent
    return point.feat[torch.from_numpy(sample["inverse"])].numpy()


def test_preprocess_reads_the_named_inputs_only_and_invents_none():
    rng = np.random.default_rng(0)
    scene = {"name": "s", "coord": rng.random((500, 3)).astype(np.float32), "color": rng.random((500, 3)) * 255}
    with pytest.raises(DataError, match=r"sample 's', field 'normal': the scene has no normal.npy"):
        preprocess(scene, 0.02, scene_rng(0, "s"))  # the default inputs include normals
    sample = preprocess(scene, 0.02, scene_rng(0, "s"), feat_keys=("coord", "color"))
    normal = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (500, 1))
    full = preprocess({**scene, "normal": normal}, 0.02, scene_rng(0, "s"))
    assert sample["feat"].shape[1] == 6
    np.testing.assert_array_equal(sample["feat"], full["feat"][:, :6])


def _files(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in sorted(out.rglob("*.parquet"))}


def test_embed_writes_every_point_as_a_direct_forward(ray_local, data, sonata, checkpoint, tmp_path):
    root, scenes = data
    out = tmp_path / "features"
    config = EmbedConfig(checkpoint=str(checkpoint), shards=str(root / "shards"), out=str(out), model=MODEL)
    summary = run_embed(config, progress=False)
    assert (summary.embedded, summary.already_done, summary.channels) == (3, 0, 16 + 16 + 32)
    assert summary.points == sum(len(s["coord"]) for s in scenes.values())
    manifest = read_manifest(root / "shards")
    expected = sorted(  # one file per scene folder
        f"{split}/{name}.parquet"
        for split, info in manifest.scenes.items()
        for shard in info.shards
        for name in shard.samples
    )
    assert sorted(_files(out)) == expected and len(expected) == 3

    backbone = sonata.student["backbone"]
    for name, scene in scenes.items():
        written_name, coord, feat = read_scene_features(str(out), name)
        assert written_name == name and feat.dtype == np.float16 and feat.shape == (len(scene["coord"]), 64)
        np.testing.assert_array_equal(coord, scene["coord"])  # every input point, in input order
        reference = reference_features(backbone, scene)
        np.testing.assert_allclose(feat.astype(np.float32), reference, rtol=2**-10, atol=1e-6)
        # The features are those of the level 2 poolings up (8 cm cells of the 2 cm grid of the centred scene)
        # copied down: the points of one cell share a feature, different cells differ.
        coord = scene["coord"]
        low, high = coord.min(axis=0), coord.max(axis=0)
        centred = coord - np.array([(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, low[2]], dtype=coord.dtype)
        grid = np.floor(centred / np.float32(0.02)).astype(np.int64)
        cells = np.unique((grid - grid.min(axis=0)) // 4, axis=0)
        assert len(np.unique(feat, axis=0)) == len(cells)
    table = pq.read_table(out / expected[0])
    assert table.column_names == ["scene", "coord", "feat"]

    # A finished run reads nothing and writes nothing (a partly finished one: see the bad-scene test).
    before = _files(out)
    summary = run_embed(config, progress=False)
    assert (summary.embedded, summary.already_done) == (0, 3) and _files(out) == before
    assert not list(out.rglob("*.tmp"))
    # Features of other settings never mix into the same folder.
    with pytest.raises(ConfigError, match="other settings"):
        run_embed(
            EmbedConfig(
                checkpoint=str(checkpoint), shards=str(root / "shards"), out=str(out), model=MODEL, grid_size=0.05
            ),
            progress=False,
        )


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_checkpoint_layouts_load_the_same_backbone(data, sonata, checkpoint, tmp_path):
    expected = _state(sonata.student["backbone"])

    def loads(state: dict, model: str | None = MODEL, **extra) -> dict:
        path = tmp_path / f"ckpt-{len(list(tmp_path.iterdir()))}.pth"
        torch.save({"state_dict": state, **extra}, path)
        return load_backbone_spec(str(path), model).build().state_dict()

    def same(found: dict) -> bool:
        return found.keys() == expected.keys() and all(torch.equal(found[k], expected[k]) for k in expected)

    assert same(load_backbone_spec(str(checkpoint), MODEL).build().state_dict())  # concerto-ray
    assert same(loads(ray_to_pointcept(sonata.state_dict())))  # Pointcept's module.student.backbone.*
    fine_tuned = {f"module.backbone.{k}": v for k, v in expected.items() if k != "embedding.mask_token"}
    fine_tuned["module.seg_head.weight"] = torch.zeros(20, 64)
    found = loads(fine_tuned)  # a Pointcept fine-tuning model: no mask token, which inference does not use
    assert all(torch.equal(found[k], expected[k]) for k in expected if k != "embedding.mask_token")
    # The reference's released inference files: backbone weights without prefix and the backbone's own config.
    spec_config = to_dict(get_model_config(MODEL).backbone)
    assert same(loads(expected, model=None, config=spec_config))
    # Pre-training's model.pt names its model config: no --model needed.
    save_model(sonata, tmp_path / "named.pt", MODEL)
    assert same(load_backbone_spec(str(tmp_path / "named.pt")).build().state_dict())

    with pytest.raises(ConfigError, match="holds no backbone config; name the model"):
        loads(expected, model=None)
    broken = dict(sonata.state_dict())
    broken.pop("student.backbone.enc.enc0.block0.attn.qkv.weight")
    with pytest.raises(ConfigError, match=r"1 missing \['enc.enc0.block0.attn.qkv.weight'\]"):
        loads(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_backbone_spec(str(tmp_path / "absent.pth"), MODEL)
    with pytest.raises(ConfigError, match=r"reads 9 input channels; feat_keys \['coord', 'normal'\] make 6"):
        load_backbone_spec(str(checkpoint), MODEL, feat_keys=("coord", "normal"))


def _corrupt_scene(shards: Path, split: str) -> str:
    """NaN coordinates in the first scene of a split's first shard (as storage corruption would), re-sealed in the
    manifest so that only decoding finds it."""
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = manifest["scenes"][split]["shards"][0]  # the scene folders, which embed reads
    path = shards / shard["path"]
    table = pq.read_table(path)
    rows = table.to_pylist()
    index = rows[0]["point_asset_names"].index("coord")
    coord = np.load(io.BytesIO(rows[0]["point_asset_npy"][index]))
    coord[3] = np.nan
    buffer = io.BytesIO()
    np.save(buffer, coord)
    rows[0]["point_asset_npy"][index] = buffer.getvalue()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path, row_group_size=1)
    shard["bytes"], shard["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    return rows[0]["name"]


def test_bad_scene_is_skipped_or_stops_the_run_and_finished_scenes_are_not_redone(
    ray_local, s3_server, data, checkpoint, tmp_path, capsys
):
    root, scenes = data
    shards = tmp_path / "shards"
    prepare(root / "scenes", str(shards), progress=False)
    bad = _corrupt_scene(shards, "train")
    prefix = f"features-{tmp_path.name}"
    out = f"s3://{s3_server.bucket}/{prefix}"
    argv = ["embed", "--checkpoint", str(checkpoint), "--model", MODEL, "--shards", str(shards), "--out", out]
    assert main([*argv, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "embedded 2 scenes" in printed and "skipped 1 bad scenes" in printed and f"train/{bad}:" in printed
    good = sorted(set(scenes) - {bad})
    for name in good:
        assert read_scene_features(out, name)[2].shape == (len(scenes[name]["coord"]), 64)
    with pytest.raises(DataError, match="no feature file"):
        read_scene_features(out, bad)

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)

    def objects():
        listed = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)["Contents"]
        return {o["Key"]: o["LastModified"] for o in listed if o["Key"].endswith(".parquet")}

    written = objects()
    time.sleep(1)  # S3 times have a resolution of one second: a rewrite would show
    # Without --skip-bad, the rerun has only the bad scene left to do, and stops at it with its name.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sample 'train/{bad}'" in err and "NaN/inf coordinates" in err and "--skip-bad" in err
    assert "Traceback" not in err
    assert objects() == written and len(written) == 2


def _colourful_pixels(png: Path, width_share: float = 1.0) -> tuple[int, float]:
    """Distinct saturated colours (not white, grey or black) in the left `width_share` of the image, and the
    pixel standard deviation."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    image = image[:, : int(image.shape[1] * width_share)]
    saturated = image[(image.max(axis=2) - image.min(axis=2)) > 40]
    return len(np.unique(saturated, axis=0)), float(image.std())


def test_viz_pictures_from_features_and_from_a_checkpoint(data, checkpoint, tmp_path, capsys):
    root, scenes = data
    name = sorted(scenes)[0]
    # From a features folder written the way `embed` writes it (the Ray path is tested above).
    spec = load_backbone_spec(str(checkpoint), MODEL)
    feat = scene_features(spec.build(), scenes[name], spec.up_cast_levels)
    write_atomically(
        storage.resolve(tmp_path / "features"),
        scene_path("train", name),
        scene_table(name, scenes[name]["coord"], feat.astype(np.float16)),
    )
    assert main(["viz", "--features", str(tmp_path / "features"), "--out", str(tmp_path / "a"), "--view", "top"]) == 0
    assert "pca.png" in capsys.readouterr().out
    images = images_from_checkpoint(str(checkpoint), str(root / "shards"), tmp_path / "b", model=MODEL, scene=name)
    for folder in (tmp_path / "a", tmp_path / "b"):
        colours, spread = _colourful_pixels(folder / "pca.png")
        assert colours > 200 and spread > 10
        # left of the colour bar: the points themselves are coloured by similarity
        assert _colourful_pixels(folder / "similarity.png", width_share=0.7)[0] > 50
    assert images["pca"] == tmp_path / "b" / "pca.png"
    # PCA colours follow the features: identical features, identical colours; every channel spans its range
    colors = pca_colors(np.concatenate([feat, feat[:10]]))
    np.testing.assert_array_equal(colors[-10:], colors[:10])
    assert (colors.min(axis=0) == 0).all() and (colors.max(axis=0) == 1).all()


def test_feature_image_of_a_fixed_scene_goes_to_mlflow(data, sonata, tmp_path):
    root, scenes = data
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("viz")).info.run_id
    backbone = sonata.student["backbone"]
    backbone.train()
    backbone.set_order_shuffling(True)
    images = FeatureImages(str(root / "shards"), "train", up_cast_levels=UP_CAST_LEVELS)
    for round_index in (1, 2):
        images.log(client, run_id, backbone, f"eval/round-{round_index:04d}")
    first = min(name for name in scenes if scenes[name]["split"] == "train")
    assert images.scene["name"] == first
    np.testing.assert_array_equal(images.scene["coord"], scenes[first]["coord"])
    for round_index in (1, 2):
        folder = f"eval/round-{round_index:04d}"
        assert [f.path for f in client.list_artifacts(run_id, folder)] == [f"{folder}/pca.png"]
    png = Path(client.download_artifacts(run_id, "eval/round-0002/pca.png", str(tmp_path)))
    assert _colourful_pixels(png)[0] > 200
    # the training state of the backbone is left as it was
    assert backbone.training and backbone.shuffle_orders
