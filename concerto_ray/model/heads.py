"""Projection head with prototypes (Pointcept's `OnlineCluster`).

Features go through an optional MLP, are L2-normalised, and are scored against `num_prototypes`
unit-length prototype vectors. Parameter names (`mlp.0`, `mlp.2`, `prototype.parametrizations.weight.
original0/original1`) equal the reference's so its checkpoints load strictly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PrototypeHead(nn.Module):
    def __init__(
        self, in_channels: int, hidden_channels: int, embed_channels: int, num_prototypes: int, with_mlp: bool = True
    ):
        super().__init__()
        if with_mlp:
            self.mlp = nn.Sequential(
                nn.Linear(in_channels, hidden_channels),
                nn.GELU(),
                nn.Linear(hidden_channels, embed_channels),
            )
            for layer in (self.mlp[0], self.mlp[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        else:
            self.mlp = None
        # Weight-normalised prototypes with the magnitude frozen at 1: every prototype stays a unit
        # vector, so the scores are cosine similarities.
        self.prototype = nn.utils.parametrizations.weight_norm(nn.Linear(embed_channels, num_prototypes, bias=False))
        magnitude = self.prototype.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = False

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            feat = self.mlp(feat)
        eps = 1e-6 if feat.dtype == torch.float16 else 1e-12
        return self.prototype(F.normalize(feat, dim=-1, p=2, eps=eps))
