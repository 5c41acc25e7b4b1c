"""A fine-tuning run: what to train (a `FinetuneConfig`) plus where its data comes from, where it runs and logs.

    FinetuneRun.finetune   a semseg config (configs/semseg-*.yaml), by name or path
    FinetuneRun.data       the shards written by `concerto-ray prepare`
    FinetuneRun.run        run name, storage (local or S3), workers, failures (shared with pre-training)
    FinetuneRun.mlflow     tracking URI and experiment

Overrides are `dotted.key=value` (value read as YAML): keys under `data.`, `run.` and `mlflow.` set the run's
sections, every other key a field of the fine-tuning config (`lr=0.001`, `lora.r=16`, `data_efficiency.label_budget=20`).
`plan_finetune` checks the whole run against the shards before any Ray resource is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concerto_ray.config import from_dict, to_dict
from concerto_ray.data.pipeline import StreamConfig
from concerto_ray.data.shards import read_manifest
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.finetune.configs import FinetuneConfig, load_finetune_config
from concerto_ray.finetune.data_efficiency import training_scenes
from concerto_ray.finetune.segmentor import locate_checkpoint
from concerto_ray.train.config import (
    SHARDS_PLACEHOLDER,
    MlflowSection,
    RunSettings,
    absolute_uri,
    check_storage,
    set_value,
)

RUN_SECTIONS = ("data", "run", "mlflow")
FINETUNE_EXPERIMENT = "concerto-ray-finetune"


@dataclass
class FinetuneData:
    shards: str  # local path or s3://bucket/prefix written by `concerto-ray prepare`
    endpoint_url: str | None = None  # S3-compatible endpoint of the shards
    segment_asset: str | None = None  # label array ("segment20" for ScanNet); default: auto
    shuffle_buffer: int = 8
    verify_checksums: bool = True


@dataclass
class FinetuneRun:
    finetune: FinetuneConfig
    data: FinetuneData
    run: RunSettings
    mlflow: MlflowSection = field(default_factory=lambda: MlflowSection(experiment=FINETUNE_EXPERIMENT))

    @property
    def worker_batch_size(self) -> int:
        """Samples per step on each worker: the config's batch size is over all workers, as in the reference."""
        return self.finetune.batch_size // self.run.num_workers

    def stream(self, mode: str = "semseg_train") -> StreamConfig:
        """The Ray Data stream of the training split."""
        return StreamConfig(shards=self.data.shards, mode=mode, splits=list(self.finetune.train_split),
                            endpoint_url=self.data.endpoint_url, batch_size=self.worker_batch_size,
                            shuffle_buffer=self.data.shuffle_buffer, verify_checksums=self.data.verify_checksums,
                            segment_asset=self.data.segment_asset, semseg=self.finetune.transform)


@dataclass(frozen=True)
class FinetunePlan:
    """What a validated run will do."""

    train_scenes: list[str]  # after the limited-reconstruction selection
    limited_scenes: bool  # only a share of the training split is used
    val_scenes: int
    steps_per_epoch: int


def finetune_run_tree(config: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of a run: the named fine-tuning config under `finetune`, with `overrides` ({dotted key:
    value}) applied as the module docstring describes."""
    tree: dict[str, Any] = {"finetune": to_dict(load_finetune_config(config))}
    for key, value in overrides.items():
        section = key.split(".", 1)[0]
        set_value(tree, key if section in RUN_SECTIONS else f"finetune.{key}", value)
    return tree


def load_finetune_run(config: str | Path, overrides: dict[str, Any]) -> FinetuneRun:
    """The run of fine-tuning config `config` (name or path) with `overrides`, typed and with absolute paths."""
    run = from_dict(FinetuneRun, finetune_run_tree(config, overrides))
    # Workers do not share the driver's working directory.
    run.data.shards = absolute_uri(run.data.shards)
    run.run.storage_path = absolute_uri(run.run.storage_path)
    pretrained = run.finetune.pretrained.path
    if pretrained is not None:
        run.finetune.pretrained.path = absolute_uri(pretrained)
    return run


def plan_finetune(run: FinetuneRun) -> FinetunePlan:
    """Check the run against its shards, storage and files; the numbers it will train with."""
    cfg = run.finetune
    if run.data.shards.startswith(SHARDS_PLACEHOLDER):
        raise ConfigError(f"data.shards is still the placeholder {run.data.shards!r}: set it to the shards written "
                          f"by `concerto-ray prepare`, e.g. --set data.shards=s3://my-bucket/scannet-shards")
    if cfg.epochs % cfg.eval_epochs:
        raise ConfigError(f"finetune.epochs ({cfg.epochs}) must be a multiple of finetune.eval_epochs "
                          f"({cfg.eval_epochs}): the epochs are cut into that many equal evaluation rounds")
    if cfg.batch_size % run.run.num_workers:
        raise ConfigError(f"finetune.batch_size ({cfg.batch_size}, over all workers) must be a multiple of "
                          f"run.num_workers ({run.run.num_workers})")
    if cfg.pretrained.path is not None:
        try:
            locate_checkpoint(cfg.pretrained.path, run.run.endpoint_url)
        except ConfigError as exc:
            raise ConfigError(f"finetune.pretrained.path: {exc}") from None
    check_storage(run.run, run.mlflow)
    scenes = _split_samples(run, cfg.train_split, "finetune.train_split")
    try:
        selected = training_scenes(scenes, cfg.data_efficiency)
    except DataError as exc:
        raise ConfigError(f"finetune.data_efficiency: {exc}") from None
    val_scenes = len(_split_samples(run, cfg.val_split, "finetune.val_split"))
    if not val_scenes:
        raise ConfigError(f"finetune.val_split {list(cfg.val_split)} has no samples to evaluate on")
    steps = len(selected) // run.run.num_workers // run.worker_batch_size
    if steps < 1:
        raise ConfigError(f"one epoch gives no optimizer step: {len(selected)} training scenes for "
                          f"{run.run.num_workers} workers x {run.worker_batch_size} samples per worker")
    return FinetunePlan(train_scenes=selected, limited_scenes=len(selected) < len(scenes), val_scenes=val_scenes,
                        steps_per_epoch=steps)


def _split_samples(run: FinetuneRun, splits: tuple[str, ...], where: str) -> list[str]:
    try:
        manifest = read_manifest(run.data.shards, endpoint_url=run.data.endpoint_url)
    except DataError as exc:
        raise ConfigError(f"data.shards: {exc}") from None
    unknown = [s for s in splits if s not in manifest.splits]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is not in the manifest of {run.data.shards} "
                          f"(it has: {', '.join(manifest.splits)})")
    return [name for split in splits for shard in manifest.splits[split].shards for name in shard.samples]
