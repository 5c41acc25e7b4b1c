"""Optimizer, lr schedule and weight-decay schedule of pre-training, as the paper configs set them up.

- AdamW over the trainable parameters, in one group per encoder block plus one for everything else. The last
  block and the rest train at `lr`; each earlier block at one more factor `layer_decay` (layer-wise lr decay).
- torch's OneCycleLR peaks at each group's lr and also cycles AdamW's beta1 (0.95 -> 0.85 -> 0.95).
- The weight decay of every group follows a half cosine from `weight_decay` up to `final_weight_decay`.
All three are stepped once per optimizer step, so a run resumed at step N continues each of them exactly.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from concerto_ray.model.schedules import CosineSchedule
from concerto_ray.train.config import OptimConfig

_BLOCK = re.compile(r"(?:^|\.)enc(\d+)\.block(\d+)\.")


def param_groups(model: nn.Module, optim: OptimConfig, enc_depths: tuple[int, ...]) -> list[dict]:
    """Trainable parameters grouped for layer-wise lr decay; each group carries its `name` and peak `lr`."""
    blocks = [(stage, block) for stage, depth in enumerate(enc_depths) for block in range(depth)]
    groups = {"other": {"name": "other", "params": [], "lr": optim.lr}}
    for index, (stage, block) in enumerate(blocks):
        name = f"enc{stage}.block{block}"
        groups[name] = {"name": name, "params": [], "lr": optim.lr * optim.layer_decay ** (len(blocks) - index - 1)}
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # the EMA teacher and the frozen image encoder
        match = _BLOCK.search(param_name)
        key = f"enc{match[1]}.block{match[2]}" if match else "other"
        if key not in groups:
            raise ValueError(f"parameter {param_name!r} belongs to a block outside enc_depths {enc_depths}")
        groups[key]["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def build_optimizer(
    model: nn.Module, optim: OptimConfig, enc_depths: tuple[int, ...], total_steps: int
) -> tuple[torch.optim.AdamW, OneCycleLR]:
    return adamw_one_cycle(
        param_groups(model, optim, enc_depths),
        optim.weight_decay,
        total_steps,
        pct_start=optim.pct_start,
        anneal_strategy=optim.anneal_strategy,
        div_factor=optim.div_factor,
        final_div_factor=optim.final_div_factor,
    )


def adamw_one_cycle(
    groups: list[dict],
    weight_decay: float,
    total_steps: int,
    *,
    pct_start: float,
    anneal_strategy: str,
    div_factor: float,
    final_div_factor: float,
) -> tuple[torch.optim.AdamW, OneCycleLR]:
    """AdamW over parameter `groups` and a OneCycleLR peaking at each group's `lr` (pre-training and fine-tuning)."""
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)
    scheduler = OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in groups],
        total_steps=total_steps,
        pct_start=pct_start,
        anneal_strategy=anneal_strategy,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )
    return optimizer, scheduler


def weight_decay_schedule(optim: OptimConfig, total_steps: int) -> CosineSchedule:
    return CosineSchedule(base=optim.weight_decay, final=optim.final_weight_decay, total_steps=total_steps)


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["weight_decay"] = value
