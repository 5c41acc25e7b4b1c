"""Concerto (Pointcept's `Concerto-v1m1`): Sonata's point self-distillation plus a 2D-3D term.

The 2D-3D (`enc2d`) term: the masked student's features of the first global view, up-cast to
`enc2d_upcast_level`, are averaged per image patch they project to (through the pixel
correspondences of the batch), projected by `patch_proj` to the image encoder's width and pulled
towards the frozen DINOv2-with-registers patch features by a cosine loss (after removing each
vector's mean when `enc2d_cos_shift`).

Differences from Sonata that follow the reference: one teacher head (the mask head) gives the targets
of every point term; the `enc2d_head_student` / `enc2d_head_teacher` prototype heads exist for
checkpoint compatibility only (the reference's loss never uses them), so they are frozen here, which
leaves training unchanged (the reference's optimizer never sees a gradient for them either). When
the batch holds no image, the enc2d term repeats the weight-normalised point loss, as in the
reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Dinov2WithRegistersModel

from concerto_ray.errors import ConfigError, DataError
from concerto_ray.model.configs import ConcertoConfig
from concerto_ray.model.heads import PrototypeHead
from concerto_ray.model.image_encoder import patch_features
from concerto_ray.model.sonata import Sonata, finish_losses, first_view_rows, up_cast
from concerto_ray.model.structure import Point, offset2batch


class Concerto(Sonata):
    def __init__(self, config: ConcertoConfig, image_encoder: Dinov2WithRegistersModel):
        super().__init__(config)
        self.config: ConcertoConfig = config
        if config.enc2d_loss_weight > 0:
            if image_encoder.config.hidden_size != config.enc2d_head_in_channels:
                raise ConfigError(
                    f"the image encoder is {image_encoder.config.hidden_size} wide but "
                    f"enc2d_head_in_channels is {config.enc2d_head_in_channels}"
                )
            # Attribute names follow the reference so that its checkpoints load strictly.
            self.enc2d_model = image_encoder
            self.patch_proj = nn.Linear(config.backbone_out_channels, config.enc2d_head_in_channels)
            width = config.enc2d_head_in_channels
            self.enc2d_head_student = PrototypeHead(
                width, config.enc2d_head_hidden_channels, width, config.enc2d_head_num_prototypes
            )
            self.enc2d_head_teacher = PrototypeHead(
                width, config.enc2d_head_hidden_channels, width, config.enc2d_head_num_prototypes, with_mlp=False
            )
            self.enc2d_head_teacher.prototype.load_state_dict(self.enc2d_head_student.prototype.state_dict())
            self.enc2d_head_student.requires_grad_(False)
            self.enc2d_head_teacher.requires_grad_(False)

    def _head_names(self) -> list[str]:
        names = super()._head_names()
        # With only the enc2d term, the reference still builds an unmask head pair.
        return names or ["unmask_head"]

    def train(self, mode: bool = True) -> Concerto:
        super().train(mode)
        if self.config.enc2d_loss_weight > 0:
            self.enc2d_model.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def update_teacher(self) -> None:
        super().update_teacher()
        if self.config.enc2d_loss_weight > 0:
            self.enc2d_head_teacher.prototype.load_state_dict(self.enc2d_head_student.prototype.state_dict())

    @torch.no_grad()
    def _teacher_logits(self, teacher: Point) -> dict[str, torch.Tensor]:
        # One teacher head serves every point term: the mask head when it exists, else the unmask head.
        head = "mask_head" if "mask_head" in self.teacher else "unmask_head"
        logits = self.teacher[head](teacher.feat)
        return {"mask": logits, "unmask": logits}

    def _needs_masked_student(self) -> bool:
        return super()._needs_masked_student() or self.config.enc2d_loss_weight > 0

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config
        views = self._prepare_views(batch)  # checks the point views first
        if c.enc2d_loss_weight > 0 and batch["global_coord"].device.type == "cpu":
            # The checks read values (device syncs and a full scan): on an accelerator the batch comes from
            # collate_concerto, which builds images, img_num and correspondences consistently.
            validate_image_batch(batch, c.num_global_view, c.patch_h, c.patch_w)
        teacher = self._teacher_forward(views.global_point)
        student_masked = self._student_forward(views.masked_point) if self._needs_masked_student() else None
        weighted = self._point_losses(teacher, student_masked, views.local_point)
        if c.enc2d_loss_weight > 0:
            if batch["images"].shape[0] > 0:  # one image per img_num count: a shape, no device sync
                enc2d = self._enc2d_loss(student_masked, batch)
            else:
                point_weights = sum(weight for _, weight in weighted.values())
                if point_weights == 0:
                    raise DataError("the batch has no image and no point loss is enabled", field="img_num")
                enc2d = sum(value * weight for value, weight in weighted.values()) / point_weights
            weighted["enc2d_loss"] = (enc2d, c.enc2d_loss_weight)
        return finish_losses(weighted)

    def _enc2d_loss(self, student_masked: Point, batch: dict) -> torch.Tensor:
        c = self.config
        num_patches = c.patch_h * c.patch_w
        point = up_cast(student_masked, c.enc2d_upcast_level - c.up_cast_level)
        correspondence = pool_correspondence(point, batch["global_correspondence"])

        # Rows of the first global view of every scene, and the scene each row belongs to.
        rows = first_view_rows(point.batch, c.num_global_view)
        scene_of_row = point.batch[rows] // c.num_global_view
        feat3d = point.feat[rows]
        correspondence = correspondence[rows]

        row, view = torch.nonzero((correspondence != -1).any(dim=-1), as_tuple=True)
        if len(row) == 0:
            raise DataError("no point of the first global views projects into any image", field="global_correspondence")
        patch = correspondence[row, view].long()  # pooled coordinates are truncated, as in the reference
        img_num = batch["img_num"].to(point.feat.device).long()
        first_image = torch.cumsum(img_num, dim=0) - img_num
        image = first_image[scene_of_row[row]] + view
        flat_patch = image * num_patches + patch[:, 0] * c.patch_w + patch[:, 1]

        # Mean 3D feature per image patch (in fp32, whatever the autocast dtype).
        patches, patch_of_pair = torch.unique(flat_patch, return_inverse=True)
        summed = feat3d.new_zeros(len(patches), feat3d.shape[1], dtype=torch.float32)
        summed.index_add_(0, patch_of_pair, feat3d[row].float())
        pairs_per_patch = torch.bincount(patch_of_pair, minlength=len(patches)).clamp(min=1)
        feat3d_patch = self.patch_proj(summed / pairs_per_patch[:, None]).float()

        feat2d = patch_features(self.enc2d_model, batch["images"], c.patch_h, c.patch_w)
        feat2d_patch = feat2d.reshape(-1, feat2d.shape[-1])[patches].float()
        if c.enc2d_cos_shift:
            feat2d_patch = feat2d_patch - feat2d_patch.mean(dim=-1, keepdim=True)
            feat3d_patch = feat3d_patch - feat3d_patch.mean(dim=-1, keepdim=True)
        cosine = F.cosine_similarity(feat2d_patch, feat3d_patch, dim=1, eps=1e-6)
        return (1 - cosine).mean() * 10


@torch.no_grad()
def pool_correspondence(point: Point, correspondence: torch.Tensor) -> torch.Tensor:
    """Pixel correspondences (N, V, 2) of the input points, pooled down to `point`'s level.

    Follows `point`'s pooling links down to the input level (consuming them), then averages the valid
    (not -1) correspondences of each pooled point per image; a pooled point without any gets -1."""
    inverses = []
    while "pooling_parent" in point:
        inverses.append(point.pop("pooling_inverse"))
        point = point.pop("pooling_parent")
    correspondence = correspondence.float()
    for inverse in reversed(inverses):
        num_coarse = int(inverse.max()) + 1
        valid = (correspondence != -1).all(dim=-1)
        summed = correspondence.new_zeros(num_coarse, *correspondence.shape[1:])
        summed.index_add_(0, inverse, torch.where(correspondence == -1, 0.0, correspondence))
        count = correspondence.new_zeros(num_coarse, correspondence.shape[1])
        count.index_add_(0, inverse, valid.float())
        correspondence = summed / count.clamp(min=1)[..., None]
        correspondence[count == 0] = -1
    return correspondence


def validate_image_batch(batch: dict, num_global_view: int, patch_h: int, patch_w: int) -> None:
    """Raise DataError naming the field when images, image counts and correspondences disagree."""
    for key in ("images", "img_num", "global_correspondence", "global_offset"):
        if key not in batch:
            raise DataError("missing from the batch (needed by the enc2d term)", field=key)
    images, img_num, corr = batch["images"], batch["img_num"], batch["global_correspondence"]
    num_scenes = len(batch["global_offset"]) // num_global_view
    if img_num.dim() != 1 or len(img_num) != num_scenes:
        raise DataError(
            f"must hold one image count per scene ({num_scenes}), got shape {tuple(img_num.shape)}", field="img_num"
        )
    if images.dim() != 4 or images.shape[0] != int(img_num.sum()):
        raise DataError(
            f"has shape {tuple(images.shape)} but img_num {img_num.tolist()} sums to {int(img_num.sum())} images",
            field="images",
        )
    num_points = batch["global_coord"].shape[0]
    if corr.dim() != 3 or corr.shape[0] != num_points or corr.shape[2] != 2:
        raise DataError(
            f"must have shape ({num_points}, max images per scene, 2), got {tuple(corr.shape)}",
            field="global_correspondence",
        )
    if len(img_num) and int(img_num.max()) > corr.shape[1]:
        raise DataError(
            f"has room for {corr.shape[1]} images per point but img_num is {img_num.tolist()}",
            field="global_correspondence",
        )
    valid = (corr != -1).all(dim=-1)
    scene = offset2batch(batch["global_offset"]) // num_global_view
    view_index = torch.arange(corr.shape[1], device=corr.device)
    beyond = valid & (view_index[None, :] >= img_num.to(corr.device)[scene][:, None])
    if beyond.any():
        point, view = (int(i) for i in torch.nonzero(beyond)[0])
        raise DataError(
            f"point {point} (scene {int(scene[point])}) refers to image {view}, but that scene has "
            f"only {int(img_num[scene[point]])} images",
            field="global_correspondence",
        )
    rows, cols = corr[..., 0][valid], corr[..., 1][valid]
    if len(rows) and (rows.min() < 0 or rows.max() >= patch_h or cols.min() < 0 or cols.max() >= patch_w):
        raise DataError(
            f"valid correspondences must be patch coordinates in [0, {patch_h}) x [0, {patch_w}), "
            f"got rows {float(rows.min())}..{float(rows.max())}, columns "
            f"{float(cols.min())}..{float(cols.max())}",
            field="global_correspondence",
        )
