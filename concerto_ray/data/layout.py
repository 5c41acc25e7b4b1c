"""Reader for Pointcept's processed dataset layout, as Concerto uses it.

    ROOT/splits/<split>.json                      {"<sample>": {"pointclouds": dir, "images": [...],
                                                                "correspondences": [...]}}
    ROOT/<split>/<scene>/{coord,color,normal,segment*,instance,...}.npy
    ROOT/images/<split>/<scene>[/<camera>]/color/<frame>.png|jpg|JPG
                               /depth/<frame>.png          (uint16 millimetres; optional)
                               /pose/<frame or index>.npy  (4x4; optional)
                               /intrinsic/<frame or index>.npy, intrinsic/intrinsic.npy, or ROOT/images/intrinsic/K.npy
                               /correspondence/<frame>.npy (M x 3: pixel_x, pixel_y, point_index)

The flavours (`flavors.py`) differ in where a frame's pose and intrinsic live: named after the frame (ScanNet,
ARKitScenes, HM3D, Structured3D, RE10K), numbered by the frame's position in its folder when the images keep their
camera names (ScanNet++ ``DSC01234.JPG``, S3DIS ``camera_..._domain_rgb.png``), one intrinsic per scene (ScanNet) or
per dataset (HM3D). Pointcept's split files store paths relative to the Pointcept checkout
(``data/scannet/train/scene0000_00``); they are resolved against ROOT by dropping leading components until the path
exists under ROOT.

Two listings of the same root: `list_samples`, what pre-training reads (the split files' entries, each a group of
frames of one scene, so a scene appears many times), and `list_scenes`, what segmentation and `embed` read (one
image-less sample per scene folder of ``ROOT/<split>/``, as Pointcept's segmentation dataset classes list them;
Structured3D nests ``<scene>/<room>/``). A split without a split file is its scene folders in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from concerto_ray.data.flavors import FLAVORS, Flavor
from concerto_ray.data.record import FrameRecord, SceneRecord, check_correspondence, check_points, image_size, load_npy
from concerto_ray.errors import DataError

# Folders of a dataset root that are not splits: Pointcept's image tree, split files and data-efficiency files.
NOT_SPLITS = ("images", "splits", "tasks")


@dataclass(frozen=True)
class FrameFiles:
    name: str
    color: Path
    correspondence: Path
    depth: Path | None
    pose: Path | None
    intrinsic: Path | None


@dataclass(frozen=True)
class SampleFiles:
    """Where the files of one sample live; `root` is the dataset root."""

    name: str
    split: str
    root: Path
    pointcloud_dir: Path
    frames: tuple[FrameFiles, ...]

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def available_splits(root: str | Path) -> list[str]:
    """Every split of the root: those of the split files and the split folders (which hold scene folders)."""
    root = Path(root)
    from_json = {p.stem for p in (root / "splits").glob("*.json")}
    folders = {p.name for p in root.iterdir() if p.is_dir() and p.name not in NOT_SPLITS and _holds_scenes(p)}
    return sorted(from_json | folders)


def list_samples(root: str | Path, splits: list[str] | None = None, dataset: str | None = None) -> list[SampleFiles]:
    """All pre-training samples of `splits` (default: every split): the split files' entries in split-file order;
    a split without a split file gives its scene folders (`list_scenes`)."""
    root = _checked_root(root)
    samples: list[SampleFiles] = []
    for split in splits or available_splits(root):
        split_file = root / "splits" / f"{split}.json"
        if split_file.is_file():
            samples.extend(_samples_from_split_file(root, split, split_file))
        elif (root / split).is_dir():
            samples.extend(_split_scenes(root, split, FLAVORS.get(dataset or "")))
        else:
            raise DataError(f"split {split!r} has neither {split_file} nor a folder {root / split}")
    return samples


def list_scenes(root: str | Path, splits: list[str] | None = None, dataset: str | None = None) -> list[SampleFiles]:
    """The scenes of `splits` (default: every split folder) as Pointcept's segmentation dataset classes list them:
    one image-less sample per scene folder of ROOT/<split>/, whatever the split files say (a split file's entries
    are groups of frames, many per scene). Names follow the dataset's class (`flavors.Flavor.scene_name`)."""
    root = _checked_root(root)
    known = FLAVORS.get(dataset or "")
    scenes: list[SampleFiles] = []
    for split in splits or [s for s in available_splits(root) if (root / s).is_dir()]:
        if not (root / split).is_dir():
            raise DataError(f"split {split!r} has no scene folder {root / split}")
        scenes.extend(_split_scenes(root, split, known))
    return scenes


