"""Pointcept <-> concerto-ray checkpoint key mapping.

Our Sonata/Concerto modules use the reference's parameter names, so the mapping is a prefix:

- Pointcept training checkpoints are `{"state_dict": ..., "epoch": ..., "optimizer": ...}` whose
  keys carry `module.` when saved under DistributedDataParallel (always, for multi-GPU runs):
  `module.student.backbone.*`, `module.teacher.backbone.*`, `module.student.mask_head.*`, ... and for
  Concerto also `module.patch_proj.*`, `module.enc2d_head_{student,teacher}.*` and
  `module.enc2d_model.*` — the frozen DINOv2 weights ARE in Pointcept's Concerto checkpoints,
  because the reference registers the image encoder as a submodule (as we do).
- concerto-ray checkpoints are `{"state_dict": ...}` with the same keys without `module.`; those written by
  pre-training also name their model config (`{"model": "pretrain-concerto-v1m1-0-base"}`).

Backbone-only weights (for fine-tuning) are found under `student.backbone.` (or `teacher.backbone.`)
of a pre-training checkpoint, under `backbone.` of a Pointcept fine-tuning model, or without a
prefix in released backbone files; `backbone_state_dict` handles all of these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from concerto_ray.errors import ConfigError

DDP_PREFIX = "module."
MODEL_NAME_KEY = "model"  # in a concerto-ray pre-training checkpoint: the name of its model config
BACKBONE_PREFIXES = {"student": "student.backbone.", "teacher": "teacher.backbone."}

Direction = Literal["pointcept-to-ray", "ray-to-pointcept"]


def pointcept_to_ray(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the DistributedDataParallel prefix where present."""
    return {key.removeprefix(DDP_PREFIX): value for key, value in state_dict.items()}


def ray_to_pointcept(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the DistributedDataParallel prefix, as Pointcept's multi-GPU trainer saves."""
    return {key if key.startswith(DDP_PREFIX) else DDP_PREFIX + key: value for key, value in state_dict.items()}


def backbone_state_dict(
    state_dict: dict[str, torch.Tensor], source: Literal["student", "teacher"] = "student"
) -> dict[str, torch.Tensor]:
    """Backbone weights without prefix, from a pre-training, fine-tuning or backbone-only state dict."""
    keys = pointcept_to_ray(state_dict)
    for prefix in (BACKBONE_PREFIXES[source], "backbone."):
        found = {key.removeprefix(prefix): value for key, value in keys.items() if key.startswith(prefix)}
        if found:
            return found
    return keys


def load_pointcept_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a Pointcept state dict strictly; a mismatch names the first differing keys."""
    result = model.load_state_dict(pointcept_to_ray(state_dict), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"checkpoint does not match {type(model).__name__}: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:5]}, {len(result.unexpected_keys)} unexpected keys "
            f"{result.unexpected_keys[:5]}"
        )


def convert_checkpoint(src: str | Path, dst: str | Path, direction: Direction) -> int:
    """Rewrite checkpoint `src` into `dst` in the other layout; returns the number of tensors.

    Only the model weights are carried over: optimizer and scheduler states are layout-specific."""
    converters = {"pointcept-to-ray": pointcept_to_ray, "ray-to-pointcept": ray_to_pointcept}
    if direction not in converters:
        raise ConfigError(f"unknown direction {direction!r}; valid: {', '.join(converters)}")
    src = Path(src)
    if not src.is_file():
        raise ConfigError(f"checkpoint not found: {src}")
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{src}: expected a dict with a 'state_dict' entry, as Pointcept and concerto-ray save")
    state_dict = converters[direction](checkpoint["state_dict"])
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict}, dst)
    return len(state_dict)
