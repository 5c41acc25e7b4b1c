"""Pointcept's whole `Concerto-v1m1` model set up to train beside ours (benchmarks/concerto_step.py).

It starts from `_reference_gpu_shim.load_reference_for_training` (Pointcept's PT-v3m2 with its flash-attn, DropPath
and spconv stand-ins) and imports `pointcept/models/concerto/concerto_v1m1_base.py` read-only from the checkout,
with stand-ins for the packages that cannot be installed on the accelerator machine:

* `torch_scatter.segment_coo` (reduce "min"/"mean", sorted index), `torch_scatter.scatter_mean` and
  `torch_scatter.segment_csr` (reduce "sum"/"mean"/"max"/"min") -> `torch.segment_reduce` / `index_add_`; no
  wheel of torch_scatter exists for the machine's torch 2.11 + CUDA 13.
* `pointops.knn_query` (k nearest reference points per query, within matching segments, CUDA only, built from
  source) -> chunked `torch.cdist` + `argmin` per segment, then the exact distance of the chosen point. It returns
  what pointops returns for k = 1 (int32 indices into the reference points, Euclidean distances, shape (m, 1)).
* `timm.layers.trunc_normal_` -> `torch.nn.init.trunc_normal_` (the same truncated normal).
* the registry's `build_model` -> Pointcept's PT-v3m2 class, and `Concerto.load_enc2d` (which would download
  weights) -> the image encoder we pass in, so both models share one random-weight DINOv2 instance.

Each stand-in runs inside a `record_function` range named `stand-in:<name>` so the profiler can say what it costs.
Pointcept's Concerto creates small tensors with `.cuda()`; `cuda_as(device)` maps those to the CPU for CPU checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import sys
import types
from pathlib import Path

import torch
from _reference_gpu_shim import load_reference_for_training, reference_kwargs
from torch.profiler import record_function

from concerto_ray.model.configs import ConcertoConfig

# Per-chunk budget of query-reference distances in the kNN stand-in (~256 MB in fp32).
_MAX_DISTANCES_PER_CHUNK = 1 << 26


def segment_coo(src: torch.Tensor, index: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """torch_scatter.segment_coo along dim 0 for a sorted `index`; output size index.max() + 1."""
    size = int(index.max()) + 1
    if reduce == "mean":  # torch_scatter leaves empty segments at 0
        return scatter_mean(src, index, dim_size=size)
    with record_function("stand-in:torch_scatter"):
        return torch.segment_reduce(src, reduce, lengths=torch.bincount(index, minlength=size), axis=0)


def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim: int = 0, dim_size: int | None = None) -> torch.Tensor:
    """torch_scatter.scatter_mean along dim 0; rows without any source stay 0."""
    assert dim == 0
    with record_function("stand-in:torch_scatter"):
        size = dim_size if dim_size is not None else int(index.max()) + 1
        total = src.new_zeros(size, *src.shape[1:]).index_add_(0, index, src)
        count = torch.bincount(index, minlength=size).clamp(min=1).to(src.dtype)
        return total / count.view(-1, *([1] * (src.dim() - 1)))


def segment_csr(src: torch.Tensor, indptr: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    with record_function("stand-in:torch_scatter"):
        return torch.segment_reduce(src, reduce, offsets=indptr, axis=0)


@torch.no_grad()
def knn_query(
    nsample: int, xyz: torch.Tensor, offset: torch.Tensor, new_xyz: torch.Tensor, new_offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """pointops.knn_query for nsample = 1: nearest point of `xyz` for each `new_xyz` in the same segment."""
    assert nsample == 1, "the stand-in covers the k = 1 matching Concerto does"
    with record_function("stand-in:pointops.knn_query"):
        nearest = torch.empty(len(new_xyz), dtype=torch.long, device=new_xyz.device)
        q_start = r_start = 0
        for q_end, r_end in zip(new_offset.tolist(), offset.tolist()):
            ref = xyz[r_start:r_end]
            chunk = max(1, _MAX_DISTANCES_PER_CHUNK // max(1, len(ref)))
            for start in range(q_start, q_end, chunk):
                end = min(start + chunk, q_end)
                nearest[start:end] = torch.cdist(new_xyz[start:end], ref).argmin(dim=1) + r_start
            q_start, r_start = q_end, r_end
        distance = (new_xyz - xyz[nearest]).norm(dim=-1)
        return nearest.int()[:, None], distance[:, None]


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    sys.modules[name] = module
    return module


def load_reference_concerto(root: Path, device: torch.device) -> tuple[types.ModuleType, types.ModuleType]:
    """(Pointcept's PT-v3m2 module, its Concerto-v1m1 module) from the checkout at `root`, runnable on `device`."""
    ptv3 = load_reference_for_training(root, device)
    scatter = sys.modules["torch_scatter"]
    scatter.segment_coo, scatter.scatter_mean, scatter.segment_csr = segment_coo, scatter_mean, segment_csr
    sys.modules["timm.layers"].trunc_normal_ = torch.nn.init.trunc_normal_
    _package("pointops").knn_query = knn_query
    _package("pointcept.utils", root / "pointcept/utils")
    _package("pointcept.models.concerto", root / "pointcept/models/concerto")
    sys.modules["pointcept.models.builder"].build_model = lambda cfg: ptv3.PointTransformerV3(
        **{key: value for key, value in cfg.items() if key != "type"}
    )
    concerto = importlib.import_module("pointcept.models.concerto.concerto_v1m1_base")
    return ptv3, concerto


def build_reference_concerto(
    concerto: types.ModuleType, ptv3: types.ModuleType, config: ConcertoConfig, image_encoder: torch.nn.Module
) -> torch.nn.Module:
    """Pointcept's Concerto with our config's values; `image_encoder` becomes its (shared) `enc2d_model`."""

    class ReferenceConcerto(concerto.Concerto):
        def load_enc2d(self, model_name, model_weight):
            return image_encoder.eval()

    accepted = inspect.signature(concerto.Concerto).parameters
    kwargs = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name in accepted and field.name not in ("backbone", "teacher_custom")
    }
    backbone = dict(type="PT-v3m2", **reference_kwargs(ptv3, config.backbone))
    return ReferenceConcerto(
        image_weight_name="dinov2_vitg14_reg",
        image_weight_path="",
        backbone=backbone,
        teacher_custom=dict(config.teacher_custom),
        embedding_channels=64,
        **kwargs,
    )


def set_reference_schedule(model: torch.nn.Module, values) -> None:
    """What Pointcept's `before_step` sets from its schedulers, set to our schedule's values."""
    model.mask_size, model.mask_ratio = values.mask_size, values.mask_ratio
    model.teacher_temp, model.momentum = values.teacher_temp, values.momentum


@contextlib.contextmanager
def cuda_as(device: torch.device):
    """Make `Tensor.cuda()` return the tensor on `device` (Pointcept's Concerto hard-codes `.cuda()`)."""
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = original
