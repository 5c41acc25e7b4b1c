"""Pointcept's PT-v3m2 set up to train beside ours, for the step benchmark (benchmarks/gpu_step.py).

It starts from `compare_reference_ptv3.load_reference` (which puts stand-ins for Pointcept's missing imports in
place) and replaces the three stand-ins that only suit that script's CPU, eval-only comparison:

* `flash_attn.flash_attn_varlen_qkvpacked_func` -> `flash_attn_varlen_qkvpacked_func` below, with flash-attn's
  semantics (packed (total, 3, heads, head_dim) qkv, int32 `cu_seqlens` segment bounds, `max_seqlen`, `dropout_p`,
  `softmax_scale`), computed by `torch.nn.functional.scaled_dot_product_attention`. flash-attn is not installed,
  so the reference's attention time is PyTorch's SDPA kernel time (flash where SDPA picks it), not flash-attn's.
* timm's `DropPath` -> our `DropPath` (drops whole rows of the (points, channels) features, scaled by 1 / keep, as
  timm's does for these inputs), because the comparison's stand-in refuses to run in training mode.
* spconv: on CUDA the real `spconv.pytorch.SubMConv3d` with its default algorithm, as Pointcept runs it (under
  autocast spconv casts its inputs to fp16); on CPU the comparison's Native-algorithm stand-in (spconv's only CPU
  kernels), run in fp32 with autocast off, since spconv's CPU path takes no bf16.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from pathlib import Path

import compare_reference_ptv3
import torch
import torch.nn.functional as F

from concerto_ray.model.ptv3 import DropPath, PTv3Config
from concerto_ray.model.sparse import spconv


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention within each segment [cu_seqlens[i], cu_seqlens[i+1]) of `qkv`; returns (total, heads, head_dim).

    When every segment is `max_seqlen` long (the usual case: Pointcept pads samples to whole patches) the segments
    are one batch, found from shapes alone without a device sync. Otherwise (a sample shorter than a patch) the
    segments are grouped by length, one SDPA call per length.
    """
    total, _, heads, head_dim = qkv.shape
    segments = cu_seqlens.numel() - 1
    if segments * max_seqlen == total:
        packed = qkv.view(segments, max_seqlen, 3, heads, head_dim)
        return _attend(packed, dropout_p, softmax_scale).reshape(total, heads, head_dim)
    out = torch.empty(total, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens.diff().long()
    for length in lengths.unique().tolist():
        rows = starts[lengths == length, None] + torch.arange(length, device=qkv.device)  # (segments, length)
        out[rows.flatten()] = _attend(qkv[rows], dropout_p, softmax_scale).reshape(-1, heads, head_dim)
    return out


def _attend(packed: torch.Tensor, dropout_p: float, scale: float | None) -> torch.Tensor:
    """(segments, length, 3, heads, head_dim) packed qkv -> (segments, length, heads, head_dim)."""
    q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale).transpose(1, 2)


class Fp32NativeSubMConv3d(compare_reference_ptv3.NativeSubMConv3d):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):  # autocast would turn spconv's inner matmuls bf16 again
            return super().forward(x.replace_feature(x.features.float()))


def load_reference_for_training(root: Path, device: torch.device) -> types.ModuleType:
    """Pointcept's PT-v3m2 module from the checkout at `root`, able to run training steps on `device`."""
    ref, _ = compare_reference_ptv3.load_reference(root)
    ref.flash_attn = types.SimpleNamespace(flash_attn_varlen_qkvpacked_func=flash_attn_varlen_qkvpacked_func)
    ref.DropPath = DropPath
    ref.spconv = spconv if device.type == "cuda" else types.SimpleNamespace(SubMConv3d=Fp32NativeSubMConv3d)
    return ref


def reference_kwargs(ref: types.ModuleType, config: PTv3Config) -> dict:
    """Our backbone config as keyword arguments of Pointcept's constructor.

    Fields Pointcept's PT-v3m2 lacks must keep our defaults, where both models behave alike.
    """
    accepted = inspect.signature(ref.PointTransformerV3).parameters
    defaults = PTv3Config()
    kwargs = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in accepted:
            kwargs[field.name] = value
        elif value != getattr(defaults, field.name):
            raise ValueError(f"backbone field {field.name}={value!r} has no counterpart in Pointcept's PT-v3m2")
    return kwargs


def set_reference_shuffling(model: torch.nn.Module, ref: types.ModuleType, enabled: bool) -> None:
    """Pointcept's order shuffling at the input and at every pooling level, on or off (off: deterministic)."""
    model.shuffle_orders = enabled
    for module in model.modules():
        if isinstance(module, ref.GridPooling):
            module.shuffle_orders = enabled
