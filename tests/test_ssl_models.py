"""Sonata / Concerto on the tiny configs: losses, teacher EMA, schedules, image branch, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Dinov2WithRegistersModel

from concerto_ray.errors import ConfigError, DataError
from concerto_ray.model.build import build_ssl_model, model_info
from concerto_ray.model.configs import MODEL_CONFIG_NAMES, get_model_config
from concerto_ray.model.schedules import SslSchedules

POINTS_PER_GLOBAL_VIEW = 160
POINTS_PER_LOCAL_VIEW = 60
IMAGES_PER_SCENE = (3, 2)


def make_batch(num_scenes: int = 2, seed: int = 0) -> dict:
    """Two global and four local views per scene, all cut from one random room, with the reference's keys."""
    gen = torch.Generator().manual_seed(seed)
    global_views, local_views = [], []
    for _ in range(num_scenes):
        room = torch.rand(2 * POINTS_PER_GLOBAL_VIEW, 3, generator=gen) * 2
        for _ in range(2):
            global_views.append(room[torch.randperm(len(room), generator=gen)[:POINTS_PER_GLOBAL_VIEW]])
        for _ in range(4):
            local_views.append(room[torch.randperm(len(room), generator=gen)[:POINTS_PER_LOCAL_VIEW]])
    batch = {}
    for prefix, views in (("global", global_views), ("local", local_views)):
        coord = torch.cat(views)
        batch[f"{prefix}_coord"] = coord
        batch[f"{prefix}_origin_coord"] = coord.clone()
        batch[f"{prefix}_feat"] = torch.cat([coord, torch.rand(len(coord), 6, generator=gen)], dim=1)
        batch[f"{prefix}_offset"] = torch.cumsum(torch.tensor([len(v) for v in views]), dim=0)
    batch["grid_size"] = torch.full((num_scenes,), 0.02)
    return batch