def _split_scenes(root: Path, split: str, known: Flavor | None) -> list[SampleFiles]:
    """The scene folders of one split folder, named and filtered as the dataset's class (`known`) does."""
    return [
        SampleFiles(
            name=known.scene_name(split, name) if known else name,
            split=split,
            root=root,
            pointcloud_dir=folder,
            frames=(),
        )
        for name, folder in _scene_folders(root / split)
        if not (known and known.labelled_scenes_only) or (folder / f"{known.label_asset}.npy").is_file()
    ]


def _checked_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {str(root)!r} is not a directory")
    if not available_splits(root):
        raise DataError(f"no splits/*.json and no split folders under {str(root)!r}")
    return root


def _holds_scenes(folder: Path) -> bool:
    """A split folder: some scene folder (or Structured3D room folder) below it holds point assets."""
    return any(folder.glob("*/*.npy")) or any(folder.glob("*/*/*.npy"))


def _scene_folders(split_dir: Path) -> list[tuple[str, Path]]:
    """(name, folder) of each scene under a split folder. A folder holding sub-folders and no .npy file nests its
    scenes one level deeper (Structured3D's scene_*/room_*), named "<scene>_<room>" as Pointcept names them. An
    empty folder is listed too: reading it reports the missing files."""
    scenes = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        rooms = sorted(p for p in d.iterdir() if p.is_dir())
        if rooms and not any(d.glob("*.npy")):
            scenes.extend((f"{d.name}_{room.name}", room) for room in rooms)
        else:
            scenes.append((d.name, d))
    return scenes


def _samples_from_split_file(root: Path, split: str, split_file: Path) -> list[SampleFiles]:
    file = str(split_file)
    try:
        entries = json.loads(split_file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"not a readable JSON split file ({exc})", file=file) from exc
    if not isinstance(entries, dict):
        raise DataError("expected a JSON object mapping sample names to their files", file=file)
    samples = []
    positions: dict[Path, dict[Path, int]] = {}  # colour folder -> {image: its position in split-file order}
    for name, entry in entries.items():
        where = dict(sample=name, file=file)
        if not isinstance(entry, dict) or "pointclouds" not in entry:
            raise DataError(
                "entry must be an object with 'pointclouds' (and 'images', 'correspondences')",
                field="pointclouds",
                **where,
            )
        images, corrs = entry.get("images", []), entry.get("correspondences", [])
        if len(images) != len(corrs):
            raise DataError(
                f"{len(images)} images but {len(corrs)} correspondence files", field="correspondences", **where
            )
        frames = []
        for c, r in zip(images, corrs):
            color = _resolve(root, c, field="images", **where)
            in_folder = positions.setdefault(color.parent, {})
            frames.append(
                _frame_files(
                    color,
                    _resolve(root, r, field="correspondences", **where),
                    in_folder.setdefault(color, len(in_folder)),
                )
            )
        pc_dir = _resolve(root, entry["pointclouds"], field="pointclouds", **where)
        samples.append(SampleFiles(name=name, split=split, root=root, pointcloud_dir=pc_dir, frames=tuple(frames)))
    return samples


def _resolve(root: Path, entry: str, **where) -> Path:
    """Find a split-file path under ROOT, dropping leading components such as ``data/scannet``."""
    path = Path(entry)
    if path.is_absolute() and path.exists():
        return path
    parts = path.parts
    for k in range(len(parts)):
        candidate = root.joinpath(*parts[k:])
        if candidate.exists():
            return candidate
    raise DataError(f"{entry!r} does not exist under the dataset root {str(root)!r}", **where)


