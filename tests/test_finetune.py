"""Semantic segmentation fine-tuning on CPU with the tiny backbone: freezing, LoRA, losses, metrics, the test
protocol, data-efficient settings, checkpoint layouts and configs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from concerto_ray import node_cache
from concerto_ray.config import CONFIG_DIR
from concerto_ray.data.collate import collate_semseg
from concerto_ray.data.presets import (
    SemsegTransformConfig,
    semseg_train_transform,
    semseg_val_transform,
)
from concerto_ray.data.transforms import CenterShift
from concerto_ray.errors import ConfigError, DataError
from concerto_ray.finetune.configs import (
    DataEfficiencyConfig,
    PretrainedConfig,
    finetune_config_names,
    load_finetune_config,
)
from concerto_ray.finetune.data_efficiency import (
    annotation_limiter,
    apply_label_file,
    limit_annotations,
    load_label_file,
    select_scenes,
    training_scenes,
)
from concerto_ray.finetune.evaluate import (
    evaluate,
    evaluate_scene,
    protocol_confusion,
    scene_probabilities,
    validation_confusion,
)
from concerto_ray.finetune.lora import merge_lora
from concerto_ray.finetune.losses import SegmentationLoss, lovasz_softmax
from concerto_ray.finetune.metrics import (
    confusion_matrix,
    per_class_table,
    save_confusion_png,
    segmentation_metrics,
)
from concerto_ray.finetune.run_config import load_finetune_run
from concerto_ray.finetune.segmentor import (
    Segmentor,
    build_segmentor,
    load_pretrained_backbone,
    param_groups,
)
from concerto_ray.finetune.submission import submission_text
from concerto_ray.model.checkpoint import load_pointcept_state_dict, ray_to_pointcept
from concerto_ray.model.configs import get_model_config
from concerto_ray.model.sonata import Sonata

TINY = "semseg-tiny-lin"
KEYS_FILE = Path(__file__).parent / "data" / "ptv3_base_keys.json"  # Pointcept's PT-v3m2 Concerto-base backbone


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny models run far faster on one thread than on threads fighting other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(mode: str = "lin", **changes):
    cfg = load_finetune_config(TINY)
    backbone = cfg.backbone
    if mode in ("dec", "ft"):
        backbone = dataclasses.replace(
            backbone,
            enc_mode=False,
            freeze_encoder=mode == "dec",
            dec_depths=(1, 1, 1, 1),
            dec_channels=(8, 8, 16, 16),
            dec_num_head=(1, 1, 2, 2),
            dec_patch_size=(16, 16, 16, 16),
        )
    return dataclasses.replace(cfg, mode=mode, backbone=backbone, **changes)


def deterministic(model: Segmentor) -> Segmentor:
    model.backbone.set_order_shuffling(False)
    return model


def make_scene(name: str, n: int = 400, seed: int = 0) -> dict:
    """Points in a 1.5 m cube; the class is the quadrant (x, z) a point lies in; every tenth point unlabelled."""
    rng = np.random.default_rng(seed)
    coord = rng.uniform(0.0, 1.5, (n, 3)).astype(np.float32)
    segment = (coord[:, 2] > 0.75).astype(np.int64) + 2 * (coord[:, 0] > 0.75)
    color = (60 * segment[:, None] + rng.integers(0, 40, (n, 3))).astype(np.float32)
    segment[::10] = -1
    normal = np.zeros((n, 3), np.float32)
    normal[:, 2] = 1.0  # every point on a floor
    return {"name": name, "coord": coord, "color": color, "normal": normal, "segment": segment}


def lattice_scene(name: str = "lattice", side: int = 7) -> dict:
    """One point per 2 cm voxel: 5 cm spacing, so test-time voxelisation gives a single fragment."""
    idx = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    coord = (idx * 0.05 + 0.01).astype(np.float32)
    segment = (idx[:, 0] >= side // 2).astype(np.int64)
    color = np.where(segment[:, None] == 1, 200.0, 30.0).repeat(3, axis=1).astype(np.float32)
    normal = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (len(coord), 1))
    return {"name": name, "coord": coord, "color": color, "normal": normal, "segment": segment}


def train_batch(seed: int = 0) -> dict:
    transform = semseg_train_transform(SemsegTransformConfig())
    rng = np.random.default_rng(seed)
    return collate_semseg([transform(make_scene(f"scene{i}", seed=i), rng) for i in range(2)])


def trainable(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_trains_only_the_head_and_the_frozen_backbone_follows_the_model_mode():
    cfg = tiny_config("lin")
    model = build_segmentor(cfg).train()
    head_in = sum(cfg.backbone.enc_channels)
    assert trainable(model) == {"seg_head.weight": head_in * 20, "seg_head.bias": 20}
    # As in the reference, the frozen backbone trains with drop path on; eval() switches it off.
    assert model.training and all(m.training for m in model.backbone.modules())
    assert not any(m.training for m in model.eval().backbone.modules())
    model.train()

    out = model(train_batch())
    out["loss"].backward()
    assert out["seg_logits"].shape[1] == 20
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.seg_head.weight.grad.abs().sum() > 0
    assert [(g["name"], g["lr"]) for g in param_groups(model, cfg)] == [("default", cfg.lr)]


def test_linear_probe_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = deterministic(build_segmentor(tiny_config("lin"))).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    batch = train_batch()
    losses = []
    for _ in range(8):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_decoder_modes_train_the_decoder_and_split_learning_rates():
    dec = build_segmentor(tiny_config("dec"))
    names = trainable(dec)
    assert any(n.startswith("backbone.dec.") for n in names) and "seg_head.weight" in names
    assert not any(n.startswith(("backbone.enc.", "backbone.embedding.")) for n in names)
    ft = build_segmentor(tiny_config("ft"))
    assert set(trainable(ft)) == {n for n, _ in ft.named_parameters()}
    groups = {g["name"]: g for g in param_groups(ft, tiny_config("ft"))}
    block = {id(p) for p in groups["block"]["params"]}
    for name, param in ft.named_parameters():
        assert (id(param) in block) == ("block" in name)
    assert groups["block"]["lr"] == tiny_config("ft").block_lr and groups["default"]["lr"] == tiny_config("ft").lr
    assert groups["block"]["lr"] != groups["default"]["lr"]


# ------------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_adapters_and_head_only_and_merges_exactly():
    cfg = tiny_config("lora")
    model = deterministic(build_segmentor(cfg))
    r, c = cfg.lora.r, cfg.backbone.enc_channels
    # Each qkv Linear(c, 3c) gets A: (r, c) and B: (3c, r).
    adapters = sum(depth * (r * ch + 3 * ch * r) for depth, ch in zip(cfg.backbone.enc_depths, c))
    counts = trainable(model)
    assert sum(v for k, v in counts.items() if "lora_" in k) == adapters
    assert sum(counts.values()) == adapters + sum(c) * 20 + 20
    assert all("lora_" in k or k.startswith("seg_head.") for k in counts)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    model(train_batch())["loss"].backward()
    optimizer.step()
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())

    model.eval()
    batch = train_batch(seed=1)
    with torch.no_grad():
        adapted = model(batch)["seg_logits"]
        merge_lora(model)
        merged = model(batch)["seg_logits"]
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    plain = Segmentor(cfg.backbone, cfg.num_classes)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


# ----------------------------------------------------------------------------------------------------- losses


def test_losses_ignore_unlabelled_points():
    torch.manual_seed(0)
    logits = torch.randn(50, 4, requires_grad=True)
    target = torch.randint(0, 4, (50,))
    target[::3] = -1
    loss = SegmentationLoss(ignore_index=-1)
    changed = logits.detach().clone()
    changed[::3] = 100 * torch.randn(17, 4)
    assert torch.allclose(loss(logits, target), loss(changed, target))
    # Uniform scores: each present class is wrong by 1 - 1/K at every one of its points.
    assert lovasz_softmax(torch.zeros(6, 4), torch.tensor([0, 0, 1, 2, 2, -1])).item() == pytest.approx(0.75)
    assert lovasz_softmax(20 * torch.eye(3), torch.tensor([0, 1, 2])).item() < 1e-6
    empty = loss(logits, torch.full((50,), -1))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def lovasz_one_class_at_a_time(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Berman et al.'s Lovasz-softmax written per class, as a reference for the vectorised loss."""
    probs = logits.softmax(dim=1)
    losses = []
    for c in target.unique():
        foreground = (target == c).float()
        errors, order = torch.sort((foreground - probs[:, c]).abs(), descending=True)
        fg = foreground[order]
        iou_loss = 1 - (fg.sum() - fg.cumsum(0)) / (fg.sum() + (1 - fg).cumsum(0))
        losses.append(torch.dot(errors, torch.diff(iou_loss, prepend=iou_loss.new_zeros(1))))
    return torch.stack(losses).mean()


