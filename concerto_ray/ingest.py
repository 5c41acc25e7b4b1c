"""`concerto-ray ingest`: plain point-cloud files -> Pointcept's processed layout, as a Ray Data job.

    SRC/<split>/<scene>.{ply,las,laz,npy,npz}   (or SRC/<scene>.* with --split NAME)
      -> ray.data.from_items: one row per scene file not yet ingested
      -> map(IngestScene): read the file (`data.point_files`), write OUT/<split>/<scene>/{coord,color,normal,
         segment}.npy in CPU tasks spread over the cluster, one scene in memory per task
      -> the driver counts the small result rows (progress bar, bad files)

OUT (a local or shared folder, or s3://) is then a dataset root that `concerto-ray prepare` turns into shards for
pre-training (Sonata-style: no camera frames), segmentation (with --labels) and `embed`; with --shards, ingest runs
that `prepare` itself (OUT must then be a local or shared folder). A scene folder is complete once its coord.npy
exists (written last), so a rerun skips finished scenes and redoes interrupted ones. `OUT/ingest.json` records every
scene's source file, points, arrays and coordinate shift (`point_files`: georeferenced clouds are moved near the
origin so that float32 keeps millimetres).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from concerto_ray.config import to_dict
from concerto_ray.data import storage
from concerto_ray.data.point_files import POINT_FILE_SUFFIXES, read_point_file
from concerto_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUMMARY_FILE = "ingest.json"
FINAL_ASSET = "coord"  # written last: its presence marks a complete scene folder


@dataclass
class IngestConfig:
    src: str  # a local or shared folder of point-cloud files
    out: str  # local or shared folder, or s3://bucket/prefix
    split: str | None = None  # SRC's files are this split's scenes; None: SRC's subfolders are the splits
    labels: bool = False  # per-point labels from the files, written as segment.npy
    skip_bad: bool = False
    endpoint_url: str | None = None


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
    """One scene file -> its folder of .npy arrays under OUT; a file that fails becomes a row carrying its error,
    so that the driver decides between stopping and skipping. Picklable for Ray Data tasks."""

    def __init__(self, out: storage.Location, labels: bool):
        self.out = out
        self.labels = labels

    def __call__(self, row: dict) -> dict:
        result = {"split": row["split"], "scene": row["scene"], "source": row["source"], "error": "", "points": 0}
        if not Path(row["source"]).is_file():  # not a bad file, which --skip-bad would pass over: a bad setup
            raise FileNotFoundError(
                f"{row['source']} is not on the node {ray.util.get_node_ip_address()}: SRC must be a folder that "
                f"every node of the cluster reads at the same path (a shared file system)"
            )
        try:
            cloud = read_point_file(Path(row["source"]), self.labels)
        except DataError as exc:
            return {**result, "error": str(exc), "arrays": "", "shift": [0.0, 0.0, 0.0]}
        folder = f"{row['split']}/{row['scene']}"
        for key in sorted(cloud.arrays, key=lambda k: k == FINAL_ASSET):  # coord.npy last
            buffer = io.BytesIO()
            np.save(buffer, cloud.arrays[key])
            self.out.write_bytes(f"{folder}/{key}.npy", buffer.getvalue())
        arrays = ",".join(sorted(cloud.arrays))
        return {**result, "points": len(cloud.arrays["coord"]), "arrays": arrays, "shift": list(cloud.shift)}


def run_ingest(config: IngestConfig, progress: bool = True) -> IngestSummary:
    """Ingest every scene file of SRC that OUT does not hold yet; uses the connected Ray cluster."""
    out = storage.resolve(config.out, config.endpoint_url)
    files = list_scene_files(Path(config.src).expanduser().resolve(), config.split)
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
            _ingest(pending, out, config, summary, progress)
    finally:  # what was written is recorded, also when a bad file stops the run
        out.write_bytes(SUMMARY_FILE, json.dumps(to_dict(summary), indent=1).encode())
    return summary


def _ingest(pending: list[dict], out: storage.Location, config: IngestConfig, summary: IngestSummary, progress: bool):
    log.info("ingesting %d scenes", len(pending))
    # One row per block, so that Ray Data spreads the scenes over the cluster's CPUs.
    ds = ray.data.from_items(pending, override_num_blocks=len(pending)).map(IngestScene(out, config.labels))
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
            bar.update()
    if bad and not config.skip_bad:
        scene, error = bad[0]
        more = f"; {len(bad) - 1} more bad files in the log" if len(bad) > 1 else ""
        raise DataError(f"cannot be ingested: {error} (--skip-bad skips such files{more})", sample=scene)
    summary.skipped += [f"{scene}: {error}" for scene, error in bad]
