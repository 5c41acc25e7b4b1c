"""The typed pre-training config, loaded from YAML with `--set` overrides and checked before Ray starts.

A YAML file has the sections of `PretrainConfig`: `model`, `data` (a `StreamConfig`), `optim`, `run` and `mlflow`.
`load_pretrain_config` rejects unknown keys (suggesting the closest one), wrong types and bad values, and checks
that the shards' manifest exists, so that a typo costs seconds, not a cluster allocation.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from concerto_ray.config import find_config, from_dict
from concerto_ray.data import storage
from concerto_ray.data.pipeline import StreamConfig
from concerto_ray.data.presets import input_channels
from concerto_ray.data.shards import load_manifest
from concerto_ray.data.sources import EpochPlan, field_name, load_sources
from concerto_ray.data.storage import S3_SCHEME
from concerto_ray.errors import ConfigError
from concerto_ray.model.configs import ConcertoConfig, SonataConfig, get_model_config

# The shipped paper configs carry this in data.shards until the user points it at their own shards.
SHARDS_PLACEHOLDER = "s3://SET-ME"


@dataclass
class ModelSection:
    name: str  # a named config of concerto_ray.model.configs, e.g. "pretrain-concerto-v1m1-0-base"
    # Concerto: a local save_pretrained directory, an s3:// copy of one, or a Hugging Face hub name (downloaded once
    # per node by the workers; HF_HUB_OFFLINE=1 reads only each node's Hugging Face cache)
    image_encoder_weights: str | None = None
    # Concerto: the 2D-3D term's weight instead of the named config's. 0 drops the term, and with it the image encoder
    # (no weights needed) and the camera frames: Sonata's point losses only, which train on point clouds without
    # frames (a Sonata config, e.g. tiny-sonata, has no such term in the first place).
    enc2d_loss_weight: float | None = None
    # Recompute the student backbone's attention and MLP activations in backward instead of keeping them: less
    # memory for a longer step (BENCHMARKS.md: the paper's batch on an H200, 97 -> 58 GiB at +5 % step time)
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.enc2d_loss_weight is not None and not self.enc2d_loss_weight >= 0:
            raise ValueError(f"enc2d_loss_weight must be >= 0, got {self.enc2d_loss_weight}")


@dataclass
class OptimConfig:
    """AdamW with layer-wise lr decay over the encoder blocks, a OneCycle lr and a cosine weight-decay ramp."""

    lr: float = 0.004  # peak lr of the last encoder block and of every parameter outside the blocks
    layer_decay: float = 0.9  # each encoder block, counted back from the last, gets this factor once more
    weight_decay: float = 0.04  # at step 0 ...
    final_weight_decay: float = 0.2  # ... rising along a half cosine to this at the last step
    pct_start: float = 0.05
    div_factor: float = 10.0
    final_div_factor: float = 1000.0
    anneal_strategy: Literal["cos", "linear"] = "cos"
    clip_grad: float | None = 3.0  # max global gradient norm; None: no clipping (the norm is still logged)
    grad_accumulation: int = 1  # micro-batches per optimizer step

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        if self.weight_decay < 0 or self.final_weight_decay < 0:
            raise ValueError("weight_decay and final_weight_decay must be >= 0")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must lie in (0, 1), got {self.pct_start}")
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            raise ValueError("div_factor and final_div_factor must be positive")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive or null, got {self.clip_grad}")
        if self.grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {self.grad_accumulation}")


@dataclass
class RunSettings:
    """Where a Ray Train run keeps its state and what it runs on; pre-training and fine-tuning share these."""

    name: str  # the run's folder under storage_path; reuse it with --resume
    storage_path: str  # local folder or s3://bucket/prefix for checkpoints and run state
    endpoint_url: str | None = None  # S3-compatible endpoint of storage_path
    # Training workers: a number, or [MIN, MAX] for elastic pre-training: any number from MIN to MAX, as many as Ray
    # Train can place (a lost spot node shrinks the group, a new one grows it back, each time from the latest
    # checkpoint). The global batch stays MAX x data.batch_size x optim.grad_accumulation: fewer workers accumulate
    # more micro-batches, so the steps, the lr schedule and the samples of every step are those of the full size.
    # Once read, num_workers is MAX and min_workers is MIN.
    num_workers: int | list[int] = 1
    min_workers: int | None = None  # the elastic group's smallest size (None: a fixed number of workers)
    # Elastic: how often Ray Train looks for room to grow the worker group (seconds).
    resize_check_s: float = 60.0
    use_gpu: bool = False
    # The GPU kind every worker needs, as Ray names it and cluster.yaml's node types declare it ("H100", "A100");
    # None: any GPU. Ray Train then places workers (and the autoscaler launches nodes) of that kind only.
    accelerator_type: str | None = None
    cpus_per_worker: float = 1.0  # leave CPUs free on the cluster for Ray Data's transform tasks
    seed: int = 0
    checkpoints_to_keep: int = 3
    # Also checkpoint after the first optimizer step that ends this many minutes after the last checkpoint (None:
    # off), so that a lost node costs at most about this much training whatever the step time. Fine-tuning then
    # checkpoints inside evaluation rounds too (not in sweeps, whose ASHA counts reports as rounds).
    checkpoint_every_minutes: float | None = None
    # Worker failures Ray Train recovers from, each time from the latest checkpoint: a node lost without a spot
    # notice, a crashed worker. Spot reclaims drained through Ray (spot_watcher) count separately, without limit.
    max_failures: int = 3
    max_nonfinite_steps: int = 10  # consecutive non-finite steps (skipped) before the run stops

    def __post_init__(self):
        if isinstance(self.num_workers, list):
            if len(self.num_workers) != 2 or self.min_workers is not None:
                raise ValueError(f"num_workers must be a number or [min, max], got {self.num_workers}")
            self.min_workers, self.num_workers = self.num_workers
        for name in ("num_workers", "checkpoints_to_keep", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            got = f"[{self.min_workers}, {self.num_workers}]"
            raise ValueError(f"num_workers [min, max] needs 1 <= min <= max, got {got}")
        if self.resize_check_s <= 0:
            raise ValueError(f"resize_check_s must be positive, got {self.resize_check_s}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.accelerator_type is not None and not self.use_gpu:
            raise ValueError(f"accelerator_type {self.accelerator_type!r} needs use_gpu: true")
        if self.checkpoint_every_minutes is not None and not self.checkpoint_every_minutes > 0:
            raise ValueError(f"checkpoint_every_minutes must be positive or null, got {self.checkpoint_every_minutes}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty folder name without '/', got {self.name!r}")

    @property
    def run_uri(self) -> str:
        """The run's folder as a user would write it."""
        return posixpath.join(self.storage_path.rstrip("/"), self.name)