def test_lovasz_over_all_classes_at_once_equals_the_per_class_loss():
    gen = torch.Generator().manual_seed(0)
    for num_points, num_classes in ((1, 3), (40, 2), (500, 13)):
        logits = torch.randn(num_points, num_classes, generator=gen) * 3
        target = torch.randint(0, num_classes, (num_points,), generator=gen)
        torch.testing.assert_close(
            lovasz_softmax(logits, target), lovasz_one_class_at_a_time(logits, target), rtol=0, atol=1e-6
        )


# ---------------------------------------------------------------------------------------------------- metrics


def test_metrics_from_a_hand_made_confusion_matrix(tmp_path):
    target = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -1, -1])
    pred = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 2, 7])  # the ignored points' predictions must not count
    confusion = confusion_matrix(pred, target, num_classes=3)
    assert confusion.tolist() == [[3, 1, 0], [2, 4, 0], [0, 0, 0]]
    m = segmentation_metrics(confusion)
    # class 0: I=3, U=4+5-3=6; class 1: I=4, U=6+5-4=7; class 2 absent: 0, counted in the means like Pointcept.
    assert m.iou.tolist() == pytest.approx([3 / 6, 4 / 7, 0.0])
    assert m.miou == pytest.approx((3 / 6 + 4 / 7) / 3)
    assert m.macc == pytest.approx((3 / 4 + 4 / 6) / 3)
    assert m.all_acc == pytest.approx(7 / 10)
    table = per_class_table(m, ["wall", "floor", "chair"])
    assert "floor" in table and "0.5714" in table and f"mIoU {m.miou:.4f}" in table
    png = save_confusion_png(confusion, ["wall", "floor", "chair"], tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="outside"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), num_classes=3)


