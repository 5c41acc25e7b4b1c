"""Point Prompt Training (Pointcept's `PPT-v1m3`): one backbone segments several datasets, each in its own classes.

Every batch comes from one dataset, named by its `condition` ("ScanNet", "S3DIS", "Structured3D"). The point
features (every encoder level up-cast onto the finest one for encoder-only backbones, else the decoder's output)
are projected to CLIP's text space and L2-normalised; a point's logits are its cosine similarities to the condition's
class-name embeddings (`model.text_encoder`), times exp(CLIP's logit_scale). v1m3 has no prompt-driven
normalisation: the backbone is the plain PTv3, whose layer norms need none.

Parameter names equal the reference's (`backbone.*`, `proj_head.weight`, `proj_head.bias`, `logit_scale`; the
class embeddings are a non-persistent buffer), so Pointcept's PPT checkpoints load strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from concerto_ray.finetune.losses import SegmentationLoss
from concerto_ray.model.ptv3 import PointTransformerV3, PTv3Config
from concerto_ray.model.sonata import up_cast
from concerto_ray.model.text_encoder import ClassText


class PointPromptTraining(nn.Module):
    """`forward(batch)` with `batch["condition"]` (one dataset's name, or a sequence of the same name) returns
    {"seg_logits": (N, that dataset's classes)} and, when the batch has `segment`, also "loss"."""

    def __init__(
        self,
        backbone: PTv3Config,
        conditions: Sequence[str],
        text: ClassText,
        backbone_out_channels: int,
        criteria: SegmentationLoss | None = None,
        freeze_backbone: bool = False,
    ):
        super().__init__()
        if len(conditions) != len(text.num_classes):
            raise ValueError(f"{len(conditions)} conditions but class names of {len(text.num_classes)} datasets")
        self.backbone = PointTransformerV3(backbone)
        self.criteria = criteria if criteria is not None else SegmentationLoss()
        self.conditions = tuple(conditions)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.up_cast_levels = len(backbone.enc_depths) - 1 if backbone.enc_mode else 0
        self.num_classes = list(text.num_classes)
        self.register_buffer("class_embeddings", text.embeddings.clone(), persistent=False)
        self.proj_head = nn.Linear(backbone_out_channels, text.embeddings.shape[1])
        # CLIP's temperature, frozen as in the reference (it comes from the frozen CLIP model) but saved with it.
        self.logit_scale = nn.Parameter(text.logit_scale.clone(), requires_grad=False)

    def condition_index(self, condition: str | Sequence[str]) -> int:
        name = condition if isinstance(condition, str) else condition[0]
        if name not in self.conditions:
            raise ValueError(f"condition {name!r} is not one of the model's {self.conditions}")
        return self.conditions.index(name)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        index = self.condition_index(batch["condition"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            point = self.backbone(batch)
        point = up_cast(point, self.up_cast_levels)
        feat = self.proj_head(point.feat)
        eps = 1e-6 if feat.dtype == torch.float16 else 1e-12  # as the reference: 1e-12 underflows in fp16
        feat = nn.functional.normalize(feat, dim=-1, p=2, eps=eps)
        classes = self.class_embeddings.split(self.num_classes)[index]
        logits = self.logit_scale.exp() * (feat @ classes.t())
        out = {"seg_logits": logits}
        if "segment" in batch:
            out["loss"] = self.criteria(logits, batch["segment"])
        return out


class Conditioned(nn.Module):
    """A PPT model whose every batch comes from one dataset: evaluation on the config's own dataset."""

    def __init__(self, model: PointPromptTraining, condition: str):
        super().__init__()
        self.model = model
        self.condition = condition

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.model({**batch, "condition": self.condition})
