"""ScanNet data-efficient settings: limited annotations (LA) and limited reconstructions (LR).

- LA: each training scene keeps the labels of only N points, the others become `ignore_index`. The points are
  drawn among the labelled ones from a generator seeded by (seed, scene name), so every worker, epoch and rerun
  picks the same points; or they come from the reference's `la_file` ({scene: point indices}, torch-saved),
  applied exactly as Pointcept does (the listed points keep their label, whatever it is).
- LR: training uses a share of the scenes, drawn from `seed`, or listed in the reference's `lr_file`.

Limiting is applied to the decoded full-resolution scene, before any transform, as the reference does, and lists
the labelled points under `sampled_index`, which grid sampling and dropout then always keep.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from concerto_ray.data.transforms import SAMPLED_INDEX
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.finetune.configs import DataEfficiencyConfig
from concerto_ray.node_cache import local_copy

SceneLimiter = Callable[[dict], dict]


def _scene_rng(seed: int, scene: str) -> np.random.Generator:
    # crc32, unlike hash(), is the same in every process.
    return np.random.default_rng([seed, zlib.crc32(scene.encode())])


def sample_labelled_points(
    segment: np.ndarray, budget: int, seed: int, scene: str, ignore_index: int = -1
) -> np.ndarray:
    """Sorted indices of min(budget, labelled points) labelled points of the scene."""
    labelled = np.flatnonzero(np.asarray(segment) != ignore_index)
    if len(labelled) <= budget:
        return labelled
    return np.sort(_scene_rng(seed, scene).choice(labelled, size=budget, replace=False))


def keep_labels(data: dict, keep: np.ndarray, ignore_index: int = -1) -> dict:
    """A copy of the scene whose `segment` is `ignore_index` except at the indices `keep`."""
    segment = np.asarray(data["segment"])
    keep = np.asarray(keep, dtype=np.int64)
    if keep.size and (keep.min() < 0 or keep.max() >= len(segment)):
        raise DataError(
            f"labelled point indices reach {int(keep.max())} but the scene has {len(segment)} points",
            sample=str(data.get("name", "?")),
            field="segment",
        )
    limited = np.full_like(segment, ignore_index)
    limited[keep] = segment[keep]
    # Pointcept's `sampled_index`: voxelisation and dropout keep these points (concerto_ray.data.transforms).
    return {**data, "segment": limited, SAMPLED_INDEX: np.unique(keep)}


def limit_annotations(data: dict, budget: int, seed: int, ignore_index: int = -1) -> dict:
    """The scene with `budget` labelled points left (all of them if it has fewer)."""
    scene = str(data["name"])
    return keep_labels(data, sample_labelled_points(data["segment"], budget, seed, scene, ignore_index), ignore_index)


def load_label_file(path: str | Path) -> dict[str, np.ndarray]:
    """The reference's `la_file`: a torch-saved dict {scene name: indices of the points that keep their label}."""
    path = local_copy(str(path), field="label_file")  # an s3:// file: fetched once per node
    if not path.is_file():
        raise ConfigError(f"label file not found: {path}")
    # The reference's files pickle numpy arrays, which the safe loader rejects: only load files you trust.
    table = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a dict {{scene name: point indices}}, got {type(table).__name__}")
    return {str(scene): np.asarray(index, dtype=np.int64).reshape(-1) for scene, index in table.items()}


def apply_label_file(data: dict, table: dict[str, np.ndarray], ignore_index: int = -1) -> dict:
    scene = str(data["name"])
    if scene not in table:
        raise DataError("the label file lists no points for this scene", sample=scene, field="segment")
    return keep_labels(data, table[scene], ignore_index)


def annotation_limiter(cfg: DataEfficiencyConfig, ignore_index: int = -1) -> SceneLimiter | None:
    """A picklable per-scene function for the training data, or None when all annotations are used."""
    if cfg.label_file is not None:
        return _FileLimiter(load_label_file(cfg.label_file), ignore_index)
    if cfg.label_budget is not None:
        return _BudgetLimiter(cfg.label_budget, cfg.seed, ignore_index)
    return None


class _BudgetLimiter:
    def __init__(self, budget: int, seed: int, ignore_index: int):
        self.budget, self.seed, self.ignore_index = budget, seed, ignore_index

    def __call__(self, data: dict) -> dict:
        return limit_annotations(data, self.budget, self.seed, self.ignore_index)


class _FileLimiter:
    def __init__(self, table: dict[str, np.ndarray], ignore_index: int):
        self.table, self.ignore_index = table, ignore_index

    def __call__(self, data: dict) -> dict:
        return apply_label_file(data, self.table, self.ignore_index)


def select_scenes(scenes: Sequence[str], percent: float, seed: int) -> list[str]:
    """round(percent % of the scenes) (at least one), drawn reproducibly from `seed`, in their given order."""
    if not 0 < percent <= 100:
        raise ConfigError(f"scene percent must lie in (0, 100], got {percent}")
    names = sorted(set(scenes))
    if len(names) != len(scenes):
        raise DataError("the scene list has duplicate names", field="name")
    count = max(1, round(len(names) * percent / 100))
    # Drawn from the sorted names, so the choice does not depend on the order the scenes were listed in.
    chosen = set(np.random.default_rng(seed).choice(names, size=count, replace=False).tolist())
    return [scene for scene in scenes if scene in chosen]


def load_scene_list(path: str | Path) -> list[str]:
    """The reference's `lr_file`: scene names separated by whitespace (one per line)."""
    path = local_copy(str(path), field="scene_list_file")  # an s3:// file: fetched once per node
    if not path.is_file():
        raise ConfigError(f"scene list file not found: {path}")
    names = path.read_text().split()
    if not names:
        raise ConfigError(f"{path}: the scene list is empty")
    return names


def training_scenes(scenes: Sequence[str], cfg: DataEfficiencyConfig) -> list[str]:
    """The training scenes to use: all, a seeded share, or those of the scene list file (which must exist)."""
    if cfg.scene_list_file is None and cfg.scene_percent is not None:
        return select_scenes(scenes, cfg.scene_percent, cfg.seed)
    if cfg.scene_list_file is not None:
        listed = load_scene_list(cfg.scene_list_file)
        unknown = sorted(set(listed) - set(scenes))
        if unknown:
            raise DataError(
                f"{len(unknown)} listed scenes are not in the training split, e.g. {unknown[:5]}",
                file=cfg.scene_list_file,
            )
        return listed
    return list(scenes)
