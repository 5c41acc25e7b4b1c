"""Frozen DINOv2-with-registers image encoder of Concerto's 2D-3D term.

The encoder is a plain `transformers.Dinov2WithRegistersModel`, registered in Concerto under the
reference's name `enc2d_model`, so Pointcept's Concerto checkpoints (which do carry the frozen image
weights, as `module.enc2d_model.*`) load strictly. Weights come from a local directory written by
save_pretrained, an s3:// copy of one, or a Hugging Face hub name, fetched on the node that loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import is_offline_mode
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from concerto_ray.errors import ConfigError
from concerto_ray.node_cache import is_remote, local_copy


@dataclass(kw_only=True)
class ImageEncoderConfig:
    """Where the DINOv2 weights are, and the architecture they must have.

    The architecture is spelled out so that parameter counts (and shape checks against the point
    branch) need no download; loaded weights whose architecture differs are rejected.
    """

    weights: str = ""  # local directory written by save_pretrained, an s3:// copy of one, or a hub name such as
    # "facebook/dinov2-with-registers-giant"
    weights_field: str = "image_encoder.weights"  # the config field that named `weights`, for error messages
    hidden_size: int = 1536
    num_hidden_layers: int = 40
    num_attention_heads: int = 24
    mlp_ratio: int = 4
    use_swiglu_ffn: bool = True
    num_register_tokens: int = 4
    patch_size: int = 14
    image_size: int = 518

    def architecture(self) -> Dinov2WithRegistersConfig:
        return Dinov2WithRegistersConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            mlp_ratio=self.mlp_ratio,
            use_swiglu_ffn=self.use_swiglu_ffn,
            num_register_tokens=self.num_register_tokens,
            patch_size=self.patch_size,
            image_size=self.image_size,
        )


_CHECKED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "use_swiglu_ffn",
    "num_register_tokens",
    "patch_size",
)


def load_image_encoder(config: ImageEncoderConfig) -> Dinov2WithRegistersModel:
    """Load the pretrained encoder, check its architecture, and freeze it.

    An s3:// folder is copied once per node into concerto-ray's cache (`node_cache`); a hub name is downloaded once
    per node into Hugging Face's cache ($HF_HOME), whose file locks make a node's other workers wait for the first
    one's download. With HF_HUB_OFFLINE=1 (air-gapped nodes) only that cache is read.
    """
    field = config.weights_field
    if not config.weights:
        raise ConfigError(
            f"{field} is empty: give a local directory written by "
            "save_pretrained or a hub name such as 'facebook/dinov2-with-registers-giant'"
        )
    try:
        weights = str(local_copy(config.weights, field=field))
        model = Dinov2WithRegistersModel.from_pretrained(weights)
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot load DINOv2-with-registers from {config.weights!r}{_hub_note(config.weights)}: {exc}"
        ) from exc
    expected = config.architecture()
    for name in _CHECKED_FIELDS:
        if getattr(model.config, name) != getattr(expected, name):
            raise ConfigError(
                f"image_encoder.{name}: the weights at {config.weights!r} have "
                f"{getattr(model.config, name)!r}, the config says {getattr(expected, name)!r}"
            )
    return freeze(model)


def _hub_note(weights: str) -> str:
    """Where a hub name was looked for: on the hub, or (offline) only in this node's cache."""
    if is_remote(weights) or Path(weights).is_dir():
        return ""
    if is_offline_mode():
        return " (HF_HUB_OFFLINE is set: only this node's Hugging Face cache was read)"
    return f" (not a local directory; downloading it from the Hugging Face hub at {hub_constants.ENDPOINT} failed)"


def build_untrained_image_encoder(config: ImageEncoderConfig) -> Dinov2WithRegistersModel:
    """The encoder's architecture with random weights (for parameter counts and meta-device builds)."""
    return freeze(Dinov2WithRegistersModel(config.architecture()))


def freeze(model: Dinov2WithRegistersModel) -> Dinov2WithRegistersModel:
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def patch_features(model: Dinov2WithRegistersModel, images: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """(num_images, patch_h * patch_w, hidden) patch-token features, row-major over the patch grid.

    The last hidden state is [CLS, registers..., patches...]; the patch tokens are its last
    patch_h * patch_w entries.
    """
    num_patches = patch_h * patch_w
    hidden = model(pixel_values=images).last_hidden_state
    if hidden.shape[1] < num_patches:
        raise ValueError(
            f"image encoder returned {hidden.shape[1]} tokens for images of shape "
            f"{tuple(images.shape)}, fewer than the {patch_h}x{patch_w} patch grid"
        )
    return hidden[:, -num_patches:, :]
