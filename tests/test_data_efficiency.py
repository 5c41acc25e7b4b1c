"""ScanNet data efficiency as the reference runs it: every labelled point of a limited-annotation scene survives the
training transforms (Pointcept's `sampled_index`), every round has the reference's optimizer steps (its repeated
dataset, DistributedSampler and drop_last), and the 16-config data-efficiency sweep loads."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from concerto_ray.config import to_dict
from concerto_ray.data.presets import SemsegTransformConfig, semseg_train_transform
from concerto_ray.data.shards import prepare, read_manifest
from concerto_ray.data.sources import StreamPosition
from concerto_ray.data.synth import SynthConfig, write_synthetic_dataset
from concerto_ray.data.transforms import (
    SAMPLED_INDEX,
    GridSample,
    RandomDropout,
    SphereCrop,
)
from concerto_ray.finetune.configs import DataEfficiencyConfig, load_finetune_config
from concerto_ray.finetune.data_efficiency import annotation_limiter, training_scenes
from concerto_ray.finetune.run_config import RoundPlan, load_finetune_run, plan_finetune
from concerto_ray.finetune.sweep import load_sweep_config
from concerto_ray.finetune.trainer import BestRound, FinetuneWorker, scene_shares, training_dataset
from concerto_ray.train.runtime import NonFiniteGuard
from concerto_ray.train.state import Progress
from concerto_ray.train.tracking import flatten

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs" / "sweep-semseg-ptv3-large-v1m1-0e-scannet-data-efficiency.yaml"
SCANNET_TRAIN_SCENES = 1201
DATA_EFFICIENCY_CONFIGS = [
    f"semseg-ptv3-large-v1m1-0e{i}-scannet-ft-{kind}"
    for i, kind in enumerate(
        [
            "la20",
            "la50",
            "la100",
            "la200",
            "lr1",
            "lr5",
            "lr10",
            "lr20",
            "lora-la20",
            "lora-la50",
            "lora-la100",
            "lora-la200",
            "lora-lr1",
            "lora-lr5",
            "lora-lr10",
            "lora-lr20",
        ]
    )
]


def dense_scene(n: int = 6000, seed: int = 0) -> dict:
    """Points in a 0.4 m cube: about 8000 voxels of 2 cm, so grid sampling drops about a third of the points."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform(0.0, 0.4, (n, 3)).astype(np.float32)
    return {
        "name": f"scene{seed:04d}_00",
        "coord": coord,
        "color": rng.uniform(0, 255, (n, 3)).astype(np.float32),
        "normal": np.zeros((n, 3), dtype=np.float32),
        "segment": rng.integers(0, 20, n),
    }


# ------------------------------------------------------------------------------- labelled points survive


@pytest.mark.parametrize("budget", [20, 200])
def test_every_selected_labelled_point_reaches_the_loss(budget):
    transform = semseg_train_transform(
        SemsegTransformConfig(num_classes=20, dropout_ratio=0.2, dropout_application_ratio=1.0)
    )
    limiter = annotation_limiter(DataEfficiencyConfig(label_budget=budget, seed=0))
    for seed in range(5):
        scene = limiter(dense_scene(seed=seed))
        labels = np.sort(scene["segment"][scene["segment"] != -1])
        assert len(labels) == budget
        sample = transform(scene, np.random.default_rng(seed))
        assert len(sample["coord"]) < 0.8 * len(scene["coord"])  # dropout and grid sampling did drop points
        # the loss sees exactly the selected points, with their labels
        np.testing.assert_array_equal(np.sort(sample["segment"][sample["segment"] != -1]), labels)


def test_the_reference_label_file_points_survive_too(tmp_path):
    scene = dense_scene(seed=7)
    index = np.random.default_rng(0).choice(len(scene["coord"]), 50, replace=False)
    torch.save({scene["name"]: index}, tmp_path / "points50")
    limited = annotation_limiter(DataEfficiencyConfig(label_file=str(tmp_path / "points50")))(scene)
    np.testing.assert_array_equal(limited[SAMPLED_INDEX], np.sort(index))
    sample = semseg_train_transform(SemsegTransformConfig(num_classes=20))(limited, np.random.default_rng(1))
    assert (sample["segment"] != -1).sum() == 50


def test_subsampling_transforms_remap_the_labelled_points():
    scene = annotation_limiter(DataEfficiencyConfig(label_budget=30, seed=1))(dense_scene(seed=3))
    rng = np.random.default_rng(0)
    for transform in (GridSample(0.02, return_grid_coord=True), RandomDropout(0.5, 1.0)):
        out = transform(scene, rng)
        assert len(out["coord"]) < len(scene["coord"])
        # sampled_index points at the same points (same coordinates and labels) in the subset
        np.testing.assert_array_equal(out["coord"][out[SAMPLED_INDEX]], scene["coord"][scene[SAMPLED_INDEX]])
        np.testing.assert_array_equal(out["segment"][out[SAMPLED_INDEX]], scene["segment"][scene[SAMPLED_INDEX]])
    # a crop keeps what lies inside it and says which labelled points those are
    cropped = SphereCrop(sample_rate=0.5)(scene, rng)
    assert len(cropped["coord"]) == len(scene["coord"]) // 2
    np.testing.assert_array_equal(np.flatnonzero(cropped["segment"] != -1), cropped[SAMPLED_INDEX])


