"""Typed configs of the self-supervised models, and the paper's named configs.

Field names equal the keyword arguments of Pointcept's `Sonata-v1m1` / `Concerto-v1m1`, so a value
can be checked against the reference config file by name. The named configs reproduce the model
sections of Pointcept's `configs/sonata/pretrain-sonata-v1m1-0-base.py` and
`configs/concerto/pretrain-concerto-v1m1-{0-base,1-large-base,2-large-video}.py` (the last two differ
only in their training data). `tiny-sonata` and `tiny-concerto` are small enough for CPU tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from concerto_ray.errors import ConfigError
from concerto_ray.model.image_encoder import ImageEncoderConfig
from concerto_ray.model.ptv3 import PTv3Config


@dataclass(kw_only=True)
class SonataConfig:
    backbone: PTv3Config
    # Backbone fields overridden for the teacher (the reference turns drop path off there).
    teacher_custom: dict[str, float] = field(
        default_factory=lambda: {"attn_drop": 0.0, "proj_drop": 0.0, "drop_path": 0.0}
    )
    head_in_channels: int
    head_hidden_channels: int = 4096
    head_embed_channels: int = 512
    head_num_prototypes: int = 4096
    num_global_view: int = 2
    num_local_view: int = 4
    mask_size_start: float = 0.1
    mask_size_base: float = 0.4
    mask_size_warmup_ratio: float = 0.05
    mask_ratio_start: float = 0.3
    mask_ratio_base: float = 0.7
    mask_ratio_warmup_ratio: float = 0.05
    mask_jitter: float | None = None
    teacher_temp_start: float = 0.04
    teacher_temp_base: float = 0.07
    teacher_temp_warmup_ratio: float = 0.05
    student_temp: float = 0.1
    mask_loss_weight: float = 2 / 8
    roll_mask_loss_weight: float = 2 / 8
    unmask_loss_weight: float = 4 / 8
    momentum_base: float = 0.996
    momentum_final: float = 1.0
    # The reference keeps match_max_k but matches with k=1; it is kept here for config parity.
    match_max_k: int = 8
    match_max_r: float = 0.08
    up_cast_level: int = 2

    def __post_init__(self):
        if (
            self.mask_loss_weight + self.roll_mask_loss_weight + self.unmask_loss_weight + self._extra_loss_weight()
            <= 0
        ):
            raise ConfigError("at least one loss weight must be positive")
        if self.num_global_view not in (1, 2):
            raise ConfigError(f"num_global_view must be 1 or 2, got {self.num_global_view}")
        if self.num_global_view == 1 and self.roll_mask_loss_weight > 0:
            raise ConfigError("roll_mask_loss_weight > 0 needs num_global_view == 2")
        if self.num_local_view < 1:
            raise ConfigError(f"num_local_view must be >= 1, got {self.num_local_view}")
        num_stages = len(self.backbone.enc_channels)
        if not 0 <= self.up_cast_level < num_stages:
            raise ConfigError(f"up_cast_level must lie in [0, {num_stages - 1}], got {self.up_cast_level}")
        upcast_channels = sum(self.backbone.enc_channels[num_stages - 1 - self.up_cast_level :])
        if self.head_in_channels != upcast_channels:
            raise ConfigError(
                f"head_in_channels is {self.head_in_channels} but up-casting "
                f"{self.up_cast_level} levels of enc_channels {tuple(self.backbone.enc_channels)} "
                f"gives {upcast_channels}"
            )
        unknown = set(self.teacher_custom) - {f.name for f in dataclasses.fields(PTv3Config)}
        if unknown:
            raise ConfigError(f"teacher_custom has keys that are not backbone fields: {sorted(unknown)}")

    def _extra_loss_weight(self) -> float:
        return 0.0

    def reads_frames(self) -> bool:
        """Whether training reads the samples' camera frames: only Concerto's 2D-3D term does."""
        return False

    def teacher_backbone(self) -> PTv3Config:
        return dataclasses.replace(self.backbone, **self.teacher_custom)


@dataclass(kw_only=True)
class ConcertoConfig(SonataConfig):
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    # Patch grid of the image crops: crop size // encoder patch size (518 // 14 = 37).
    patch_h: int = 37
    patch_w: int = 37
    backbone_out_channels: int
    enc2d_head_in_channels: int = 384
    enc2d_head_hidden_channels: int = 4096
    enc2d_head_num_prototypes: int = 384
    mask_loss_weight: float = 2 / 10
    roll_mask_loss_weight: float = 2 / 10
    unmask_loss_weight: float = 4 / 10
    enc2d_loss_weight: float = 2 / 10
    enc2d_upcast_level: int = 4
    enc2d_cos_shift: bool = True
    # "online": the teacher backbone is the EMA of the student (every paper config). The reference's
    # "offline" mode (teacher loaded from a Sonata checkpoint and kept fixed) is not provided.
    sonata_model_type: Literal["online"] = "online"

    def __post_init__(self):
        super().__post_init__()
        num_stages = len(self.backbone.enc_channels)
        if not self.up_cast_level <= self.enc2d_upcast_level < num_stages:
            raise ConfigError(
                f"enc2d_upcast_level must lie in [{self.up_cast_level}, {num_stages - 1}], "
                f"got {self.enc2d_upcast_level}"
            )
        upcast_channels = sum(self.backbone.enc_channels[num_stages - 1 - self.enc2d_upcast_level :])
        if self.backbone_out_channels != upcast_channels:
            raise ConfigError(
                f"backbone_out_channels is {self.backbone_out_channels} but up-casting "
                f"{self.enc2d_upcast_level} levels gives {upcast_channels}"
            )
        if self.enc2d_head_in_channels != self.image_encoder.hidden_size:
            raise ConfigError(
                f"enc2d_head_in_channels ({self.enc2d_head_in_channels}) must equal the image "
                f"encoder's hidden_size ({self.image_encoder.hidden_size})"
            )

    def _extra_loss_weight(self) -> float:
        return self.enc2d_loss_weight

    def reads_frames(self) -> bool:
        return self.enc2d_loss_weight > 0


def _pointcept_backbone(enc_channels: tuple[int, ...], enc_num_head: tuple[int, ...]) -> PTv3Config:
    """The PT-v3m2 encoder-only backbone shared by the paper's pre-training configs."""
    return PTv3Config(
        in_channels=9,
        order=("z", "z-trans", "hilbert", "hilbert-trans"),
        stride=(2, 2, 2, 2),
        enc_depths=(3, 3, 3, 12, 3),
        enc_channels=enc_channels,
        enc_num_head=enc_num_head,
        enc_patch_size=(1024, 1024, 1024, 1024, 1024),
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        drop_path=0.3,
        shuffle_orders=True,
        pre_norm=True,
        enable_rpe=False,
        enable_flash=True,
        upcast_attention=False,
        upcast_softmax=False,
        enc_mode=True,
        traceable=True,
        mask_token=True,
    )


