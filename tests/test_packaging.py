"""The built wheel works outside the repository: the shipped configs are found by name, the CLI runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_configs_and_runs_outside_the_repository(tmp_path):
    # Built from a clean copy of the sources: a build folder left in the checkout would mask a missing data file.
    source = tmp_path / "source"
    shutil.copytree(REPO / "concerto_ray", source / "concerto_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("concerto_ray-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("concerto_ray/configs/")}
    assert {
        "concerto_ray/configs/pretrain-tiny.yaml",
        "concerto_ray/configs/semseg-tiny-lin.yaml",
        "concerto_ray/configs/sweep-semseg-tiny.yaml",
    } <= shipped
    assert len(shipped) == len(list((REPO / "concerto_ray" / "configs").glob("*.yaml")))

    # A fresh environment that sees this one's dependencies (a .pth line) but not the editable checkout: the
    # editable install's own .pth lives in this environment's site-packages, which a .pth line does not process.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = subprocess.run(
        [python, "-c", "import concerto_ray; print(concerto_ray.__file__)"],
        cwd=outside,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(site))  # the installed wheel, not the checkout
    info = subprocess.run(
        [env_dir / "bin" / "concerto-ray", "model", "info", "tiny-concerto"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["name"] == "tiny-concerto" and json.loads(info.stdout)["backbone_params"] > 0
    lookup = (
        "from concerto_ray.finetune.configs import load_finetune_config\n"
        "from concerto_ray.train.config import find_config\n"
        "print(load_finetune_config('semseg-tiny-lin').mode, find_config('pretrain-tiny', 'pretrain').name)"
    )
    found = subprocess.run([python, "-c", lookup], cwd=outside, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["lin", "pretrain-tiny.yaml"]
