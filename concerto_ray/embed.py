"""`concerto-ray embed`: per-point features of every scene of a shard set from a pre-trained backbone, on Ray Data.

    ShardSampleDatasource (data/sources.py): the scenes without output yet, without their camera frames
      -> map(PrepareScene): decode + the reference's inference preprocessing, in CPU tasks
      -> map_batches(EmbedScenes): an actor pool holding one backbone per actor (one GPU each when the cluster has
         GPUs); forward, up-cast to every input point, one parquet file per scene written from the actor
      -> the driver counts the actors' small result rows (progress bar, bad scenes)

Preprocessing and up-casting follow the reference's inference demo (Pointcept/Concerto `demo/0_pca.py` with
`concerto.transform.default()`): centre the scene (lowest point at z = 0), keep one point per 2 cm voxel, colours to
0..1, features = (coord, color, normal); after the forward, concatenate the features of the `up_cast_levels` coarsest
levels onto the next finer one, copy them down to the grid-sampled points, and through the grid sampling's inverse
to every input point. Which point a voxel keeps is drawn from a generator seeded by (seed, scene name) and
serialization orders are not shuffled, so that a rerun gives the same features.

Output, local or s3://: ``<out>/<split>/<scene>.parquet`` with one row per input point, in input order: ``scene``
(string), ``coord`` (3 x float32, the input coordinates) and ``feat`` (C x float16); ``<out>/embed.json`` records
the checkpoint and settings. A scene whose file exists is skipped on a rerun (each file appears only complete).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
import uuid
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from concerto_ray.config import from_dict, to_dict
from concerto_ray.data import storage
from concerto_ray.data.presets import FEAT_KEYS, check_feat_keys, input_channels
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.shards import read_manifest
from concerto_ray.data.sources import ShardSampleDatasource, SourceConfig, check_shards, load_sources
from concerto_ray.data.transforms import CenterShift, GridSample, NormalizeColor, apply_transforms
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.finetune.segmentor import locate_checkpoint
from concerto_ray.model.checkpoint import MODEL_NAME_KEY, backbone_state_dict
from concerto_ray.model.configs import MODEL_CONFIG_NAMES, get_model_config
from concerto_ray.model.ptv3 import GridPooling, PointTransformerV3, PTv3Config
from concerto_ray.model.sonata import up_cast

log = logging.getLogger(__name__)

SUMMARY_FILE = "embed.json"
FEATURE_SUFFIX = ".parquet"
REFERENCE_UP_CAST_LEVELS = 2  # the reference demo's, for checkpoints that carry no model config of ours
# A backbone's weights that inference does not need: the pre-training mask token (absent from fine-tuned backbones).
OPTIONAL_KEYS = ("embedding.mask_token",)
STEM_WEIGHT = "embedding.stem.linear.weight"  # (embed channels, input channels)


@dataclass
class EmbedConfig:
    checkpoint: str  # checkpoint file or concerto-ray checkpoint folder, local or s3://
    shards: str  # written by `concerto-ray prepare`
    out: str  # local folder or s3://bucket/prefix
    # Named model config whose backbone the checkpoint holds; None: the model the checkpoint names (pre-training's
    # do) or its own "config" entry (the reference's released inference checkpoints carry one).
    model: str | None = None
    source: str = "student"  # which backbone of a pre-training checkpoint: student or teacher
    splits: list[str] | None = None
    endpoint_url: str | None = None
    grid_size: float = 0.02
    up_cast_levels: int | None = None  # None: the model config's up_cast_level (the reference demo's 2)
    seed: int = 0  # the grid sampling's choice of point per voxel
    # The backbone's input, in this order (its in_channels: 3 per key); every scene must hold each.
    feat_keys: tuple[str, ...] = FEAT_KEYS
    scenes_per_batch: int = 1  # scenes per forward pass
    concurrency: int | None = None  # actors; None: one per GPU of the cluster, or 1 without GPUs
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_actor: float = 1.0
    amp: bool = True  # fp16 autocast on GPU (spconv has no bf16 kernels)
    skip_bad: bool = False
    verify_checksums: bool = True

    def __post_init__(self):
        check_feat_keys(self.feat_keys)
        if self.source not in ("student", "teacher"):
            raise ConfigError(f"source must be 'student' or 'teacher', got {self.source!r}")
        if self.model is not None and self.model not in MODEL_CONFIG_NAMES:
            raise ConfigError(f"unknown model config {self.model!r}; valid names: {', '.join(MODEL_CONFIG_NAMES)}")
        if self.grid_size <= 0:
            raise ConfigError(f"grid_size must be positive, got {self.grid_size}")
        if self.scenes_per_batch < 1 or (self.concurrency is not None and self.concurrency < 1):
            raise ConfigError("scenes_per_batch and concurrency must be >= 1")


@dataclass
class BackboneSpec:
    """What an actor needs to rebuild the backbone: its config, weights and up-cast depth."""

    uri: str  # the checkpoint file
    config: PTv3Config
    state_dict: dict
    up_cast_levels: int

    def build(self) -> PointTransformerV3:
        backbone = PointTransformerV3(self.config)
        backbone.load_state_dict(self.state_dict, strict=False)  # checked in `load_backbone_spec`
        return backbone.eval()

    @property
    def channels(self) -> int:
        """Width of the up-cast features."""
        cfg = self.config
        if not cfg.enc_mode:
            return cfg.dec_channels[0]
        return sum(cfg.enc_channels[len(cfg.enc_channels) - 1 - self.up_cast_levels :])


@dataclass
class EmbedSummary:
    checkpoint: str
    model: str | None
    channels: int
    grid_size: float
    up_cast_levels: int
    seed: int
    feat_keys: list[str] = field(default_factory=lambda: list(FEAT_KEYS))  # summaries of before feat_keys: these
    embedded: int = 0  # scenes written by this run
    already_done: int = 0  # scenes whose output existed
    points: int = 0  # points written by this run
    skipped: list[str] = field(default_factory=list)  # bad scenes (with --skip-bad)

    def identity(self) -> dict:
        """The settings that must not change between a run and its resumption."""
        return {
            k: v
            for k, v in to_dict(self).items()
            if k in ("checkpoint", "model", "channels", "grid_size", "up_cast_levels", "seed", "feat_keys")
        }

    def text(self) -> str:
        lines = [
            f"embedded {self.embedded} scenes ({self.points} points, {self.channels} channels); "
            f"{self.already_done} were already done"
        ]
        lines.append(f"skipped {len(self.skipped)} bad scenes:" if self.skipped else "no bad scenes")
        lines.extend(f"  {message}" for message in self.skipped)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the model


def load_backbone_spec(
    checkpoint: str,
    model: str | None = None,
    source: str = "student",
    up_cast_levels: int | None = None,
    endpoint_url: str | None = None,
    feat_keys: tuple[str, ...] = FEAT_KEYS,
) -> BackboneSpec:
    """The backbone of `checkpoint` (ours or Pointcept's: pre-training, fine-tuning, backbone-only or the released
    inference files), checked against its config: every weight must be used and every weight found."""
    folder, name = locate_checkpoint(checkpoint, endpoint_url)
    uri = folder.uri_of(name)
    try:
        loaded = torch.load(io.BytesIO(folder.read_bytes(name)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise ConfigError(f"{uri}: cannot be loaded as a checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        raise ConfigError(f"{uri}: expected a dict with a 'state_dict' entry, as Pointcept and concerto-ray save")
    if model is not None:
        model_config = get_model_config(model)
        config, levels = model_config.backbone, model_config.up_cast_level
    elif isinstance(loaded.get(MODEL_NAME_KEY), str):  # written by `concerto-ray pretrain`
        model_config = get_model_config(loaded[MODEL_NAME_KEY])
        config, levels = model_config.backbone, model_config.up_cast_level
    elif isinstance(loaded.get("config"), dict):
        config, levels = from_dict(PTv3Config, loaded["config"], where=f"{uri}: config"), REFERENCE_UP_CAST_LEVELS
    else:
        raise ConfigError(
            f"{uri} holds no backbone config; name the model it was trained as with --model "
            f"(one of {', '.join(MODEL_CONFIG_NAMES)})"
        )
    if model is not None or MODEL_NAME_KEY in loaded:  # as pre-training derives it from its feat_keys
        config = replace(config, in_channels=input_channels(feat_keys))
    levels = up_cast_levels if up_cast_levels is not None else levels
    if not config.enc_mode:
        levels = 0  # a decoder already returns the finest level
    elif not 0 <= levels < len(config.enc_channels):
        raise ConfigError(f"up_cast_levels must lie in [0, {len(config.enc_channels) - 1}], got {levels}")
    weights = backbone_state_dict(loaded["state_dict"], source)
    stem = weights.get(STEM_WEIGHT)
    if stem is not None and stem.shape[1] != input_channels(feat_keys):
        raise ConfigError(
            f"{uri}: the backbone reads {stem.shape[1]} input channels; feat_keys {list(feat_keys)} make "
            f"{input_channels(feat_keys)} (3 per key): name the inputs it was trained on"
        )
    try:
        result = PointTransformerV3(config).load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even when not strict
        raise ConfigError(f"{uri}: the weights do not fit the backbone config: {exc}") from exc
    missing = [key for key in result.missing_keys if key not in OPTIONAL_KEYS]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{uri}: the backbone weights do not match the config: {len(missing)} missing "
            f"{missing[:5]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}; "
            f"check --model (and --source)"
        )
    return BackboneSpec(uri, config, weights, levels)


@contextlib.contextmanager
def inference(backbone: PointTransformerV3):
    """Eval mode, no order shuffling (deterministic outputs) and no autograd; the previous state is restored."""
    poolings = [m for m in backbone.modules() if isinstance(m, GridPooling)]
    saved = backbone.training, backbone.shuffle_orders, [m.shuffle_orders for m in poolings]
    backbone.eval()
    backbone.set_order_shuffling(False)
    try:
        with torch.inference_mode():
            yield backbone
    finally:
        backbone.train(saved[0])
        backbone.shuffle_orders = saved[1]
        for module, shuffle in zip(poolings, saved[2]):
            module.shuffle_orders = shuffle


# ------------------------------------------------------------------------------------- preprocessing, forward


def scene_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def preprocess(data: dict, grid_size: float, rng: np.random.Generator, feat_keys: tuple[str, ...] = FEAT_KEYS) -> dict:
    """A decoded scene -> the backbone input of the reference's inference transform.

    Returns `feat` (M, 3 per feat key) and `grid_coord` (M, 3) of the grid-sampled points and `inverse` (N,): each
    input point's sampled point. A scene without one of `feat_keys` is an error (nothing is filled in)."""
    name = str(data.get("name", "?"))
    for key in ("coord", *feat_keys):
        if key not in data:
            raise DataError(
                f"the scene has no {key}.npy, which feat_keys {list(feat_keys)} read", sample=name, field=key
            )
    n = len(data["coord"])
    points = {key: data[key] for key in ("coord", *feat_keys)}
    for key, value in points.items():
        if value.shape != (n, 3):
            raise DataError(f"expected shape ({n}, 3), got {value.shape}", sample=name, field=key)
    transforms = (
        CenterShift(apply_z=True),
        GridSample(grid_size, return_grid_coord=True, return_inverse=True),
        NormalizeColor(),
    )
    sampled = apply_transforms(transforms, points, rng)
    feat = np.concatenate([sampled[key] for key in feat_keys], axis=1).astype(np.float32)
    return {
        "feat": feat,
        "grid_coord": sampled["grid_coord"].astype(np.int64),
        "inverse": sampled["inverse"].astype(np.int64),
    }


