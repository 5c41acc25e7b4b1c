"""Build a Sonata/Concerto model from its config, and report parameter counts."""

from __future__ import annotations

import torch

from concerto_ray.model.concerto import Concerto
from concerto_ray.model.configs import ConcertoConfig, SonataConfig, get_model_config
from concerto_ray.model.image_encoder import build_untrained_image_encoder, load_image_encoder
from concerto_ray.model.sonata import Sonata


def build_ssl_model(config: SonataConfig | ConcertoConfig) -> Sonata | Concerto:
    """The model, with Concerto's frozen image encoder loaded from `config.image_encoder.weights`."""
    if isinstance(config, ConcertoConfig):
        encoder = load_image_encoder(config.image_encoder) if config.enc2d_loss_weight > 0 else None
        return Concerto(config, encoder)
    return Sonata(config)


def model_info(config_name: str) -> dict:
    """Parameter counts of a named config, built on the meta device (no weights needed).

    `backbone_params`: one (student) backbone; `total_params`: everything in the state dict,
    including the teacher and, for Concerto, the frozen image encoder; `trainable_params`: what the
    optimizer updates; `image_encoder_params`: the frozen image encoder (0 for Sonata)."""
    config = get_model_config(config_name)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        if isinstance(config, ConcertoConfig):
            model = Concerto(config, build_untrained_image_encoder(config.image_encoder))
        else:
            model = Sonata(config)
    encoder = getattr(model, "enc2d_model", None)
    return {
        "name": config_name,
        "model": type(model).__name__,
        "backbone_params": _count(model.student["backbone"].parameters()),
        "total_params": _count(model.parameters()),
        "trainable_params": _count(p for p in model.parameters() if p.requires_grad),
        "image_encoder_params": _count(encoder.parameters()) if encoder is not None else 0,
    }


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)