def _tiny_backbone() -> PTv3Config:
    return PTv3Config(
        in_channels=9,
        order=("z", "z-trans", "hilbert", "hilbert-trans"),
        stride=(2, 2, 2, 2),
        enc_depths=(1, 1, 1, 1, 1),
        enc_channels=(8, 8, 16, 16, 32),
        enc_num_head=(1, 1, 2, 2, 4),
        enc_patch_size=(16, 16, 16, 16, 16),
        mlp_ratio=2,
        qkv_bias=True,
        qk_scale=None,
        attn_drop=0.0,
        proj_drop=0.0,
        drop_path=0.1,
        shuffle_orders=True,
        pre_norm=True,
        enable_rpe=False,
        enable_flash=False,
        upcast_attention=False,
        upcast_softmax=False,
        enc_mode=True,
        traceable=True,
        mask_token=True,
    )


def _concerto(enc_channels: tuple[int, ...], enc_num_head: tuple[int, ...]) -> ConcertoConfig:
    return ConcertoConfig(
        backbone=_pointcept_backbone(enc_channels, enc_num_head),
        image_encoder=ImageEncoderConfig(weights="facebook/dinov2-with-registers-giant"),
        patch_h=518 // 14,
        patch_w=518 // 14,
        backbone_out_channels=sum(enc_channels[1:]),
        head_in_channels=sum(enc_channels[2:]),
        head_hidden_channels=4096,
        head_embed_channels=256,
        head_num_prototypes=4096,
        enc2d_head_in_channels=1536,
        enc2d_head_hidden_channels=4096,
        enc2d_head_num_prototypes=4096,
        mask_jitter=0.01,
        mask_loss_weight=1 / 8,
        roll_mask_loss_weight=1 / 8,
        unmask_loss_weight=2 / 8,
        enc2d_loss_weight=4 / 8,
        momentum_base=0.994,
        momentum_final=1.0,
        match_max_r=0.32,
        up_cast_level=2,
        enc2d_upcast_level=3,
        enc2d_cos_shift=True,
    )


