import colorsys

import numpy as np
import pytest
import torch

from concerto_ray.config import from_dict
from concerto_ray.data.collate import collate_concerto, collate_semseg
from concerto_ray.data.presets import (
    ConcertoPretrainTransformConfig,
    SemsegTransformConfig,
    semseg_test_augmentations,
    semseg_test_fragments,
    semseg_train_transform,
    semseg_val_transform,
)
from concerto_ray.data.transforms import (
    CenterShift,
    ChromaticAutoContrast,
    ElasticDistortion,
    GridSample,
    RandomColorJitter,
    RandomDropColor,
    RandomDropNormal,
    RandomDropout,
    RandomFlip,
    RandomRotate,
    SphereCrop,
    _adjust_hue,
    _hsv_to_rgb,
    _rgb_to_hsv,
)
from concerto_ray.errors import ConfigError, DataError


def make_scene(n=3000, seed=0, normal=True):
    rng = np.random.default_rng(seed)
    data = {
        "name": f"scene{seed}",
        "coord": (rng.random((n, 3)) * [2.0, 1.5, 1.0] + [5.0, -3.0, 0.7]).astype(np.float32),
        "color": (rng.random((n, 3)) * 255).astype(np.float32),
        "segment": np.arange(n, dtype=np.int32),  # the point's own index: shows whether arrays stay aligned
        "instance": np.arange(n, dtype=np.int32) % 7,
    }
    if normal:
        v = rng.standard_normal((n, 3))
        data["normal"] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return data


def read_only(data):
    for value in data.values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return data


def voxel_ids(coord, grid_size):
    return {tuple(v) for v in np.floor(coord / grid_size).astype(np.int64)}


def test_grid_sample_train_keeps_one_point_per_voxel_and_inverse_finds_it():
    data = make_scene()
    grid = 0.1
    out = GridSample(grid, return_grid_coord=True, return_inverse=True)(data, np.random.default_rng(1))
    voxels = np.floor(data["coord"] / grid).astype(np.int64)
    kept_voxels = np.floor(out["coord"] / grid).astype(np.int64)
    assert len(out["coord"]) == len(voxel_ids(data["coord"], grid)) < len(data["coord"])
    assert len({tuple(v) for v in kept_voxels}) == len(kept_voxels)  # no voxel twice
    # every kept row is an original point with all of its fields (segment holds the original index)
    np.testing.assert_array_equal(out["coord"], data["coord"][out["segment"]])
    np.testing.assert_array_equal(out["normal"], data["normal"][out["segment"]])
    np.testing.assert_array_equal(out["grid_coord"], kept_voxels - voxels.min(axis=0))
    # inverse: each input point -> the kept point of its own voxel
    np.testing.assert_array_equal(kept_voxels[out["inverse"]], voxels)


def test_grid_sample_fragments_hold_every_voxel_once_and_cover_every_point():
    data = make_scene()
    fragments = GridSample(0.1, return_grid_coord=True).fragments(data)
    voxels = np.floor(data["coord"] / 0.1).astype(np.int64)
    per_voxel = np.unique(voxels, axis=0, return_counts=True)[1]
    assert len(fragments) == per_voxel.max() > 1
    for fragment in fragments:
        assert len(fragment["coord"]) == len(per_voxel)  # one point of every voxel
        assert len(voxel_ids(fragment["coord"], 0.1)) == len(per_voxel)
        np.testing.assert_array_equal(fragment["segment"], fragment["index"])
    # smaller voxels repeat their points (as in Pointcept), so every point appears at least once
    covered = np.concatenate([f["index"] for f in fragments])
    np.testing.assert_array_equal(np.unique(covered), np.arange(len(data["coord"])))