def add_images(batch: dict, patch_h: int, patch_w: int, image_size: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    img_num = torch.tensor(IMAGES_PER_SCENE)
    num_points = len(batch["global_coord"])
    corr = torch.stack(
        [
            torch.randint(0, patch_h, (num_points, img_num.max()), generator=gen),
            torch.randint(0, patch_w, (num_points, img_num.max()), generator=gen),
        ],
        dim=-1,
    ).float()
    corr[torch.rand(num_points, int(img_num.max()), generator=gen) < 0.3] = -1
    second_scene = slice(2 * POINTS_PER_GLOBAL_VIEW, None)
    corr[second_scene, int(img_num[1]) :] = -1  # the second scene has fewer images
    batch.update(
        images=torch.randn(int(img_num.sum()), 3, image_size, image_size, generator=gen),
        img_num=img_num,
        global_correspondence=corr,
    )
    return batch


@pytest.fixture(scope="module")
def sonata():
    torch.manual_seed(0)
    return build_ssl_model(get_model_config("tiny-sonata"))


@pytest.fixture(scope="module")
def concerto_config(tmp_path_factory):
    config = get_model_config("tiny-concerto")
    weights = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2WithRegistersModel(config.image_encoder.architecture()).save_pretrained(weights)
    config.image_encoder.weights = str(weights)
    return config


def test_sonata_loss_is_finite_and_decreases():
    torch.manual_seed(0)
    model = build_ssl_model(get_model_config("tiny-sonata"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = make_batch()
    losses = []
    for _ in range(6):
        torch.manual_seed(1)  # same masks every step, so only the weights change the loss
        out = model(batch)
        assert set(out) == {"loss", "mask_loss", "roll_mask_loss", "unmask_loss"}
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out.values())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.update_teacher()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0] - 0.05, losses


def test_teacher_is_frozen_and_follows_the_student_by_ema(sonata):
    assert all(not p.requires_grad for p in sonata.teacher.parameters())
    sonata.zero_grad(set_to_none=True)
    sonata(make_batch())["loss"].backward()
    assert all(p.grad is None for p in sonata.teacher.parameters())
    assert sonata.student["backbone"].embedding.mask_token.grad is not None
    with torch.no_grad():
        for p in sonata.student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    values = SslSchedules.from_config(sonata.config, total_steps=100).at(40)
    sonata.set_schedule(values)
    m = values.momentum
    assert 0.994 < m < 1
    expected = [
        t.detach().clone().mul_(m).add_(s.detach(), alpha=1 - m)
        for t, s in zip(sonata.teacher.parameters(), sonata.student.parameters())
    ]
    sonata.update_teacher()
    for t, e in zip(sonata.teacher.parameters(), expected):
        assert torch.equal(t, e)


def reference_cosine_schedule(base, final, total, start=0.0, warmup=0):
    """Pointcept's CosineScheduler: numpy linspace warm-up, then a half cosine."""
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([np.linspace(start, base, warmup), cosine])


def test_schedules_match_the_reference():
    config = get_model_config("pretrain-sonata-v1m1-0-base")
    total = 1000
    schedules = SslSchedules.from_config(config, total)
    expected = {
        "mask_size": reference_cosine_schedule(0.4, 0.4, total, start=0.1, warmup=50),
        "mask_ratio": reference_cosine_schedule(0.7, 0.7, total, start=0.3, warmup=50),
        "teacher_temp": reference_cosine_schedule(0.07, 0.07, total, start=0.04, warmup=50),
        "momentum": reference_cosine_schedule(0.994, 1.0, total),
    }
    for name, values in expected.items():
        ours = np.array([getattr(schedules.at(step), name) for step in range(total)])
        np.testing.assert_allclose(ours, values, rtol=0, atol=1e-12, err_msg=name)
    start, warm, end = schedules.at(0), schedules.at(49), schedules.at(total)
    assert (start.mask_size, start.mask_ratio, start.teacher_temp, start.momentum) == (0.1, 0.3, 0.04, 0.994)
    assert math.isclose(warm.mask_size, 0.4) and math.isclose(warm.teacher_temp, 0.07)
    assert (end.mask_size, end.mask_ratio, end.teacher_temp, end.momentum) == (0.4, 0.7, 0.07, 1.0)


def test_concerto_2d_branch_with_a_frozen_dinov2_loaded_from_disk(concerto_config):
    torch.manual_seed(0)
    model = build_ssl_model(concerto_config)
    model.train()
    assert not model.enc2d_model.training
    assert all(not p.requires_grad for p in model.enc2d_model.parameters())
    c = concerto_config
    batch = add_images(make_batch(), c.patch_h, c.patch_w, c.image_encoder.image_size)
    out = model(batch)
    assert set(out) == {"loss", "mask_loss", "roll_mask_loss", "unmask_loss", "enc2d_loss"}
    assert all(torch.isfinite(v) for v in out.values())
    weighted = sum(
        float(out[k]) * w
        for k, w in (("mask_loss", 1 / 8), ("roll_mask_loss", 1 / 8), ("unmask_loss", 2 / 8), ("enc2d_loss", 4 / 8))
    )
    assert math.isclose(float(out["loss"].detach()), weighted, rel_tol=1e-5)
    out["loss"].backward()
    assert model.patch_proj.weight.grad is not None and model.patch_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.enc2d_head_student.prototype.parametrizations.weight.original1.add_(1.0)
    model.update_teacher()
    assert torch.equal(
        model.enc2d_head_teacher.prototype.parametrizations.weight.original1,
        model.enc2d_head_student.prototype.parametrizations.weight.original1,
    )


def test_concerto_without_images_repeats_the_point_loss(concerto_config):
    torch.manual_seed(0)
    model = build_ssl_model(concerto_config)
    c = concerto_config
    batch = add_images(make_batch(), c.patch_h, c.patch_w, c.image_encoder.image_size)
    batch.update(
        images=batch["images"][:0],
        img_num=torch.zeros(2, dtype=torch.long),
        global_correspondence=torch.full_like(batch["global_correspondence"], -1),
    )
    out = model(batch)
    point = (out["mask_loss"] + out["roll_mask_loss"] + 2 * out["unmask_loss"]) / 4
    assert torch.allclose(out["enc2d_loss"], point)


def test_bf16_autocast_gives_fp32_finite_losses(sonata):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sonata(make_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda b: b.update(global_offset=b["global_offset"] - 1), "global_offset"),
        (lambda b: b.update(local_offset=b["local_offset"][:-1]), "local_offset"),
        (lambda b: b.pop("local_feat"), "local_feat"),
    ],
)
def test_bad_point_batches_are_rejected(sonata, breakage, field):
    batch = make_batch()
    breakage(batch)
    with pytest.raises(DataError, match=field) as info:
        sonata(batch)
    assert info.value.field == field


@pytest.mark.parametrize(
    "breakage, field, message",
    [
        (lambda b: b.pop("global_correspondence"), "global_correspondence", "missing"),
        (lambda b: b.update(images=b["images"][:-1]), "images", "sums to 5"),
        (
            lambda b: b.update(img_num=torch.tensor([3, 1]), images=b["images"][:4]),
            "global_correspondence",
            "only 1 images",
        ),
        (lambda b: b["global_correspondence"][0, 0].fill_(7), "global_correspondence", "patch coordinates"),
    ],
)
def test_bad_image_batches_are_rejected(concerto_config, breakage, field, message):
    torch.manual_seed(0)
    model = build_ssl_model(concerto_config)
    c = concerto_config
    batch = add_images(make_batch(), c.patch_h, c.patch_w, c.image_encoder.image_size)
    breakage(batch)
    with pytest.raises(DataError, match=message) as info:
        model(batch)
    assert info.value.field == field


def test_model_info_counts_the_instantiated_modules(concerto_config):
    info = model_info("tiny-concerto")
    torch.manual_seed(0)
    model = build_ssl_model(concerto_config)
    assert info["backbone_params"] == sum(p.numel() for p in model.student["backbone"].parameters())
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["image_encoder_params"] == sum(p.numel() for p in model.enc2d_model.parameters())
    assert 0 < info["backbone_params"] < info["trainable_params"] < info["total_params"]


def test_unknown_config_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        get_model_config("concerto-huge")
    assert all(name in str(info.value) for name in MODEL_CONFIG_NAMES)
    assert {
        "pretrain-concerto-v1m1-0-base",
        "pretrain-concerto-v1m1-1-large-base",
        "pretrain-concerto-v1m1-2-large-video",
        "pretrain-sonata-v1m1-0-base",
    } <= set(MODEL_CONFIG_NAMES)