def _frame_files(color: Path, correspondence: Path, position: int) -> FrameFiles:
    """The files of one frame; `position` is its place among its folder's images in split-file order."""
    # The image folder holds color/, depth/, pose/, intrinsic/ side by side; the frame's path below color/ may
    # include a sub-folder (Structured3D's perspective/panorama views).
    parts = color.parts
    if "color" not in parts:
        return FrameFiles(color.stem, color, correspondence, None, None, None)
    i = len(parts) - 1 - parts[::-1].index("color")
    image_dir, tail = Path(*parts[:i]), Path(*parts[i + 1 :])

    def existing(*candidates: Path) -> Path | None:
        return next((c for c in candidates if c.is_file()), None)

    def per_frame(kind: str) -> list[Path]:
        by_name = [image_dir / kind / tail.with_suffix(".npy"), image_dir / kind / f"{tail.stem}.npy"]
        # Numbered files belong to frames by position only where frames are not themselves numbered: ScanNet's
        # pose/75.npy is frame 75, not the 76th image.
        return by_name if tail.stem.isdigit() else [*by_name, image_dir / kind / f"{position}.npy"]

    # S3DIS names a depth image after its colour image with "_domain_depth" for "_domain_rgb".
    s3dis_depth = tail.with_name(tail.stem.replace("_domain_rgb", "_domain_depth") + ".png")
    return FrameFiles(
        name=tail.with_suffix("").as_posix(),
        color=color,
        correspondence=correspondence,
        depth=existing(image_dir / "depth" / tail.with_suffix(".png"), image_dir / "depth" / s3dis_depth),
        pose=existing(*per_frame("pose")),
        intrinsic=existing(
            *per_frame("intrinsic"),
            image_dir / "intrinsic" / "intrinsic.npy",
            image_dir.parent.parent / "intrinsic" / "K.npy",
        ),  # HM3D: ROOT/images/intrinsic/K.npy
    )


def _read(path: Path, sample: str, rel: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", sample=sample, file=rel) from exc


def read_sample(files: SampleFiles, dataset: str, validate: bool = True) -> SceneRecord:
    """Read every file of a sample into a `SceneRecord`, checking it (see `record.check_*`) unless told not to."""
    source = files.rel(files.pointcloud_dir)
    if not files.pointcloud_dir.is_dir():
        raise DataError("point-cloud folder is missing", sample=files.name, file=source)
    assets = {p.stem: _read(p, files.name, files.rel(p)) for p in sorted(files.pointcloud_dir.glob("*.npy"))}
    frames = [
        FrameRecord(
            name=f.name,
            color_path=files.rel(f.color),
            color=_read(f.color, files.name, files.rel(f.color)),
            correspondence_path=files.rel(f.correspondence),
            correspondence=_read(f.correspondence, files.name, files.rel(f.correspondence)),
            depth=_read(f.depth, files.name, files.rel(f.depth)) if f.depth else b"",
            pose=_read(f.pose, files.name, files.rel(f.pose)) if f.pose else b"",
            intrinsic=_read(f.intrinsic, files.name, files.rel(f.intrinsic)) if f.intrinsic else b"",
        )
        for f in files.frames
    ]
    record = SceneRecord(
        name=files.name, split=files.split, dataset=dataset, source=source, point_assets=assets, frames=frames
    )
    if validate:
        check_record(record)
    return record


def check_record(record: SceneRecord) -> None:
    """Validate without decoding images fully: arrays, lengths, correspondences against image sizes."""
    arrays = {
        k: load_npy(v, sample=record.name, file=f"{record.source}/{k}.npy") for k, v in record.point_assets.items()
    }
    n = check_points(arrays, sample=record.name, source=record.source)
    for frame in record.frames:
        width, height = image_size(frame.color, sample=record.name, file=frame.color_path)
        corr = load_npy(frame.correspondence, sample=record.name, file=frame.correspondence_path)
        check_correspondence(corr, n, width, height, sample=record.name, file=frame.correspondence_path)
        for key in ("pose", "intrinsic"):
            blob = getattr(frame, key)
            if blob:
                where = dict(sample=record.name, file=f"{key} of frame {frame.color_path}", field=key)
                matrix = load_npy(blob, **where)
                # A frame whose tracking was lost: ScanNet writes an all -inf pose, S3DIS's 2D-3D-S a NaN one; the
                # reference's preprocessing gives either no correspondences (the single row -1, -1, -1).
                untracked = key == "pose" and corr.shape == (1, 3) and bool(np.all(corr == -1))
                if matrix.shape not in ((4, 4), (3, 3)) or not (untracked or np.isfinite(matrix).all()):
                    raise DataError(f"expected a finite 3x3 or 4x4 matrix, got shape {matrix.shape}", **where)
