"""`concerto-ray` command line. Each subcommand is a thin shell over one library function.

Heavy imports (torch, ray) happen inside the handlers so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from concerto_ray.cli_args import add_set_option
from concerto_ray.errors import ConfigError, DataError, TrainingError


def _synth(args: argparse.Namespace) -> None:
    from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

    config = SynthConfig(
        scenes=args.scenes,
        seed=args.seed,
        points_per_scene=args.points,
        views_per_scene=args.views,
        image_width=args.image_size[0],
        image_height=args.image_size[1],
        flavor=args.flavor,
        depth=not args.no_depth,
    )
    root = write_synthetic_dataset(args.out, config)
    print(f"wrote {args.scenes} synthetic scenes in {args.flavor}'s processed files to {root}")


def _prepare(args: argparse.Namespace) -> None:
    from concerto_ray.data.shards import prepare

    manifest = prepare(
        args.src,
        args.dest,
        format=args.format,
        splits=args.splits,
        dataset_name=args.dataset_name,
        target_shard_mb=args.shard_mb,
        workers=args.workers,
        skip_bad=args.skip_bad,
        endpoint_url=args.endpoint_url,
    )
    print(manifest.summary())


def _ingest(args: argparse.Namespace) -> None:
    from concerto_ray.console import default_log_file, start_ray
    from concerto_ray.ingest import IngestConfig, run_ingest

    if args.shards and args.out.startswith("s3://"):
        raise ConfigError("--shards runs prepare on OUT, which reads a local or shared folder: give OUT as one")
    config = IngestConfig(
        src=args.src,
        out=args.out,
        adapter=args.adapter,
        split=args.split,
        labels=args.labels,
        skip_bad=args.skip_bad,
        endpoint_url=args.endpoint_url,
        frame_skip=args.frame_skip,
        depth=args.depth,
        label_map=args.label_map,
        split_lists=args.split_lists,
        frames_src=args.frames_src,
        align_angle=args.align_angle,
        device=args.device,
    )
    start_ray(default_log_file("ingest"))  # Ray Data's progress logs go to the log file
    print(run_ingest(config).text())
    if args.shards:  # then `prepare OUT SHARDS`, every split, with the options ingest takes
        shards = {"src": args.out, "dest": args.shards, "splits": None, "dataset_name": None, "workers": None}
        _prepare(argparse.Namespace(**{**vars(args), **shards}))


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `ingest` (and of jobs/ingest.py)."""
    p.add_argument(
        "src",
        help="clouds: folder of point-cloud files, SRC/<split>/<scene>.<ext> (or SRC/<scene>.<ext> with --split); "
        "scannet: the raw ScanNet v2 download, SRC/scans*/<scene>/; s3dis: Stanford3dDataset_v1.2, "
        "SRC/Area_<k>/<room>/Annotations/ (frames and meshes from --frames-src); capture: RGB-D capture folders, "
        "SRC/<split>/<scene>/{color,depth,pose}/ + intrinsic (or SRC/<scene>/ with --split; format in README)",
    )
    p.add_argument("out", help="the dataset root to write (local or shared folder, or s3://bucket/prefix)")
    p.add_argument(
        "--adapter",
        choices=("clouds", "scannet", "s3dis", "capture"),
        default="clouds",
        help="what SRC holds: plain point-cloud files; raw ScanNet (.sens, mesh, labels) or raw S3DIS, processed as "
        "Pointcept's Concerto preprocessing does; or own RGB-D captures (frames with depth, pose and intrinsic, "
        "and a point cloud or none: then one is fused from the depth)",
    )
    p.add_argument(
        "--split", help="clouds, capture: SRC's scenes are this split's (default: SRC's subfolders are splits)"
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="write per-point labels of the cloud files as segment.npy (PLY segment/label/class, LAS classification, "
        "NPZ segment); clouds, capture (scannet and s3dis labels always come from their annotations)",
    )
    p.add_argument(
        "--frame-skip", type=int, help="keep every N-th frame (default as Pointcept: scannet 75, s3dis 5; capture 1)"
    )
    p.add_argument(
        "--depth", action="store_true", help="scannet, s3dis, capture: also write the depth frames (as the source's)"
    )
    p.add_argument("--label-map", help="scannet: ScanNet's label map (default SRC/scannetv2-labels.combined.tsv)")
    p.add_argument(
        "--split-lists",
        help="scannet: folder of the benchmark's scannetv2_train.txt and scannetv2_val.txt (default SRC); other "
        "scenes are the test split",
    )
    p.add_argument(
        "--frames-src",
        help="s3dis (required): the 2D-3D-S download without XYZ, FRAMES/area_<k>/data/{rgb,depth,pose}/ and "
        "FRAMES/area_<k>/3d/rgb.obj (area 5: area_5a and area_5b)",
    )
    p.add_argument(
        "--align-angle",
        action="store_true",
        help="s3dis: turn each room by its alignment angle (Pointcept's --align_angle; its Concerto script does not)",
    )
    p.add_argument(
        "--device", default="cpu", help="scannet, s3dis, capture: torch device of the mesh cast and point search (cuda)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip (and list) scenes that cannot be read")
    p.add_argument("--shards", help="then run `prepare OUT SHARDS` (local or s3://) with the options below")
    p.add_argument("--format", choices=("parquet", "webdataset"), default="parquet", help="with --shards")
    p.add_argument("--shard-mb", type=float, default=256, help="target shard size in MB, with --shards")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")