def backbone_features(
    backbone: PointTransformerV3, samples: list[dict], up_cast_levels: int, amp: bool = False
) -> list[torch.Tensor]:
    """Per-input-point features of `samples` (`preprocess` outputs), in one forward pass; call under `inference`."""
    device = next(backbone.parameters()).device
    counts = [len(sample["feat"]) for sample in samples]
    batch = {
        "feat": torch.from_numpy(np.concatenate([s["feat"] for s in samples])).to(device),
        "grid_coord": torch.from_numpy(np.concatenate([s["grid_coord"] for s in samples])).to(device),
        "offset": torch.tensor(np.cumsum(counts), dtype=torch.int64).to(device),
    }
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
        point = backbone(batch)
    point = up_cast(point, up_cast_levels)
    while "pooling_parent" in point:  # the up-cast features, copied down to the grid-sampled points
        parent = point.pop("pooling_parent")
        parent.feat = point.feat[point.pop("pooling_inverse")]
        point = parent
    return [
        part[torch.from_numpy(sample["inverse"]).to(device)] for part, sample in zip(point.feat.split(counts), samples)
    ]


def scene_features(
    backbone: PointTransformerV3,
    data: dict,
    up_cast_levels: int,
    grid_size: float = 0.02,
    seed: int = 0,
    feat_keys: tuple[str, ...] = FEAT_KEYS,
) -> np.ndarray:
    """(N, C) float32 features of every point of one decoded scene, exactly as `embed` computes them (fp32)."""
    sample = preprocess(data, grid_size, scene_rng(seed, str(data.get("name", "?"))), feat_keys)
    with inference(backbone):
        return backbone_features(backbone, [sample], up_cast_levels)[0].float().cpu().numpy()


