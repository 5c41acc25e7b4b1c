import numpy as np
import pytest
import torch

from concerto_ray.data.collate import collate_concerto
from concerto_ray.data.image_views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageAugmentation,
    gaussian_blur,
    prepare_frames,
)
from concerto_ray.data.presets import PRETRAIN_KEYS, ConcertoPretrainTransformConfig, concerto_pretrain_transform
from concerto_ray.errors import DataError

FRAME_W, FRAME_H = 200, 150
CROP, PATCH = 112, 14  # 8 x 8 patch grid
# The centred crop of a 200x150 frame is 18 x (8 x 8 patches) = 144 px square at left 28, top 3.
LEFT, TOP, SIDE = 28, 3, 144


def pixel_of(coord):
    """Frame 0's camera: pixel (x, y) = 100 * (coord x, coord y) - the scene spans the whole 200x150 frame."""
    return np.floor(coord[:, 0] * 100), np.floor(coord[:, 1] * 100)


def expected_patch(coord):
    x, y = pixel_of(coord)
    inside = (x >= LEFT) & (x < LEFT + SIDE) & (y >= TOP) & (y < TOP + SIDE)
    return (y - TOP) * CROP / SIDE / PATCH, (x - LEFT) * CROP / SIDE / PATCH, inside


def position_image():
    """R = x pixel, G = y pixel: lets the test read back which original pixel a resized pixel shows."""
    x, y = np.meshgrid(np.arange(FRAME_W), np.arange(FRAME_H))
    return np.stack([x, y, np.zeros_like(x)], axis=2).astype(np.uint8)