def test_geometry_transforms():
    data = make_scene()
    shifted = CenterShift(apply_z=True)(data, None)["coord"]
    np.testing.assert_allclose(shifted.min(0)[:2], -shifted.max(0)[:2], atol=1e-5)
    assert abs(shifted[:, 2].min()) < 1e-6

    rotated = RandomRotate((0.5, 0.5), "z", (0.0, 0.0, 0.0), p=1.0)(data, np.random.default_rng(0))
    np.testing.assert_allclose(rotated["coord"][:, 0], -data["coord"][:, 1], atol=1e-5)  # +90 deg about z
    np.testing.assert_allclose(rotated["normal"][:, 1], data["normal"][:, 0], atol=1e-6)

    flipped = RandomFlip(p=1.0)(data, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped["coord"][:, :2], -data["coord"][:, :2])
    np.testing.assert_array_equal(flipped["normal"][:, 2], data["normal"][:, 2])

    dropped = RandomDropout(0.2, 1.0)(data, np.random.default_rng(0))
    assert len(dropped["coord"]) == int(len(data["coord"]) * 0.8)
    np.testing.assert_array_equal(dropped["color"], data["color"][dropped["segment"]])


def test_semseg_train_sample_and_collate():
    cfg = SemsegTransformConfig(grid_size=0.05, point_max=1000)
    transform = semseg_train_transform(cfg)
    samples = [transform(read_only(make_scene(seed=s)), np.random.default_rng(s)) for s in range(3)]
    for sample in samples:
        assert set(sample) == {"coord", "grid_coord", "segment", "feat", "offset"}
        n = len(sample["coord"])
        assert n == 1000  # SphereCrop caps the voxelised cloud
        assert sample["feat"].shape == (n, 9)
        np.testing.assert_array_equal(sample["feat"][:, :3], sample["coord"])
        color = sample["feat"][:, 3:6]
        assert color.min() >= 0 and color.max() <= 1 and color.max() > 0.5  # normalised, not zeroed
        np.testing.assert_allclose(sample["coord"].min(0)[:2], -sample["coord"].max(0)[:2], atol=1e-4)
    batch = collate_semseg(samples)
    counts = [len(s["coord"]) for s in samples]
    assert batch["offset"].dtype == torch.int64
    assert batch["offset"].tolist() == np.cumsum(counts).tolist()
    assert batch["feat"].dtype == torch.float32 and batch["segment"].dtype == torch.int64
    start = counts[0] + counts[1]
    np.testing.assert_array_equal(batch["coord"][start:].numpy(), samples[2]["coord"])


def test_semseg_val_inverse_restores_full_resolution():
    data = make_scene()
    sample = semseg_val_transform(SemsegTransformConfig(grid_size=0.1))(data, np.random.default_rng(0))
    np.testing.assert_array_equal(sample["origin_segment"], data["segment"])
    assert len(sample["inverse"]) == len(data["coord"]) > len(sample["coord"])
    # a voxel's kept point holds the original index of a point of that same voxel (voxelised after centring)
    voxels = np.floor(CenterShift(apply_z=True)(data, None)["coord"] / 0.1).astype(np.int64)
    np.testing.assert_array_equal(voxels[sample["segment"][sample["inverse"]]], voxels)
    assert sample["feat"][:, 3:6].max() <= 1


def test_semseg_test_fragments():
    assert len(semseg_test_augmentations(SemsegTransformConfig())) == 13  # 4 rotations x (1 + 2 scales) + flip
    cfg = SemsegTransformConfig(grid_size=0.1, test_rotations=(0.5,), test_scales=(), test_flip=False)
    data = make_scene(n=800)
    result = semseg_test_fragments(data, cfg)
    np.testing.assert_array_equal(result["segment"], data["segment"])
    covered = np.concatenate([f["index"] for f in result["fragment_list"]])
    np.testing.assert_array_equal(np.unique(covered), np.arange(800))
    fragment = result["fragment_list"][0]
    assert set(fragment) == {"coord", "grid_coord", "index", "feat", "offset"}
    assert fragment["offset"].tolist() == [len(fragment["coord"])]
    # rotated by 90 deg about z: x/y extents swap (then re-centred); colours normalised
    extent = np.ptp(fragment["coord"], axis=0)
    assert extent[0] < extent[1] and fragment["feat"][:, 3:6].max() <= 1