def _stream(args: argparse.Namespace) -> None:
    import ray
    import yaml

    from concerto_ray.config import from_dict
    from concerto_ray.data.pipeline import StreamConfig, drain

    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
    if args.shards is not None:
        values["shards"] = args.shards
    for key in ("mode", "batch_size", "seed", "endpoint_url", "splits"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.skip_bad:
        values["skip_bad"] = True
    config = from_dict(StreamConfig, values)  # validated before Ray starts
    ray.init(ignore_reinit_error=True, include_dashboard=False)
    print(drain(config, max_batches=args.batches).summary())


def _pretrain(args: argparse.Namespace) -> None:
    from concerto_ray.console import default_log_file, start_ray
    from concerto_ray.data import storage
    from concerto_ray.train.config import load_pretrain_config
    from concerto_ray.train.trainer import run_pretrain

    config = load_pretrain_config(args.config, args.overrides)  # before Ray: a typo costs no cluster time
    start_ray(default_log_file("pretrain"))
    result = run_pretrain(config, resume=args.resume, show_progress=True)
    storage_root = storage.resolve(config.run.storage_path, config.run.endpoint_url)
    print(
        f"finished; latest checkpoint: "
        f"{storage_root.uri_of_path(result.checkpoint.path) if result.checkpoint else None}"
    )


def _demo(args: argparse.Namespace) -> None:
    from concerto_ray.demo import run_demo

    run_demo(
        Path(args.workdir),
        scenes=args.scenes,
        seed=args.seed,
        pretrain_epochs=args.pretrain_epochs,
        probe_epochs=args.probe_epochs,
        dinov2=Path(args.dinov2) if args.dinov2 else None,
    )


def _model_info(args: argparse.Namespace) -> None:
    from concerto_ray.model.build import model_info

    print(json.dumps(model_info(args.name), indent=2))


def _model_convert(args: argparse.Namespace) -> None:
    from concerto_ray.model.checkpoint import convert_checkpoint

    convert_checkpoint(args.src, args.dst, "ray-to-pointcept" if args.to == "pointcept" else "pointcept-to-ray")
    print(f"wrote {args.dst}")


def _compare(args: argparse.Namespace) -> None:
    from concerto_ray.compare import compare_runs

    print(compare_runs(args.runs, tracking_uri=args.tracking_uri, out=args.out, experiment=args.experiment))


def _embed(args: argparse.Namespace) -> None:
    from concerto_ray.console import default_log_file, start_ray
    from concerto_ray.embed import EmbedConfig, run_embed

    config = EmbedConfig(
        checkpoint=args.checkpoint,
        shards=args.shards,
        out=args.out,
        model=args.model,
        source=args.source,
        splits=args.splits,
        endpoint_url=args.endpoint_url,
        grid_size=args.grid_size,
        up_cast_levels=args.up_cast_levels,
        seed=args.seed,
        feat_keys=tuple(args.feat_keys),
        scenes_per_batch=args.scenes_per_batch,
        concurrency=args.concurrency,
        use_gpu=False if args.cpu else None,
        cpus_per_actor=args.cpus_per_actor,
        amp=not args.no_amp,
        skip_bad=args.skip_bad,
        verify_checksums=not args.no_verify,
    )
    start_ray(default_log_file("embed"))  # Ray Data's progress logs go to the log file
    print(run_embed(config).text())


def _viz(args: argparse.Namespace) -> None:
    from concerto_ray import viz

    where = dict(scene=args.scene, split=args.split, query=args.query, view=args.view, endpoint_url=args.endpoint_url)
    if args.features:
        images = viz.images_from_features(args.features, args.out, **where)
    else:
        if not args.shards:
            raise ConfigError("--checkpoint needs --shards (the scenes to embed)")
        images = viz.images_from_checkpoint(
            args.checkpoint,
            args.shards,
            args.out,
            model=args.model,
            source=args.source,
            grid_size=args.grid_size,
            up_cast_levels=args.up_cast_levels,
            feat_keys=tuple(args.feat_keys),
            **where,
        )
    for path in images.values():
        print(f"wrote {path}")


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `embed` (and of jobs/embed.py)."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint file (.pth / model.pt) or concerto-ray checkpoint folder, local or s3://",
    )
    p.add_argument("--shards", required=True, help="shards written by `prepare` (local folder or s3://)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix: <split>/<scene>.parquet")
    _add_backbone_arguments(p)
    p.add_argument("--splits", nargs="+", help="splits to embed (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the grid sampling's choice of point per voxel")
    p.add_argument("--scenes-per-batch", type=int, default=1, help="scenes per forward pass")
    p.add_argument("--concurrency", type=int, help="model actors (default: one per GPU of the cluster, else 1)")
    p.add_argument("--cpu", action="store_true", help="run the actors on CPUs even where the cluster has GPUs")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved by each model actor")
    p.add_argument("--no-amp", action="store_true", help="fp32 forward on GPU (default: fp16 autocast)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and list) scenes that cannot be decoded")
    p.add_argument("--no-verify", action="store_true", help="do not check the shards' sha256 first")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint")


