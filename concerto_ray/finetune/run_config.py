"""A fine-tuning run: what to train (a `FinetuneConfig`) plus where its data comes from, where it runs and logs.

    FinetuneRun.finetune   a semseg config (configs/semseg-*.yaml), by name or path
    FinetuneRun.data       the shards written by `concerto-ray prepare`
    FinetuneRun.run        run name, storage (local or S3), workers, failures (shared with pre-training)
    FinetuneRun.mlflow     tracking URI and experiment

Overrides are `dotted.key=value` (value read as YAML): keys under `data.`, `run.` and `mlflow.` set the run's
sections, every other key a field of the fine-tuning config (`lr=0.001`, `lora.r=16`,
`data_efficiency.label_budget=20`).
`plan_finetune` checks the whole run against the shards before any Ray resource is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concerto_ray.config import from_dict, to_dict
from concerto_ray.data import storage
from concerto_ray.data.flavors import label_asset
from concerto_ray.data.pipeline import StreamConfig, under_root
from concerto_ray.data.shards import Manifest, read_manifest
from concerto_ray.data.sources import SourceConfig
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.finetune.configs import DataEfficiencyConfig, FinetuneConfig, load_finetune_config
from concerto_ray.finetune.data_efficiency import training_scenes
from concerto_ray.finetune.multi_dataset import round_steps
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
    # PPT: the folder or prefix that each source's shards are in (`finetune.ppt.sources[].shards`, default the
    # source's dataset name), one prepare per dataset under it, as pre-training's data.sources_root.
    sources_root: str | None = None
    segment_asset: str | None = None  # label array; default: the dataset's (flavors.label_asset: ScanNet segment20)
    verify_checksums: bool = True


@dataclass
class FinetuneRun:
    finetune: FinetuneConfig
    data: FinetuneData
    run: RunSettings
    mlflow: MlflowSection = field(default_factory=lambda: MlflowSection(experiment=FINETUNE_EXPERIMENT))

    def stream(self, round_plan: RoundPlan) -> StreamConfig:
        """The Ray Data stream of one round: the training split `loop` times in one shuffled epoch, as the
        reference's repeated dataset, batched per worker."""
        source = SourceConfig(shards=self.data.shards, splits=list(self.finetune.train_split), loop=round_plan.loop)
        return StreamConfig(
            sources=[source],
            mode="semseg_train",
            endpoint_url=self.data.endpoint_url,
            batch_size=round_plan.worker_batch_size,
            seed=self.run.seed,
            verify_checksums=self.data.verify_checksums,
            segment_asset=self.data.segment_asset,
            semseg=self.finetune.transform,
        )

    def source_streams(self, round_plan: RoundPlan) -> list[StreamConfig]:
        """PPT: the stream of each source, batched per worker; the first one's scenes `loop` times."""
        streams = []
        for i, source in enumerate(self.finetune.ppt.sources):
            loop = round_plan.loop if i == 0 else 1
            streams.append(
                StreamConfig(
                    sources=[SourceConfig(shards=self.source_shards(i), splits=list(source.splits), loop=loop)],
                    mode="semseg_train",
                    endpoint_url=self.data.endpoint_url,
                    batch_size=round_plan.worker_batch_size,
                    seed=self.run.seed,
                    verify_checksums=self.data.verify_checksums,
                    segment_asset=label_asset(source.dataset),
                    semseg=source.transform,
                )
            )
        return streams

    def source_shards(self, index: int) -> str:
        """Where PPT source `index` has its shards."""
        source = self.finetune.ppt.sources[index]
        shards = source.shards or source.dataset
        if "://" in shards or Path(shards).is_absolute():
            return shards
        if self.data.sources_root is None:
            raise ConfigError(
                f"finetune.ppt.sources[{index}].shards is {shards!r}, relative to data.sources_root, which is not "
                f"set: --set data.sources_root=s3://my-bucket/shards (one prepare per dataset under it)"
            )
        return under_root(self.data.sources_root, shards)


