"""The ready-made per-sample pipelines: Concerto pre-training and ScanNet semantic segmentation.

Each mirrors a Pointcept config's transform list (configs/concerto/pretrain-concerto-v1m1-0-base.py and
configs/concerto/semseg-ptv3-base-v1m1-0a-scannet-lin.py) step by step, with the config's values as defaults, and
ends with that config's Collect: the returned dict holds exactly the keys of one sample of Pointcept's batch, as
numpy arrays; `concerto_ray.data.collate` turns a list of them into the torch batch.

Input: the decoder's dict (`name`, `coord`, `color` 0..255, `normal`, `segment`, `instance`; for pre-training
with Concerto's 2D-3D term also `frames_color` and `frames_correspondence`). The model's input concatenates the
config's `feat_keys` (Pointcept's Collect feat_keys); a scene without one of them is an error, never filled in
(Pointcept fails on it too). Data without colours or normals leaves them out of `feat_keys` (and the backbone's
`in_channels` follows); the colour augmentations then pass such a scene through, as the reference's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from concerto_ray.data.image_views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageAugmentation,
    prepare_frames,
)
from concerto_ray.data.transforms import (
    CenterShift,
    ChromaticAutoContrast,
    ChromaticJitter,
    ChromaticTranslation,
    Copy,
    ElasticDistortion,
    GridSample,
    NormalizeColor,
    RandomColorJitter,
    RandomDropColor,
    RandomDropNormal,
    RandomDropout,
    RandomFlip,
    RandomJitter,
    RandomRotate,
    RandomRotateTargetAngle,
    RandomScale,
    SphereCrop,
    Transform,
    apply_transforms,
)
from concerto_ray.data.views import MultiViewGenerator
from concerto_ray.errors import ConfigError, DataError

PRETRAIN_KEYS = (
    "global_origin_coord",
    "global_coord",
    "global_color",
    "global_offset",
    "local_origin_coord",
    "local_coord",
    "local_color",
    "local_offset",
    "grid_size",
    "name",
    "images",
    "global_correspondence",
    "img_num",
)
IMAGE_VIEW_KEYS = ("images", "global_correspondence", "img_num")  # Concerto's image views: samples with frames only
POINT_INPUTS = ("coord", "color", "normal")  # the per-point arrays a model input can be built from, 3 channels each
OPTIONAL_PRETRAIN_KEYS = ("global_color", "local_color")  # absent for scenes without colours
FEAT_KEYS = POINT_INPUTS  # the feat_keys of every Concerto config


def check_feat_keys(feat_keys: tuple[str, ...]) -> None:
    if not feat_keys or len(set(feat_keys)) != len(feat_keys) or not set(feat_keys) <= set(POINT_INPUTS):
        raise ConfigError(f"feat_keys: distinct names out of {list(POINT_INPUTS)}, got {list(feat_keys)}")


def input_channels(feat_keys: tuple[str, ...]) -> int:
    """The backbone's `in_channels` for a model input of `feat_keys`."""
    return 3 * len(feat_keys)


@dataclass
class GeometryAugmentConfig:
    """Per-view geometric augmentation (identical in both configs apart from the rotation probability)."""

    scale: tuple[float, float] = (0.9, 1.1)
    rotate_z_angle: tuple[float, float] = (-1.0, 1.0)  # in units of pi
    rotate_xy_angle: tuple[float, float] = (-1 / 64, 1 / 64)
    flip_p: float = 0.5
    jitter_sigma: float = 0.005
    jitter_clip: float = 0.02
    elastic: tuple[tuple[float, float], ...] = ((0.2, 0.4), (0.8, 1.6))  # (granularity, magnitude) pairs

    def rotations(self, p: float) -> tuple[Transform, ...]:
        return (
            RandomRotate(self.rotate_z_angle, "z", (0.0, 0.0, 0.0), p),
            RandomRotate(self.rotate_xy_angle, "x", None, p),
            RandomRotate(self.rotate_xy_angle, "y", None, p),
        )


