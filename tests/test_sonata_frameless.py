"""Point clouds without camera frames pre-train with Sonata's losses: own PLY scans -> ingest -> prepare -> a tiny
pre-training run on a local Ray that reads no frame -> the checkpoint's backbone embeds the same scans."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_ingest import cloud, write_ply  # tests/ is on sys.path under pytest

from concerto_ray.data.presets import IMAGE_VIEW_KEYS, ConcertoPretrainTransformConfig, concerto_pretrain_transform
from concerto_ray.data.shards import prepare
from concerto_ray.embed import load_backbone_spec, scene_features
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.ingest import IngestConfig, run_ingest
from concerto_ray.model.build import build_ssl_model
from concerto_ray.train.config import load_pretrain_config, steps_per_epoch
from concerto_ray.train.tracking import RUN_ID_FILE
from concerto_ray.train.trainer import run_pretrain
from concerto_ray.viz import load_scene

POINTS = 1500


def test_frameless_clouds_pretrain_with_sonata_losses_and_embed(ray_local, mlflow_server, tmp_path):
    src, root, shards = tmp_path / "scans", tmp_path / "root", tmp_path / "shards"
    for i in range(4):  # colours, no normals, no labels; no frames and no split files
        write_ply(src / "train" / f"room{i}.ply", cloud(POINTS, i), with_normals=False, with_labels=False)
    run_ingest(IngestConfig(str(src), str(root)), progress=False)
    prepare(root, str(shards), progress=False)
    where = [f"data.shards={shards}", f"run.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_server}"]

    # Concerto's 2D-3D term on these samples: refused before Ray Train starts, naming a sample and the way out.
    with pytest.raises(
        ConfigError, match=r"sample 'room0' of split 'train' .* no camera frames .* model.enc2d_loss_weight: 0"
    ):
        load_pretrain_config("pretrain-tiny", [*where, "model.image_encoder_weights=facebook/dinov2-with-registers"])
    # ... which with that weight at 0 needs neither frames nor image encoder weights (its ./demo/dinov2-tiny is unread).
    concerto = load_pretrain_config(
        "pretrain-tiny", [*where, "model.enc2d_loss_weight=0", "data.pretrain.feat_keys=[coord, color]"]
    )
    assert not hasattr(build_ssl_model(concerto.model_config()), "enc2d_model")
    # Per sample: the model input reads what the config names (a scene without it is an error naming the array);
    # without frames a sample gets no image views, and where the 2D-3D term wants them it is an error.
    scene, rng = load_scene(str(shards), "room0"), np.random.default_rng(0)
    with pytest.raises(DataError, match=r"sample 'room0', field 'normal': the scene has no normal.npy"):
        concerto_pretrain_transform(ConcertoPretrainTransformConfig(), frames=False)(scene, rng)
    coord_color = ConcertoPretrainTransformConfig(feat_keys=("coord", "color"))
    sample = concerto_pretrain_transform(coord_color, frames=False)(scene, rng)
    assert not set(IMAGE_VIEW_KEYS) & set(sample) and sample["global_feat"].shape[1] == 6
    with pytest.raises(DataError, match=r"sample 'room0', field 'frames_color': has no camera frames"):
        concerto_pretrain_transform(coord_color)(scene, rng)

    # One worker and epoch (4 steps of 1 sample) keep the run short; the frame-less stream does not depend on them.
    config = load_pretrain_config(
        "pretrain-sonata-tiny", [*where, "run.name=frameless", "run.num_workers=1", "run.epochs=1"]
    )
    assert config.model_config().backbone.in_channels == 6  # coord + color
    steps = steps_per_epoch(config) * config.run.epochs
    result = run_pretrain(config)

    checkpoint = Path(result.checkpoint.path)
    assert checkpoint.name == f"step-{steps:08d}"
    assert json.loads((checkpoint / "progress.json").read_text())["global_step"] == steps == 4
    run_id = json.loads((checkpoint.parent / RUN_ID_FILE).read_text())["run_id"]
    client = MlflowClient(mlflow_server)
    losses = client.get_metric_history(run_id, "loss")
    assert [m.step for m in losses] == list(range(1, steps + 1))
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    logged = set(client.get_run(run_id).data.metrics)
    assert {"mask_loss", "roll_mask_loss", "unmask_loss"} <= logged and "enc2d_loss" not in logged

    # The checkpoint's backbone reads [coord, color] and embeds every point of the same scans.
    state = torch.load(checkpoint / "model.pt", weights_only=True)["state_dict"]
    assert state["student.backbone.embedding.stem.linear.weight"].shape[1] == 6
    spec = load_backbone_spec(str(checkpoint), feat_keys=("coord", "color"))
    feat = scene_features(spec.build(), scene, spec.up_cast_levels, feat_keys=("coord", "color"))
    assert feat.shape == (POINTS, spec.channels) == (POINTS, 16 + 16 + 32)  # tiny-sonata's up-cast width
    assert np.isfinite(feat).all()