def test_same_seed_same_sample_and_a_missing_input_is_named_never_invented():
    transform = semseg_train_transform(SemsegTransformConfig(grid_size=0.05))
    a = transform(make_scene(), np.random.default_rng(7))
    b = transform(make_scene(), np.random.default_rng(7))
    c = transform(make_scene(), np.random.default_rng(8))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["coord"], c["coord"])
    # the config's input reads normals: a scene without them is refused, not given zeros
    with pytest.raises(DataError, match=r"scene0.*field 'normal'|field 'normal'.*scene0") as error:
        transform(make_scene(normal=False), np.random.default_rng(7))
    assert "no normal.npy" in str(error.value) and "feat_keys" in str(error.value)
    # data without normals (or colours) trains on what it has, in feat_keys' order
    no_normals = SemsegTransformConfig(grid_size=0.05, feat_keys=("coord", "color"))
    sample = semseg_val_transform(no_normals)(make_scene(normal=False), np.random.default_rng(7))
    assert sample["feat"].shape == (len(sample["coord"]), 6)
    np.testing.assert_array_equal(sample["feat"][:, :3], sample["coord"])
    colourless = {k: v for k, v in make_scene().items() if k != "color"}
    no_colours = SemsegTransformConfig(grid_size=0.05, feat_keys=("normal", "coord"))
    for pipeline in (semseg_train_transform(no_colours), semseg_val_transform(no_colours)):
        sample = pipeline(colourless, np.random.default_rng(7))
        np.testing.assert_array_equal(sample["feat"][:, 3:], sample["coord"])
        np.testing.assert_allclose(np.linalg.norm(sample["feat"][:, :3], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"feat_keys: distinct names out of \['coord', 'color', 'normal'\]"):
        SemsegTransformConfig(feat_keys=("coord", "intensity"))


def test_bad_input_and_bad_config_are_named():
    data = make_scene()
    data["color"] = data["color"][:10]
    with pytest.raises(DataError, match="scene0.*color"):
        semseg_train_transform(SemsegTransformConfig())(data, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="multiples of patch_size"):
        from_dict(ConcertoPretrainTransformConfig, {"crop_h": 100, "crop_w": 112, "patch_size": 14})
    with pytest.raises(ConfigError, match="color_jitter.brightness"):
        from_dict(ConcertoPretrainTransformConfig, {"color_jitter": {"brightness": "a lot"}})
    jitter = from_dict(ConcertoPretrainTransformConfig, {"color_jitter": {"hue": 0.1}}).color_jitter
    assert isinstance(jitter, RandomColorJitter) and jitter.hue == 0.1


@pytest.mark.parametrize("label", [20, -2])
def test_semseg_labels_out_of_range_are_named(label):
    data = make_scene()
    data["segment"] = np.zeros(len(data["coord"]), dtype=np.int64)
    data["segment"][5] = label
    cfg = SemsegTransformConfig(num_classes=20)
    for transform in (semseg_train_transform(cfg), semseg_val_transform(cfg)):
        with pytest.raises(DataError, match=f"scene0.*segment.*label {label} ") as info:
            transform(data, np.random.default_rng(0))
        assert info.value.field == "segment" and info.value.sample == "scene0"
    with pytest.raises(DataError, match="segment"):
        semseg_test_fragments(data, cfg)
    data["segment"][5] = 19  # the largest class and the ignore label pass
    data["segment"][6] = -1
    assert len(semseg_train_transform(cfg)(data, np.random.default_rng(0))["segment"]) > 0


def test_collate_names_the_sample_with_an_empty_view():
    sample = {"name": "empty", "coord": np.zeros((3, 3), np.float32), "offset": np.array([0, 3])}
    with pytest.raises(DataError, match="empty.*offset"):
        collate_semseg([sample])
    views = {
        "name": "short",
        "global_coord": np.zeros((4, 3), np.float32),
        "global_offset": np.array([2, 3]),
        "img_num": np.array([0]),
    }
    with pytest.raises(DataError, match="short.*global_offset"):
        collate_concerto([views])


# ------------------------------------------------------------------------------------------------ colour


def test_color_jitter_hsv_round_trip_matches_colorsys_and_zero_hue_shift_is_identity():
    rgb = np.random.default_rng(0).random((500, 3))
    rgb[:5] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 0, 1]]  # grey and pure hues
    hsv = _rgb_to_hsv(rgb)
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*row) for row in rgb], atol=1e-12)
    np.testing.assert_allclose(_hsv_to_rgb(hsv), rgb, atol=1e-12)

    color = (np.random.default_rng(1).random((200, 3)) * 255).round()
    np.testing.assert_allclose(_adjust_hue(color, 0.0), color, atol=1e-9)
    np.testing.assert_allclose(_adjust_hue(_adjust_hue(color, 0.3), -0.3), color, atol=1e-9)
    shifted = RandomColorJitter(hue=0.5, p=1.0)({"color": color}, np.random.default_rng(0))["color"]
    assert np.abs(shifted - color).max() > 10
    # A hue shift keeps each point's largest and smallest channel (value and chroma).
    np.testing.assert_allclose(shifted.max(1), color.max(1), atol=1e-9)
    np.testing.assert_allclose(shifted.min(1), color.min(1), atol=1e-9)