# ------------------------------------------------------------------------------------------ Ray Data stages


class PrepareScene:
    """Shard row -> decoded, preprocessed scene. A scene that fails becomes a row carrying its error (and empty
    arrays), so that the driver decides between stopping and skipping. Picklable for Ray Data tasks."""

    def __init__(self, grid_size: float, seed: int, feat_keys: tuple[str, ...]):
        self.grid_size = grid_size
        self.seed = seed
        self.feat_keys = feat_keys

    def __call__(self, row: dict) -> dict:
        name, split = str(row.get("name", "?")), str(row.get("split", "?"))
        try:
            data = decode_record(row_to_record(row), with_frames=False)
            return {
                "scene": name,
                "split": split,
                "error": "",
                "coord": data["coord"],
                **preprocess(data, self.grid_size, scene_rng(self.seed, name), self.feat_keys),
            }
        except DataError as exc:
            return {
                "scene": name,
                "split": split,
                "error": str(exc),
                "coord": np.zeros((0, 3), np.float32),
                "feat": np.zeros((0, input_channels(self.feat_keys)), np.float32),
                "grid_coord": np.zeros((0, 3), np.int64),
                "inverse": np.zeros(0, np.int64),
            }


class EmbedScenes:
    """The actor of the pool: holds one backbone, embeds batches of scenes and writes each scene's parquet file."""

    def __init__(self, spec: list, out: storage.Location, use_gpu: bool, amp: bool):
        device = torch.device("cuda" if use_gpu else "cpu")  # Ray shows an actor only its own GPU
        self.spec: BackboneSpec = ray.get(spec[0])  # wrapped in a list: Ray Data passes it through unresolved
        self.backbone = self.spec.build().to(device)
        self.out = out
        self.amp = amp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["scene"]))]
        good = [row for row in rows if not row["error"]]
        if good:
            with inference(self.backbone):
                features = backbone_features(self.backbone, good, self.spec.up_cast_levels, self.amp)
            for row, feat in zip(good, features):
                table = scene_table(
                    str(row["scene"]), np.asarray(row["coord"], np.float32), feat.to(torch.float16).cpu().numpy()
                )
                write_atomically(self.out, scene_path(str(row["split"]), str(row["scene"])), table)
        return {
            "scene": np.array([str(r["scene"]) for r in rows]),
            "split": np.array([str(r["split"]) for r in rows]),
            "points": np.array([0 if r["error"] else len(r["coord"]) for r in rows], dtype=np.int64),
            "error": np.array([str(r["error"]) for r in rows]),
        }