def make_scene(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    coord = (rng.random((n, 3)) * [2.0, 1.5, 1.0]).astype(np.float32)
    x, y = pixel_of(coord)
    seen = rng.random(n) < 0.7
    frame0 = np.stack([x, y, np.arange(n)], axis=1)[seen].astype(np.float32)
    frame2 = np.stack([x, y, np.arange(n)], axis=1)[:50].astype(np.float32)  # sees only 50 points
    return {
        "name": f"scene{seed}",
        "coord": coord,
        "color": (rng.random((n, 3)) * 255).astype(np.float32),
        "normal": np.tile(np.array([[0, 0, 1]], np.float32), (n, 1)),
        "segment": np.zeros(n, np.int32),
        "instance": np.zeros(n, np.int32),
        "frames_color": [position_image(), position_image(), position_image()],
        "frames_correspondence": [frame0, -np.ones((1, 3)), frame2],  # frame 1 sees nothing
    }


def small_config(**overrides):
    values = dict(crop_h=CROP, crop_w=CROP, patch_size=PATCH, grid_size=0.02, max_size=1500, enc2d_max_size=2000)
    values.update(overrides)
    return ConcertoPretrainTransformConfig(**values)


def test_prepare_frames_maps_pixels_to_patch_coordinates_of_the_resized_image():
    data = make_scene()
    images, correspondence = prepare_frames(
        data["frames_color"], data["frames_correspondence"], len(data["coord"]), CROP, CROP, PATCH, sample="s"
    )
    assert images.shape == (3, 3, CROP, CROP) and images.dtype == np.float32
    assert correspondence.shape == (len(data["coord"]), 3, 2)
    assert np.all(correspondence[:, 1] == -1)

    row, col, inside = expected_patch(data["coord"])
    seen = np.zeros(len(data["coord"]), bool)
    seen[data["frames_correspondence"][0][:, 2].astype(int)] = True
    visible = seen & inside
    assert 0 < visible.sum() < seen.sum()  # some seen pixels fall outside the centred crop
    np.testing.assert_allclose(correspondence[visible, 0, 0], row[visible], rtol=1e-6)
    np.testing.assert_allclose(correspondence[visible, 0, 1], col[visible], rtol=1e-6)
    assert np.all(correspondence[~visible, 0] == -1)

    # The resized image really shows, at patch coordinate * patch size, the pixel the point projects to.
    r = np.round(correspondence[visible, 0, 0] * PATCH).astype(int)
    c = np.round(correspondence[visible, 0, 1] * PATCH).astype(int)
    shown_x = images[0, 0, r, c] * 255
    shown_y = images[0, 1, r, c] * 255
    x, y = pixel_of(data["coord"][visible])
    assert np.abs(shown_x - x).max() <= 2 and np.abs(shown_y - y).max() <= 2


def test_image_augmentation_normalises_with_imagenet_statistics():
    constant = np.tile(np.array([1.0, 0.0, 0.5], np.float32)[None, :, None, None], (2, 1, 16, 16))
    plain = ImageAugmentation(jitter_p=0.0, blur_p=0.0)(constant, np.random.default_rng(0))
    expected = (np.array([1.0, 0.0, 0.5]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(plain[:, :, 5, 5], np.tile(expected, (2, 1)), rtol=1e-5)

    jittered = ImageAugmentation(jitter_p=1.0, jitter_std=0.05, blur_p=1.0)(constant, np.random.default_rng(0))
    shift = jittered[0, :, 8, 8] * IMAGENET_STD + IMAGENET_MEAN - [1.0, 0.0, 0.5]
    assert np.all(shift[1:] >= 0) and np.all(shift < 0.05) and shift[1:].max() > 0  # + [0, 0.05), clipped at 1
    np.testing.assert_allclose(jittered[0], jittered[1])  # all frames of a sample get the same shift


def test_gaussian_blur_of_an_impulse_is_the_separable_gaussian_kernel():
    sigma, size = 1.3, 9
    impulse = np.zeros((1, 3, 21, 21), np.float32)
    impulse[:, :, 10, 10] = 1.0
    blurred = gaussian_blur(impulse, sigma, size)
    offsets = np.arange(size) - size // 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    expected = np.zeros((21, 21))
    expected[6:15, 6:15] = np.outer(kernel, kernel)
    for channel in range(3):
        np.testing.assert_allclose(blurred[0, channel], expected, atol=1e-6)
    # At a corner, reflect padding (the edge pixel is not repeated) leaves only the centre weight.
    corner = np.zeros((1, 1, 21, 21), np.float32)
    corner[0, 0, 0, 0] = 1.0
    assert gaussian_blur(corner, sigma, size)[0, 0, 0, 0] == pytest.approx(kernel[4] ** 2, rel=1e-5)


def test_pretrain_sample_keys_views_and_sizes():
    data = make_scene()
    cfg = small_config()
    sample = concerto_pretrain_transform(cfg)(data, np.random.default_rng(3))
    assert set(sample) == set(PRETRAIN_KEYS) | {"global_feat", "local_feat"}

    num_voxels = len(np.unique(np.floor(data["coord"] / cfg.grid_size), axis=0))
    global_sizes = np.diff(sample["global_offset"], prepend=0)
    local_sizes = np.diff(sample["local_offset"], prepend=0)
    assert len(global_sizes) == 2 and len(local_sizes) == 4
    assert global_sizes[0] == min(cfg.enc2d_max_size, num_voxels)  # the major view
    limit = min(cfg.max_size, num_voxels)
    assert int(0.4 * limit) <= global_sizes[1] <= limit
    assert np.all((local_sizes >= int(0.1 * limit)) & (local_sizes <= int(0.4 * limit)))
    assert len(sample["global_coord"]) == sample["global_offset"][-1]
    assert len(sample["local_coord"]) == sample["local_offset"][-1]

    # frame 1 sees nothing and is dropped; images, img_num and correspondence agree
    assert sample["img_num"].tolist() == [2]
    assert sample["images"].shape == (2, 3, CROP, CROP)
    assert sample["global_correspondence"].shape == (len(sample["global_coord"]), 2, 2)
    for prefix in ("global", "local"):
        feat = sample[f"{prefix}_feat"]
        assert feat.shape == (len(sample[f"{prefix}_coord"]), 9) and feat.dtype == np.float32
        np.testing.assert_array_equal(feat[:, :3], sample[f"{prefix}_coord"])
        color = sample[f"{prefix}_color"]
        assert color.min() >= 0 and color.max() <= 1


def test_pretrain_sample_of_a_scene_without_colours_reads_the_config_inputs_only():
    data = {key: value for key, value in make_scene().items() if key != "color"}
    with pytest.raises(DataError, match="no color.npy"):
        concerto_pretrain_transform(small_config())(data, np.random.default_rng(3))
    sample = concerto_pretrain_transform(small_config(feat_keys=("coord", "normal")))(data, np.random.default_rng(3))
    assert set(sample) == set(PRETRAIN_KEYS) - {"global_color", "local_color"} | {"global_feat", "local_feat"}
    for prefix in ("global", "local"):
        feat = sample[f"{prefix}_feat"]
        assert feat.shape == (len(sample[f"{prefix}_coord"]), 6)
        np.testing.assert_array_equal(feat[:, :3], sample[f"{prefix}_coord"])
        # normals: unit length or dropped (zero) by RandomDropNormal, as the reference's
        assert np.all(np.isin(np.round(np.linalg.norm(feat[:, 3:], axis=1), 5), (0.0, 1.0)))


def test_correspondence_follows_its_point_through_voxelisation_and_views():
    data = make_scene()
    sample = concerto_pretrain_transform(small_config())(data, np.random.default_rng(5))
    correspondence = sample["global_correspondence"][:, 0]  # frame 0 survives as the first frame
    has = correspondence[:, 0] != -1
    assert has.sum() > 100
    # origin_coord is the voxelised point before view augmentation: its own projection must come back
    row, col, inside = expected_patch(sample["global_origin_coord"])
    assert np.all(inside[has])
    np.testing.assert_allclose(correspondence[has, 0], row[has], rtol=1e-6)
    np.testing.assert_allclose(correspondence[has, 1], col[has], rtol=1e-6)
    # the augmented coordinates are no longer the originals (views were augmented), but the rows still match
    assert not np.allclose(sample["global_coord"], sample["global_origin_coord"])


def test_pretrain_is_deterministic_per_seed():
    transform = concerto_pretrain_transform(small_config())
    a = transform(make_scene(), np.random.default_rng(11))
    b = transform(make_scene(), np.random.default_rng(11))
    c = transform(make_scene(), np.random.default_rng(12))
    for key in PRETRAIN_KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["local_coord"], c["local_coord"])


def test_collate_concerto_offsets_order_and_frame_padding():
    transform = concerto_pretrain_transform(small_config())
    one = make_scene(seed=1)
    two = make_scene(seed=2)
    two["frames_color"] = two["frames_color"][:1]  # one frame only
    two["frames_correspondence"] = two["frames_correspondence"][:1]
    samples = [transform(one, np.random.default_rng(0)), transform(two, np.random.default_rng(0))]
    batch = collate_concerto(samples)

    assert batch["name"] == ["scene1", "scene2"]
    assert batch["img_num"].tolist() == [2, 1] and batch["images"].shape == (3, 3, CROP, CROP)
    for prefix in ("global", "local"):
        sizes = np.concatenate([np.diff(s[f"{prefix}_offset"], prepend=0) for s in samples])
        assert batch[f"{prefix}_offset"].dtype == torch.int64
        assert batch[f"{prefix}_offset"].tolist() == np.cumsum(sizes).tolist()
        first = len(samples[0][f"{prefix}_coord"])
        np.testing.assert_array_equal(batch[f"{prefix}_coord"][first:].numpy(), samples[1][f"{prefix}_coord"])
    correspondence = batch["global_correspondence"]
    first = len(samples[0]["global_coord"])
    assert correspondence.shape == (len(batch["global_coord"]), 2, 2)
    assert torch.all(correspondence[first:, 1] == -1)  # the second sample's missing frame is padding
    np.testing.assert_array_equal(correspondence[first:, :1].numpy(), samples[1]["global_correspondence"])
    assert batch["grid_size"].tolist() == [0.02, 0.02]
