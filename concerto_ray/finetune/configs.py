"""Typed fine-tuning config, and the YAML configs under `configs/` named after Pointcept's Concerto semseg configs.

Four modes, as in Pointcept's `configs/concerto/semseg-ptv3-*`:

- `lin`: linear probe. Encoder-only backbone, frozen (no gradients; it follows the model's train/eval mode, so
  drop path stays on in training); the features of every level are up-cast onto the finest one and a linear head
  is trained (`DefaultSegmentorV2`, `freeze_backbone=True`).
- `dec`: the pre-trained encoder is frozen (`freeze_encoder`), a fresh decoder and the head are trained.
- `ft`: full fine-tuning of encoder, decoder and head.
- `lora`: encoder-only backbone with LoRA adapters on the attention `qkv` layers (`DefaultLORASegmentorV2`);
  only the adapters and the head train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from concerto_ray.config import find_config, load_yaml, shipped_config_names
from concerto_ray.data.presets import SemsegTransformConfig, input_channels
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.submission import SUBMISSION_DATASETS
from concerto_ray.model.ptv3 import PTv3Config

Mode = Literal["lin", "dec", "ft", "lora"]
# Pointcept's PPT `clip_model="ViT-B/16"` as a Hugging Face hub name.
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


@dataclass
class CriteriaConfig:
    """Weights of the two losses every Concerto semseg config sums (both with the config's ignore_index)."""

    ce_weight: float = 1.0
    lovasz_weight: float = 1.0

    def __post_init__(self):
        if self.ce_weight < 0 or self.lovasz_weight < 0 or self.ce_weight + self.lovasz_weight == 0:
            raise ConfigError(
                f"criteria weights must be >= 0 and not both 0, got ce_weight={self.ce_weight}, "
                f"lovasz_weight={self.lovasz_weight}"
            )


@dataclass
class LoraSettings:
    """peft LoraConfig of the reference's LoRA segmentor (bias "none")."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("qkv",)

    def __post_init__(self):
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ConfigError(
                f"lora needs r >= 1, alpha >= 1, 0 <= dropout < 1 and target modules; got r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, target_modules={self.target_modules}"
            )


@dataclass
class OneCycleConfig:
    """torch OneCycleLR arguments; the peaks are `lr` for the head and the rest, `block_lr` for backbone blocks."""

    pct_start: float = 0.05
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = 10.0
    final_div_factor: float = 1000.0


@dataclass
class DataEfficiencyConfig:
    """Limited annotations (points per scene) and limited reconstructions (share of training scenes).

    Read from the reference's files (`label_file`: Pointcept's `la_file`, a torch-saved {scene: point indices};
    `scene_list_file`: its `lr_file`, one scene name per line), or drawn reproducibly from `seed` (`label_budget`,
    `scene_percent`). A relative file path is looked up in the shards (`prepare` copies the root's tasks/ folder
    there); given with a budget or percent, the file is used where the shards have it and the seeded draw where
    they do not (`run_config.settle_data_efficiency`)."""

    label_budget: int | None = None
    label_file: str | None = None
    scene_percent: float | None = None
    scene_list_file: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.label_budget is not None and self.label_budget < 1:
            raise ConfigError(f"label_budget must be >= 1 point per scene, got {self.label_budget}")
        if self.scene_percent is not None and not 0 < self.scene_percent <= 100:
            raise ConfigError(f"scene_percent must lie in (0, 100], got {self.scene_percent}")


@dataclass
class PPTSource:
    """One dataset of a Point Prompt Training run (one entry of the reference's ConcatDataset)."""

    condition: str  # its name among `PPTConfig.conditions` (the reference's "condition" of its samples)
    dataset: Literal["scannet", "scannet200", "scannetpp", "s3dis", "structured3d"]  # whose labels it trains on
    splits: tuple[str, ...]
    # Batches of this dataset per turn (the reference's `loop` of a sub-dataset, which MultiDatasetDataloader
    # reads as a ratio).
    ratio: int = 1
    # Its shards: a folder under data.sources_root, or a URI / absolute path; default: the dataset's name.
    shards: str | None = None
    transform: SemsegTransformConfig | None = None  # None: the config's own `transform`

    def __post_init__(self):
        if self.ratio < 1 or not self.splits:
            raise ConfigError(f"source {self.condition!r}: needs ratio >= 1 and at least one split")


@dataclass
class PPTConfig:
    """Point Prompt Training (Pointcept's PPT-v1m3, `finetune/ppt.py`): one model trained on several datasets.

    The first source sets a round's length (MultiDatasetTrainer); validation and test run on the config's own
    `dataset` and `val_split` under `condition`."""

    conditions: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]  # per condition
    condition: str  # the condition of the config's `dataset` (validation and test)
    sources: tuple[PPTSource, ...]
    template: str = "[x]"
    clip_model: str = DEFAULT_CLIP  # local directory, s3:// copy or hub name of a transformers CLIP
    backbone_out_channels: int = 64

    def __post_init__(self):
        if len(self.class_names) != len(self.conditions):
            raise ConfigError(f"ppt: {len(self.conditions)} conditions but {len(self.class_names)} class-name lists")
        unknown = [c for c in (self.condition, *(s.condition for s in self.sources)) if c not in self.conditions]
        if unknown:
            raise ConfigError(f"ppt: condition {unknown[0]!r} is not one of the conditions {list(self.conditions)}")
        if not self.sources:
            raise ConfigError("ppt.sources: list at least one dataset to train on")

    def classes(self, condition: str) -> tuple[str, ...]:
        return self.class_names[self.conditions.index(condition)]


