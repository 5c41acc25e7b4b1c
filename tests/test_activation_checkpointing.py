"""`model.activation_checkpointing`: the pre-training config reaches the student backbone of the model a worker
builds, whose blocks then recompute their attention and MLP in backward, with the same loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ssl_models import add_images, make_batch

from concerto_ray.errors import ConfigError
from concerto_ray.model.ptv3 import Block
from concerto_ray.train.config import load_pretrain_config
from concerto_ray.train.loop import build_training_model

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain-tiny.yaml"


def tiny_config(pretrain_shards, dinov2_dir, tmp_path, *overrides: str):
    return load_pretrain_config(
        TINY_CONFIG,
        [
            f"data.shards={pretrain_shards}",
            f"model.image_encoder_weights={dinov2_dir}",
            f"run.storage_path={tmp_path / 'runs'}",
            "data.pretrain.crop_h=28",  # 2 x 2 patches
            "data.pretrain.crop_w=28",
            *overrides,
        ],
    )


def one_step(config) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss and gradients of one training step on a fixed batch, and how often the student's block MLPs ran."""
    model = build_training_model(config).train()
    model_config = config.model_config()
    crop = config.data.pretrain.crop_h  # the images are the pipeline's square crops
    batch = add_images(make_batch(), model_config.patch_h, model_config.patch_w, crop)
    mlp_calls = 0

    def count(*_):
        nonlocal mlp_calls
        mlp_calls += 1

    for module in model.student["backbone"].modules():
        if isinstance(module, Block):
            # A pre-hook: the recomputation stops after the last activation backward needs, which can be inside
            # the MLP (a block without drop path keeps nothing after it), before a forward hook would run.
            module.mlp.register_forward_pre_hook(count)
    torch.manual_seed(1)  # the same masks and drop-path rows in both runs
    loss = model(batch)["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, mlp_calls


def test_activation_checkpointing_recomputes_the_student_blocks_with_the_same_loss_and_gradients(
    pretrain_shards, dinov2_dir, tmp_path
):
    plain = tiny_config(pretrain_shards, dinov2_dir, tmp_path)
    assert plain.model.activation_checkpointing is False  # the default
    checkpointed = tiny_config(pretrain_shards, dinov2_dir, tmp_path, "model.activation_checkpointing=true")

    model = build_training_model(checkpointed)
    student_blocks = [m for m in model.student["backbone"].modules() if isinstance(m, Block)]
    assert student_blocks and all(block.activation_checkpointing for block in student_blocks)
    assert not any(m.activation_checkpointing for m in model.teacher["backbone"].modules() if isinstance(m, Block))

    loss_plain, grads_plain, calls_plain = one_step(plain)
    loss_ckpt, grads_ckpt, calls_ckpt = one_step(checkpointed)
    # Every student block's MLP runs once more, in backward: its activations were recomputed, not kept.
    assert calls_ckpt == 2 * calls_plain > 0
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=1e-7)
    assert grads_ckpt.keys() == grads_plain.keys() and grads_plain
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_must_be_a_boolean(pretrain_shards, dinov2_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.activation_checkpointing: expected true or false, got 'sometimes'"):
        tiny_config(pretrain_shards, dinov2_dir, tmp_path, "model.activation_checkpointing=sometimes")