@dataclass(frozen=True)
class RoundPlan:
    """One evaluation round as the reference trains it (Pointcept's train loop with `loop = epoch // eval_epoch`).

    The round is one pass over the training scenes repeated `loop` times (L samples). As torch's
    DistributedSampler does, every worker gets ceil(L / workers) of them (a few samples repeated to pad); the
    batches are `batch_size // workers` per worker with the last partial batch dropped, except when L is at most
    one global batch: the reference then keeps it, so the round is one step of the samples there are."""

    samples: int  # training scenes (PPT: of the first source)
    loop: int
    num_workers: int
    batch_size: int  # over all workers
    # PPT (Pointcept's MultiDatasetDataloader): batches of each source per turn; the first source's batches, all
    # full (it always drops the last partial one), set the round's length (`multi_dataset.round_steps`).
    ratios: tuple[int, ...] = ()

    @property
    def samples_per_worker(self) -> int:
        return -(-self.samples * self.loop // self.num_workers)

    @property
    def worker_batch_size(self) -> int:
        if self.ratios:
            return self.batch_size // self.num_workers
        return min(self.batch_size // self.num_workers, self.samples_per_worker)

    @property
    def steps(self) -> int:
        batches = self.samples_per_worker // self.worker_batch_size
        return round_steps(batches, self.ratios) if self.ratios else batches

    @property
    def padding(self) -> int:
        """Samples repeated so that every worker gets `samples_per_worker`."""
        return self.samples_per_worker * self.num_workers - self.samples * self.loop


@dataclass(frozen=True)
class FinetunePlan:
    """What a validated run will do."""

    train_scenes: list[str]  # after the limited-reconstruction selection (PPT: empty, every source's scenes train)
    limited_scenes: bool  # only a share of the training split is used
    val_scenes: list[str]  # validated every round (none with `evaluate` off)
    test_scenes: list[str]  # the final test protocol's
    round: RoundPlan
    rounds: int  # evaluation rounds (Pointcept's eval_epoch)

    @property
    def total_steps(self) -> int:
        return self.round.steps * self.rounds


def finetune_run_tree(config: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The nested dict of a run: the named fine-tuning config under `finetune`, with `overrides` ({dotted key:
    value}) applied as the module docstring describes."""
    tree: dict[str, Any] = {"finetune": to_dict(load_finetune_config(config))}
    # The transform's class count and ignore index follow the config's own (FinetuneConfig sets them), so that
    # `num_classes=13` or `ignore_index=255` alone is a whole override.
    for derived in ("num_classes", "ignore_index"):
        tree["finetune"]["transform"].pop(derived)
    for key, value in overrides.items():
        section = key.split(".", 1)[0]
        set_value(tree, key if section in RUN_SECTIONS else f"finetune.{key}", value)
    return tree


def load_finetune_run(config: str | Path, overrides: dict[str, Any]) -> FinetuneRun:
    """The run of fine-tuning config `config` (name or path) with `overrides`, typed and with absolute paths."""
    run = from_dict(FinetuneRun, finetune_run_tree(config, overrides))
    if run.data.segment_asset is None:  # the labels the config's dataset trains on: ScanNet200 reads segment200
        run.data.segment_asset = label_asset(run.finetune.dataset)
    # Workers do not share the driver's working directory.
    run.data.shards = absolute_uri(run.data.shards)
    if run.data.sources_root is not None:
        run.data.sources_root = absolute_uri(run.data.sources_root)
    if run.finetune.ppt is not None and Path(run.finetune.ppt.clip_model).is_dir():
        run.finetune.ppt.clip_model = str(Path(run.finetune.ppt.clip_model).resolve())
    run.run.storage_path = absolute_uri(run.run.storage_path)
    pretrained = run.finetune.pretrained.path
    if pretrained is not None:
        run.finetune.pretrained.path = absolute_uri(pretrained)
    return run


def settle_data_efficiency(run: FinetuneRun, manifest: Manifest) -> None:
    """Choose between the reference's data-efficiency files and the seeded draws, in `run`'s config (and so in its
    MLflow params), once on the driver.

    A relative `label_file` / `scene_list_file` names a file of the shards (the root's tasks/ folder, which
    `prepare` copies). Where the manifest lists it, it is used (as a URI beside the manifest) and the budget or
    percent beside it is dropped; where not, the budget or percent is used, or, without one, the missing file is
    reported. A file given as a URI or absolute path is used as it is."""
    cfg = run.finetune.data_efficiency
    shards = storage.resolve(run.data.shards, run.data.endpoint_url)
    for file_key, draw_key in (("label_file", "label_budget"), ("scene_list_file", "scene_percent")):
        path = getattr(cfg, file_key)
        if path is None:
            continue
        if "://" in path or Path(path).is_absolute():
            setattr(cfg, draw_key, None)
        elif path in manifest.task_files:
            setattr(cfg, file_key, shards.uri_of(path))
            setattr(cfg, draw_key, None)
        elif getattr(cfg, draw_key) is not None:
            setattr(cfg, file_key, None)
        else:
            raise ConfigError(
                f"finetune.data_efficiency.{file_key}: {path!r} is not among the shards' task files "
                f"({', '.join(manifest.task_files) or 'none'}); prepare copies the dataset root's tasks/ folder"
            )


def plan_finetune(run: FinetuneRun) -> FinetunePlan:
    """Check the run against its shards, storage and files; the numbers it will train with. Settles the
    data-efficiency files in `run` (`settle_data_efficiency`)."""
    cfg = run.finetune
    if run.data.shards.startswith(SHARDS_PLACEHOLDER):
        raise ConfigError(
            f"data.shards is still the placeholder {run.data.shards!r}: set it to the shards written "
            f"by `concerto-ray prepare`, e.g. --set data.shards=s3://my-bucket/scannet-shards"
        )
    if cfg.epochs % cfg.eval_epochs:
        raise ConfigError(
            f"finetune.epochs ({cfg.epochs}) must be a multiple of finetune.eval_epochs "
            f"({cfg.eval_epochs}): the epochs are cut into that many equal evaluation rounds"
        )
    if run.run.min_workers is not None:
        raise ConfigError("run.num_workers: fine-tuning runs on a fixed number of workers, not a [min, max] range")
    if cfg.batch_size % run.run.num_workers:
        raise ConfigError(
            f"finetune.batch_size ({cfg.batch_size}, over all workers) must be a multiple of "
            f"run.num_workers ({run.run.num_workers})"
        )
    if cfg.pretrained.path is not None:
        try:
            locate_checkpoint(cfg.pretrained.path, run.run.endpoint_url)
        except ConfigError as exc:
            raise ConfigError(f"finetune.pretrained.path: {exc}") from exc
    check_storage(run.run, run.mlflow)
    try:
        manifest = read_manifest(run.data.shards, endpoint_url=run.data.endpoint_url)
    except DataError as exc:
        raise ConfigError(f"data.shards: {exc}") from exc
    settle_data_efficiency(run, manifest)
    if cfg.ppt is not None:
        return _plan_joint(run, manifest)
    scenes = _split_samples(manifest, run.data.shards, cfg.train_split, "finetune.train_split")
    try:
        selected = training_scenes(scenes, cfg.data_efficiency)
    except DataError as exc:
        raise ConfigError(f"finetune.data_efficiency: {exc}") from exc
    if not selected:
        raise ConfigError(f"finetune.train_split {list(cfg.train_split)} has no samples to train on")
    round_plan = RoundPlan(
        samples=len(selected),
        loop=cfg.epochs // cfg.eval_epochs,
        num_workers=run.run.num_workers,
        batch_size=cfg.batch_size,
    )
    return FinetunePlan(
        train_scenes=selected,
        limited_scenes=len(selected) < len(scenes),
        **_evaluation_scenes(run, manifest),
        round=round_plan,
        rounds=cfg.eval_epochs,
    )


def _plan_joint(run: FinetuneRun, manifest: Manifest) -> FinetunePlan:
    """PPT: every source's scenes are checked; the first one's set the rounds; validation is the config's own."""
    cfg = run.finetune
    if cfg.data_efficiency != DataEfficiencyConfig():
        raise ConfigError("finetune.data_efficiency: not available with ppt (the reference's PPT configs use none)")
    counts = []
    for i, source in enumerate(cfg.ppt.sources):
        where = f"finetune.ppt.sources[{i}]"
        try:
            source_manifest = read_manifest(run.source_shards(i), endpoint_url=run.data.endpoint_url)
        except DataError as exc:
            raise ConfigError(f"{where}.shards: {exc}") from exc
        scenes = _split_samples(source_manifest, run.source_shards(i), source.splits, f"{where}.splits")
        if not scenes:
            raise ConfigError(f"{where}: splits {list(source.splits)} hold no scenes")
        counts.append(len(scenes))
    round_plan = RoundPlan(
        samples=counts[0],
        loop=cfg.epochs // cfg.eval_epochs,
        num_workers=run.run.num_workers,
        batch_size=cfg.batch_size,
        ratios=tuple(source.ratio for source in cfg.ppt.sources),
    )
    if round_plan.steps < 1:
        raise ConfigError(
            f"a round gives no step: {counts[0]} scenes of finetune.ppt.sources[0] x loop {round_plan.loop} for "
            f"{run.run.num_workers} workers x batch {round_plan.worker_batch_size} (full batches only)"
        )
    return FinetunePlan(
        train_scenes=[],
        limited_scenes=False,
        **_evaluation_scenes(run, manifest),
        round=round_plan,
        rounds=cfg.eval_epochs,
    )


def _evaluation_scenes(run: FinetuneRun, manifest: Manifest) -> dict[str, list[str]]:
    """The plan's val_scenes (none with `evaluate` off) and test_scenes (`test_split`, else the val_scenes)."""
    cfg = run.finetune
    scenes = {}
    for key, name in (("val_scenes", "val_split"), ("test_scenes", "test_split")):
        splits = getattr(cfg, name)
        scenes[key] = _split_samples(manifest, run.data.shards, splits, f"finetune.{name}")
        if splits and not scenes[key]:
            raise ConfigError(f"finetune.{name} {list(splits)} has no samples to evaluate on")
    return {**scenes, "test_scenes": scenes["test_scenes"] or scenes["val_scenes"]}


def _split_samples(manifest: Manifest, uri: str, splits: tuple[str, ...], where: str) -> list[str]:
    """The scenes of `splits` in the manifest of the shards at `uri`: one per scene folder, as Pointcept's
    segmentation datasets list them."""
    try:
        scenes = manifest.scene_splits(uri)
    except DataError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    unknown = [s for s in splits if s not in scenes]
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]!r} has no scene folders in the manifest of {uri} "
            f"(splits with scene folders: {', '.join(scenes) or 'none'})"
        )
    return [name for split in splits for shard in scenes[split].shards for name in shard.samples]
