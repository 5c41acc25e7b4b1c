"""`concerto-ray ingest`: own data -> Pointcept's processed layout, as a Ray Data job. Four adapters:

- `clouds` (default): plain point-cloud files, SRC/<split>/<scene>.{ply,las,laz,npy,npz} (or SRC/<scene>.* with
  --split NAME) -> OUT/<split>/<scene>/{coord,color,normal,segment}.npy (`data.point_files`). Georeferenced clouds
  are moved near the origin so that float32 keeps millimetres; the shift is recorded.
- `scannet`: the raw ScanNet v2 download (.sens streams, meshes, labels) -> what Pointcept's Concerto ScanNet
  preprocessing writes, point assets, frames, poses, intrinsics, mesh-cast correspondences and the split files
  (`data.scannet_raw`).
- `s3dis`: the raw S3DIS download (Stanford3dDataset_v1.2 rooms, with the 2D-3D-S frames and meshes as
  --frames-src) -> what Pointcept's Concerto S3DIS preprocessing writes, per room and camera (`data.s3dis_raw`).
- `capture`: own RGB-D captures in the folder format of `data.capture` (colour, depth, pose, intrinsic per frame,
  and a point cloud or none: then one is fused from the depth) -> the same kind of root, with split files.

    ray.data.from_items: one row per scene not yet ingested
      -> map(IngestScene): convert one scene in a CPU task spread over the cluster, one scene in memory per task
      -> the driver counts the small result rows (progress bar, bad scenes)

OUT (a local or shared folder, or s3://) is then a dataset root that `concerto-ray prepare` turns into shards; with
--shards, ingest runs that `prepare` itself (OUT must then be a local or shared folder). A scene folder is complete
once its coord.npy exists (written last), so a rerun skips finished scenes and redoes interrupted ones.
`OUT/ingest.json` records every scene's source, points, arrays, coordinate shift and kept frames.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import ray
from tqdm import tqdm

from concerto_ray.config import to_dict
from concerto_ray.data import capture, s3dis_raw, scannet_raw, storage
from concerto_ray.data.point_files import POINT_FILE_SUFFIXES, read_point_file
from concerto_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUMMARY_FILE = "ingest.json"
FRAMES_PER_ENTRY = 4  # frames per pre-training sample in the split files, as Pointcept's splits.py groups them
FINAL_ASSET = "coord"  # written last: its presence marks a complete scene folder


@dataclass
class IngestConfig:
    src: str  # a local or shared folder: point-cloud files, the raw ScanNet download, or capture folders
    out: str  # local or shared folder, or s3://bucket/prefix
    adapter: Literal["clouds", "scannet", "s3dis", "capture"] = "clouds"
    split: str | None = None  # clouds, capture: SRC's scenes are this split's; None: SRC's subfolders are the splits
    labels: bool = False  # clouds, capture: per-point labels from the cloud files, written as segment.npy
    skip_bad: bool = False
    endpoint_url: str | None = None
    # scannet, s3dis, capture: every frame_skip-th frame is kept (None: as the reference, scannet 75 and s3dis 5;
    # capture 1)
    frame_skip: int | None = None
    depth: bool = False  # scannet, s3dis, capture: also write the depth frames
    label_map: str | None = None  # scannet: default SRC/scannetv2-labels.combined.tsv
    split_lists: str | None = None  # scannet: the folder of scannetv2_{train,val}.txt, default SRC
    frames_src: str | None = None  # s3dis (required): the 2D-3D-S download, area_<k>/{data,3d}/
    align_angle: bool = False  # s3dis: turn each room by its alignment angle (the reference's --align_angle)
    # scannet, s3dis, capture: the torch device of the mesh cast and point search ("cuda" on GPUs)
    device: str = "cpu"

    def __post_init__(self):
        if self.adapter not in ("clouds", "scannet", "s3dis", "capture"):
            raise ConfigError(f"adapter: {self.adapter!r} is not one of clouds, scannet, s3dis, capture")
        unused = {
            "clouds": ("frame_skip", "depth", "label_map", "split_lists", "frames_src", "align_angle", "device"),
            "scannet": ("split", "labels", "frames_src", "align_angle"),
            "s3dis": ("split", "labels", "label_map", "split_lists"),
            "capture": ("label_map", "split_lists", "frames_src", "align_angle"),
        }[self.adapter]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        wrong = [name for name in unused if getattr(self, name) != defaults[name]]
        if wrong:  # an option the adapter would not read is refused, not ignored
            raise ConfigError(f"--adapter {self.adapter} does not take {', '.join(wrong)}")
        if self.frame_skip is not None and self.frame_skip < 1:
            raise ConfigError(f"frame_skip: {self.frame_skip} must be at least 1")
        if self.adapter == "s3dis" and not self.frames_src:
            raise ConfigError("--adapter s3dis needs --frames-src: the 2D-3D-S download (its frames and meshes)")

    def every_nth_frame(self) -> int:
        """frame_skip, or the adapter's default: the reference's 75 for ScanNet and 5 for S3DIS, every frame of a
        capture."""
        return self.frame_skip or {"scannet": 75, "s3dis": s3dis_raw.FRAME_SKIP}.get(self.adapter, 1)


@dataclass
class IngestSummary:
    ingested: int = 0  # scenes written by this run
    already_done: int = 0  # scenes whose folder was complete
    scenes: dict[str, dict] = field(default_factory=dict)  # "<split>/<scene>": source, points, arrays, shift
    skipped: list[str] = field(default_factory=list)  # bad files (with --skip-bad)

    def text(self) -> str:
        lines = [f"ingested {self.ingested} scenes; {self.already_done} were already done"]
        lines.append(f"skipped {len(self.skipped)} bad files:" if self.skipped else "no bad files")
        lines.extend(f"  {message}" for message in self.skipped)
        # scenes of a framed adapter written without any frame (e.g. an S3DIS room that no 2D-3D-S camera posed)
        frameless = [name for name, scene in self.scenes.items() if scene.get("frames") == []]
        if frameless:
            lines.append(f"{len(frameless)} scenes have no frames (Concerto pre-training has no sample of them):")
            lines.extend(f"  {scene}" for scene in frameless)
        return "\n".join(lines)


def list_scene_files(src: Path, split: str | None) -> list[tuple[str, str, Path]]:
    """(split, scene, file) of every point-cloud file: SRC/<split>/<scene>.<ext>, or SRC/<scene>.<ext> as `split`."""
    if not src.is_dir():
        raise ConfigError(f"src: {src} is not a folder")
    folders = [(split, src)] if split is not None else [(p.name, p) for p in sorted(src.iterdir()) if p.is_dir()]
    found = []
    for name, folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in POINT_FILE_SUFFIXES)
        stems = [p.stem for p in files]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise ConfigError(f"{folder}: scenes {twice} have more than one file; keep one file per scene")
        found += [(name, p.stem, p) for p in files]
    if not found:
        layout = f"{src}/<scene>.<ext>" if split is not None else f"{src}/<split>/<scene>.<ext>"
        raise ConfigError(f"src: no point-cloud files ({', '.join(POINT_FILE_SUFFIXES)}) as {layout}")
    return found


class IngestScene:
    """One scene (a cloud file, a raw ScanNet or S3DIS folder, a capture folder) -> its files under OUT; a scene
    that fails becomes a row carrying its error, so that the driver decides between stopping and skipping.
    Picklable for Ray Data tasks."""

    def __init__(self, out: storage.Location, labels: bool, framed=None, shared: tuple[tuple[str, Path], ...] = ()):
        self.out = out
        self.labels = labels
        self.framed = framed  # the adapter of scenes with frames (ScannetScene, S3disRoom, CaptureScene); clouds: None
        self.shared = shared  # (option, folder) besides SRC that every node reads

    def __call__(self, row: dict) -> dict:
        result = {"split": row["split"], "scene": row["scene"], "source": row["source"], "error": "", "points": 0,
                  "arrays": "", "shift": [0.0, 0.0, 0.0], "frames": ""}  # fmt: skip
        # not a bad scene, which --skip-bad would pass over: a bad setup
        for name, path in (("SRC", row["source"]), *self.shared):
            if not Path(path).exists():
                raise FileNotFoundError(
                    f"{path} is not on the node {ray.util.get_node_ip_address()}: {name} must be a folder that "
                    f"every node of the cluster reads at the same path (a shared file system)"
                )
        try:
            if self.framed is not None:
                done = self.framed.convert(row["split"], row["scene"], Path(row["source"]))
                return {**result, "points": done["points"], "arrays": ",".join(done["arrays"]),
                        "frames": ",".join(done["frames"])}  # fmt: skip
            cloud = read_point_file(Path(row["source"]), self.labels)
        except DataError as exc:
            return {**result, "error": str(exc)}
        folder = f"{row['split']}/{row['scene']}"
        for key in sorted(cloud.arrays, key=lambda k: k == FINAL_ASSET):  # coord.npy last
            self.out.write_npy(f"{folder}/{key}.npy", cloud.arrays[key])
        arrays = ",".join(sorted(cloud.arrays))
        return {**result, "points": len(cloud.arrays["coord"]), "arrays": arrays, "shift": list(cloud.shift)}


def run_ingest(config: IngestConfig, progress: bool = True) -> IngestSummary:
    """Ingest every scene of SRC that OUT does not hold yet; uses the connected Ray cluster."""
    out = storage.resolve(config.out, config.endpoint_url)
    src = Path(config.src).expanduser().resolve()
    framed, shared = None, ()  # the adapter of scenes with frames; folders besides SRC that tasks read
    if config.adapter == "scannet":
        files = scannet_raw.list_scenes(src, Path(config.split_lists).expanduser() if config.split_lists else src)
        labelled = any(split != "test" for split, _, _ in files)
        label_map = Path(config.label_map).expanduser() if config.label_map else src / scannet_raw.LABEL_MAP
        framed = scannet_raw.ScannetScene(
            out, scannet_raw.read_label_map(label_map) if labelled else None, config.every_nth_frame(), config.depth,
            config.device,
        )  # fmt: skip
    elif config.adapter == "s3dis":
        files = s3dis_raw.list_rooms(src)
        frames_src = Path(config.frames_src).expanduser().resolve()
        s3dis_raw.check_frames_src(frames_src, {area for area, _, _ in files})
        shared = (("--frames-src", frames_src),)
        framed = s3dis_raw.S3disRoom(
            out, frames_src, config.every_nth_frame(), config.depth, config.align_angle, config.device
        )
    elif config.adapter == "capture":
        files = capture.list_captures(src, config.split)
        framed = capture.CaptureScene(out, config.labels, config.every_nth_frame(), config.depth, config.device)
    else:
        files = list_scene_files(src, config.split)
    convert = IngestScene(out, config.labels, framed, shared)
    summary = IngestSummary()
    if out.exists(SUMMARY_FILE):
        summary.scenes = json.loads(out.read_bytes(SUMMARY_FILE))["scenes"]
    pending = []
    for split, scene, path in files:
        if out.exists(f"{split}/{scene}/{FINAL_ASSET}.npy"):
            summary.already_done += 1
        else:
            pending.append({"split": split, "scene": scene, "source": str(path)})
    try:
        if pending:
            _ingest(pending, convert, config, summary, progress)
    finally:  # what was written is recorded, also when a bad scene stops the run
        out.write_bytes(SUMMARY_FILE, json.dumps(to_dict(summary), indent=1).encode())
        if config.adapter != "clouds":
            prefixes = {"scannet": scannet_raw.SPLIT_PATH_PREFIX, "s3dis": s3dis_raw.SPLIT_PATH_PREFIX}
            _write_split_files(out, summary, prefixes.get(config.adapter, ""))
    return summary


def _write_split_files(out: storage.Location, summary: IngestSummary, prefix: str) -> None:
    """splits/<split>.json over every scene ingested so far (this run's and earlier runs')."""
    by_split: dict[str, dict[str, list[str]]] = {}
    for key, scene in summary.scenes.items():
        split, name = key.split("/", 1)
        by_split.setdefault(split, {})[name] = scene["frames"]
    for split, scenes in sorted(by_split.items()):
        entries = split_entries(scenes, split, prefix)
        out.write_bytes(f"splits/{split}.json", json.dumps(entries, indent=1).encode())


def split_entries(scenes: dict[str, list[str]], split: str, prefix: str = "") -> dict:
    """A split file as Pointcept's splits.py writes it: per scene (by name) and camera, its frames (colour file
    names, "<camera>/<name>" where a scene has several cameras as S3DIS's rooms, in the order given) in groups of
    FRAMES_PER_ENTRY, each group one pre-training sample "<scene>[_<camera>]_<group>"; paths below `prefix` (our
    reader resolves them against the root)."""
    entries = {}
    for scene in sorted(scenes):
        cameras: dict[str, list[str]] = {}
        for frame in scenes[scene]:
            camera, _, name = frame.rpartition("/")
            cameras.setdefault(camera, []).append(name)
        for camera, frames in cameras.items():
            images = f"{prefix}images/{split}/{scene}" + (f"/{camera}" if camera else "")
            key = f"{scene}_{camera}" if camera else scene
            for group, i in enumerate(range(0, len(frames), FRAMES_PER_ENTRY)):
                names = frames[i : i + FRAMES_PER_ENTRY]
                entries[f"{key}_{group}"] = {
                    "pointclouds": f"{prefix}{split}/{scene}",
                    "images": [f"{images}/color/{name}" for name in names],
                    "correspondences": [f"{images}/correspondence/{Path(name).stem}.npy" for name in names],
                }
    return entries


def _ingest(pending: list[dict], convert: IngestScene, config: IngestConfig, summary: IngestSummary, progress: bool):
    log.info("ingesting %d scenes", len(pending))
    # One row per block, so that Ray Data spreads the scenes over the cluster's CPUs.
    # A task that casts on a GPU asks Ray for one: Ray hides the GPUs from tasks that ask for none.
    gpus = 1 if config.device.startswith("cuda") else 0
    ds = ray.data.from_items(pending, override_num_blocks=len(pending)).map(convert, num_gpus=gpus)
    bad: list[tuple[str, str]] = []
    # Every row is taken, also after a bad file, so that each scene written is recorded with its shift.
    with tqdm(total=len(pending), desc="scenes", unit="scene", disable=not progress) as bar:
        for row in ds.iter_rows():
            scene = f"{row['split']}/{row['scene']}"
            if row["error"]:
                log.warning("bad file %s: %s", row["source"], row["error"])
                bad.append((scene, row["error"]))
            else:
                summary.ingested += 1
                summary.scenes[scene] = {
                    "source": row["source"],
                    "points": int(row["points"]),
                    "arrays": row["arrays"].split(","),
                    "shift": [float(x) for x in row["shift"]],
                }
                if config.adapter != "clouds":
                    summary.scenes[scene]["frames"] = row["frames"].split(",") if row["frames"] else []
                    if not row["frames"]:
                        log.warning("%s has no frames", scene)
            bar.update()
    if bad and not config.skip_bad:
        scene, error = bad[0]
        more = f"; {len(bad) - 1} more bad scenes in the log" if len(bad) > 1 else ""
        raise DataError(f"cannot be ingested: {error} (--skip-bad skips such scenes{more})", sample=scene)
    summary.skipped += [f"{scene}: {error}" for scene, error in bad]