# ---------------------------------------------------------------------------------------------- test protocol


def test_fragment_voting_equals_a_direct_forward_for_one_fragment_without_augmentation():
    cfg = tiny_config("lin", transform=SemsegTransformConfig(test_rotations=(0.0,), test_scales=(), test_flip=False))
    model = deterministic(build_segmentor(cfg)).eval()
    scene = lattice_scene()
    votes, _ = scene_probabilities(model, scene, cfg)

    sample = semseg_val_transform(cfg.transform)(scene, np.random.default_rng(0))
    assert len(sample["coord"]) == len(scene["coord"])  # one point per voxel: a single fragment
    with torch.no_grad():
        logits = model(collate_semseg([sample]))["seg_logits"]
    direct = logits.softmax(dim=-1)[torch.from_numpy(sample["inverse"])]
    torch.testing.assert_close(votes, direct, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(evaluate_scene(model, scene, cfg), direct.argmax(dim=1).numpy())


def test_fragment_voting_covers_every_point_of_every_pass():
    cfg = tiny_config("lin", transform=SemsegTransformConfig(test_rotations=(0.0, 1.0), test_scales=(1.05,)))
    passes = 2 * 2 + 1  # each rotation unscaled and scaled, then the flip
    model = deterministic(build_segmentor(cfg)).train()
    scene = make_scene("dense", n=300)
    scene["coord"] = np.concatenate([scene["coord"], scene["coord"] + 0.001])  # several points per voxel
    scene = {**scene, **{k: np.concatenate([scene[k], scene[k]]) for k in ("color", "normal", "segment")}}
    votes, _ = scene_probabilities(model, scene, cfg)
    assert votes.shape == (600, 20)
    # Softmax rows sum to 1: every point is voted on at least once per pass.
    assert torch.all(votes.sum(dim=1) >= passes - 1e-4)
    metrics = evaluate(model, [scene], cfg)
    assert metrics.confusion.sum() == int((scene["segment"] != -1).sum())
    assert model.training  # evaluation gives the model back in the mode it found it in


def test_test_protocol_presamples_the_scene_and_scores_every_raw_point():
    """ScanNet++ / S3DIS: the scene is voxelised at 0.01 first; votes are cast on those points and every raw point
    takes its voxel's prediction, scored against its own raw label."""
    transform = SemsegTransformConfig(
        test_rotations=(0.0,), test_scales=(), test_flip=False, test_presample_grid_size=0.01
    )
    cfg = tiny_config("lin", transform=transform)
    model = deterministic(build_segmentor(cfg)).eval()
    scene = make_scene("dense", n=300)
    # every point twice, 1 mm apart: the pre-sampling keeps one point per occupied 1 cm voxel
    scene = {
        **scene,
        **{k: np.concatenate([scene[k], scene[k]]) for k in ("color", "normal", "segment")},
        "coord": np.concatenate([scene["coord"], scene["coord"] + 0.001]),
    }
    shifted = CenterShift(apply_z=True)(scene, np.random.default_rng(0))["coord"]
    voxels = len(np.unique(np.floor(shifted / 0.01), axis=0))
    votes, sample = scene_probabilities(model, scene, cfg)
    assert 300 < voxels < 600 and len(votes) == voxels and len(sample["inverse"]) == 600
    np.testing.assert_array_equal(sample["origin_segment"], scene["segment"])
    pred = evaluate_scene(model, scene, cfg)
    assert pred.shape == (600,)
    np.testing.assert_array_equal(pred, votes.argmax(dim=1).numpy()[sample["inverse"]])
    assert evaluate(model, [scene], cfg).confusion.sum() == int((scene["segment"] != -1).sum())
    # the pre-sampling is part of the protocol: without it, votes are cast on all 600 points
    raw_votes, _ = scene_probabilities(
        model, scene, tiny_config("lin", transform=dataclasses.replace(transform, test_presample_grid_size=None))
    )
    assert len(raw_votes) == 600


def test_submission_files_rank_every_raw_point_in_the_benchmarks_format():
    assert submission_text("scannet", np.array([[0], [19]])) == "1\n39\n"  # ScanNet's label ids, not class indices
    assert submission_text("scannet200", np.array([[199]])) == "1191\n"
    assert submission_text("scannetpp", np.array([[2, 0, 1], [5, 4, 3]])) == "2,0,1\n5,4,3\n"  # top 3, best first
    with pytest.raises(ValueError, match=r"expected \(points, 3\) class indices"):
        submission_text("scannetpp", np.array([[0], [1]]))
    cfg = dataclasses.replace(tiny_config("lin"), dataset="scannetpp")
    model = deterministic(build_segmentor(cfg)).eval()
    scene = make_scene("scene0", n=300)
    written = {}
    confusion = protocol_confusion(model, [scene], cfg, write_submission=written.__setitem__)
    top3 = np.loadtxt(io.StringIO(written["scene0"]), delimiter=",", dtype=np.int64)
    assert top3.shape == (300, 3)
    np.testing.assert_array_equal(top3[:, 0], evaluate_scene(model, scene, cfg))
    votes, sample = scene_probabilities(model, scene, cfg)
    votes = votes.numpy()[sample["inverse"]] if "inverse" in sample else votes.numpy()
    ranked_votes = np.take_along_axis(votes, top3, axis=1)
    assert (np.diff(ranked_votes, axis=1) <= 0).all()  # most likely first
    assert (ranked_votes[:, 2] >= np.sort(votes, axis=1)[:, -3]).all()  # and these are the three most likely
    np.testing.assert_array_equal(confusion, evaluate(model, [scene], cfg).confusion)  # scored on the first


def test_validation_pass_scores_every_raw_point_through_the_inverse_mapping():
    cfg = tiny_config("lin")
    model = deterministic(build_segmentor(cfg)).train()
    scenes = [make_scene(f"scene{i}", n=400, seed=i) for i in range(2)]
    samples = [semseg_val_transform(cfg.transform)(scene, np.random.default_rng(0)) for scene in scenes]
    confusion = validation_confusion(model, samples, cfg)
    assert model.training  # given back in the mode it was found in
    assert confusion.sum() == sum(int((scene["segment"] != -1).sum()) for scene in scenes)
    expected = np.zeros_like(confusion)
    model.eval()
    for scene, sample in zip(scenes, samples):
        inputs = {k: v for k, v in sample.items() if k not in ("segment", "origin_segment", "inverse")}
        with torch.no_grad():
            pred = model(collate_semseg([inputs]))["seg_logits"].argmax(dim=1).numpy()[sample["inverse"]]
        expected += confusion_matrix(pred, scene["segment"], cfg.num_classes)
    np.testing.assert_array_equal(confusion, expected)


# --------------------------------------------------------------------------------------------- data efficiency


def test_limited_annotations_keep_exactly_n_points_reproducibly(tmp_path):
    scene = make_scene("scene0001_00", n=500)
    labelled = int((scene["segment"] != -1).sum())
    for budget in (20, 200, 10_000):
        limited = limit_annotations(scene, budget, seed=3)
        kept = np.flatnonzero(limited["segment"] != -1)
        assert len(kept) == min(budget, labelled)
        assert np.array_equal(limited["segment"][kept], scene["segment"][kept])
    again = annotation_limiter(DataEfficiencyConfig(label_budget=50, seed=3))(scene)
    assert np.array_equal(again["segment"], limit_annotations(scene, 50, seed=3)["segment"])
    other = limit_annotations({**scene, "name": "scene0002_00"}, 50, seed=3)
    assert not np.array_equal(other["segment"], again["segment"])

    index = np.array([0, 5, 11, 42])  # point 0 is unlabelled: the reference keeps it as it is
    torch.save({"scene0001_00": index}, tmp_path / "points4")
    from_file = annotation_limiter(DataEfficiencyConfig(label_file=str(tmp_path / "points4")))(scene)
    assert np.array_equal(np.flatnonzero(from_file["segment"] != -1), [5, 11, 42])
    with pytest.raises(DataError, match="scene0009_00"):
        apply_label_file({**scene, "name": "scene0009_00"}, load_label_file(tmp_path / "points4"))


def test_limited_reconstructions_pick_the_share_of_scenes_reproducibly(tmp_path):
    scenes = [f"scene{i:04d}_00" for i in range(200)]
    for percent, count in ((1, 2), (5, 10), (10, 20), (20, 40)):
        chosen = select_scenes(scenes, percent, seed=0)
        assert len(chosen) == count and set(chosen) <= set(scenes)
        assert chosen == select_scenes(list(reversed(scenes)), percent, seed=0)[::-1]
    assert select_scenes(scenes, 5, seed=0) != select_scenes(scenes, 5, seed=1)
    assert len(select_scenes(scenes[:30], 1, seed=0)) == 1

    (tmp_path / "5.txt").write_text("scene0003_00\nscene0150_00\n")
    cfg = DataEfficiencyConfig(scene_list_file=str(tmp_path / "5.txt"))
    assert training_scenes(scenes, cfg) == ["scene0003_00", "scene0150_00"]
    with pytest.raises(DataError, match="not in the training split"):
        training_scenes(scenes[:100], cfg)


# ----------------------------------------------------------------------------------------- checkpoint layouts


def test_pointcept_semseg_state_dict_loads_strictly():
    expected = {
        f"backbone.{k}": v for k, v in json.loads(KEYS_FILE.read_text()).items() if k != "embedding.mask_token"
    }  # the semseg configs build the backbone without mask token
    expected.update({"seg_head.weight": [20, 1232], "seg_head.bias": [20]})
    cfg = load_finetune_config("semseg-ptv3-base-v1m1-0a-scannet-lin")
    with torch.device("meta"):
        model = build_segmentor(cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected

    for mode in ("lin", "ft", "lora"):
        cfg = tiny_config(mode)
        source, target = deterministic(build_segmentor(cfg)).eval(), deterministic(build_segmentor(cfg)).eval()
        load_pointcept_state_dict(target, ray_to_pointcept(source.state_dict()))  # "module." keys, strict
        batch = train_batch()
        with torch.no_grad():
            torch.testing.assert_close(target(batch)["seg_logits"], source(batch)["seg_logits"])


@pytest.mark.parametrize("layout", ["concerto-ray", "pointcept"])
def test_pretrained_backbone_loads_from_a_pretraining_checkpoint(tmp_path, layout):
    sonata = Sonata(get_model_config("tiny-sonata"))
    state = sonata.state_dict()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": ray_to_pointcept(state) if layout == "pointcept" else state}, path)

    cfg = tiny_config("ft", pretrained=PretrainedConfig(path=str(tmp_path)))  # a checkpoint folder
    model = build_segmentor(cfg)
    student = {k.removeprefix("student.backbone."): v for k, v in state.items() if k.startswith("student.backbone.")}
    for key, value in model.backbone.state_dict().items():
        if not key.startswith("dec."):
            assert torch.equal(value, student[key]), key
    result = load_pretrained_backbone(model, path)
    assert result.ignored == ["embedding.mask_token"]
    assert result.new and all(k.startswith("dec.") for k in result.new)
    with pytest.raises(ConfigError, match="no key becomes 'backbone"):
        load_pretrained_backbone(model, path, keyword="module.nothing", replacement="module.nothing")


def test_pretrained_backbone_loads_from_s3_once_per_node(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    sonata = Sonata(get_model_config("tiny-sonata"))
    buffer = io.BytesIO()
    torch.save({"state_dict": sonata.state_dict()}, buffer)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    s3.put_object(Bucket=s3_server.bucket, Key="pretrain/run/step-00000004/model.pt", Body=buffer.getvalue())
    folder = f"s3://{s3_server.bucket}/pretrain/run/step-00000004"

    for path in (folder, f"{folder}/model.pt"):  # a checkpoint folder or the file itself
        model = build_segmentor(tiny_config("lin", pretrained=PretrainedConfig(path=path)), s3_server.endpoint_url)
        expected = sonata.student.backbone.state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in model.backbone.state_dict().items())
    # Both names are one file, downloaded once into the node's cache; later loads on the node read that copy.
    cached = [p for p in (tmp_path / "cache").iterdir() if p.name.endswith("-model.pt")]
    assert len(cached) == 1 and cached[0].read_bytes() == buffer.getvalue()
    s3.delete_object(Bucket=s3_server.bucket, Key="pretrain/run/step-00000004/model.pt")
    s3.put_object(Bucket=s3_server.bucket, Key="pretrain/run/step-00000004/model.pt", Body=b"")  # still located
    build_segmentor(tiny_config("lin", pretrained=PretrainedConfig(path=folder)), s3_server.endpoint_url)
    with pytest.raises(ConfigError, match=f"pre-trained checkpoint not found: {folder}-missing/model.pt"):
        build_segmentor(
            tiny_config("lin", pretrained=PretrainedConfig(path=f"{folder}-missing/model.pt")), s3_server.endpoint_url
        )


# ------------------------------------------------------------------------------------------------------ configs


def test_config_names_resolve_and_bad_input_is_named(tmp_path):
    names = finetune_config_names()
    for name in (
        "semseg-ptv3-base-v1m1-0a-scannet-lin",
        "semseg-ptv3-large-v1m1-0f-scannet-ft-lora",
        "semseg-ptv3-large-v1m1-0e0-scannet-ft-la20",
        "semseg-ptv3-large-v1m1-0e15-scannet-ft-lora-lr20",
        "semseg-ptv3-large-v1m1-3e-s3dis-ft-lora",
        TINY,
    ):
        assert name in names
    configs = {name: load_finetune_config(name) for name in names}
    assert configs["semseg-ptv3-large-v1m1-0e15-scannet-ft-lora-lr20"].data_efficiency.scene_percent == 20
    assert configs["semseg-ptv3-large-v1m1-0e1-scannet-ft-la50"].data_efficiency.label_budget == 50
    assert {c.mode for c in configs.values()} == {"lin", "dec", "ft", "lora"}
    assert {c.dataset for c in configs.values()} == {"scannet", "scannet200", "scannetpp", "s3dis"}

    with pytest.raises(ConfigError, match="did you mean 'semseg-ptv3-base-v1m1-0a-scannet-lin'"):
        load_finetune_config("semseg-ptv3-base-v1m1-0a-scannet-lim")
    tiny_yaml = (CONFIG_DIR / f"{TINY}.yaml").read_text()
    for old, new, message in (
        ("mode: lin", "mode: linear", "mode: 'linear' is not one of"),
        ("lr: 0.05", "lr: fast", "lr: expected a number"),
        ("enc_mode: true", "enc_mode: false", "mode 'lin' needs backbone.enc_mode=True"),
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(tiny_yaml.replace(old, new, 1))
        with pytest.raises(ConfigError, match=message):
            load_finetune_config(bad)


def test_submit_configs_test_the_last_round_on_the_test_split_and_evaluation_and_input_settings_are_checked(tmp_path):
    cfg = load_finetune_config("semseg-ptv3-large-v1m1-2f-scannetpp-ppt-submit")
    assert (cfg.evaluate, cfg.test_last, cfg.submission) == (False, True, True)
    assert (cfg.val_split, cfg.test_splits) == ((), ("test",))
    assert load_finetune_config(TINY).test_splits == ("val",)  # no test_split: the reference's data.test is val
    base = {"data.shards": str(tmp_path), "run.name": "x", "run.storage_path": str(tmp_path)}
    colourless = load_finetune_run(
        TINY, {**base, "transform.feat_keys": ["coord", "normal"], "backbone.in_channels": 6}
    )
    assert build_segmentor(colourless.finetune).backbone.embedding.stem.linear.in_features == 6
    for overrides, message in (
        ({"evaluate": False}, r"val_split \['val'\]: evaluate is false, so nothing is validated"),
        ({"evaluate": False, "val_split": []}, "evaluate: false leaves no best round to test: set test_last: true"),
        ({"val_split": []}, "val_split: list the splits to validate on, or set evaluate: false"),
        ({"dataset": "s3dis", "submission": True}, "submission: s3dis has no benchmark file format"),
        (
            {"transform.feat_keys": ["coord", "color"]},
            r"transform.feat_keys \['coord', 'color'\] make 6 input channels but backbone.in_channels is 9",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            load_finetune_run(TINY, {**base, **overrides})


def test_class_count_and_ignore_index_overrides_reach_the_label_check(tmp_path):
    # The transform's label check follows the config's num_classes and ignore_index: overriding those is enough.
    base = {"data.shards": str(tmp_path), "run.name": "x", "run.storage_path": str(tmp_path)}
    names = [f"class{i}" for i in range(13)]
    run = load_finetune_run(TINY, {**base, "num_classes": 13, "class_names": names, "ignore_index": 255})
    transform = run.finetune.transform
    assert (transform.num_classes, transform.ignore_index) == (13, 255)
    scene = {
        "name": "s",
        "coord": np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32),
        "color": np.zeros((50, 3), np.float32),
        "normal": np.zeros((50, 3), np.float32),
        "segment": np.where(np.arange(50) % 5 == 0, 255, np.arange(50) % 13),
    }
    assert len(semseg_val_transform(transform)(scene, np.random.default_rng(0))["segment"]) > 0
    with pytest.raises(DataError, match=r"label 13 is out of range.*255 \(ignored\) or 0\.\.12"):
        semseg_val_transform(transform)({**scene, "segment": np.full(50, 13)}, np.random.default_rng(0))
    with pytest.raises(DataError, match=r"label -1 is out of range"):  # -1 is no longer the ignore label
        semseg_val_transform(transform)({**scene, "segment": np.full(50, -1)}, np.random.default_rng(0))