def _sonata_base() -> SonataConfig:
    enc_channels = (48, 96, 192, 384, 512)
    return SonataConfig(
        backbone=_pointcept_backbone(enc_channels, (3, 6, 12, 24, 32)),
        head_in_channels=sum(enc_channels[2:]),
        head_hidden_channels=4096,
        head_embed_channels=256,
        head_num_prototypes=4096,
        mask_jitter=0.01,
        mask_loss_weight=2 / 8,
        roll_mask_loss_weight=2 / 8,
        unmask_loss_weight=4 / 8,
        momentum_base=0.994,
        momentum_final=1.0,
        match_max_r=0.32,
        up_cast_level=2,
    )


def _tiny_sonata() -> SonataConfig:
    return SonataConfig(
        backbone=_tiny_backbone(),
        head_in_channels=16 + 16 + 32,
        head_hidden_channels=32,
        head_embed_channels=16,
        head_num_prototypes=32,
        mask_jitter=0.01,
        momentum_base=0.994,
        match_max_r=0.32,
        up_cast_level=2,
    )


def _tiny_concerto() -> ConcertoConfig:
    # A 2-layer, 32-wide DINOv2 on 28x28 crops (2x2 patches of 14 pixels); weights must be given.
    return ConcertoConfig(
        backbone=_tiny_backbone(),
        image_encoder=ImageEncoderConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, use_swiglu_ffn=False, image_size=28
        ),
        patch_h=2,
        patch_w=2,
        backbone_out_channels=8 + 16 + 16 + 32,
        head_in_channels=16 + 16 + 32,
        head_hidden_channels=32,
        head_embed_channels=16,
        head_num_prototypes=32,
        enc2d_head_in_channels=32,
        enc2d_head_hidden_channels=32,
        enc2d_head_num_prototypes=32,
        mask_jitter=0.01,
        mask_loss_weight=1 / 8,
        roll_mask_loss_weight=1 / 8,
        unmask_loss_weight=2 / 8,
        enc2d_loss_weight=4 / 8,
        momentum_base=0.994,
        match_max_r=0.32,
        up_cast_level=2,
        enc2d_upcast_level=3,
    )


_NAMED_CONFIGS = {
    "pretrain-sonata-v1m1-0-base": _sonata_base,
    "pretrain-concerto-v1m1-0-base": lambda: _concerto((48, 96, 192, 384, 512), (3, 6, 12, 24, 32)),
    "pretrain-concerto-v1m1-1-large-base": lambda: _concerto((64, 128, 256, 512, 768), (4, 8, 16, 32, 48)),
    "pretrain-concerto-v1m1-2-large-video": lambda: _concerto((64, 128, 256, 512, 768), (4, 8, 16, 32, 48)),
    "tiny-sonata": _tiny_sonata,
    "tiny-concerto": _tiny_concerto,
}

MODEL_CONFIG_NAMES = tuple(_NAMED_CONFIGS)


def get_model_config(name: str) -> SonataConfig | ConcertoConfig:
    """A fresh copy of the named config (callers may change it freely)."""
    if name not in _NAMED_CONFIGS:
        raise ConfigError(f"unknown model config {name!r}; valid names: {', '.join(MODEL_CONFIG_NAMES)}")
    return _NAMED_CONFIGS[name]()