@dataclass
class PretrainedConfig:
    """Where the pre-trained backbone comes from, and the reference's key rewrite (`CheckpointLoader`'s
    `keywords` -> `replacement`, applied after every key has been given the `module.` prefix)."""

    path: str | None = None
    keyword: str = "module.student.backbone"
    replacement: str = "module.backbone"


@dataclass(kw_only=True)
class FinetuneConfig:
    mode: Mode
    dataset: Literal["scannet", "scannet200", "scannetpp", "s3dis"]
    train_split: tuple[str, ...] = ("train",)
    val_split: tuple[str, ...] = ("val",)  # validated every round; empty when `evaluate` is off
    # The scenes of the final test protocol (Pointcept's `data.test`); empty: `val_split`.
    test_split: tuple[str, ...] = ()
    # Pointcept's `evaluate`: a validation pass every round, the best round tested at the end. Off (the `-submit`
    # configs, which train on train + val): no validation, and the last round is tested (`test_last`).
    evaluate: bool = True
    test_last: bool = False  # test the last round's model instead of the best (PreciseEvaluator's test_last)
    # The test protocol also writes the benchmark's prediction file of every test scene to `submit/<scene>.txt`
    # in the run folder (Pointcept's tester's submit folder), and test scenes may be unlabelled (they then count in
    # no metric).
    submission: bool = False
    backbone: PTv3Config
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = -1
    criteria: CriteriaConfig = field(default_factory=CriteriaConfig)
    # Passes over the training set, and how many evaluation rounds they are cut into (Pointcept's `eval_epoch`).
    epochs: int = 800
    eval_epochs: int = 100
    batch_size: int = 24  # over all workers, like the reference
    lr: float = 0.002
    block_lr: float = 0.0002  # parameters whose name contains "block" (the reference's param_dicts)
    weight_decay: float = 0.02
    schedule: OneCycleConfig = field(default_factory=OneCycleConfig)
    clip_grad: float | None = 3.0
    mix_prob: float = 0.8  # Mix3D probability of the training batches
    # Mixed precision on the GPU, as Pointcept's trainer: autocast to `amp_dtype`; float16 (its default) with a
    # gradient scaler, whose overflow-skipped steps leave the lr schedule where it is.
    enable_amp: bool = True
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    lora: LoraSettings = field(default_factory=LoraSettings)
    data_efficiency: DataEfficiencyConfig = field(default_factory=DataEfficiencyConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    transform: SemsegTransformConfig = field(default_factory=SemsegTransformConfig)
    ppt: PPTConfig | None = None  # joint training on several datasets (the `*-ppt` configs)

    def __post_init__(self):
        encoder_only = self.mode in ("lin", "lora")
        if self.backbone.enc_mode != encoder_only:
            raise ConfigError(f"mode {self.mode!r} needs backbone.enc_mode={encoder_only}")
        if self.mode == "dec" and not self.backbone.freeze_encoder:
            raise ConfigError("mode 'dec' trains the decoder on a frozen encoder: set backbone.freeze_encoder=true")
        if self.mode == "ft" and self.backbone.freeze_encoder:
            raise ConfigError("mode 'ft' trains the whole backbone: set backbone.freeze_encoder=false")
        if self.num_classes < 1 or len(self.class_names) != self.num_classes:
            raise ConfigError(f"num_classes is {self.num_classes} but class_names has {len(self.class_names)} names")
        # The transforms check labels against the model's classes and ignore index.
        if self.transform.num_classes is None:
            self.transform = dataclasses.replace(self.transform, num_classes=self.num_classes)
        elif self.transform.num_classes != self.num_classes:
            raise ConfigError(
                f"transform.num_classes is {self.transform.num_classes} but num_classes is {self.num_classes}"
            )
        self.transform = dataclasses.replace(self.transform, ignore_index=self.ignore_index)
        if min(self.lr, self.block_lr) <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"lr and block_lr must be > 0 and weight_decay >= 0, got lr={self.lr}, "
                f"block_lr={self.block_lr}, weight_decay={self.weight_decay}"
            )
        for where, transform in [("transform", self.transform)] + [
            (f"ppt.sources[{i}].transform", source.transform)
            for i, source in enumerate(self.ppt.sources if self.ppt else ())
            if source.transform is not None
        ]:
            if input_channels(transform.feat_keys) != self.backbone.in_channels:
                raise ConfigError(
                    f"{where}.feat_keys {list(transform.feat_keys)} make {input_channels(transform.feat_keys)} input "
                    f"channels but backbone.in_channels is {self.backbone.in_channels}"
                )
        if self.ppt is not None:
            if self.mode != "ft":
                raise ConfigError(f"ppt trains the whole model: mode must be 'ft', not {self.mode!r}")
            if self.ppt.classes(self.ppt.condition) != self.class_names:
                raise ConfigError(f"class_names must be ppt.class_names of condition {self.ppt.condition!r}")
            self.ppt = dataclasses.replace(
                self.ppt, sources=tuple(self._source_transform(source) for source in self.ppt.sources)
            )
        if self.evaluate != bool(self.val_split):
            raise ConfigError(
                "val_split: list the splits to validate on, or set evaluate: false"
                if self.evaluate
                else f"val_split {list(self.val_split)}: evaluate is false, so nothing is validated; set val_split: []"
            )
        if not self.evaluate and not self.test_last:
            raise ConfigError("evaluate: false leaves no best round to test: set test_last: true")
        if not self.test_splits:
            raise ConfigError("test_split: list the splits to test on (there is no val_split to fall back to)")
        if self.submission and self.dataset not in SUBMISSION_DATASETS:
            raise ConfigError(
                f"submission: {self.dataset} has no benchmark file format; one of {', '.join(SUBMISSION_DATASETS)}"
            )
        if self.epochs < 1 or self.batch_size < 1 or not 1 <= self.eval_epochs <= self.epochs:
            raise ConfigError(
                f"need epochs >= 1, batch_size >= 1 and 1 <= eval_epochs <= epochs; got "
                f"epochs={self.epochs}, batch_size={self.batch_size}, eval_epochs={self.eval_epochs}"
            )

    @property
    def test_splits(self) -> tuple[str, ...]:
        return self.test_split or self.val_split

    def _source_transform(self, source: PPTSource) -> PPTSource:
        """The source's transform, checking labels against its own classes and the config's ignore index."""
        transform = source.transform or self.transform
        classes = len(self.ppt.classes(source.condition))
        return dataclasses.replace(
            source, transform=dataclasses.replace(transform, num_classes=classes, ignore_index=self.ignore_index)
        )


def finetune_config_names() -> list[str]:
    return shipped_config_names("semseg")


def load_finetune_config(name_or_path: str | Path) -> FinetuneConfig:
    """A shipped config by name (e.g. "semseg-ptv3-base-v1m1-0a-scannet-lin") or a YAML file by path."""
    return load_yaml(FinetuneConfig, find_config(name_or_path, "semseg"))