def _add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    from concerto_ray.data.presets import FEAT_KEYS, POINT_INPUTS

    p.add_argument(
        "--model",
        help="named model config the checkpoint was trained as, e.g. "
        "pretrain-concerto-v1m1-0-base (default: the model a pre-training checkpoint names, or the "
        "checkpoint's own 'config' entry)",
    )
    p.add_argument(
        "--source",
        choices=("student", "teacher"),
        default="student",
        help="which backbone of a pre-training checkpoint",
    )
    p.add_argument("--grid-size", type=float, default=0.02, help="grid sampling voxel size (m)")
    p.add_argument(
        "--feat-keys",
        nargs="+",
        default=list(FEAT_KEYS),
        choices=POINT_INPUTS,
        help="the point arrays the backbone reads, in order, 3 channels each (default: coord color normal); "
        "data without colours or normals leaves them out, for a backbone trained so",
    )
    p.add_argument(
        "--up-cast-levels", type=int, help="coarse levels concatenated onto the finer ones (default: the model's, 2)"
    )


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from exc
    return w, h


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `prepare` (shared with jobs/prepare.py)."""
    p.add_argument("src", help="dataset root (holding splits/*.json, or <split>/<scene>/ folders)")
    p.add_argument(
        "dest",
        help="local folder or s3://bucket/prefix, one per dataset (e.g. s3://bucket/shards/"
        "scannet); a later prepare of other splits of that dataset adds them to its manifest",
    )
    p.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    p.add_argument("--splits", nargs="+", help="splits to convert (default: all split files)")
    p.add_argument("--dataset-name", help="name stored in the manifest (default: the folder name of SRC)")
    p.add_argument("--shard-mb", type=float, default=256, help="target shard size in MB")
    p.add_argument("--workers", type=int, help="parallel readers (default: CPU count)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip samples that fail validation (each is logged and listed in the manifest)",
    )
    p.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")


def add_run_arguments(p: argparse.ArgumentParser, config_help: str) -> None:
    """The options of a training run (shared with jobs/*.py)."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--resume", action="store_true", help="continue the stopped run of the config's run.name")
    add_set_option(p, "override a config value, read as YAML, e.g. --set run.epochs=10 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from concerto_ray.finetune.commands import (
        add_sweep_arguments,
        evaluate_command,
        finetune_command,
        sweep_command,
    )

    parser = argparse.ArgumentParser(
        prog="concerto-ray",
        description="Concerto / Sonata point-cloud pre-training and fine-tuning on Ray.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print the full traceback with its causes, not only the message",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser(
        "synth",
        formatter_class=fmt,
        help="write procedural indoor scenes in Pointcept's processed layout",
        description="Write synthetic rooms (points, labels, RGB-D frames, poses, point-pixel "
        "correspondences, split files) in the processed files of one of the datasets "
        "Pointcept's Concerto preprocessing writes.",
    )
    p.add_argument("out", help="output dataset root (created; must be empty or a previous synth output)")
    p.add_argument("--scenes", type=int, default=8, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--points", type=int, default=20000, help="points per scene (ScanNet: ~150000)")
    p.add_argument("--views", type=int, default=8, help="camera frames per scene")
    p.add_argument("--image-size", type=_image_size, default=(320, 240), metavar="WxH", help="frame size")
    from concerto_ray.data.flavors import FLAVORS  # light: names only

    p.add_argument(
        "--flavor",
        choices=tuple(FLAVORS),
        default="scannet",
        help="whose processed files to write (names, dtypes, label shapes and ids, splits, intrinsics)",
    )
    p.add_argument("--no-depth", action="store_true", help="write no depth images (optional in the preprocessing)")
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "prepare",
        formatter_class=fmt,
        help="convert a dataset root into shards + manifest",
        description="Convert a dataset in Pointcept's processed layout into parquet or webdataset "
        "shards with a manifest. Resumable: finished shards are skipped. A destination "
        "holds one dataset; mix several in pre-training with data.sources.",
    )
    add_prepare_arguments(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "ingest",
        formatter_class=fmt,
        help="own data (point-cloud files, raw ScanNet or S3DIS, RGB-D captures) to a dataset root, with Ray Data",
        description="Convert one scene per Ray Data task across the cluster into Pointcept's processed layout. "
        "--adapter clouds (PLY, LAS/LAZ, NPY, NPZ): coord, and color / normal / segment where the files have them; "
        "nothing is filled in. --adapter scannet: the raw ScanNet v2 download, as Pointcept's Concerto "
        "preprocessing writes it (frames, poses, mesh-cast correspondences, ScanNet-20/200 labels, split files). "
        "--adapter s3dis: Stanford3dDataset_v1.2 rooms with the 2D-3D-S frames and meshes (--frames-src), the same "
        "way (13-class labels, normals from the mesh, per-camera frames). "
        "--adapter capture: own RGB-D captures (colour, depth, pose, intrinsic per frame; a point cloud or one "
        "fused from the depth), with depth-based correspondences. "
        "Resumable: finished scenes are skipped. OUT is then a root for `prepare` (or pass --shards). Uses "
        "RAY_ADDRESS if set, else a local Ray. Same as `python jobs/ingest.py`.",
    )
    add_ingest_arguments(p)
    p.set_defaults(func=_ingest)

    p = sub.add_parser(
        "stream",
        formatter_class=fmt,
        help="stream shards through the Ray Data pipeline",
        description="Read shards with Ray Data, run the pre-training or segmentation transforms and "
        "collate batches; prints throughput. Uses RAY_ADDRESS if set, else a local Ray.",
    )
    p.add_argument(
        "shards", nargs="?", help="local folder or s3://bucket/prefix written by `prepare` (or `sources` in --config)"
    )
    p.add_argument("--config", help="YAML file with StreamConfig fields (sources, transform parameters etc.)")
    p.add_argument("--mode", choices=("pretrain", "semseg_train", "semseg_val"))
    p.add_argument("--batch-size", type=int, help="samples per batch")
    p.add_argument("--batches", type=int, default=None, help="stop after this many batches (default: one epoch)")
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the epoch order and the augmentations (default 0): the same seed, the same stream",
    )
    p.add_argument("--splits", nargs="+", help="splits to read (default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip, count and log undecodable samples")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p.set_defaults(func=_stream)

    p = sub.add_parser(
        "pretrain",
        formatter_class=fmt,
        help="pre-train Sonata / Concerto with Ray Train",
        description="Pre-train on the connected Ray cluster (RAY_ADDRESS, or a local Ray). The config "
        "is validated before Ray starts. Same as `python jobs/pretrain.py`.",
    )
    add_run_arguments(p, "pre-training config: a shipped name (e.g. pretrain-tiny) or a YAML path")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser(
        "finetune",
        formatter_class=fmt,
        help="semantic-segmentation fine-tuning / probing",
        description="Linear / decoder probing, full or LoRA fine-tuning on Ray Train, from a "
        "pre-trained checkpoint (ours or Pointcept's) or random init. Same as "
        "`python jobs/finetune.py`.",
    )
    add_run_arguments(p, "fine-tuning config: a shipped name (e.g. semseg-tiny-lin) or a YAML path")
    p.set_defaults(func=finetune_command)

    p = sub.add_parser(
        "evaluate",
        formatter_class=fmt,
        help="the full test protocol on a fine-tuning checkpoint",
        description="Fragments and test-time augmentations over the config's test scenes (test_split, else "
        "val_split), on a checkpoint folder of a fine-tuning run (local or s3://), e.g. the best round's; prints "
        "per-class IoU and mIoU / mAcc / allAcc. Runs in this process (on its GPU if it has one).",
    )
    p.add_argument("--config", required=True, help="the run's fine-tuning config: a shipped name or a YAML path")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder of that run, e.g. RUN/round-0002")
    add_set_option(p, "the run's config overrides (data.shards=..., backbone.*), read as YAML (repeatable)")
    p.set_defaults(func=evaluate_command)

    p = sub.add_parser(
        "sweep",
        formatter_class=fmt,
        help="a Ray Tune sweep of fine-tuning runs",
        description="Fine-tuning runs over a search space with Ray Tune (ASHA early stopping), one "
        "MLflow parent run with a child per trial. Same as `python jobs/sweep.py`.",
    )
    add_sweep_arguments(p)
    p.set_defaults(func=sweep_command)

    p = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="the end-to-end demo on embedded defaults",
        description="Local Ray -> synthetic scenes -> shards -> tiny Concerto pre-training on CPU "
        "workers -> linear probes of the backbone after vs before pre-training -> mIoU table. "
        "Resumable: a rerun reuses what the work folder holds.",
    )
    p.add_argument("--workdir", default="demo", help="where the demo writes its data, runs and MLflow store")
    p.add_argument("--scenes", type=int, default=16, help="synthetic scenes (3/4 train, 1/4 held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-epochs", type=int, default=30, help="pre-training epochs")
    p.add_argument(
        "--probe-epochs", type=int, default=20, help="epochs of each linear probe (two evaluation rounds; even)"
    )
    p.add_argument(
        "--dinov2",
        help="directory of DINOv2-with-registers weights of the tiny architecture "
        "(default: random weights, written to WORKDIR/dinov2-tiny)",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "compare",
        formatter_class=fmt,
        help="MLflow runs side by side: params, metrics, loss curves",
        description="Show the params that differ, final metrics and loss curves of MLflow runs.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids or run names")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", help="look run names up in this experiment only (default: all)")
    p.add_argument("--out", default="compare.png", help="PNG file for the loss curves")
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "embed",
        formatter_class=fmt,
        help="per-point features of every scene with Ray Data",
        description="Run a pre-trained backbone over every scene of a shard set (an actor pool, one "
        "GPU each where the cluster has GPUs) and write per-point features (fp16) with "
        "coordinates as parquet, one file per scene. Resumable: scenes whose file exists "
        "are skipped. Same as `python jobs/embed.py`.",
    )
    add_embed_arguments(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "viz",
        formatter_class=fmt,
        help="PCA and similarity pictures of a scene's features",
        description="Write pca.png (features -> 3 principal components -> RGB) and similarity.png "
        "(cosine similarity to a query point) of one scene, from the output of `embed` "
        "or from a checkpoint and shards.",
    )
    p.add_argument("--out", required=True, help="folder for the PNG files")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="output folder of `embed` (local or s3://)")
    source.add_argument("--checkpoint", help="checkpoint whose backbone embeds the scene (with --shards)")
    p.add_argument("--shards", help="shards holding the scene (with --checkpoint)")
    _add_backbone_arguments(p)
    p.add_argument("--scene", help="scene name (default: the first)")
    p.add_argument("--split", help="the scene's split, where its name occurs in several")
    p.add_argument("--query", type=int, help="point index for the similarity map (default: the most central point)")
    p.add_argument("--view", choices=("oblique", "top"), default="oblique", help="camera")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint")
    p.set_defaults(func=_viz)

    p = sub.add_parser("model", help="model utilities: parameter counts, checkpoint conversion")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    q = msub.add_parser(
        "info",
        formatter_class=fmt,
        help="print backbone and total parameter counts of a config",
        description="Print the backbone and total parameter counts of a model config, e.g. "
        "pretrain-concerto-v1m1-0-base.",
    )
    q.add_argument("name", help="config name")
    q.set_defaults(func=_model_info)
    q = msub.add_parser(
        "convert",
        formatter_class=fmt,
        help="convert checkpoints between Pointcept and ours",
        description="Convert a checkpoint between Pointcept's key layout and concerto-ray's.",
    )
    q.add_argument("src", help="input checkpoint (.pth)")
    q.add_argument("dst", help="output checkpoint (.pth)")
    q.add_argument("--to", choices=("pointcept", "concerto-ray"), required=True, help="target layout")
    q.set_defaults(func=_model_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, TrainingError, FileExistsError) as exc:
        if args.debug:
            traceback.print_exc()  # with the chain of causes
        print(f"concerto-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