# ---------------------------------------------------------------------------------- the reference's steps


def reference_round_steps(samples: int, loop: int, batch_size: int, workers: int) -> int:
    """Optimizer steps of one of Pointcept's epochs on rank 0: the dataset of `samples * loop` entries through
    torch's DistributedSampler and a DataLoader of batch_size // workers with drop_last = (length > batch_size)."""
    dataset = range(samples * loop)
    sampler = DistributedSampler(dataset, num_replicas=workers, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size // workers, sampler=sampler, drop_last=len(dataset) > batch_size)
    return len(loader)


@pytest.mark.parametrize("name", DATA_EFFICIENCY_CONFIGS)
def test_every_data_efficiency_config_has_the_reference_step_count(name):
    cfg = load_finetune_config(name)
    seeded = dataclasses.replace(cfg.data_efficiency, scene_list_file=None)  # as where the shards lack the file
    scenes = training_scenes([f"scene{i:04d}_00" for i in range(SCANNET_TRAIN_SCENES)], seeded)
    loop = cfg.epochs // cfg.eval_epochs
    assert loop == 8  # Pointcept: loop = epoch // eval_epoch = 800 // 100
    for workers in (1, 2, 3, 4, 8):
        plan = RoundPlan(samples=len(scenes), loop=loop, num_workers=workers, batch_size=cfg.batch_size)
        assert plan.steps == reference_round_steps(len(scenes), loop, cfg.batch_size, workers), (name, workers)
        assert plan.samples_per_worker * workers == len(scenes) * loop + plan.padding
    if name.endswith("lr5"):  # the example: 60 scenes x 8 / 24 = 20 steps a round, 100 rounds
        assert RoundPlan(len(scenes), loop, 1, cfg.batch_size).steps * cfg.eval_epochs == 2000
    if name.endswith("lr1"):  # 12 scenes: one global batch of 24 is four steps a round, not zero
        assert RoundPlan(len(scenes), loop, 4, cfg.batch_size).steps == 4


@pytest.mark.parametrize(
    "samples, loop, batch_size, workers",
    [
        (3, 1, 8, 2),  # fewer samples than a global batch: one short step, as the reference keeps its last batch
        (5, 3, 4, 2),  # 15 samples on two workers: one padding sample
        (7, 1, 6, 3),
        (1, 1, 4, 4),  # one scene on four workers: every worker gets it (padding)
    ],
)
def test_round_plan_equals_the_reference_at_the_edges(samples, loop, batch_size, workers):
    plan = RoundPlan(samples=samples, loop=loop, num_workers=workers, batch_size=batch_size)
    assert plan.steps == reference_round_steps(samples, loop, batch_size, workers)
    assert plan.samples_per_worker == math.ceil(samples * loop / workers)


# ------------------------------------------------------------------------------- the runs and the sweep


@pytest.fixture(scope="module")
def scannet_shards(tmp_path_factory):
    """8 synthetic rooms: 6 training and 2 validation scenes."""
    root = tmp_path_factory.mktemp("data-efficiency")
    write_synthetic_dataset(
        root / "scenes",
        SynthConfig(scenes=8, points_per_scene=1500, views_per_scene=1, image_width=16, image_height=16),
        progress=False,
    )
    prepare(root / "scenes", str(root / "shards"), progress=False)
    return root / "shards"


def test_the_reference_files_in_the_shards_are_used_else_the_seeded_draw(scannet_shards, tmp_path):
    root = tmp_path / "scenes"
    shutil.copytree(scannet_shards.parent / "scenes", root)
    (root / "tasks" / "scenes").mkdir(parents=True)
    (root / "tasks" / "points").mkdir()
    train = [n for s in read_manifest(scannet_shards).scenes["train"].shards for n in s.samples]
    (root / "tasks" / "scenes" / "1.txt").write_text(f"{train[4]}\n{train[2]}\n")
    torch.save({name: np.arange(3) for name in train}, root / "tasks" / "points" / "points20")
    prepare(root, str(tmp_path / "shards"), progress=False)
    base = {"run.name": "files", "run.storage_path": str(tmp_path / "runs")}

    def planned(config: str, shards: Path):
        run = load_finetune_run(config, {**base, "data.shards": str(shards)})
        return run, plan_finetune(run), flatten(to_dict(run))

    run, plan, params = planned(DATA_EFFICIENCY_CONFIGS[4], tmp_path / "shards")  # lr1: the listed scenes
    assert plan.train_scenes == [train[4], train[2]]
    assert params["finetune.data_efficiency.scene_list_file"] == str(tmp_path / "shards" / "tasks/scenes/1.txt")
    assert params["finetune.data_efficiency.scene_percent"] == "None"
    run, plan, params = planned(DATA_EFFICIENCY_CONFIGS[4], scannet_shards)  # no tasks/: 1 % drawn from the seed
    assert len(plan.train_scenes) == 1 and params["finetune.data_efficiency.scene_list_file"] == "None"
    assert params["finetune.data_efficiency.scene_percent"] == "1.0"
    run, plan, params = planned(DATA_EFFICIENCY_CONFIGS[0], tmp_path / "shards")  # la20: the file's points
    assert params["finetune.data_efficiency.label_budget"] == "None"
    limiter = annotation_limiter(run.finetune.data_efficiency)
    scene = {"name": train[0], "segment": np.arange(50) % 20}
    assert np.array_equal(np.flatnonzero(limiter(scene)["segment"] != -1), np.arange(3))
    run, plan, params = planned(DATA_EFFICIENCY_CONFIGS[0], scannet_shards)
    assert params["finetune.data_efficiency.label_budget"] == "20"
    assert params["finetune.data_efficiency.label_file"] == "None"


def test_the_data_efficiency_sweep_loads_all_16_configs(scannet_shards, tmp_path):
    sweep = load_sweep_config(SWEEP, [f"data.shards={scannet_shards}", f"run.storage_path={tmp_path}"])
    assert [name.split("-")[4] for name in sweep.configs] == [f"0e{i}" for i in range(16)]
    assert sweep.configs == DATA_EFFICIENCY_CONFIGS


def test_a_round_streams_the_planned_samples_with_padding(ray_local, scannet_shards, tmp_path):
    # 6 scenes, loop 2, 4 workers: 12 samples, 3 per worker, no padding; 3 workers x 4 would need none either,
    # so take 5 workers: ceil(12 / 5) = 3 each, 3 padding samples.
    run = load_finetune_run(
        "semseg-tiny-lin",
        {
            "data.shards": str(scannet_shards),
            "run.name": "plan",
            "run.storage_path": str(tmp_path),
            "run.num_workers": 5,
            "epochs": 2,
            "eval_epochs": 1,
            "batch_size": 5,
        },
    )
    plan = plan_finetune(run)
    assert (plan.round.loop, plan.round.samples_per_worker, plan.round.padding, plan.round.steps) == (2, 3, 3, 3)
    # 12 samples of the repeated scenes plus 3 of the padding pass: 5 workers x 3
    position = StreamPosition()
    position.set(0)
    assert training_dataset(run, plan, position).count() == 15


# ------------------------------------------------------------------------ evaluation shares, AMP loss scaling


def test_evaluation_shares_cover_every_scene_once():
    scenes = [f"scene{i:04d}_00" for i in range(11)]
    shares = scene_shares(list(reversed(scenes)), 4)
    assert sorted(name for share in shares for name in share) == scenes
    assert sorted(len(share) for share in shares) == [2, 3, 3, 3]
    assert scene_shares(scenes[:2], 3)[2] == []  # more workers than scenes: some evaluate nothing


class _ScaledLoss(torch.nn.Module):
    """A model whose loss is weight * factor: factor 1e38 is a finite loss whose scaled gradient overflows."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.factor = 1.0

    def forward(self, batch: dict) -> dict:
        return {"loss": self.weight * self.factor}


def test_float16_loss_scaling_skips_overflowing_steps_without_moving_the_schedule():
    """Pointcept's AMP step: the gradient scaler skips a step whose scaled gradient overflows and lowers its
    scale; that step neither counts as a bad step nor advances the lr schedule."""
    model = _ScaledLoss()
    worker = object.__new__(FinetuneWorker)  # the step logic alone, without Ray Train around it
    worker.cfg = dataclasses.replace(load_finetune_config("semseg-tiny-lin"), mix_prob=0.0, clip_grad=None)
    worker.model, worker.device, worker.amp, worker.amp_dtype = model, torch.device("cpu"), False, torch.float16
    worker.optimizer = torch.optim.AdamW([{"params": [model.weight], "name": "default", "lr": 0.1}])
    worker.scheduler = torch.optim.lr_scheduler.OneCycleLR(worker.optimizer, max_lr=0.1, total_steps=10)
    worker.scaler = torch.amp.GradScaler("cpu")
    worker.mix_rng, worker.progress, worker.nonfinite_guard = np.random.default_rng(0), Progress(), NonFiniteGuard(1)
    batch = {"offset": torch.tensor([1])}

    model.factor = 1e38
    values = worker.optimizer_step(batch)
    assert model.weight.item() == 1.0 and worker.scheduler.last_epoch == 0  # skipped: no update, no lr step
    assert values["loss_scale"] == 32768.0 and worker.progress.skipped_steps == 0  # the guard (limit 1) is calm
    model.factor = 1.0
    values = worker.optimizer_step(batch)
    assert model.weight.item() < 1.0 and worker.scheduler.last_epoch == 1 and values["loss_scale"] == 32768.0


def test_the_best_round_is_the_first_with_the_highest_val_miou():
    # By construction, so that "keep the last round" cannot pass on noise: a worse, an equal and a better round.
    best = BestRound().after(1, 0.40)
    assert best.after(2, 0.35) == BestRound(1, 0.40)
    assert best.after(2, 0.40) == BestRound(1, 0.40)
    assert best.after(2, 0.45).after(3, 0.45) == BestRound(2, 0.45)
