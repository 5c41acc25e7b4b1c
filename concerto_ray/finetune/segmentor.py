"""Semantic segmentation model (Pointcept's `DefaultSegmentorV2`), pre-trained backbone loading, lr groups.

Parameter names equal the reference's (`backbone.*`, `seg_head.weight`, `seg_head.bias`; under LoRA
`backbone.enc.base_model.model.*`), so Pointcept semseg checkpoints load with
`concerto_ray.model.checkpoint.load_pointcept_state_dict`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from torch import nn

from concerto_ray.data import storage
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.configs import FinetuneConfig
from concerto_ray.finetune.lora import add_lora
from concerto_ray.finetune.losses import SegmentationLoss
from concerto_ray.finetune.ppt import Conditioned, PointPromptTraining
from concerto_ray.model.checkpoint import DDP_PREFIX
from concerto_ray.model.ptv3 import PointTransformerV3, PTv3Config
from concerto_ray.model.sonata import up_cast
from concerto_ray.model.text_encoder import class_text_embeddings
from concerto_ray.node_cache import local_copy

BACKBONE_PREFIX = "backbone."
DECODER_PREFIX = "dec."
CHECKPOINT_FILE = "model.pt"  # inside a concerto-ray checkpoint folder
BLOCK_KEYWORD = "block"  # parameters whose name contains it train at `block_lr` (the reference's param_dicts)


def head_in_channels(backbone: PTv3Config) -> int:
    """Width of the features the head sees: every encoder level up-cast (encoder-only), or the decoder output."""
    return sum(backbone.enc_channels) if backbone.enc_mode else backbone.dec_channels[0]


class Segmentor(nn.Module):
    """Backbone + linear head. `forward(batch)` returns {"seg_logits": (N, classes)} and, when the batch has
    `segment`, also "loss".

    Encoder-only backbones have the features of all coarser levels concatenated onto the finest one. With
    `freeze_backbone` (linear probing) the backbone gets no gradients but follows the segmentor's train/eval
    mode, as in the reference: drop path stays active while the head trains."""

    def __init__(
        self,
        backbone: PTv3Config,
        num_classes: int,
        criteria: SegmentationLoss | None = None,
        freeze_backbone: bool = False,
    ):
        super().__init__()
        self.seg_head = nn.Linear(head_in_channels(backbone), num_classes)
        self.backbone = PointTransformerV3(backbone)
        self.criteria = criteria if criteria is not None else SegmentationLoss()
        self.freeze_backbone = freeze_backbone
        self.up_cast_levels = len(backbone.enc_depths) - 1 if backbone.enc_mode else 0
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            point = self.backbone(batch)
        point = up_cast(point, self.up_cast_levels)
        logits = self.seg_head(point.feat)
        out = {"seg_logits": logits}
        if "segment" in batch:
            out["loss"] = self.criteria(logits, batch["segment"])
        return out


def build_segmentor(cfg: FinetuneConfig, endpoint_url: str | None = None) -> Segmentor | PointPromptTraining:
    """The model of `cfg.mode`, with the pre-trained backbone loaded (before LoRA wraps the encoder, as in the
    reference) when `cfg.pretrained.path` is set; `endpoint_url` serves an s3:// checkpoint."""
    criteria = SegmentationLoss(cfg.criteria.ce_weight, cfg.criteria.lovasz_weight, cfg.ignore_index)
    if cfg.ppt is not None:  # the class embeddings come from CLIP, loaded on this worker's node
        ppt = cfg.ppt
        text = class_text_embeddings(
            ppt.clip_model, ppt.class_names, ppt.template, field="finetune.ppt.clip_model", endpoint_url=endpoint_url
        )
        model = PointPromptTraining(cfg.backbone, ppt.conditions, text, ppt.backbone_out_channels, criteria)
    else:
        model = Segmentor(cfg.backbone, cfg.num_classes, criteria, freeze_backbone=cfg.mode == "lin")
    if cfg.pretrained.path is not None:
        load_pretrained_backbone(
            model, cfg.pretrained.path, cfg.pretrained.keyword, cfg.pretrained.replacement, endpoint_url
        )
    if cfg.mode == "lora":
        add_lora(model, cfg.lora)
    return model


