"""Point Transformer V3 backbone, checkpoint- and output-compatible with Pointcept's `PT-v3m2`.

Submodule names and parameter shapes follow Pointcept exactly (that is why single layers sit inside
one-element `nn.Sequential`s: their parameters are named `norm1.0.weight`, `cpe.0.weight`, ...), so a
Pointcept / Sonata / Concerto state dict loads with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from concerto_ray.errors import ConfigError, DataError
from concerto_ray.model.serialization import ORDERS
from concerto_ray.model.sparse import SubMConv3d
from concerto_ray.model.structure import Point, offset2bincount, validate_point_layout


@dataclasses.dataclass
class PTv3Config:
    """Constructor arguments of Pointcept's PT-v3m2, under the same names and defaults.

    `enable_flash` is accepted for config compatibility and selects how points are cut into patches,
    not a kernel (attention always runs through `scaled_dot_product_attention`):
    - True (Pointcept's flash-attn path): patches of exactly `patch_size` points; a sample with fewer
      points is one shorter patch.
    - False (Pointcept's plain path): the patch size shrinks to the smallest sample's point count.
    Unlike Pointcept, rpe and upcasting are allowed together with `enable_flash`.

    `traceable` makes the decoder keep each coarse Point as `unpooling_parent` of the finer one
    (pooling always keeps `pooling_parent`, as in Pointcept).

    `pooling_shuffle_orders` is not a PT-v3m2 argument: Pointcept's pooling layers always re-shuffle
    the serialization orders, in eval too, so outputs vary from call to call. Set it and
    `shuffle_orders` to False for deterministic outputs (or call `set_order_shuffling(False)`).
    """

    in_channels: int = 6
    order: tuple[str, ...] = ("z", "z-trans")
    stride: tuple[int, ...] = (2, 2, 2, 2)
    enc_depths: tuple[int, ...] = (2, 2, 2, 6, 2)
    enc_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    enc_num_head: tuple[int, ...] = (2, 4, 8, 16, 32)
    enc_patch_size: tuple[int, ...] = (48, 48, 48, 48, 48)
    dec_depths: tuple[int, ...] = (2, 2, 2, 2)
    dec_channels: tuple[int, ...] = (64, 64, 128, 256)
    dec_num_head: tuple[int, ...] = (4, 4, 8, 16)
    dec_patch_size: tuple[int, ...] = (48, 48, 48, 48)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    drop_path: float = 0.3
    layer_scale: float | None = None
    pre_norm: bool = True
    shuffle_orders: bool = True
    pooling_shuffle_orders: bool = True
    enable_rpe: bool = False
    enable_flash: bool = True
    upcast_attention: bool = False
    upcast_softmax: bool = False
    traceable: bool = False
    mask_token: bool = False
    enc_mode: bool = False
    freeze_encoder: bool = False

    def __post_init__(self):
        self.order = (self.order,) if isinstance(self.order, str) else tuple(self.order)
        unknown = [o for o in self.order if o not in ORDERS]
        if unknown or not self.order:
            raise ConfigError(f"order: {list(self.order)} must be a non-empty list of {', '.join(ORDERS)}")
        stages = len(self.enc_depths)
        per_stage = {"stride": stages - 1, "enc_channels": stages, "enc_num_head": stages, "enc_patch_size": stages}
        if not self.enc_mode:
            per_stage.update(
                dec_depths=stages - 1, dec_channels=stages - 1, dec_num_head=stages - 1, dec_patch_size=stages - 1
            )
        for name, expected in per_stage.items():
            if len(getattr(self, name)) != expected:
                raise ConfigError(
                    f"{name}: expected {expected} values for {stages} encoder stages, got {len(getattr(self, name))}"
                )
        heads = [("enc", c, h) for c, h in zip(self.enc_channels, self.enc_num_head)]
        if not self.enc_mode:
            heads += [("dec", c, h) for c, h in zip(self.dec_channels, self.dec_num_head)]
        for part, channels, num_heads in heads:
            if channels % num_heads:
                raise ConfigError(f"{part}_channels {channels} is not divisible by {part}_num_head {num_heads}")


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a point's whole residual branch with probability `p`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, channels: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RPE(nn.Module):
    """Relative position bias: a learned per-head value for each clamped offset along x, y and z."""

    def __init__(self, patch_size: int, num_heads: int):
        super().__init__()
        self.pos_bnd = int((4 * patch_size) ** (1 / 3) * 2)
        self.rpe_num = 2 * self.pos_bnd + 1
        self.rpe_table = nn.Parameter(torch.zeros(3 * self.rpe_num, num_heads))
        nn.init.trunc_normal_(self.rpe_table, std=0.02)

    def forward(self, rel_pos: torch.Tensor) -> torch.Tensor:
        """(P, K, K, 3) integer offsets -> (P, H, K, K) additive attention bias."""
        axis_start = torch.arange(3, device=rel_pos.device) * self.rpe_num
        idx = rel_pos.clamp(-self.pos_bnd, self.pos_bnd) + self.pos_bnd + axis_start
        bias = self.rpe_table.index_select(0, idx.reshape(-1)).view(idx.shape + (-1,)).sum(3)
        return bias.permute(0, 3, 1, 2)


def patch_layout(offset: torch.Tensor, patch_size: int):
    """Cut each serialized sample into patches of `patch_size` slots.

    Returns (`pad`, `unpad`, `key_valid`): `pad[s]` is the serialized position that fills slot `s`,
    `unpad[i]` the slot of serialized position `i`, and `key_valid` a (patches, patch_size) mask of
    slots that may be attended to, or None when all may. The last patch of a sample longer than
    `patch_size` is completed with the tail of the patch before it (so every query still sees
    `patch_size` keys, as in Pointcept); a sample shorter than `patch_size` is one patch whose empty
    slots are masked.
    """
    counts = offset2bincount(offset)
    padded = torch.div(counts + patch_size - 1, patch_size, rounding_mode="floor") * patch_size
    start = offset - counts
    padded_start = torch.cumsum(padded, dim=0) - padded
    sample_of_slot = torch.arange(len(counts), device=offset.device).repeat_interleave(padded)
    slot_in_sample = torch.arange(len(sample_of_slot), device=offset.device) - padded_start[sample_of_slot]
    count_of_slot = counts[sample_of_slot]
    is_point = slot_in_sample < count_of_slot
    long_sample = count_of_slot > patch_size
    source = torch.where(
        is_point,
        slot_in_sample,
        torch.where(long_sample, slot_in_sample - patch_size, torch.zeros_like(slot_in_sample)),
    )
    pad = start[sample_of_slot] + source
    position_in_sample = torch.arange(int(offset[-1]), device=offset.device) - start.repeat_interleave(counts)
    unpad = padded_start.repeat_interleave(counts) + position_in_sample
    key_valid = (is_point | long_sample).view(-1, patch_size)
    return pad, unpad, (None if bool(key_valid.all()) else key_valid)


class SerializedAttention(nn.Module):
    """Multi-head self-attention inside patches of consecutive points along one serialization order."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        patch_size: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        order_index: int = 0,
        enable_rpe: bool = False,
        enable_flash: bool = True,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.scale = qk_scale or (channels // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.order_index = order_index
        self.enable_flash = enable_flash
        self.upcast = upcast_attention or upcast_softmax
        self.qkv = nn.Linear(channels, channels * 3, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rpe = RPE(patch_size, num_heads) if enable_rpe else None

    def _layout(self, point: Point, patch_size: int):
        # Shared by all blocks of a stage (same points, same patch size): computed once per Point.
        key = f"patch_layout_{patch_size}"
        if key not in point:
            point[key] = patch_layout(point.offset, patch_size)
        return point[key]

    def _rel_pos(self, point: Point, order: torch.Tensor, patch_size: int) -> torch.Tensor:
        key = f"rel_pos_{self.order_index}_{patch_size}"
        if key not in point:
            grid_coord = point.grid_coord[order].reshape(-1, patch_size, 3)
            point[key] = grid_coord.unsqueeze(2) - grid_coord.unsqueeze(1)
        return point[key]

    def forward(self, feat: torch.Tensor, point: Point) -> torch.Tensor:
        patch = self.patch_size
        if not self.enable_flash:
            patch = min(int(offset2bincount(point.offset).min()), patch)
        h, c = self.num_heads, self.channels
        pad, unpad, key_valid = self._layout(point, patch)
        order = point.serialized_order[self.order_index][pad]
        inverse = unpad[point.serialized_inverse[self.order_index]]

        qkv = self.qkv(feat)[order]
        q, k, v = qkv.reshape(-1, patch, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(dim=0)
        bias = None
        if self.rpe is not None:
            bias = self.rpe(self._rel_pos(point, order, patch))
        if key_valid is not None:
            valid = key_valid[:, None, None, :]
            bias = valid if bias is None else bias.masked_fill(~valid, -math.inf)
        if self.upcast:
            # Pointcept's upcast flags make the logits and softmax fp32; SDPA in fp32 covers both.
            q, k, v = q.float(), k.float(), v.float()
            bias = bias.float() if bias is not None and bias.is_floating_point() else bias
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.to(qkv.dtype).transpose(1, 2).reshape(-1, c)[inverse]
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    def __init__(self, channels: int, hidden_channels: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden_channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_channels, channels)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _maybe_layer_scale(channels: int, init_value: float | None) -> nn.Sequential:
    return nn.Sequential(LayerScale(channels, init_value) if init_value is not None else nn.Identity())


class Block(nn.Module):
    """xCPE (sparse conv positional encoding) + serialized attention + MLP, each with a residual."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        patch_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_drop: float,
        proj_drop: float,
        drop_path: float,
        layer_scale: float | None,
        pre_norm: bool,
        order_index: int,
        cpe_indice_key: str,
        enable_rpe: bool,
        enable_flash: bool,
        upcast_attention: bool,
        upcast_softmax: bool,
    ):
        super().__init__()
        self.pre_norm = pre_norm
        self.cpe = nn.ModuleList(
            [
                SubMConv3d(channels, channels, kernel_size=3, bias=True, indice_key=cpe_indice_key),
                nn.Linear(channels, channels),
                nn.LayerNorm(channels),
            ]
        )
        self.norm1 = nn.Sequential(nn.LayerNorm(channels))
        self.ls1 = _maybe_layer_scale(channels, layer_scale)
        self.attn = SerializedAttention(
            channels,
            num_heads,
            patch_size,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            order_index=order_index,
            enable_rpe=enable_rpe,
            enable_flash=enable_flash,
            upcast_attention=upcast_attention,
            upcast_softmax=upcast_softmax,
        )
        self.norm2 = nn.Sequential(nn.LayerNorm(channels))
        self.ls2 = _maybe_layer_scale(channels, layer_scale)
        self.mlp = nn.Sequential(MLP(channels, int(channels * mlp_ratio), drop=proj_drop))
        self.drop_path = DropPath(drop_path)
        self.activation_checkpointing = False  # set through PointTransformerV3.set_activation_checkpointing

    def forward(self, point: Point) -> Point:
        # Keep the conv's output tensor: it carries the neighbour map that later blocks of the stage reuse.
        point.sparse_conv_feat = self.cpe[0](point.sparse_conv_feat)
        if self.activation_checkpointing and torch.is_grad_enabled():
            # Only the block's inputs are kept; the rest is recomputed in backward (RNG state preserved, so
            # drop path draws the same rows). The conv stays outside: spconv keeps its own state.
            feat = checkpoint(self._residuals, point.feat, point.sparse_conv_feat.features, point, use_reentrant=False)
        else:
            feat = self._residuals(point.feat, point.sparse_conv_feat.features, point)
        point.feat = feat
        point.sparse_conv_feat = point.sparse_conv_feat.replace_feature(feat)
        return point

    def _residuals(self, feat: torch.Tensor, conv_feat: torch.Tensor, point: Point) -> torch.Tensor:
        """The block after its sparse conv: positional-encoding residual, attention and MLP."""
        _, linear, norm = self.cpe
        feat = feat + norm(linear(conv_feat))

        shortcut = feat
        if self.pre_norm:
            feat = self.norm1(feat)
        feat = shortcut + self.drop_path(self.ls1(self.attn(feat, point)))
        if not self.pre_norm:
            feat = self.norm1(feat)

        shortcut = feat
        if self.pre_norm:
            feat = self.norm2(feat)
        feat = shortcut + self.drop_path(self.ls2(self.mlp(feat)))
        if not self.pre_norm:
            feat = self.norm2(feat)
        return feat


def _segment_reduce(data: torch.Tensor, lengths: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce consecutive runs of rows of `data`; computed in fp32 where the input is half precision."""
    out = torch.segment_reduce(data.float(), reduce, lengths=lengths, axis=0)
    return out.to(data.dtype)


class GridPooling(nn.Module):
    """Merge the points of each `stride`^3 block of voxels: max of projected features, mean of coords."""

    # Keys copied unchanged from the finer Point to the pooled one.
    PASSTHROUGH_KEYS = ("condition", "context", "name", "split")
    MEAN_KEYS = ("coord", "origin_coord", "color")

    def __init__(self, in_channels: int, out_channels: int, stride: int, shuffle_orders: bool = True):
        super().__init__()
        self.stride = stride
        self.shuffle_orders = shuffle_orders
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = nn.Sequential(nn.LayerNorm(out_channels))
        self.act = nn.Sequential(nn.GELU())

    def forward(self, point: Point) -> Point:
        grid_coord = torch.div(point.ensure_grid_coord(), self.stride, rounding_mode="trunc").long()
        # One int64 key per coarse voxel, ordered by (batch, x, y, z) like Pointcept's row-wise unique;
        # serialization already limits coordinates to 16 bits per axis.
        key = (point.batch.long() << 48) | (grid_coord[:, 0] << 32) | (grid_coord[:, 1] << 16) | grid_coord[:, 2]
        unique_key, cluster, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
        _, indices = torch.sort(cluster)
        idx_ptr = F.pad(torch.cumsum(counts, dim=0), (1, 0))
        head = indices[idx_ptr[:-1]]

        pooled = Point(
            feat=_segment_reduce(self.proj(point.feat)[indices], counts, "max"),
            grid_coord=torch.stack(
                [(unique_key >> 32) & 0xFFFF, (unique_key >> 16) & 0xFFFF, unique_key & 0xFFFF], dim=1
            ),
            batch=point.batch[head],
            pooling_inverse=cluster,
            pooling_parent=point,
            idx_ptr=idx_ptr,
        )
        for name in self.MEAN_KEYS:
            if name in point:
                pooled[name] = _segment_reduce(point[name][indices], counts, "mean")
        for name in self.PASSTHROUGH_KEYS:
            if name in point:
                pooled[name] = point[name]
        if "grid_size" in point:
            pooled["grid_size"] = point.grid_size * self.stride
        pooled.feat = self.act(self.norm(pooled.feat))
        pooled.serialization(order=point.order, shuffle_orders=self.shuffle_orders)
        pooled.sparsify()
        return pooled


class GridUnpooling(nn.Module):
    """Return to the finer Point of a pooling: its projected skip features plus the upsampled coarse ones."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, traceable: bool = False):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_channels, out_channels), nn.LayerNorm(out_channels), nn.GELU())
        self.proj_skip = nn.Sequential(nn.Linear(skip_channels, out_channels), nn.LayerNorm(out_channels), nn.GELU())
        self.traceable = traceable

    def forward(self, point: Point) -> Point:
        if "pooling_parent" not in point:
            raise ValueError("GridUnpooling needs a Point produced by GridPooling (no 'pooling_parent')")
        parent = point.pop("pooling_parent")
        parent.feat = self.proj_skip(parent.feat) + self.proj(point.feat)[point.pooling_inverse]
        parent.sparse_conv_feat = parent.sparse_conv_feat.replace_feature(parent.feat)
        if self.traceable:
            parent["unpooling_parent"] = point
        return parent


class Embedding(nn.Module):
    """Linear stem; points flagged in `mask` get the learned mask token instead (masked pre-training)."""

    def __init__(self, in_channels: int, embed_channels: int, mask_token: bool = False):
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict(linear=nn.Linear(in_channels, embed_channels), norm=nn.LayerNorm(embed_channels), act=nn.GELU())
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_channels)) if mask_token else None

    def forward(self, point: Point) -> Point:
        point.feat = self.stem(point.feat)
        if "mask" in point:
            if self.mask_token is None:
                raise DataError("the input has a 'mask' but the backbone was built with mask_token=False", field="mask")
            point.feat = torch.where(point.mask.unsqueeze(-1), self.mask_token.to(point.feat.dtype), point.feat)
        return point


class PointTransformerV3(nn.Module):
    """PT-v3m2 backbone. `forward(data)` takes a dict with `feat`, `offset` or `batch`, and `grid_coord`
    (or `coord` + `grid_size`), and returns the output `Point`: the coarsest level when `enc_mode`,
    otherwise the full-resolution decoder output."""

    def __init__(self, config: PTv3Config | None = None):
        super().__init__()
        cfg = config or PTv3Config()
        self.config = cfg
        self.shuffle_orders = cfg.shuffle_orders
        stages = len(cfg.enc_depths)
        block_args = dict(
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            qk_scale=cfg.qk_scale,
            attn_drop=cfg.attn_drop,
            proj_drop=cfg.proj_drop,
            layer_scale=cfg.layer_scale,
            pre_norm=cfg.pre_norm,
            enable_rpe=cfg.enable_rpe,
            enable_flash=cfg.enable_flash,
            upcast_attention=cfg.upcast_attention,
            upcast_softmax=cfg.upcast_softmax,
        )

        self.embedding = Embedding(cfg.in_channels, cfg.enc_channels[0], mask_token=cfg.mask_token)

        # Schedules are computed on CPU explicitly so that building the model on the meta device works.
        enc_drop_path = torch.linspace(0, cfg.drop_path, sum(cfg.enc_depths), device="cpu").tolist()
        self.enc = nn.Sequential()
        for s in range(stages):
            stage = nn.Sequential()
            if s > 0:
                stage.add_module(
                    "down",
                    GridPooling(
                        cfg.enc_channels[s - 1],
                        cfg.enc_channels[s],
                        stride=cfg.stride[s - 1],
                        shuffle_orders=cfg.pooling_shuffle_orders,
                    ),
                )
            first = sum(cfg.enc_depths[:s])
            for i in range(cfg.enc_depths[s]):
                stage.add_module(
                    f"block{i}",
                    Block(
                        cfg.enc_channels[s],
                        cfg.enc_num_head[s],
                        cfg.enc_patch_size[s],
                        drop_path=enc_drop_path[first + i],
                        order_index=i % len(cfg.order),
                        cpe_indice_key=f"stage{s}",
                        **block_args,
                    ),
                )
            if len(stage):
                self.enc.add_module(f"enc{s}", stage)

        if not cfg.enc_mode:
            dec_drop_path = torch.linspace(0, cfg.drop_path, sum(cfg.dec_depths), device="cpu").tolist()
            dec_channels = list(cfg.dec_channels) + [cfg.enc_channels[-1]]
            self.dec = nn.Sequential()
            for s in reversed(range(stages - 1)):
                stage_drop_path = dec_drop_path[sum(cfg.dec_depths[:s]) : sum(cfg.dec_depths[: s + 1])][::-1]
                stage = nn.Sequential()
                stage.add_module(
                    "up",
                    GridUnpooling(dec_channels[s + 1], cfg.enc_channels[s], dec_channels[s], traceable=cfg.traceable),
                )
                for i in range(cfg.dec_depths[s]):
                    stage.add_module(
                        f"block{i}",
                        Block(
                            dec_channels[s],
                            cfg.dec_num_head[s],
                            cfg.dec_patch_size[s],
                            drop_path=stage_drop_path[i],
                            order_index=i % len(cfg.order),
                            cpe_indice_key=f"stage{s}",
                            **block_args,
                        ),
                    )
                self.dec.add_module(f"dec{s}", stage)

        self.apply(self._init_weights)
        if cfg.freeze_encoder:
            for p in list(self.embedding.parameters()) + list(self.enc.parameters()):
                p.requires_grad = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, SubMConv3d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_order_shuffling(self, enabled: bool) -> None:
        """Switch random order shuffling at the input and at every pooling level (off: deterministic)."""
        self.shuffle_orders = enabled
        for module in self.modules():
            if isinstance(module, GridPooling):
                module.shuffle_orders = enabled

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's attention and MLP in backward instead of keeping their activations: less
        memory for a longer step (the outputs and gradients are unchanged)."""
        for module in self.modules():
            if isinstance(module, Block):
                module.activation_checkpointing = enabled

    def _check_input(self, data: dict) -> None:
        """Shape checks, free of device syncs; the value checks of offset/batch run only on CPU tensors (on an
        accelerator, `concerto_ray.data.collate` has already made them on the CPU)."""
        if "feat" not in data:
            raise DataError("the input has no 'feat'", field="feat")
        feat = data["feat"]
        if feat.dim() != 2 or feat.shape[1] != self.config.in_channels:
            raise DataError(
                f"has shape {tuple(feat.shape)} but the backbone expects (N, in_channels={self.config.in_channels})",
                field="feat",
            )
        num_points = feat.shape[0]
        if "offset" not in data and "batch" not in data:
            raise DataError("the input needs 'offset' or 'batch'", field="offset")
        if "batch" in data and data["batch"].shape != (num_points,):
            raise DataError(
                f"has shape {tuple(data['batch'].shape)}, expected ({num_points},): one sample index per point",
                field="batch",
            )
        for name in ("coord", "grid_coord"):
            if name in data and data[name].shape != (num_points, 3):
                raise DataError(f"has shape {tuple(data[name].shape)}, expected ({num_points}, 3)", field=name)
        if feat.device.type == "cpu":
            validate_point_layout(data, num_points)

    def forward(self, data: dict) -> Point:
        self._check_input(data)
        point = Point(data)
        point = self.embedding(point)
        point.serialization(order=self.config.order, shuffle_orders=self.shuffle_orders)
        point.sparsify()
        point = self.enc(point)
        if not self.config.enc_mode:
            point = self.dec(point)
        return point