@dataclass
class ConcertoPretrainTransformConfig:
    crop_h: int = 518
    crop_w: int = 518
    patch_size: int = 14
    image_jitter_p: float = 0.95
    image_jitter_std: float = 0.05
    image_blur_p: float = 0.5
    image_blur_sigma: tuple[float, float] = (0.1, 2.0)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    grid_size: float = 0.02
    color_drop: tuple[tuple[float, float], ...] = ((1.0, 0.2), (0.2, 0.5))  # (drop_ratio, application_ratio)
    normal_drop: tuple[tuple[float, float], ...] = ((1.0, 0.2), (0.2, 0.5))
    global_view_num: int = 2
    global_view_scale: tuple[float, float] = (0.4, 1.0)
    local_view_num: int = 4
    local_view_scale: tuple[float, float] = (0.1, 0.4)
    max_size: int = 65536
    enc2d_max_size: int = 65536
    # Concerto's values; a YAML `color_jitter` section sets all five (RandomColorJitter's own defaults are "off").
    color_jitter: RandomColorJitter = field(
        default_factory=lambda: RandomColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.02, p=0.8)
    )
    chromatic_translation_p: float = 0.95
    chromatic_translation_ratio: float = 0.05
    rotate_p: float = 0.8
    geometry: GeometryAugmentConfig = field(default_factory=GeometryAugmentConfig)
    # The model input, in this order (backbone in_channels: 3 per key); each must be in every scene.
    feat_keys: tuple[str, ...] = FEAT_KEYS

    def __post_init__(self):
        check_feat_keys(self.feat_keys)
        if self.patch_size < 1 or self.crop_h < self.patch_size or self.crop_w < self.patch_size:
            raise ConfigError(f"crop {self.crop_h}x{self.crop_w} must hold at least one {self.patch_size}-pixel patch")
        if self.crop_h % self.patch_size or self.crop_w % self.patch_size:
            raise ConfigError(
                f"crop_h and crop_w ({self.crop_h}, {self.crop_w}) must be multiples of patch_size ({self.patch_size})"
            )
        if self.global_view_num < 1 or self.local_view_num < 0:
            raise ConfigError("global_view_num must be >= 1 and local_view_num >= 0")
        for name in ("global_view_scale", "local_view_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"{name} must satisfy 0 < low <= high <= 1, got ({low}, {high})")
        if self.grid_size <= 0 or self.max_size < 1 or self.enc2d_max_size < 1:
            raise ConfigError("grid_size, max_size and enc2d_max_size must be positive")


@dataclass
class SemsegTransformConfig:
    # Labels must be `ignore_index` or lie in [0, num_classes); None checks only the lower bound. FinetuneConfig
    # sets both from its own num_classes and ignore_index.
    num_classes: int | None = None
    ignore_index: int = -1
    grid_size: float = 0.02
    dropout_ratio: float = 0.2
    dropout_application_ratio: float = 1.0
    rotate_p: float = 0.5
    geometry: GeometryAugmentConfig = field(default_factory=GeometryAugmentConfig)
    auto_contrast_p: float = 0.2
    chromatic_translation_p: float = 0.95
    chromatic_translation_ratio: float = 0.05
    chromatic_jitter_p: float = 0.95
    chromatic_jitter_std: float = 0.05
    point_max: int = 102400  # SphereCrop
    # A first SphereCrop to this share of the voxelised points (ScanNet++ 0.8 and S3DIS 0.6 in some configs).
    crop_sample_rate: float | None = None
    # Test protocol: voxelise the scene at this size first (ScanNet++ and S3DIS: 0.01), vote on those points and
    # score every raw point through the inverse mapping. None: vote on the raw points.
    test_presample_grid_size: float | None = None
    # Test-time augmentation: each z rotation (units of pi) unscaled and at each extra scale, plus one x/y flip.
    test_rotations: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    test_scales: tuple[float, ...] = (0.95, 1.05)
    test_flip: bool = True
    # The model input, in this order (backbone in_channels: 3 per key); each must be in every scene.
    feat_keys: tuple[str, ...] = FEAT_KEYS

    def __post_init__(self):
        check_feat_keys(self.feat_keys)
        if self.grid_size <= 0 or self.point_max < 1:
            raise ConfigError("grid_size and point_max must be positive")
        if self.crop_sample_rate is not None and not 0 < self.crop_sample_rate <= 1:
            raise ConfigError(f"crop_sample_rate must lie in (0, 1], got {self.crop_sample_rate}")
        if self.test_presample_grid_size is not None and self.test_presample_grid_size <= 0:
            raise ConfigError(f"test_presample_grid_size must be positive, got {self.test_presample_grid_size}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")


# ------------------------------------------------------------------------------------------------ pre-training


def concerto_pretrain_transform(cfg: ConcertoPretrainTransformConfig, *, frames: bool = True) -> Transform:
    """`frames`: every sample's camera frames become its image views (`IMAGE_VIEW_KEYS`) for Concerto's 2D-3D term,
    and a sample without frames is an error. False, for a model without that term (Sonata's losses): a sample needs
    no frames and gets no image views, and its views are cut as Sonata cuts them (`MultiViewGenerator`)."""
    image_augmentation = ImageAugmentation(
        jitter_p=cfg.image_jitter_p,
        jitter_std=cfg.image_jitter_std,
        blur_p=cfg.image_blur_p,
        blur_sigma=cfg.image_blur_sigma,
        mean=cfg.image_mean,
        std=cfg.image_std,
    )
    color_augmentation = (
        cfg.color_jitter,
        ChromaticTranslation(cfg.chromatic_translation_p, cfg.chromatic_translation_ratio),
        NormalizeColor(),
    )
    geometry = cfg.geometry
    view_geometry = (
        CenterShift(apply_z=True),
        RandomScale(geometry.scale),
        *geometry.rotations(cfg.rotate_p),
        RandomFlip(geometry.flip_p),
        RandomJitter(geometry.jitter_sigma, geometry.jitter_clip),
        ElasticDistortion(geometry.elastic),
    )
    point_transforms = (
        GridSample(cfg.grid_size),
        *(RandomDropColor(ratio, applied) for ratio, applied in cfg.color_drop),
        *(RandomDropNormal(ratio, applied) for ratio, applied in cfg.normal_drop),
        Copy("coord", "origin_coord"),
        MultiViewGenerator(
            global_view_num=cfg.global_view_num,
            global_view_scale=cfg.global_view_scale,
            local_view_num=cfg.local_view_num,
            local_view_scale=cfg.local_view_scale,
            max_size=cfg.max_size,
            enc2d_max_size=cfg.enc2d_max_size,
            global_shared_transforms=color_augmentation,
            global_transforms=view_geometry,
            local_transforms=view_geometry + color_augmentation,
        ),
    )

    keys = PRETRAIN_KEYS if frames else tuple(key for key in PRETRAIN_KEYS if key not in IMAGE_VIEW_KEYS)

    def transform(data: dict, rng: np.random.Generator) -> dict:
        data = _checked_points(data, cfg.feat_keys)
        if frames:
            for key in ("frames_color", "frames_correspondence"):
                if not data.get(key):
                    raise DataError(
                        "has no camera frames, which the 2D-3D term reads (enc2d_loss_weight > 0); point clouds "
                        "without frames pre-train with model.enc2d_loss_weight: 0 (Sonata's point losses only)",
                        sample=data["name"],
                        field=key,
                    )
            images, correspondence = prepare_frames(
                data["frames_color"],
                data["frames_correspondence"],
                len(data["coord"]),
                cfg.crop_h,
                cfg.crop_w,
                cfg.patch_size,
                sample=data["name"],
            )
            data = {**data, "images": image_augmentation(images, rng), "correspondence": correspondence}
        data = apply_transforms(point_transforms, data, rng)
        data["grid_size"] = cfg.grid_size
        sample = {key: data[key] for key in keys if key in data or key not in OPTIONAL_PRETRAIN_KEYS}
        if frames:
            sample["img_num"] = np.array([data["img_num"]], dtype=np.int64)
        for prefix in ("global", "local"):
            sample[f"{prefix}_feat"] = _feat(data, cfg.feat_keys, prefix + "_")
        return sample

    return transform


# ------------------------------------------------------------------------------------- semantic segmentation


def semseg_train_transform(cfg: SemsegTransformConfig) -> Transform:
    geometry = cfg.geometry
    transforms = (
        CenterShift(apply_z=True),
        RandomDropout(cfg.dropout_ratio, cfg.dropout_application_ratio),
        *geometry.rotations(cfg.rotate_p),
        RandomScale(geometry.scale),
        RandomFlip(geometry.flip_p),
        RandomJitter(geometry.jitter_sigma, geometry.jitter_clip),
        ElasticDistortion(geometry.elastic),
        ChromaticAutoContrast(cfg.auto_contrast_p),
        ChromaticTranslation(cfg.chromatic_translation_p, cfg.chromatic_translation_ratio),
        ChromaticJitter(cfg.chromatic_jitter_p, cfg.chromatic_jitter_std),
        GridSample(cfg.grid_size, return_grid_coord=True),
        *((SphereCrop(sample_rate=cfg.crop_sample_rate),) if cfg.crop_sample_rate is not None else ()),
        SphereCrop(cfg.point_max),
        CenterShift(apply_z=False),
        NormalizeColor(),
    )

    def transform(data: dict, rng: np.random.Generator) -> dict:
        data = apply_transforms(transforms, _checked_labelled_points(data, cfg), rng)
        return _collect_semseg(data, ("coord", "grid_coord", "segment"), cfg.feat_keys)

    return transform


def semseg_val_transform(cfg: SemsegTransformConfig) -> Transform:
    """Voxelised validation sample; `inverse` and `origin_segment` give back the full-resolution labels."""
    transforms = (
        CenterShift(apply_z=True),
        Copy("segment", "origin_segment"),
        GridSample(cfg.grid_size, return_grid_coord=True, return_inverse=True),
        CenterShift(apply_z=False),
        NormalizeColor(),
    )

    def transform(data: dict, rng: np.random.Generator) -> dict:
        data = apply_transforms(transforms, _checked_labelled_points(data, cfg), rng)
        return _collect_semseg(data, ("coord", "grid_coord", "segment", "origin_segment", "inverse"), cfg.feat_keys)

    return transform


def semseg_test_augmentations(cfg: SemsegTransformConfig) -> list[tuple[Transform, ...]]:
    """The test-time augmentation passes: every z rotation at scale 1 and each of `test_scales`, then a flip."""
    passes: list[tuple[Transform, ...]] = []
    for scale in (None, *cfg.test_scales):
        for angle in cfg.test_rotations:
            rotation = RandomRotateTargetAngle((angle,), "z", (0.0, 0.0, 0.0), p=1.0)
            passes.append((rotation,) if scale is None else (rotation, RandomScale((scale, scale))))
    if cfg.test_flip:
        passes.append((RandomFlip(p=1.0),))
    return passes


def semseg_test_fragments(data: dict, cfg: SemsegTransformConfig) -> dict:
    """Pointcept's test-mode sample: {segment, name, fragment_list}, plus {origin_segment, inverse} when the
    config pre-samples the scene (`test_presample_grid_size`).

    Every augmentation pass is voxelised into fragments that together cover each (pre-sampled) point at least once;
    a fragment holds coord, grid_coord, index (into `segment`'s points), feat and offset. With pre-sampling,
    `inverse` maps every raw point to the pre-sampled point whose prediction it takes, and `origin_segment` holds
    the raw labels the prediction is scored against.
    """
    # The test augmentations are deterministic (p = 1, one angle, one scale) and the pre-sampling's pick of a point
    # per voxel is drawn from a fixed generator, so a scene's protocol is the same every time.
    rng = np.random.default_rng(0)
    prepare: tuple[Transform, ...] = (CenterShift(apply_z=True), NormalizeColor())
    if cfg.test_presample_grid_size is not None:
        prepare += (Copy("segment", "origin_segment"), GridSample(cfg.test_presample_grid_size, return_inverse=True))
    data = apply_transforms(prepare, _checked_labelled_points(data, cfg), rng)
    voxelize = GridSample(cfg.grid_size, return_grid_coord=True)
    fragment_list = []
    for augmentation in semseg_test_augmentations(cfg):
        for fragment in voxelize.fragments(apply_transforms(augmentation, data, rng)):
            fragment = CenterShift(apply_z=False)(fragment, rng)
            fragment_list.append(_collect_semseg(fragment, ("coord", "grid_coord", "index"), cfg.feat_keys))
    sample = {"segment": data["segment"], "name": data["name"], "fragment_list": fragment_list}
    if cfg.test_presample_grid_size is not None:
        sample.update(origin_segment=data["origin_segment"], inverse=data["inverse"])
    return sample


# -------------------------------------------------------------------------------------------------- helpers


def _checked_points(data: dict, feat_keys: tuple[str, ...]) -> dict:
    """The fields every pipeline reads: name, coord, segment and each of the model input's `feat_keys`."""
    name = str(data.get("name", "?"))
    for key in ("name", "coord", "segment"):
        if key not in data:
            raise DataError("missing", sample=name, field=key)
    for key in feat_keys:
        if key not in data:
            raise DataError(
                f"the scene has no {key}.npy, which the model input reads (feat_keys {list(feat_keys)}); for data "
                f"without it, leave it out of feat_keys and set the backbone's in_channels to 3 per key",
                sample=name,
                field=key,
            )
    n = len(data["coord"])
    for key in POINT_INPUTS:
        if key in data and data[key].shape != (n, 3):
            raise DataError(f"expected shape ({n}, 3), got {data[key].shape}", sample=name, field=key)
    return data


def _checked_labelled_points(data: dict, cfg: SemsegTransformConfig) -> dict:
    """`_checked_points`, plus segment labels that are `cfg.ignore_index` or in [0, cfg.num_classes)."""
    data = _checked_points(data, cfg.feat_keys)
    segment = data["segment"]
    upper = np.inf if cfg.num_classes is None else cfg.num_classes
    bad = (segment != cfg.ignore_index) & ((segment < 0) | (segment >= upper))
    if bad.any():
        classes = ">= 0" if cfg.num_classes is None else f"0..{cfg.num_classes - 1}"
        allowed = f"{cfg.ignore_index} (ignored) or {classes}"
        raise DataError(
            f"label {segment[bad][0]} is out of range ({int(bad.sum())} points); labels must be {allowed}",
            sample=str(data["name"]),
            field="segment",
        )
    return data


def _feat(data: dict, feat_keys: tuple[str, ...], prefix: str = "") -> np.ndarray:
    return np.concatenate([data[prefix + key] for key in feat_keys], axis=1).astype(np.float32)


def _collect_semseg(data: dict, keys: tuple[str, ...], feat_keys: tuple[str, ...]) -> dict:
    sample = {key: data[key] for key in keys}
    sample["feat"] = _feat(data, feat_keys)
    sample["offset"] = np.array([len(data["coord"])], dtype=np.int64)
    return sample
