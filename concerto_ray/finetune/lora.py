"""LoRA fine-tuning of the encoder (Pointcept's `DefaultLORASegmentorV2`) with peft.

peft wraps `backbone.enc` with rank-`r` adapters on the attention `qkv` layers (bias "none"), so parameter names
match the reference's (`backbone.enc.base_model.model.enc0.block0.attn.qkv.lora_A.default.weight`). In the
backbone only the adapters train; the head trains as usual.
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from concerto_ray.finetune.configs import LoraSettings

ADAPTER_MARK = "lora_"  # peft names every adapter parameter lora_A / lora_B / lora_embedding_*


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap `model.backbone.enc` in place with LoRA adapters and freeze the rest of the backbone."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    model.backbone.enc = get_peft_model(model.backbone.enc, config)
    for name, param in model.backbone.named_parameters():
        param.requires_grad = ADAPTER_MARK in name
    return model


def has_lora(model: nn.Module) -> bool:
    return isinstance(model.backbone.enc, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the `qkv` weights (W + alpha / r * B A) and drop peft, in place: the model's
    state dict then has the plain backbone names of a non-LoRA segmentor."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to merge (add_lora was not applied, or already merged)")
    model.backbone.enc = model.backbone.enc.merge_and_unload()
    return model