def test_chromatic_auto_contrast_with_full_blend_stretches_each_channel_to_0_255():
    color = np.random.default_rng(0).uniform([10, 50, 100], [200, 60, 120], (300, 3)).astype(np.float32)
    out = ChromaticAutoContrast(p=1.0, blend_factor=1.0)({"color": color}, np.random.default_rng(0))["color"]
    np.testing.assert_allclose(out.min(0), 0, atol=1e-3)
    np.testing.assert_allclose(out.max(0), 255, atol=1e-3)
    # order within each channel is kept
    np.testing.assert_array_equal(np.argsort(out[:, 1]), np.argsort(color[:, 1]))


def test_drop_colour_and_normal_with_ratio_one_zero_every_row():
    data = make_scene()
    rng = np.random.default_rng(0)
    out = RandomDropNormal(1.0, 1.0)(RandomDropColor(1.0, 1.0)(read_only(data), rng), rng)
    assert np.all(out["color"] == 0) and np.all(out["normal"] == 0)
    assert out["color"].shape == data["color"].shape and out["color"].dtype == data["color"].dtype
    assert np.all(data["color"] != 0)  # the input was not written into
    half = RandomDropColor(0.5, 1.0)(data, np.random.default_rng(0))["color"]
    assert np.sum(np.all(half == 0, axis=1)) == len(data["color"]) // 2


# ------------------------------------------------------------------------------------------------ geometry


def test_sphere_crop_keeps_the_point_max_nearest_points_nearest_first():
    data = make_scene(n=2000)
    out = SphereCrop(point_max=300)(data, np.random.default_rng(4))
    center = data["coord"][np.random.default_rng(4).integers(len(data["coord"]))]
    distance = np.sum(np.square(data["coord"] - center), axis=1)
    kept = out["segment"]  # the original indices
    assert len(kept) == 300 and len(np.unique(kept)) == 300
    assert np.all(np.diff(distance[kept]) >= 0)  # nearest first
    assert distance[kept].max() <= np.sort(distance)[299]  # no nearer point was left out
    assert SphereCrop(point_max=2000)(data, np.random.default_rng(0)) is data


def test_elastic_distortion_zero_magnitude_is_identity_and_displacement_is_bounded():
    data = make_scene(n=1000)
    assert np.random.default_rng(0).random() < 0.95  # with seed 0 the distortion is applied
    unchanged = ElasticDistortion(((0.2, 0.0),))(data, np.random.default_rng(0))
    np.testing.assert_array_equal(unchanged["coord"], data["coord"])
    warped = ElasticDistortion(((0.2, 0.4),))(data, np.random.default_rng(0))["coord"]
    displacement = warped - data["coord"]
    # The noise is standard normals box-blurred twice per axis with width 3 (std (19/81)^1.5 = 0.114 inside the
    # grid, less at its zero-padded edges) and interpolated. Measured over 285 seeds on this 2 x 1.5 x 1 m scene:
    # std 0.075..0.125 x magnitude, largest move 0.22..0.48 x magnitude. Unblurred noise gives ~0.8, a doubled
    # magnitude 0.23.
    assert 0.06 * 0.4 < displacement.std() < 0.15 * 0.4
    assert np.abs(displacement).max() < 0.6 * 0.4