@dataclass
class RunSection(RunSettings):
    epochs: int = 100
    amp: Literal["bf16", "off"] = "bf16"  # bf16 autocast needs no gradient scaler
    checkpoint_every: int = 1000  # optimizer steps; the last step is always checkpointed
    find_unused_parameters: bool = False  # DDP: only for model configs that leave trainable parameters unused
    # After run.max_nonfinite_steps non-finite steps in a row: "stop" the run, or "rollback": restore the weights and
    # optimizer moments of the latest checkpoint and go on with the next batches (the steps since that checkpoint
    # count as done, as the schedules do; MLflow's rolled_back_to_step says when). A second rollback to the same
    # checkpoint stops the run.
    on_nonfinite: Literal["stop", "rollback"] = "stop"
    # Record which samples every optimizer step trained on, worker by worker: at each checkpoint the steps since the
    # last one go to MLflow as samples/step-NNNNNNNN.json ({step: [each worker's sample names]}).
    log_sample_names: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("epochs", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class MlflowSection:
    # None: $MLFLOW_TRACKING_URI, else a SQLite file in the run folder (local storage only).
    tracking_uri: str | None = None
    experiment: str = "concerto-ray-pretrain"
    # CPU, memory, disk, network and GPU of every node, as system/node<N>/... metrics, sampled this often; 0: off.
    system_metrics_interval_s: float = 10.0


@dataclass
class PretrainConfig:
    model: ModelSection
    data: StreamConfig
    run: RunSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def model_config(self) -> SonataConfig | ConcertoConfig:
        """The named model config with this run's overrides applied."""
        config = get_model_config(self.model.name)
        if self.model.enc2d_loss_weight is not None:
            if not isinstance(config, ConcertoConfig):
                raise ConfigError(
                    f"enc2d_loss_weight: model {self.model.name!r} is a Sonata config, which has no 2D-3D term"
                )
            # A new config, so that its checks (some loss weight positive) see the weight.
            config = dataclasses.replace(config, enc2d_loss_weight=self.model.enc2d_loss_weight)
        # The backbone reads what the data pipeline feeds it: 3 channels per input array (9 for the paper's data).
        config.backbone.in_channels = input_channels(self.data.pretrain.feat_keys)
        if isinstance(config, ConcertoConfig):
            if self.model.image_encoder_weights is not None:
                config.image_encoder.weights = self.model.image_encoder_weights
            config.image_encoder.weights_field = "model.image_encoder_weights"
            # The image patch grid is the crop the data pipeline produces, in encoder patches.
            config.patch_h = self.data.pretrain.crop_h // self.data.pretrain.patch_size
            config.patch_w = self.data.pretrain.crop_w // self.data.pretrain.patch_size
        return config

    def workers_batch(self) -> int:
        """Samples per optimizer step over all workers (the global batch, whatever the number of workers)."""
        return self.data.batch_size * self.run.num_workers * self.optim.grad_accumulation

    def accumulation(self, workers: int) -> int:
        """Micro-batches per optimizer step on each of `workers` workers: the global batch's share of each, in
        `data.batch_size` samples (`optim.grad_accumulation` at the full size)."""
        return self.optim.grad_accumulation * self.run.num_workers // workers


def load_pretrain_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    """Read the YAML at `path` (or the shipped config of that name, e.g. "pretrain-tiny"), apply `a.b.c=value`
    overrides (values parsed as YAML), validate everything."""
    path = find_config(path, "pretrain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    data = apply_overrides(data, overrides)
    try:
        config = from_dict(PretrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    validate(config)
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each `dotted.key=value` set (the value read as YAML); unknown keys are left for
    `from_dict` to name."""
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides).items():
        set_value(data, key, value)
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["a.b=1", "c=[x, y]"] -> {"a.b": 1, "c": ["x", "y"]}: each value read as YAML."""
    parsed = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            parsed[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from exc
    return parsed


def set_value(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for key "a.b.c" in place, creating missing sections."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = value


def validate(config: PretrainConfig) -> None:
    """Checks across sections, and of the things the config points at, that `from_dict` cannot do alone."""
    data = config.data
    if data.mode != "pretrain":
        raise ConfigError(f"data.mode must be 'pretrain' for pre-training, got {data.mode!r}")
    placeholders = [("data.sources_root", data.sources_root)] + [
        (field_name(data.where(), i, "shards"), s.shards) for i, s in enumerate(data.source_configs())
    ]
    for name, value in placeholders:
        if value is not None and value.startswith(SHARDS_PLACEHOLDER):
            raise ConfigError(
                f"{name} is still the placeholder {value!r}: set it to the shards written by "
                f"`concerto-ray prepare`, e.g. --set {name}=s3://my-bucket/concerto-shards"
            )
    # Workers do not share the driver's working directory: local paths become absolute here.
    if data.shards is not None:
        data.shards = absolute_uri(data.shards)
        if data.splits is None:
            data.splits = ["train"]
    else:  # each source's shards resolved against sources_root
        data.sources = [dataclasses.replace(s, shards=absolute_uri(s.shards)) for s in data.source_configs()]
        data.sources_root = None
    if data.seed is None:  # the run's seed fixes the data order and augmentations too
        data.seed = config.run.seed
    config.run.storage_path = absolute_uri(config.run.storage_path)
    weights = config.model.image_encoder_weights
    if weights is not None and Path(weights).is_dir():
        config.model.image_encoder_weights = str(Path(weights).resolve())
    try:
        model_config = config.model_config()
    except ValueError as exc:  # ConfigError, or a model config check on the derived patch grid
        raise ConfigError(f"model: {exc}") from exc
    _check_views(config, model_config)
    check_storage(config.run, config.mlflow)
    _check_elastic(config)
    steps = steps_per_epoch(config)
    if steps < 1:
        raise ConfigError(
            f"one epoch gives no optimizer step: {_train_samples(config)} samples of "
            f"{data.where()} for {config.run.num_workers} workers x data.batch_size "
            f"{data.batch_size} x optim.grad_accumulation {config.optim.grad_accumulation}"
        )
    if model_config.reads_frames():  # Concerto's 2D-3D term; the manifests are known to be readable by now
        _check_frames(config, model_config)
        _check_image_encoder_weights(model_config)


def _check_frames(config: PretrainConfig, model_config: ConcertoConfig) -> None:
    """The 2D-3D term reads every sample's camera frames. A split without split file has its scene folders as
    samples, points only (`Manifest.frameless_splits`): refused here, before Ray starts. Any other sample without
    frames fails where it is read (`concerto_pretrain_transform`)."""
    data = config.data
    for i, source in enumerate(data.source_configs()):
        location = storage.resolve(source.shards, data.endpoint_url)
        manifest = load_manifest(location)
        frameless = manifest.frameless_splits()
        for split in source.splits or list(manifest.splits):
            if split in frameless:
                sample = next(name for shard in manifest.splits[split].shards for name in shard.samples)
                raise ConfigError(
                    f"{field_name(data.where(), i, 'shards')}: sample {sample!r} of split {split!r} ({location.uri}) "
                    "has no camera frames (the split has no split file: its samples are scene folders, points only), "
                    f"but model {config.model.name!r} reads frames for its 2D-3D term (enc2d_loss_weight "
                    f"{model_config.enc2d_loss_weight:g}). Point clouds without frames pre-train with "
                    "model.enc2d_loss_weight: 0 (Sonata's point losses only) or a Sonata model, as "
                    "configs/pretrain-sonata-tiny.yaml does"
                )


def _check_elastic(config: PretrainConfig) -> None:
    """An elastic run keeps its global batch at every size it may run at, or is refused before it starts."""
    run = config.run
    if run.min_workers is None:
        return
    elastic = f"run.num_workers [{run.min_workers}, {run.num_workers}]"
    if keeps_short_batch(config):
        raise ConfigError(
            f"{elastic}: an epoch of {_train_samples(config)} samples is one short batch per worker, which "
            "fewer workers cannot make up with gradient accumulation; use a fixed number of workers"
        )
    per_step = run.num_workers * config.optim.grad_accumulation  # micro-batches of data.batch_size a step
    odd = [w for w in range(run.min_workers, run.num_workers + 1) if per_step % w]
    if odd:
        raise ConfigError(
            f"{elastic}: with {', '.join(map(str, odd))} workers the global batch ({run.num_workers} workers x "
            f"optim.grad_accumulation {config.optim.grad_accumulation} micro-batches of data.batch_size) cannot be "
            "split evenly; raise the minimum or choose a grad_accumulation that every size in the range divides"
        )


def steps_per_epoch(config: PretrainConfig) -> int:
    """Optimizer steps per epoch, as Pointcept's: the epoch is padded so that each worker gets
    ceil(samples / workers) of it (`EpochPlan`), and every worker drops its last partial batch, unless that batch
    is the only one (`keeps_short_batch`)."""
    if keeps_short_batch(config):
        return 1
    return _rows_per_worker(config) // config.data.batch_size // config.optim.grad_accumulation


def keeps_short_batch(config: PretrainConfig) -> bool:
    """Whether an epoch is one short batch per worker: Pointcept's loader drops the last partial batch only when the
    epoch holds more samples than the global batch, so a smaller set still trains, one step an epoch. (With
    gradient accumulation, which the reference has not, such an epoch is refused.)"""
    return config.optim.grad_accumulation == 1 and 0 < _rows_per_worker(config) < config.data.batch_size


def _rows_per_worker(config: PretrainConfig) -> int:
    return -(-_train_samples(config) // config.run.num_workers)


def resolve_tracking_uri(mlflow: MlflowSection, local_run_dir: str | None) -> str:
    """The MLflow tracking URI: the config's, else $MLFLOW_TRACKING_URI, else SQLite in a local run folder."""
    uri = mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if local_run_dir is None:
        raise ConfigError(
            "mlflow.tracking_uri: set it (or MLFLOW_TRACKING_URI) when run.storage_path is on S3; "
            "the SQLite default only works in a local run folder"
        )
    return f"sqlite:///{local_run_dir}/mlflow.db"


def absolute_uri(uri: str) -> str:
    """Workers do not share the driver's working directory: local paths are made absolute, URIs kept."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def _check_views(config: PretrainConfig, model_config: SonataConfig) -> None:
    transform = config.data.pretrain
    if (transform.global_view_num, transform.local_view_num) != (
        model_config.num_global_view,
        model_config.num_local_view,
    ):
        raise ConfigError(
            f"data.pretrain makes {transform.global_view_num} global and {transform.local_view_num} "
            f"local views but model {config.model.name!r} expects {model_config.num_global_view} "
            f"and {model_config.num_local_view}"
        )


def _check_image_encoder_weights(model_config: ConcertoConfig) -> None:
    """The weights' form only: an s3:// folder or a hub name is fetched, and its architecture checked, where it is
    read, on each worker's node (`load_image_encoder`)."""
    weights = model_config.image_encoder.weights
    if not weights:
        raise ConfigError(
            "model.image_encoder_weights: the Concerto image encoder needs DINOv2 weights "
            "(a directory written by save_pretrained, or a hub name such as 'facebook/dinov2-with-registers-giant')"
        )
    if "://" in weights or Path(weights).is_dir():
        return
    # A path ("/...", "./...", "~/...") or something that exists is meant as a local directory, never a hub name.
    if Path(weights).is_absolute() or weights.startswith((".", "~")) or Path(weights).exists():
        raise ConfigError(
            f"model.image_encoder_weights: {weights!r} is neither a local directory (no directory is at that path) "
            f"nor a hub name"
        )
    try:
        validate_repo_id(weights)
    except HFValidationError as exc:
        raise ConfigError(
            f"model.image_encoder_weights: {weights!r} is neither a local directory nor a valid hub name such as "
            f"'facebook/dinov2-with-registers-giant': {exc}"
        ) from exc


def check_storage(run: RunSettings, mlflow: MlflowSection) -> None:
    """The run folder is local or on S3, and MLflow has somewhere to log to."""
    if "://" in run.storage_path and not run.storage_path.startswith(S3_SCHEME):
        raise ConfigError(f"run.storage_path {run.storage_path!r}: use a local folder or s3://bucket/prefix")
    local_dir = None if run.storage_path.startswith(S3_SCHEME) else run.run_uri
    resolve_tracking_uri(mlflow, local_dir)


def _train_samples(config: PretrainConfig) -> int:
    """Samples per epoch over all sources (each source's samples times its loop factor)."""
    data = config.data
    sources = load_sources(data.source_configs(), data.endpoint_url, where=data.where())
    return EpochPlan(sources, seed=0).epoch_size()  # the size does not depend on the seed