@dataclass
class PretrainedLoad:
    loaded: int  # backbone tensors taken from the checkpoint
    ignored: list[str]  # backbone keys of the checkpoint the model has no use for (e.g. the pre-training mask token)
    new: list[str]  # model keys the checkpoint does not have (a fresh decoder)


def load_pretrained_backbone(
    model: Segmentor,
    path: str,
    keyword: str = "module.student.backbone",
    replacement: str = "module.backbone",
    endpoint_url: str | None = None,
) -> PretrainedLoad:
    """Copy pre-trained backbone weights into `model.backbone`.

    `path` is a checkpoint file holding {"state_dict": ...} (Pointcept's .pth, our model.pt) or a concerto-ray
    checkpoint folder, local or s3:// (`endpoint_url`: an S3-compatible store). Keys are rewritten as the
    reference's CheckpointLoader does: prefixed with "module." where missing, the first `keyword` replaced by
    `replacement`, "module." dropped; those then under "backbone." are loaded. Every encoder weight must be found;
    only decoder weights may be new."""
    state_dict = _read_state_dict(path, endpoint_url)
    weights = {}
    for key, value in state_dict.items():
        key = key if key.startswith(DDP_PREFIX) else DDP_PREFIX + key
        key = key.replace(keyword, replacement, 1).removeprefix(DDP_PREFIX)
        if key.startswith(BACKBONE_PREFIX):
            weights[key.removeprefix(BACKBONE_PREFIX)] = value
    if not weights:
        raise ConfigError(
            f"{path}: no key becomes 'backbone.*' after replacing {keyword!r} with {replacement!r}; "
            f"the checkpoint's first keys are {list(state_dict)[:5]}"
        )
    try:
        result = model.backbone.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even when not strict
        raise ConfigError(f"{path}: backbone weights do not fit the configured backbone: {exc}") from exc
    missing = [key for key in result.missing_keys if not key.startswith(DECODER_PREFIX)]
    if missing:
        raise ConfigError(
            f"{path}: {len(missing)} encoder weights are missing from the checkpoint, e.g. "
            f"{missing[:5]}; check pretrained.keyword/replacement and the backbone config"
        )
    return PretrainedLoad(
        loaded=len(weights) - len(result.unexpected_keys),
        ignored=list(result.unexpected_keys),
        new=list(result.missing_keys),
    )


def locate_checkpoint(path: str, endpoint_url: str | None = None) -> tuple[storage.Location, str]:
    """The folder and file name of the checkpoint file that `path` (a file, or a concerto-ray checkpoint folder
    holding model.pt) names; ConfigError if there is none."""
    parent, name = posixpath.split(str(path).rstrip("/"))
    folder = storage.resolve(parent, endpoint_url)
    if folder.filesystem.get_file_info(folder.path(name)).type == pafs.FileType.Directory:
        folder, name = storage.resolve(path, endpoint_url), CHECKPOINT_FILE
    if not folder.exists(name):
        raise ConfigError(f"pre-trained checkpoint not found: {folder.uri_of(name)}")
    return folder, name


def _read_state_dict(path: str, endpoint_url: str | None) -> dict[str, torch.Tensor]:
    folder, name = locate_checkpoint(path, endpoint_url)
    # An s3:// checkpoint is downloaded once per node (every worker of a node loads the same file).
    local = local_copy(folder.uri_of(name), endpoint_url, field="finetune.pretrained.path")
    checkpoint = torch.load(local, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(
            f"{folder.uri_of(name)}: expected a dict with a 'state_dict' entry, as Pointcept and concerto-ray save"
        )
    return checkpoint["state_dict"]


def for_evaluation(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """The model as evaluation calls it: a PPT model on the batches of the config's own dataset."""
    return Conditioned(model, cfg.ppt.condition) if cfg.ppt is not None else model


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Trainable parameters in AdamW groups, each with its `name` and peak `lr` (for OneCycleLR's max_lr):
    names containing "block" at `cfg.block_lr`, all others at `cfg.lr`. Empty groups are left out."""
    groups = {
        "default": {"name": "default", "params": [], "lr": cfg.lr},
        BLOCK_KEYWORD: {"name": BLOCK_KEYWORD, "params": [], "lr": cfg.block_lr},
    }
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[BLOCK_KEYWORD if BLOCK_KEYWORD in name else "default"]["params"].append(param)
    return [group for group in groups.values() if group["params"]]
