"""Point Prompt Training (Pointcept's PPT-v1m3): CLIP class-name embeddings through transformers, one backbone with
per-dataset classes, and the reference's parameter names.

Its outputs equal the reference's module on the same weights and batch: benchmarks/compare_reference_ppt.py runs
Pointcept's own PPT-v1m3 read-only beside ours (max abs diff 7e-6 on 2026-12-07); tests/data/ppt_head_keys.json is
the non-backbone part of its state dict, written by that script.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer

from concerto_ray.data.collate import collate_semseg
from concerto_ray.data.presets import semseg_train_transform
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.configs import load_finetune_config
from concerto_ray.finetune.ppt import PointPromptTraining
from concerto_ray.model.checkpoint import load_pointcept_state_dict, ray_to_pointcept
from concerto_ray.model.text_encoder import class_text_embeddings, write_random_clip

HEAD_KEYS = Path(__file__).resolve().parent / "data" / "ppt_head_keys.json"
CONDITIONS = ("Structured3D", "ScanNet", "S3DIS")
NAMES = (("wall", "floor", "lamp"), ("wall", "floor", "shower curtain", "toilet"), ("ceiling", "beam"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_random_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_class_embeddings_are_clips_normalised_text_features(clip_dir):
    text = class_text_embeddings(str(clip_dir), NAMES, template="a [x] in a scene")
    model, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    assert text.num_classes == [3, 4, 2] and text.embeddings.shape == (9, model.config.projection_dim)
    with torch.no_grad():  # one prompt at a time: no padding, so batching cannot hide a pooling mistake
        for i, name in enumerate(n for names in NAMES for n in names):
            features = model.get_text_features(**tokenizer([f"a {name} in a scene"], return_tensors="pt"))
            features = features if isinstance(features, torch.Tensor) else features.pooler_output
            torch.testing.assert_close(text.embeddings[i], (features / features.norm())[0], rtol=0, atol=1e-6)
    assert torch.equal(text.logit_scale, model.logit_scale.detach())
    with pytest.raises(ConfigError, match="ppt.clip_model: cannot load"):
        class_text_embeddings(str(clip_dir.parent / "absent"), NAMES)


def _batch(condition: str, classes: int) -> dict:
    rng = np.random.default_rng(0)
    transform = semseg_train_transform(load_finetune_config("semseg-tiny-lin").transform)
    samples = []
    for seed in (1, 2):
        n = 400
        scene = {
            "name": f"s{seed}",
            "coord": rng.uniform(0, 3, size=(n, 3)).astype(np.float32),
            "color": rng.uniform(0, 255, size=(n, 3)).astype(np.float32),
            "normal": rng.normal(size=(n, 3)).astype(np.float32),
            "segment": rng.integers(-1, classes, size=n),
        }
        samples.append(transform(scene, np.random.default_rng(seed)))
    return {**{k: torch.as_tensor(v) for k, v in collate_semseg(samples).items()}, "condition": condition}


def test_one_backbone_segments_each_dataset_in_its_own_classes(clip_dir):
    backbone = load_finetune_config("semseg-tiny-lin").backbone  # encoder only: every level up-cast
    text = class_text_embeddings(str(clip_dir), NAMES)
    torch.manual_seed(0)
    model = PointPromptTraining(backbone, CONDITIONS, text, backbone_out_channels=sum(backbone.enc_channels))
    reference_keys = set(json.loads(HEAD_KEYS.read_text()))
    assert {k for k in model.state_dict() if not k.startswith("backbone.")} == reference_keys
    assert "class_embeddings" not in model.state_dict()  # not saved, as in the reference: rebuilt from CLIP
    for condition, names in zip(CONDITIONS, NAMES):
        out = model(_batch(condition, len(names)))
        assert out["seg_logits"].shape[1] == len(names) and out["loss"].isfinite()
    # Each dataset's logits are its classes' similarities: the ScanNet and Structured3D "wall" columns agree.
    batch = _batch("ScanNet", 2)
    model.eval()
    model.backbone.set_order_shuffling(False)  # two forwards of the same points
    with torch.no_grad():
        scannet, structured = model(batch)["seg_logits"], model({**batch, "condition": "Structured3D"})["seg_logits"]
    torch.testing.assert_close(scannet[:, :2], structured[:, :2])
    assert (scannet.abs() <= text.logit_scale.exp() + 1e-4).all()  # scaled cosine similarities
    model.train()
    out = model(_batch("S3DIS", 2))
    out["loss"].backward()
    assert model.proj_head.weight.grad is not None and model.logit_scale.grad is None
    with pytest.raises(ValueError, match="condition 'HM3D' is not one of"):
        model({**batch, "condition": "HM3D"})

    # A Pointcept PPT checkpoint (module.-prefixed, DDP) loads strictly.
    other = PointPromptTraining(backbone, CONDITIONS, text, backbone_out_channels=sum(backbone.enc_channels))
    load_pointcept_state_dict(other, ray_to_pointcept(model.state_dict()))
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
