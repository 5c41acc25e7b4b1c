"""Pointcept <-> concerto-ray checkpoint mapping on the tiny configs."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2WithRegistersModel

from concerto_ray.errors import ConfigError
from concerto_ray.model.build import build_ssl_model
from concerto_ray.model.checkpoint import (
    backbone_state_dict,
    convert_checkpoint,
    load_pointcept_state_dict,
    pointcept_to_ray,
    ray_to_pointcept,
)
from concerto_ray.model.configs import get_model_config
from concerto_ray.model.ptv3 import PointTransformerV3


def tiny_sonata(seed: int):
    torch.manual_seed(seed)
    return build_ssl_model(get_model_config("tiny-sonata"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pointcept_layout_loads_strictly():
    source, target = tiny_sonata(0), tiny_sonata(1)
    pointcept = ray_to_pointcept(source.state_dict())
    assert all(k.startswith("module.") for k in pointcept)
    assert "module.student.backbone.embedding.mask_token" in pointcept
    assert "module.teacher.mask_head.prototype.parametrizations.weight.original1" in pointcept
    load_pointcept_state_dict(target, pointcept)
    assert_same_weights(target.state_dict(), source.state_dict())


def test_concerto_checkpoints_carry_the_frozen_image_encoder(tmp_path):
    config = get_model_config("tiny-concerto")
    Dinov2WithRegistersModel(config.image_encoder.architecture()).save_pretrained(tmp_path)
    config.image_encoder.weights = str(tmp_path)
    source, target = build_ssl_model(config), build_ssl_model(config)
    with torch.no_grad():
        source.patch_proj.weight.add_(1.0)
    pointcept = ray_to_pointcept(source.state_dict())
    for prefix in (
        "module.enc2d_model.embeddings.",
        "module.patch_proj.",
        "module.enc2d_head_student.mlp.",
        "module.enc2d_head_teacher.prototype.",
    ):
        assert any(k.startswith(prefix) for k in pointcept), prefix
    load_pointcept_state_dict(target, pointcept)
    assert torch.equal(target.patch_proj.weight, source.patch_proj.weight)


def test_mismatched_checkpoint_names_the_keys():
    pointcept = ray_to_pointcept(tiny_sonata(0).state_dict())
    pointcept["module.student.extra.weight"] = torch.zeros(1)
    del pointcept["module.teacher.backbone.embedding.mask_token"]
    with pytest.raises(ConfigError, match="teacher.backbone.embedding.mask_token") as info:
        load_pointcept_state_dict(tiny_sonata(1), pointcept)
    assert "student.extra.weight" in str(info.value)


def test_convert_round_trip(tmp_path):
    state = ray_to_pointcept(tiny_sonata(0).state_dict())
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "pointcept.pth")
    count = convert_checkpoint(tmp_path / "pointcept.pth", tmp_path / "ray.pth", "pointcept-to-ray")
    ours = torch.load(tmp_path / "ray.pth", weights_only=True)["state_dict"]
    assert count == len(state) and not any(k.startswith("module.") for k in ours)
    convert_checkpoint(tmp_path / "ray.pth", tmp_path / "back.pth", "ray-to-pointcept")
    assert_same_weights(torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"], state)


def test_convert_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "out.pth", "pointcept-to-ray")
    torch.save({"weights": {}}, tmp_path / "odd.pth")
    with pytest.raises(ConfigError, match="state_dict"):
        convert_checkpoint(tmp_path / "odd.pth", tmp_path / "out.pth", "pointcept-to-ray")
    with pytest.raises(ConfigError, match="pointcept-to-ray"):
        convert_checkpoint(tmp_path / "odd.pth", tmp_path / "out.pth", "sideways")


@pytest.mark.parametrize("layout", ["pre-training", "fine-tuning", "backbone-only"])
def test_backbone_weights_are_found_under_every_documented_prefix(layout):
    model = tiny_sonata(0)
    backbone = model.student["backbone"].state_dict()
    state = {
        "pre-training": ray_to_pointcept(model.state_dict()),
        "fine-tuning": {f"module.backbone.{k}": v for k, v in backbone.items()},
        "backbone-only": backbone,
    }[layout]
    target = PointTransformerV3(get_model_config("tiny-sonata").backbone)
    target.load_state_dict(backbone_state_dict(state), strict=True)
    assert_same_weights(target.state_dict(), backbone)


def test_teacher_backbone_can_be_extracted():
    model = tiny_sonata(0)
    with torch.no_grad():
        model.teacher["backbone"].embedding.mask_token.fill_(3.0)
    extracted = backbone_state_dict(pointcept_to_ray(model.state_dict()), source="teacher")
    assert torch.equal(extracted["embedding.mask_token"], torch.full_like(extracted["embedding.mask_token"], 3.0))
