"""Space-filling-curve codes for integer grid coordinates (z-order and Hilbert), vectorised over points.

Codes are bit-for-bit those of Pointcept's serialization module, so that a point cloud is cut into the
same attention patches: bit `i` of x, y, z lands at code bit `3i+2`, `3i+1`, `3i` (x most significant
within each triple), and the batch index sits above the `3 * depth` coordinate bits.
"""

from __future__ import annotations

import torch

ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")
MAX_DEPTH = 16  # 3 * 16 coordinate bits leave room for the batch index in an int64 code


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Insert two zero bits between the low 16 bits of `v` (bit i moves to bit 3i)."""
    v = (v | (v << 16)) & 0xFF0000FF
    v = (v | (v << 8)) & 0x00F00F00F00F
    v = (v | (v << 4)) & 0x0C30C30C30C3
    v = (v | (v << 2)) & 0x249249249249
    return v


def _interleave(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (_spread_bits(x) << 2) | (_spread_bits(y) << 1) | _spread_bits(z)


def z_order_code(grid_coord: torch.Tensor, depth: int) -> torch.Tensor:
    """Morton code of (N, 3) non-negative integer coordinates, keeping their low `depth` bits."""
    xyz = grid_coord.long() & ((1 << depth) - 1)
    return _interleave(xyz[:, 0], xyz[:, 1], xyz[:, 2])


def hilbert_code(grid_coord: torch.Tensor, depth: int) -> torch.Tensor:
    """Hilbert index of (N, 3) non-negative integer coordinates on a 2**depth cube.

    Skilling's transform ("Programming the Hilbert curve", 2004) on whole integers: the loops run over
    bit levels and axes only; every step is an element-wise operation over all points at once.
    """
    xyz = grid_coord.long() & ((1 << depth) - 1)
    axes = [xyz[:, 0], xyz[:, 1], xyz[:, 2]]
    for level in range(depth - 1, 0, -1):
        bit = 1 << level
        lower = bit - 1
        for i in range(3):
            is_set = (axes[i] & bit) != 0
            # where the axis bit is set, reflect the lower bits of axis 0; otherwise swap them with axis i
            swap = torch.where(is_set, torch.zeros_like(axes[0]), (axes[0] ^ axes[i]) & lower)
            axes[0] = torch.where(is_set, axes[0] ^ lower, axes[0] ^ swap)
            if i > 0:
                axes[i] = axes[i] ^ swap
    # The transposed index read as one interleaved word is a Gray code; undo it with a prefix xor.
    code = _interleave(*axes)
    for shift in (1, 2, 4, 8, 16, 32):
        code = code ^ (code >> shift)
    return code


def encode(grid_coord: torch.Tensor, batch: torch.Tensor | None, depth: int, order: str) -> torch.Tensor:
    """Serialization code of each point for one order; "-trans" orders swap the x and y axes."""
    if order not in ORDERS:
        raise ValueError(f"unknown serialization order {order!r}; expected one of {', '.join(ORDERS)}")
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"serialization depth must be in [0, {MAX_DEPTH}], got {depth}")
    if order.endswith("-trans"):
        grid_coord = grid_coord[:, [1, 0, 2]]
    code = z_order_code(grid_coord, depth) if order.startswith("z") else hilbert_code(grid_coord, depth)
    if batch is not None:
        code = (batch.long() << (3 * depth)) | code
    return code