# ------------------------------------------------------------------------------------------------- storage


def scene_path(split: str, scene: str) -> str:
    return posixpath.join(split, scene + FEATURE_SUFFIX)


def scene_table(scene: str, coord: np.ndarray, feat: np.ndarray) -> pa.Table:
    n, channels = feat.shape
    return pa.table(
        {
            "scene": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([scene])),
            "coord": pa.FixedSizeListArray.from_arrays(pa.array(coord.reshape(-1)), 3),
            "feat": pa.FixedSizeListArray.from_arrays(pa.array(feat.reshape(-1)), channels),
        }
    )


def write_atomically(out: storage.Location, relative: str, table: pa.Table) -> None:
    """Write `table` as parquet such that the file is either absent or complete: a resumed run trusts it."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    if isinstance(out.filesystem, pafs.LocalFileSystem):  # written beside, then renamed into place
        temporary = f"{relative}.{uuid.uuid4().hex}.tmp"
        out.write_bytes(temporary, buffer.getvalue())
        out.filesystem.move(out.path(temporary), out.path(relative))
    else:  # an S3 object appears only once its upload completes
        out.write_bytes(relative, buffer.getvalue())


def finished_scenes(out: storage.Location, splits: list[str]) -> set[tuple[str, str]]:
    """(split, scene) of every feature file under `out`."""
    done = set()
    for split in splits:
        selector = pafs.FileSelector(out.path(split), allow_not_found=True)
        for info in out.filesystem.get_file_info(selector):
            if info.type == pafs.FileType.File and info.base_name.endswith(FEATURE_SUFFIX):
                done.add((split, info.base_name.removesuffix(FEATURE_SUFFIX)))
    return done


def feature_scenes(location: storage.Location) -> list[tuple[str, str]]:
    """(split, scene) of every feature file below `location`, sorted."""
    splits = [
        info.base_name
        for info in location.filesystem.get_file_info(pafs.FileSelector(location.root, allow_not_found=True))
        if info.type == pafs.FileType.Directory
    ]
    return sorted(finished_scenes(location, splits))


def read_scene_features(
    out: str, scene: str | None = None, split: str | None = None, endpoint_url: str | None = None
) -> tuple[str, np.ndarray, np.ndarray]:
    """(scene, coord (N, 3) float32, feat (N, C) float16) of one scene written by `embed`: `scene` (by default the
    first by split and name), in `split` (needed only where the name occurs in several splits)."""
    location = storage.resolve(out, endpoint_url)
    found = [
        (s, n) for s, n in feature_scenes(location) if (scene is None or n == scene) and (split is None or s == split)
    ]
    if not found or (scene is not None and len(found) > 1):
        problem = "no feature file" if not found else f"feature files in splits {[s for s, _ in found]}; give --split"
        raise DataError(f"{problem} under {location.uri}", sample=scene)
    split, scene = found[0]
    table = pq.read_table(io.BytesIO(location.read_bytes(scene_path(split, scene))))
    coord = table.column("coord").combine_chunks().flatten().to_numpy().reshape(-1, 3)
    feat = table.column("feat").combine_chunks()
    return scene, coord, feat.flatten().to_numpy().reshape(len(feat), -1)


# -------------------------------------------------------------------------------------------------- driver


def run_embed(config: EmbedConfig, progress: bool = True) -> EmbedSummary:
    """Embed every scene of `config.splits` that has no output yet; uses the connected Ray cluster."""
    out = storage.resolve(config.out, config.endpoint_url)
    try:  # one output file per scene folder, not per pre-training sample (many per scene)
        scenes = read_manifest(config.shards, config.endpoint_url).scene_splits(config.shards)
    except DataError as exc:
        raise ConfigError(f"shards: {exc}") from exc
    splits = list(config.splits or scenes)
    unknown = [s for s in splits if s not in scenes]
    if unknown:
        raise ConfigError(
            f"split {unknown[0]!r} has no scene folders in the manifest of {config.shards} "
            f"(splits with scene folders: {', '.join(scenes) or 'none'})"
        )
    spec = load_backbone_spec(
        config.checkpoint, config.model, config.source, config.up_cast_levels, config.endpoint_url, config.feat_keys
    )
    summary = EmbedSummary(
        checkpoint=spec.uri,
        model=config.model,
        channels=spec.channels,
        grid_size=config.grid_size,
        up_cast_levels=spec.up_cast_levels,
        seed=config.seed,
        feat_keys=list(config.feat_keys),
    )
    _check_same_settings(out, summary)
    every = {(split, name) for split in splits for shard in scenes[split].shards for name in shard.samples}
    done = finished_scenes(out, splits) & every
    pending = every - done
    summary.already_done = len(done)
    if pending:
        _embed(config, spec, out, pending, summary, progress)
    out.write_bytes(SUMMARY_FILE, json.dumps(to_dict(summary), indent=1).encode())
    return summary


def _check_same_settings(out: storage.Location, summary: EmbedSummary) -> None:
    """Features of different checkpoints or settings must not mix in one output folder."""
    if not out.exists(SUMMARY_FILE):
        return
    try:
        previous = from_dict(EmbedSummary, json.loads(out.read_bytes(SUMMARY_FILE)))
    except ValueError as exc:
        raise ConfigError(f"{out.uri_of(SUMMARY_FILE)} is not a valid embed summary ({exc})") from exc
    if previous.identity() != summary.identity():
        raise ConfigError(
            f"{out.uri} holds features of other settings {previous.identity()}; this run has "
            f"{summary.identity()}: use another --out"
        )


def _embed(
    config: EmbedConfig,
    spec: BackboneSpec,
    out: storage.Location,
    pending: set[tuple[str, str]],
    summary: EmbedSummary,
    progress: bool,
) -> None:
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    if use_gpu and gpus < 1:
        raise ConfigError("use_gpu is set but the Ray cluster has no GPUs")
    concurrency = config.concurrency or (int(gpus) if use_gpu else 1)
    log.info("embedding %d scenes with %d %s actors", len(pending), concurrency, "GPU" if use_gpu else "CPU")
    out.write_bytes(SUMMARY_FILE, json.dumps(to_dict(summary), indent=1).encode())  # claims the folder first
    # Only the pending scenes' samples are read, without their camera frames.
    sources = load_sources(
        [SourceConfig(config.shards, config.splits)],
        config.endpoint_url,
        where="shards",
        scenes=frozenset(name for _, name in pending),
        listing="scenes",
    )
    check_shards(sources, config.verify_checksums)
    ds = ray.data.read_datasource(ShardSampleDatasource(sources, config.seed, with_frames=False))
    ds = ds.map(PrepareScene(config.grid_size, config.seed, config.feat_keys))
    ds = ds.map_batches(
        EmbedScenes,
        fn_constructor_kwargs={"spec": [ray.put(spec)], "out": out, "use_gpu": use_gpu, "amp": config.amp},
        batch_size=config.scenes_per_batch,
        batch_format="numpy",
        concurrency=concurrency,
        num_gpus=1 if use_gpu else 0,
        num_cpus=config.cpus_per_actor,
    )
    with tqdm(total=len(pending), desc="scenes", unit="scene", disable=not progress) as bar:
        for row in ds.iter_rows():
            scene = f"{row['split']}/{row['scene']}"
            if row["error"]:
                if not config.skip_bad:
                    raise DataError(f"cannot be embedded: {row['error']} (--skip-bad skips such scenes)", sample=scene)
                log.warning("skipping bad scene %s: %s", scene, row["error"])
                summary.skipped.append(f"{scene}: {row['error']}")
            else:
                summary.embedded += 1
                summary.points += int(row["points"])
            bar.update()
