"""Sonata (Pointcept's `Sonata-v1m1`): point self-distillation with an EMA teacher.

Per batch, with `num_global_view` global views and `num_local_view` local views of every scene:

- the teacher backbone embeds the global views; its multi-level features are up-cast
  (`up_cast_level` coarse levels concatenated onto a finer one) and scored by the teacher heads;
- the student embeds a masked copy of the global views (grid patches of size `mask_size`, a
  `mask_ratio` share of them replaced by the backbone's mask token and their coordinates jittered)
  and the local views;
- each student point is matched to the nearest teacher point (by original coordinate, within
  `match_max_r`) and learns the teacher's Sinkhorn-Knopp-balanced prototype assignment:
  `mask` (masked view vs. the same global view), `roll_mask` (vs. the other global view) and
  `unmask` (local views vs. the first global view).

The training loop sets the schedules (`set_schedule`) before each step and calls `update_teacher`
after each optimizer step. Parameter names equal the reference's (`student.backbone.*`,
`student.mask_head.*`, `teacher.*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from concerto_ray.errors import DataError
from concerto_ray.model.configs import SonataConfig
from concerto_ray.model.heads import PrototypeHead
from concerto_ray.model.ptv3 import PointTransformerV3
from concerto_ray.model.schedules import ScheduleValues
from concerto_ray.model.structure import Point, batch2offset, offset2batch, offset2bincount, validate_offset

# Per-chunk budget of query-reference distances in the nearest-neighbour search (~256 MB in fp32).
_MAX_DISTANCES_PER_CHUNK = 1 << 26


class Sonata(nn.Module):
    def __init__(self, config: SonataConfig):
        super().__init__()
        self.config = config
        student = {"backbone": PointTransformerV3(config.backbone)}
        teacher = {"backbone": PointTransformerV3(config.teacher_backbone())}
        for name in self._head_names():
            student[name] = self._point_head()
            teacher[name] = self._point_head()
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.schedule = ScheduleValues(
            mask_size=config.mask_size_start,
            mask_ratio=config.mask_ratio_start,
            teacher_temp=config.teacher_temp_start,
            momentum=config.momentum_base,
        )

    def _head_names(self) -> list[str]:
        names = []
        if self.config.mask_loss_weight > 0 or self.config.roll_mask_loss_weight > 0:
            names.append("mask_head")
        if self.config.unmask_loss_weight > 0:
            names.append("unmask_head")
        return names

    def _point_head(self) -> PrototypeHead:
        c = self.config
        return PrototypeHead(c.head_in_channels, c.head_hidden_channels, c.head_embed_channels, c.head_num_prototypes)

    def set_schedule(self, values: ScheduleValues) -> None:
        """Mask size/ratio, teacher temperature and momentum for the coming step."""
        self.schedule = values

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step after the optimizer step: teacher = m * teacher + (1 - m) * student."""
        student, teacher = self._ema_pairs()
        m = self.schedule.momentum
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1 - m)

    def _ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return list(self.student.parameters()), list(self.teacher.parameters())

    @torch.no_grad()
    def extract_features(self, point: Point) -> Point:
        """Teacher features of a point cloud, up-cast like the heads see them (for probing/visualising)."""
        return up_cast(self.teacher["backbone"](point), self.config.up_cast_level)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Losses of one batch: the weighted total under "loss", and each term under its own name."""
        views = self._prepare_views(batch)
        teacher = self._teacher_forward(views.global_point)
        student_masked = self._student_forward(views.masked_point) if self._needs_masked_student() else None
        weighted = self._point_losses(teacher, student_masked, views.local_point)
        return finish_losses(weighted)

    def _needs_masked_student(self) -> bool:
        return self.config.mask_loss_weight > 0 or self.config.roll_mask_loss_weight > 0

    @torch.no_grad()
    def _prepare_views(self, batch: dict) -> Views:
        c = self.config
        validate_point_batch(batch, c.num_global_view, c.num_local_view)
        grid_size = batch["grid_size"][0]
        global_point = Point(
            feat=batch["global_feat"],
            coord=batch["global_coord"],
            origin_coord=batch["global_origin_coord"],
            offset=batch["global_offset"],
            grid_size=grid_size,
        )
        mask = grid_patch_mask(
            global_point.coord, global_point.offset, self.schedule.mask_size, self.schedule.mask_ratio
        )
        masked_coord = global_point.coord.clone()
        if c.mask_jitter is not None:
            noise = torch.randn_like(masked_coord[mask]).mul(c.mask_jitter)
            # Only the upper side is clipped, as in the reference.
            masked_coord[mask] += torch.clamp(noise, max=2 * c.mask_jitter)
        masked_point = Point(
            feat=batch["global_feat"],
            coord=masked_coord,
            origin_coord=batch["global_origin_coord"],
            mask=mask,
            offset=batch["global_offset"],
            grid_size=grid_size,
        )
        local_point = Point(
            feat=batch["local_feat"],
            coord=batch["local_coord"],
            origin_coord=batch["local_origin_coord"],
            offset=batch["local_offset"],
            grid_size=grid_size,
        )
        return Views(global_point, masked_point, local_point)

    @torch.no_grad()
    def _teacher_forward(self, global_point: Point) -> Point:
        return up_cast(self.teacher["backbone"](global_point), self.config.up_cast_level)

    def _student_forward(self, point: Point) -> Point:
        return up_cast(self.student["backbone"](point), self.config.up_cast_level)

    @torch.no_grad()
    def _teacher_logits(self, teacher: Point) -> dict[str, torch.Tensor]:
        """Teacher prototype scores per point term ("mask", "unmask"): each term has its own head."""
        return {name.removesuffix("_head"): self.teacher[name](teacher.feat) for name in self._head_names()}

    def _point_losses(
        self, teacher: Point, student_masked: Point | None, local_point: Point
    ) -> dict[str, tuple[torch.Tensor, float]]:
        c = self.config
        temp = self.schedule.teacher_temp
        teacher_logits = self._teacher_logits(teacher)
        losses = {}
        if c.mask_loss_weight > 0 or c.roll_mask_loss_weight > 0:
            targets = teacher_logits["mask"]
            pred = self.student["mask_head"](student_masked.feat)
            if c.mask_loss_weight > 0:
                losses["mask_loss"] = (
                    self._matched_loss(
                        pred,
                        student_masked.origin_coord,
                        student_masked.offset,
                        student_masked.batch,
                        targets,
                        teacher.origin_coord,
                        teacher.offset,
                        temp,
                        "mask",
                    ),
                    c.mask_loss_weight,
                )
            if c.roll_mask_loss_weight > 0:
                order = swap_view_pairs(teacher.offset, teacher.batch, c.num_global_view)
                losses["roll_mask_loss"] = (
                    self._matched_loss(
                        pred,
                        student_masked.origin_coord,
                        student_masked.offset,
                        student_masked.batch,
                        targets[order.index],
                        teacher.origin_coord[order.index],
                        order.offset,
                        temp,
                        "roll_mask",
                    ),
                    c.roll_mask_loss_weight,
                )
        if c.unmask_loss_weight > 0:
            targets = teacher_logits["unmask"]
            local = self._student_forward(local_point)
            pred = self.student["unmask_head"](local.feat)
            # All local views of a scene are matched against the scene's first global view.
            principal = first_view_rows(teacher.batch, c.num_global_view)
            principal_offset = batch2offset(teacher.batch[principal] // c.num_global_view)
            losses["unmask_loss"] = (
                self._matched_loss(
                    pred,
                    local.origin_coord,
                    local.offset[c.num_local_view - 1 :: c.num_local_view],
                    local.batch,
                    targets[principal],
                    teacher.origin_coord[principal],
                    principal_offset,
                    temp,
                    "unmask",
                ),
                c.unmask_loss_weight,
            )
        return losses

    def _matched_loss(
        self,
        pred: torch.Tensor,
        pred_coord: torch.Tensor,
        pred_offset: torch.Tensor,
        pred_batch: torch.Tensor,
        target: torch.Tensor,
        target_coord: torch.Tensor,
        target_offset: torch.Tensor,
        teacher_temp: float,
        term: str,
    ) -> torch.Tensor:
        """Cross-entropy between balanced teacher assignments and student scores of matched points,
        averaged per view and then over views."""
        with torch.no_grad():
            match = match_nearest(pred_coord, pred_offset, target_coord, target_offset, self.config.match_max_r)
            if len(match) == 0:
                raise DataError(
                    f"no student point lies within match_max_r={self.config.match_max_r} of a "
                    f"teacher point; the views of this batch do not overlap",
                    field=term,
                )
            target = sinkhorn_knopp(target[match[:, 1]], teacher_temp)
        log_prob = F.log_softmax(pred[match[:, 0]].float() / self.config.student_temp, dim=-1)
        per_point = -torch.sum(target * log_prob, dim=-1)
        return segment_mean(per_point, pred_batch[match[:, 0]]).mean()


@dataclass
class Views:
    global_point: Point
    masked_point: Point
    local_point: Point


@dataclass
class ViewOrder:
    index: torch.Tensor  # gathers points into the new view order
    offset: torch.Tensor  # offsets of the reordered views


def finish_losses(weighted: dict[str, tuple[torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """The weighted total under "loss" plus each term. The terms returned for logging are averaged over
    workers (like the reference's all-reduce); the total keeps its local value, since the gradient
    all-reduce already averages what it drives."""
    result = {"loss": sum(value * weight for value, weight in weighted.values())}
    terms = torch.stack([value.detach() for value, _ in weighted.values()])  # one all-reduce for all terms
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(terms, op=dist.ReduceOp.AVG)
    result.update(zip(weighted, terms.unbind()))
    return result


def validate_point_batch(batch: dict, num_global_view: int, num_local_view: int) -> None:
    """Raise DataError naming the field when the batch does not have the reference's layout."""
    for key in (
        "global_coord",
        "global_feat",
        "global_origin_coord",
        "global_offset",
        "local_coord",
        "local_feat",
        "local_origin_coord",
        "local_offset",
        "grid_size",
    ):
        if key not in batch:
            raise DataError("missing from the batch", field=key)
    for prefix in ("global", "local"):
        coord = batch[f"{prefix}_coord"]
        for key in (f"{prefix}_feat", f"{prefix}_origin_coord"):
            if batch[key].shape[0] != coord.shape[0]:
                raise DataError(f"has {batch[key].shape[0]} rows but {prefix}_coord has {coord.shape[0]}", field=key)
        offset = batch[f"{prefix}_offset"]
        if offset.device.type == "cpu":  # reads values: on an accelerator, collate has checked it on the CPU
            try:
                validate_offset(offset, coord.shape[0])
            except DataError as exc:
                raise DataError(exc.problem, field=f"{prefix}_offset") from exc
    num_global = len(batch["global_offset"])
    if num_global % num_global_view:
        raise DataError(
            f"has {num_global} views, not a multiple of num_global_view={num_global_view}", field="global_offset"
        )
    num_scenes = num_global // num_global_view
    if len(batch["local_offset"]) != num_scenes * num_local_view:
        raise DataError(
            f"has {len(batch['local_offset'])} views but {num_scenes} scenes x "
            f"num_local_view={num_local_view} were expected",
            field="local_offset",
        )


@torch.no_grad()
def grid_patch_mask(coord: torch.Tensor, offset: torch.Tensor, patch_size: float, ratio: float) -> torch.Tensor:
    """Boolean mask over points: each view is cut into cubes of `patch_size` (from its own minimum
    corner) and a random `ratio` share of all cubes of the batch is masked."""
    batch = offset2batch(offset)
    view_min = torch.full((len(offset), 3), float("inf"), dtype=coord.dtype, device=coord.device)
    view_min = view_min.scatter_reduce(0, batch[:, None].expand(-1, 3), coord, reduce="amin")
    cell = ((coord - view_min[batch]) // patch_size).int()
    cell = torch.cat([batch[:, None].int(), cell], dim=-1)
    cells, cell_of_point = torch.unique(cell, dim=0, sorted=True, return_inverse=True)
    num_masked = int(len(cells) * ratio)
    masked_cells = torch.randperm(len(cells), device=coord.device)[:num_masked]
    return torch.isin(cell_of_point, masked_cells)


@torch.no_grad()
def match_nearest(
    query_coord: torch.Tensor,
    query_offset: torch.Tensor,
    ref_coord: torch.Tensor,
    ref_offset: torch.Tensor,
    max_distance: float,
) -> torch.Tensor:
    """(M, 2) pairs [query index, index of its nearest reference point of the same segment], kept when
    closer than `max_distance`."""
    query_coord, ref_coord = query_coord.float(), ref_coord.float()
    nearest = torch.empty(len(query_coord), dtype=torch.long, device=query_coord.device)
    q_start = r_start = 0
    for q_end, r_end in zip(query_offset.tolist(), ref_offset.tolist()):
        ref = ref_coord[r_start:r_end]
        chunk = max(1, _MAX_DISTANCES_PER_CHUNK // max(1, len(ref)))
        for start in range(q_start, q_end, chunk):
            end = min(start + chunk, q_end)
            nearest[start:end] = torch.cdist(query_coord[start:end], ref).argmin(dim=1) + r_start
        q_start, r_start = q_end, r_end
    # Exact distances of the chosen pairs (cdist's matrix-product path is only approximate).
    distance = (query_coord - ref_coord[nearest]).norm(dim=-1)
    query_index = torch.arange(len(query_coord), device=query_coord.device)
    keep = distance < max_distance
    return torch.stack([query_index[keep], nearest[keep]], dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, num_iter: int = 3) -> torch.Tensor:
    """Balanced soft assignment of samples (rows) to prototypes (columns), each row summing to 1.

    Sums run over all workers so that prototypes are balanced across the global batch."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    q = torch.exp(logits.float() / temp).t()
    num_prototypes = q.shape[0]
    num_samples = torch.tensor(float(q.shape[1]), device=q.device)
    total = q.sum()
    if distributed:
        dist.all_reduce(num_samples)
        dist.all_reduce(total)
    q = q / total
    for _ in range(num_iter):
        per_prototype = q.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(per_prototype)
        q = q / per_prototype / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / num_samples
    return (q * num_samples).t()


def segment_mean(values: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Mean of `values` per segment id, for ids 0..max(segment); ids without values give 0."""
    size = int(segment.max()) + 1
    total = values.new_zeros(size).index_add(0, segment, values)
    count = values.new_zeros(size).index_add(0, segment, torch.ones_like(values))
    return total / count.clamp(min=1)


def first_view_rows(batch: torch.Tensor, num_global_view: int) -> torch.Tensor:
    """Boolean mask of the points of each scene's first global view (views are grouped by scene)."""
    return batch % num_global_view == 0


@torch.no_grad()
def swap_view_pairs(offset: torch.Tensor, batch: torch.Tensor, num_global_view: int) -> ViewOrder:
    """Order that swaps the two global views of every scene: [a, a', b, b'] -> [a', a, b', b].

    `batch` is each point's view index. Computed on the device, without reading values back."""
    counts = offset2bincount(offset)
    new_views = torch.arange(len(offset), device=offset.device).view(-1, num_global_view).flip(1).flatten()
    new_offset = torch.cumsum(counts[new_views], dim=0)
    new_start_of_view = (new_offset - counts[new_views])[torch.argsort(new_views)]
    point = torch.arange(len(batch), device=batch.device)
    # Each point keeps its place within its view; its view moves to the view's new start.
    destination = new_start_of_view[batch] + point - (offset - counts)[batch]
    index = torch.empty_like(point).scatter_(0, destination, point)
    return ViewOrder(index=index, offset=new_offset)


def up_cast(point: Point, levels: int) -> Point:
    """Walk `levels` poolings back up: each finer level gets the coarser features concatenated on.

    Consumes the pooling links it follows (as the reference does)."""
    for _ in range(levels):
        if "pooling_parent" not in point or "pooling_inverse" not in point:
            raise ValueError(
                "cannot up-cast: the backbone output has no pooling trace "
                "(the backbone must be built with traceable=True)"
            )
        parent = point.pop("pooling_parent")
        inverse = point.pop("pooling_inverse")
        parent.feat = torch.cat([parent.feat, point.feat[inverse]], dim=-1)
        point = parent
    return point
