"""Point Transformer V3 backbone: layout compatibility with Pointcept, serialization, pooling, errors.

Numerical equivalence with Pointcept's own code is checked by benchmarks/compare_reference_ptv3.py
(it needs a Pointcept source tree, so it is not part of the tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from concerto_ray.errors import DataError
from concerto_ray.model.ptv3 import GridPooling, GridUnpooling, PointTransformerV3, PTv3Config, patch_layout
from concerto_ray.model.serialization import encode, hilbert_code, z_order_code
from concerto_ray.model.sparse import SparseConvTensor, SubMConv3d
from concerto_ray.model.structure import Point

ALL_ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")
# Backbone dicts of Pointcept's configs/concerto/pretrain-concerto-v1m1-{0-base,1-large-base}.py
# (the large-video config uses the same backbone as large-base).
CONCERTO_BASE = dict(
    in_channels=9,
    order=ALL_ORDERS,
    stride=(2, 2, 2, 2),
    enc_depths=(3, 3, 3, 12, 3),
    enc_channels=(48, 96, 192, 384, 512),
    enc_num_head=(3, 6, 12, 24, 32),
    enc_patch_size=(1024,) * 5,
    mlp_ratio=4,
    enc_mode=True,
    traceable=True,
    mask_token=True,
)
CONCERTO_LARGE = dict(CONCERTO_BASE, enc_channels=(64, 128, 256, 512, 768), enc_num_head=(4, 8, 16, 32, 48))
# Parameter counts from instantiating Pointcept's PT-v3m2 (its own code, CPU) with those two backbone
# dicts on 2026-11-25 (benchmarks/compare_reference_ptv3.py prints them).
REFERENCE_PARAMS = {"base": 108_461_376, "large": 207_667_456}
KEYS_FILE = Path(__file__).parent / "data" / "ptv3_base_keys.json"


def tiny_config(**overrides) -> PTv3Config:
    config = dict(
        in_channels=6,
        order=ALL_ORDERS,
        stride=(2, 2),
        enc_depths=(1, 1, 1),
        enc_channels=(8, 16, 16),
        enc_num_head=(2, 2, 2),
        enc_patch_size=(16, 16, 16),
        dec_depths=(1, 1),
        dec_channels=(8, 16),
        dec_num_head=(2, 2),
        dec_patch_size=(16, 16),
        drop_path=0.0,
        shuffle_orders=False,
        pooling_shuffle_orders=False,
    )
    config.update(overrides)
    return PTv3Config(**config)


def make_batch(counts, in_channels=6, span=12, seed=0) -> dict:
    """Samples of distinct voxels in a span^3 cube, packed with an offset."""
    generator = torch.Generator().manual_seed(seed)
    grids = []
    for n in counts:
        cells = torch.randperm(span**3, generator=generator)[:n]
        grids.append(torch.stack([cells // span**2, cells // span % span, cells % span], dim=1))
    grid_coord = torch.cat(grids)
    return dict(
        feat=torch.randn(len(grid_coord), in_channels, generator=generator),
        grid_coord=grid_coord,
        coord=grid_coord * 0.05,
        grid_size=0.05,
        offset=torch.tensor(counts).cumsum(0),
    )


def build(config: PTv3Config) -> PointTransformerV3:
    torch.manual_seed(0)
    return PointTransformerV3(config)


# ---------------------------------------------------------------- checkpoint layout
def test_state_dict_layout_matches_pointcept_base_and_loads_strictly():
    expected = json.loads(KEYS_FILE.read_text())
    with torch.device("meta"):
        model = PointTransformerV3(PTv3Config(**CONCERTO_BASE))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected
    state = {key: torch.empty(shape, device="meta") for key, shape in expected.items()}
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("name, config", [("base", CONCERTO_BASE), ("large", CONCERTO_LARGE)])
def test_parameter_count_equals_pointcept(name, config):
    with torch.device("meta"):
        model = PointTransformerV3(PTv3Config(**config))
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


# ---------------------------------------------------------------- serialization
def test_z_order_known_values():
    grid = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [2, 0, 0], [0, 0, 2], [3, 5, 6]])
    # x bits go to 3i+2, y to 3i+1, z to 3i; (3,5,6): x=011 y=101 z=110 -> triples (x,y,z) per bit level
    # level2: 0 1 1, level1: 1 0 1, level0: 1 1 0 -> 0b011_101_110
    assert z_order_code(grid, depth=3).tolist() == [4, 2, 1, 7, 32, 8, 0b011101110]


def test_hilbert_known_values_on_2x2x2():
    # On a 2x2x2 cube the Hilbert curve is the 3-bit Gray code read as (x, y, z).
    path = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 0)]
    assert hilbert_code(torch.tensor(path), depth=1).tolist() == list(range(8))


@pytest.mark.parametrize("order", ALL_ORDERS)
def test_codes_are_bijective_on_a_grid(order):
    depth = 3
    axis = torch.arange(1 << depth)
    grid = torch.cartesian_prod(axis, axis, axis)
    code = encode(grid, None, depth, order)
    assert sorted(code.tolist()) == list(range(8**depth))


def test_hilbert_neighbours_in_code_are_neighbours_in_space():
    depth = 3
    axis = torch.arange(1 << depth)
    grid = torch.cartesian_prod(axis, axis, axis)
    walk = grid[torch.argsort(hilbert_code(grid, depth))]
    steps = (walk[1:] - walk[:-1]).abs().sum(1)
    assert torch.all(steps == 1)


def test_batch_index_sits_above_coordinate_bits():
    grid = torch.tensor([[7, 7, 7], [0, 0, 0]])
    code = encode(grid, torch.tensor([0, 1]), depth=3, order="hilbert")
    assert code[1] == 1 << 9 and code[0] < code[1]


def test_serialization_order_and_inverse_are_permutations():
    point = Point(make_batch([40, 25]))
    point.serialization(order=ALL_ORDERS)
    n = len(point.feat)
    for order, inverse, code in zip(point.serialized_order, point.serialized_inverse, point.serialized_code):
        assert torch.equal(order[inverse], torch.arange(n))
        assert torch.all(code[order][1:] >= code[order][:-1])
        assert torch.equal(point.batch[order], point.batch)  # samples stay contiguous


# ---------------------------------------------------------------- patches, sparse conv
def test_patch_layout_covers_every_point_once():
    offset = torch.tensor([5, 45, 90])  # sample sizes 5 (short), 40, 45 with patch 16
    pad, unpad, key_valid = patch_layout(offset, 16)
    assert len(pad) == 16 * (1 + 3 + 3)
    assert torch.equal(pad[unpad], torch.arange(90))
    assert key_valid is not None and key_valid.sum(1).tolist() == [5] + [16] * 6
    # the tail of sample 2's last patch repeats the previous patch's points, so it stays in the sample
    assert torch.all((pad[-16:] >= 45) & (pad[-16:] < 90))


def test_submconv_matches_direct_neighbourhood_sum_and_runs_fp32_under_autocast():
    torch.manual_seed(0)
    conv = SubMConv3d(3, 4, kernel_size=3, bias=True).eval()
    torch.nn.init.normal_(conv.bias)
    grid = torch.tensor([[1, 1, 1], [1, 1, 2], [2, 1, 1], [1, 0, 1], [4, 4, 4]])
    feat = torch.randn(5, 3)
    tensor = SparseConvTensor(feat, torch.cat([torch.zeros(5, 1, dtype=torch.int32), grid.int()], 1), [8, 8, 8], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(tensor).features
    assert out.dtype == torch.float32
    expected = conv.bias.expand(5, 4).clone()
    for i in range(5):
        for j in range(5):
            d = grid[j] - grid[i] + 1
            if torch.all((d >= 0) & (d <= 2)):
                expected[i] += conv.weight[:, d[0], d[1], d[2], :] @ feat[j]
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- pooling
def test_pooling_then_unpooling_round_trip():
    point = Point(make_batch([60, 30]))
    point.feat = torch.randn(90, 8)
    point.serialization(order=("z",))
    point.sparsify()
    pool = GridPooling(8, 16, stride=2, shuffle_orders=False)
    pooled = pool(point)
    inverse = pooled.pooling_inverse
    assert torch.equal(pooled.grid_coord[inverse], torch.div(point.grid_coord, 2, rounding_mode="floor"))
    assert torch.equal(pooled.batch[inverse], point.batch)
    members = torch.zeros(len(pooled.feat), 3).index_add_(0, inverse, point.coord)
    sizes = torch.bincount(inverse).unsqueeze(1)
    torch.testing.assert_close(pooled.coord, members / sizes)
    assert torch.equal(pooled.idx_ptr[1:] - pooled.idx_ptr[:-1], sizes.flatten())
    assert pooled.grid_size == pytest.approx(0.1) and pooled.feat.shape == (len(sizes), 16)

    unpool = GridUnpooling(16, 8, 8)
    restored = unpool(pooled)
    assert restored is point and restored.feat.shape == (90, 8)
    assert torch.equal(restored.sparse_conv_feat.features, restored.feat)


# ---------------------------------------------------------------- backbone
def test_encoder_and_decoder_output_shapes():
    data = make_batch([80, 50])
    decoder = build(tiny_config()).eval()
    out = decoder(data)
    assert out.feat.shape == (130, 8) and torch.equal(out.grid_coord, data["grid_coord"])
    encoder = build(tiny_config(enc_mode=True)).eval()
    coarse = encoder(data)
    assert coarse.feat.shape[1] == 16 and len(coarse.feat) < 130
    assert coarse.offset.shape == (2,) and coarse.pooling_parent.pooling_parent.feat.shape == (130, 8)


def test_eval_is_deterministic_only_with_shuffling_off():
    data = make_batch([80, 50])
    model = build(tiny_config(shuffle_orders=True, pooling_shuffle_orders=True)).eval()
    model.set_order_shuffling(False)
    first, second = model(data).feat, model(data).feat
    assert torch.equal(first, second)
    model.set_order_shuffling(True)
    shuffled = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        shuffled.append(model(data).feat)
    assert not torch.allclose(shuffled[0], shuffled[1])


def test_flash_mode_samples_do_not_influence_each_other():
    # With enable_flash, patches never mix samples and their size does not depend on the batch.
    model = build(tiny_config(enable_flash=True, enable_rpe=True)).eval()
    both = make_batch([80, 10])
    alone = {k: v[:80] if k in ("feat", "grid_coord", "coord") else v for k, v in both.items()}
    alone["offset"] = torch.tensor([80])
    torch.testing.assert_close(model(both).feat[:80], model(alone).feat, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = build(tiny_config(enable_rpe=True, layer_scale=0.1, mask_token=True)).train()
    data = make_batch([70, 40])
    data["mask"] = torch.arange(110) % 3 == 0
    model(data).feat.square().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_activation_checkpointing_keeps_outputs_and_gradients_and_saves_fewer_tensors():
    # Drop path on: the recomputation must draw the same rows as the first pass.
    model = build(tiny_config(drop_path=0.5)).train()
    data = make_batch([70, 40])
    results = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        saved = []

        def pack(tensor, saved=saved):
            saved.append(tensor.numel())
            return tensor

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(dict(data)).feat
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()], sum(saved)))
    (out_plain, grads_plain, saved_plain), (out_ckpt, grads_ckpt, saved_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain)
    for plain, ckpt in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(ckpt, plain)
    assert saved_ckpt < saved_plain / 2


def test_freeze_encoder_leaves_only_decoder_trainable():
    model = build(tiny_config(freeze_encoder=True))
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dec"}


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.update(feat=torch.randn(90, 5)), "feat"),
        (lambda d: d.update(offset=torch.tensor([50, 80])), "offset"),
        (lambda d: d.update(offset=torch.tensor([50, 50, 90])), "offset"),
        (lambda d: d.update(offset=torch.tensor([60, 30])), "offset"),
        (lambda d: d.update(batch=torch.arange(90) % 2), "batch"),
        (lambda d: d.update(mask=torch.ones(90, dtype=torch.bool)), "mask"),
    ],
)
def test_bad_input_raises_naming_the_field(change, field):
    data = make_batch([50, 40])
    change(data)
    model = build(tiny_config(enc_mode=True)).eval()
    with pytest.raises(DataError) as error:
        model(data)
    assert error.value.field == field


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="enc_channels"):
        PTv3Config(
            enc_depths=(1, 1), enc_channels=(8,), enc_num_head=(2,), enc_patch_size=(16, 16), stride=(2,), enc_mode=True
        )
    with pytest.raises(ValueError, match="order"):
        PTv3Config(order=("z", "peano"))
