"""jobs/prepare.py: `concerto-ray prepare` run as a Ray task by a driver connected to a running Ray cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "jobs" / "prepare.py"


def _load_job_module():
    spec = importlib.util.spec_from_file_location("prepare_job", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("job") / "scenes"
    write_synthetic_dataset(
        root, SynthConfig(scenes=2, seed=1, points_per_scene=1500, views_per_scene=4, image_width=48, image_height=32)
    )
    return root


def _submit(args: list[str]) -> subprocess.CompletedProcess:
    """Run the job script as `ray job submit` would: a separate driver process attached to the cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_job_writes_shards_and_manifest_on_the_cluster(scenes, tmp_path, ray_local):
    dest = tmp_path / "shards"
    done = _submit([str(scenes), str(dest), "--format", "webdataset", "--workers", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["format"] == "webdataset"
    assert sum(split["samples"] for split in manifest["splits"].values()) == 2
    shard_files = sorted(dest.rglob("*.tar"))
    assert shard_files and all(f.stat().st_size > 0 for f in shard_files)


def test_data_error_in_the_task_gives_exit_code_2_and_names_the_file(scenes, tmp_path, ray_local):
    broken = tmp_path / "broken"
    write_synthetic_dataset(
        broken, SynthConfig(scenes=1, points_per_scene=1500, views_per_scene=4, image_width=48, image_height=32)
    )
    (broken / "train" / "scene0000_00" / "coord.npy").write_bytes(b"garbage")
    done = _submit([str(broken), str(tmp_path / "out"), "--workers", "1"])
    assert done.returncode == 2
    assert "train/scene0000_00/coord.npy" in done.stdout + done.stderr


def test_bad_options_fail_before_any_ray_work(capsys):
    job = _load_job_module()
    with pytest.raises(SystemExit) as exit_:
        job.run(["only-src", "--format", "zip"])
    assert exit_.value.code == 2
    assert "invalid choice: 'zip'" in capsys.readouterr().err
