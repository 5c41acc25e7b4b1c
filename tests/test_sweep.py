"""Ray Tune sweeps of fine-tuning runs: bad search spaces fail before Ray; a 4-trial ASHA sweep on the local Ray
with one MLflow parent run and a child run per trial."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml

from concerto_ray.errors import ConfigError
from concerto_ray.cli import main as cli_main
from concerto_ray.finetune.sweep import load_sweep_config

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "configs" / "sweep-semseg-tiny.yaml"
ONE_TEST_PASS = {"transform": {"test_rotations": [0.0], "test_scales": [], "test_flip": False}}


@pytest.fixture(scope="module")
def sweep_shards(tmp_path_factory):
    from concerto_ray.data.shards import prepare
    from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("sweep")
    write_synthetic_dataset(root / "scenes", SynthConfig(scenes=3, points_per_scene=1000, views_per_scene=1,
                                                         image_width=16, image_height=16,
                                                         splits={"train": 0.67, "val": 0.33}), progress=False)
    prepare(root / "scenes", str(root / "shards"), progress=False)
    return root / "shards"


def overrides(shards: Path, storage: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run.storage_path={storage}", "overrides.batch_size=1", *extra]


@pytest.mark.parametrize("space, message", [
    ("{lr_rate: {choice: [0.1]}}", r"space.lr_rate: .*unknown config key 'finetune.lr_rate'"),
    ("{lr: {choice: []}}", r"space.lr: choice: needs at least one value"),
    ("{lr: {uniform: [0.1, 0.01]}}", r"uniform: low 0.1 is above high 0.01"),
    ("{lr: {loguniform: [0.0, 0.1]}}", r"loguniform: bounds must be > 0"),
    ("{lr: {normal: [0.0, 0.1]}}", r"unknown config key 'space.lr.normal'"),
    ("{lora.r: {grid: [0, 8]}}", r"space.lora.r: the value 0 gives an invalid config: .*lora needs r >= 1"),
])
def test_bad_search_spaces_fail_before_ray(sweep_shards, tmp_path, monkeypatch, capsys, space, message):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid sweep")

    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(TINY_SWEEP, overrides(sweep_shards, tmp_path, f"space={space}"))
    assert cli_main(["sweep", "--config", str(TINY_SWEEP),
                     *[f"--set={o}" for o in overrides(sweep_shards, tmp_path, f"space={space}")]]) == 2
    assert "concerto-ray sweep: error:" in capsys.readouterr().err


def test_shipped_sweeps_load(sweep_shards, tmp_path):
    tiny = load_sweep_config(TINY_SWEEP, overrides(sweep_shards, tmp_path))
    assert tiny.num_samples == 4 and tiny.asha is not None and set(tiny.space) == {"lr", "weight_decay"}
    data_efficiency = yaml.safe_load((REPO / "configs" /
                                      "sweep-semseg-ptv3-large-v1m1-0e-scannet-data-efficiency.yaml").read_text())
    assert [name.split("-")[4] for name in data_efficiency["configs"]] == [f"0e{i}" for i in range(16)]
    with pytest.raises(ConfigError, match="data.shards is still the placeholder"):
        load_sweep_config(REPO / "configs" / "sweep-semseg-ptv3-large-v1m1-0e-scannet-data-efficiency.yaml",
                          [f"run.storage_path={tmp_path}"])
