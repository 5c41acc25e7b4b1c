"""`Point`: a batched point cloud as a dict of tensors, with serialization and sparsification.

Batches are packed: the points of all samples are concatenated and either `offset` (cumulative
point counts, one per sample) or `batch` (the sample index of each point) says where each sample
ends. Keys keep Pointcept's meaning so that checkpoints and heads written for it carry over:

- `coord` (N, 3) float coordinates; `grid_coord` (N, 3) integer voxel coordinates; `grid_size`;
- `feat` (N, C) features; `offset` (B,) and `batch` (N,) as above;
- `order`, `serialized_depth`, `serialized_code` / `serialized_order` / `serialized_inverse`
  (one row per serialization order: code, sort permutation, and its inverse);
- `sparse_shape`, `sparse_conv_feat` (an spconv tensor sharing `feat`);
- after pooling: `pooling_parent` (the finer Point), `pooling_inverse` (finer point -> coarse point),
  `idx_ptr` (CSR pointer of the finer points grouped by coarse point); after unpooling, when
  traceable: `unpooling_parent`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from concerto_ray.errors import DataError
from concerto_ray.model.serialization import MAX_DEPTH, encode
from concerto_ray.model.sparse import SparseConvTensor


def offset2bincount(offset: torch.Tensor) -> torch.Tensor:
    return torch.diff(offset, prepend=offset.new_zeros(1))


def offset2batch(offset: torch.Tensor) -> torch.Tensor:
    counts = offset2bincount(offset)
    return torch.arange(len(counts), device=offset.device).repeat_interleave(counts)


def batch2offset(batch: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(batch.bincount(), dim=0)


def validate_offset(offset: torch.Tensor, num_points: int) -> None:
    """Raise DataError unless `offset` describes `num_points` points split into non-empty samples."""
    if offset.dim() != 1 or len(offset) == 0:
        raise DataError(f"must be a non-empty 1-D tensor, got shape {tuple(offset.shape)}", field="offset")
    if int(offset[-1]) != num_points:
        raise DataError(f"ends at {int(offset[-1])} but the batch has {num_points} points", field="offset")
    counts = offset2bincount(offset)
    empty = torch.nonzero(counts <= 0).flatten().tolist()
    if empty:
        raise DataError(
            f"must be strictly increasing; batch element(s) {empty} have no points (offset={offset.tolist()})",
            field="offset",
        )


def validate_point_layout(data: dict, num_points: int) -> None:
    """The data-dependent checks of a batch's `offset` and/or `batch` (sorted, non-empty, consistent).

    They read tensor values, i.e. sync with the device: run them on CPU tensors, once per batch."""
    if "offset" in data:
        validate_offset(data["offset"], num_points)
    if "batch" in data:
        batch = data["batch"]
        if len(batch) and (torch.any(batch[1:] < batch[:-1]) or int(batch[0]) != 0):
            raise DataError(
                "must give each point's sample index, starting at 0, with points grouped by sample in sample order",
                field="batch",
            )
        validate_offset(batch2offset(batch), num_points)
        if "offset" in data and not torch.equal(batch, offset2batch(data["offset"])):
            raise DataError("does not match 'offset'", field="batch")


class Point(dict):
    """A batched point cloud; keys are also readable and writable as attributes (`point.feat`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "batch" not in self and "offset" in self:
            self["batch"] = offset2batch(self["offset"])
        elif "offset" not in self and "batch" in self:
            self["offset"] = batch2offset(self["batch"])

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"Point has no key {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def ensure_grid_coord(self) -> torch.Tensor:
        """`grid_coord`, computed from `coord` and `grid_size` when the data pipeline did not voxelise."""
        if "grid_coord" not in self:
            if "coord" not in self or "grid_size" not in self:
                raise DataError("a Point needs 'grid_coord', or 'coord' and 'grid_size'", field="grid_coord")
            self["grid_coord"] = torch.div(
                self.coord - self.coord.min(0)[0], self.grid_size, rounding_mode="trunc"
            ).int()
        return self["grid_coord"]

    def serialization(
        self, order: Sequence[str] = ("z",), depth: int | None = None, shuffle_orders: bool = False
    ) -> None:
        """Sort the points along each space-filling curve in `order`.

        Codes put the batch index above the coordinate bits, so each sample stays contiguous. With
        `shuffle_orders`, the rows (orders) are permuted randomly; `order` keeps the unshuffled list.
        """
        order = (order,) if isinstance(order, str) else tuple(order)
        self["order"] = order
        grid_coord = self.ensure_grid_coord()
        if depth is None:
            depth = int(grid_coord.max() + 1).bit_length()
        if depth > MAX_DEPTH or 3 * depth + len(self.offset).bit_length() > 63:
            raise DataError(
                f"grid coordinates up to {int(grid_coord.max())} need {depth} bits per axis; "
                f"at most {MAX_DEPTH} fit a 64-bit serialization code",
                field="grid_coord",
            )
        self["serialized_depth"] = depth
        code = torch.stack([encode(grid_coord, self.batch, depth, name) for name in order])
        sort_order = torch.argsort(code)
        positions = torch.arange(code.shape[1], device=code.device).expand_as(sort_order)
        inverse = torch.empty_like(sort_order).scatter_(1, sort_order, positions)
        if shuffle_orders:
            perm = torch.randperm(code.shape[0])
            code, sort_order, inverse = code[perm], sort_order[perm], inverse[perm]
        self["serialized_code"] = code
        self["serialized_order"] = sort_order
        self["serialized_inverse"] = inverse

    def sparsify(self, pad: int = 96) -> None:
        """Build the spconv tensor over (batch, grid_coord); `pad` enlarges the sparse shape margin."""
        grid_coord = self.ensure_grid_coord()
        if "sparse_shape" in self:
            sparse_shape = self.sparse_shape
        else:
            sparse_shape = torch.add(torch.max(grid_coord, dim=0).values, pad).tolist()
        indices = torch.cat([self.batch.unsqueeze(-1).int(), grid_coord.int()], dim=1).contiguous()
        self["sparse_shape"] = sparse_shape
        self["sparse_conv_feat"] = SparseConvTensor(
            features=self.feat, indices=indices, spatial_shape=sparse_shape, batch_size=int(self.batch[-1]) + 1
        )
