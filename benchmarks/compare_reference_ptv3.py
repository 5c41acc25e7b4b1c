"""Check our PT-v3m2 backbone against Pointcept's own code, on CPU.

Usage: python benchmarks/compare_reference_ptv3.py --pointcept /tmp/pointcept [--write-keys FILE]

`--pointcept` is an extracted Pointcept source tree (with `pointcept/models` and `configs/concerto`).
Only PT-v3m2 and its helpers are loaded from it; its other imports get small stand-ins defined here
(addict.Dict, timm's DropPath, torch_scatter.segment_csr, spconv on the Native algorithm, and a
plain-PyTorch flash_attn varlen function for the flash path; `enable_flash=False` runs its own plain path). The script
1. compares serialization codes (all four orders) and the flash-path patch layout exactly;
2. builds the Concerto base and large backbones in both, compares state-dict keys, shapes and
   parameter counts (and with --write-keys saves the base layout as a JSON fact file for the tests);
3. copies a reference state dict into ours (strict) for small configs and compares eval outputs with
   order shuffling off: the plain path must agree to 1e-5; the flash path is compared at bf16
   precision because Pointcept casts qkv to bf16 before flash-attn.
Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import torch

from concerto_ray.model.ptv3 import PointTransformerV3, PTv3Config, patch_layout
from concerto_ray.model.serialization import encode
from concerto_ray.model.sparse import ConvAlgo, spconv

CONFIGS = {
    "base": "pretrain-concerto-v1m1-0-base.py",
    "large": "pretrain-concerto-v1m1-1-large-base.py",
    "large-video": "pretrain-concerto-v1m1-2-large-video.py",
}


# ---------------------------------------------------------------- stand-ins for Pointcept's imports
class AttrDict(dict):
    """addict.Dict as Pointcept uses it: attribute access, nested dicts converted, missing -> empty."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = AttrDict(value) if type(value) is dict else value

    def __missing__(self, key):
        return AttrDict()

    def __getattr__(self, name):
        return self[name]

    def __setattr__(self, name, value):
        self[name] = value


class DropPath(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        assert not self.training, "the comparison runs in eval only"
        return x


def segment_csr(src, indptr, reduce):
    return torch.segment_reduce(src, reduce, offsets=indptr, axis=0)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
    """Attention within each [cu_seqlens[i], cu_seqlens[i+1]) segment, one segment at a time."""
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[start:end].float().unbind(1)  # (L, H, D) each
        attn = torch.einsum("qhd,khd->hqk", q * softmax_scale, k).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", attn, v))
    return torch.cat(out)


class NativeSubMConv3d(spconv.SubMConv3d):
    """spconv's SubMConv3d on the Native algorithm (the only one on CPU); spconv's CPU kernel cannot add
    a bias, so the conv always takes spconv's own add-bias-afterwards branch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, algo=ConvAlgo.Native, **kwargs)

    def forward(self, x):
        return self._conv_forward(
            True, x, self.weight, self.bias, name=self.name, sparse_unique_name=self._sparse_unique_name
        )


def load_reference(root: Path):
    """Import Pointcept's PT-v3m2 module without its package __init__ files (they import everything)."""

    def package(name, path=None):
        module = types.ModuleType(name)
        if path is not None:
            module.__path__ = [str(path)]
        sys.modules[name] = module
        return module

    package("pointcept", root / "pointcept")
    package("pointcept.models", root / "pointcept/models")
    package("pointcept.models.point_transformer_v3", root / "pointcept/models/point_transformer_v3")
    builder = package("pointcept.models.builder")
    builder.MODELS = types.SimpleNamespace(register_module=lambda name=None: lambda cls: cls)
    package("pointcept.engines")
    package("pointcept.engines.hooks").HookBase = object
    package("addict").Dict = AttrDict
    package("timm")
    package("timm.layers").DropPath = DropPath
    package("torch_scatter").segment_csr = segment_csr
    sys.modules["flash_attn"] = None  # whatever is installed, the import fails; the stand-in goes in below
    ref = importlib.import_module("pointcept.models.point_transformer_v3.point_transformer_v3m2_sonata")
    ref.spconv = types.SimpleNamespace(SubMConv3d=NativeSubMConv3d)
    ref.flash_attn = types.SimpleNamespace(flash_attn_varlen_qkvpacked_func=flash_attn_varlen_qkvpacked_func)
    serialization = importlib.import_module("pointcept.models.utils.serialization")
    return ref, serialization


def backbone_config(root: Path, name: str) -> dict:
    namespace: dict = {}
    exec((root / "configs/concerto" / CONFIGS[name]).read_text(), namespace)
    config = dict(namespace["model"]["backbone"])
    config.pop("type")
    return config


# ---------------------------------------------------------------- checks
def check_serialization(ref_serialization) -> list[str]:
    failures = []
    generator = torch.Generator().manual_seed(0)
    for depth in (1, 3, 7, 11, 16):
        grid = torch.randint(0, 1 << depth, (4000, 3), generator=generator)
        batch = torch.randint(0, 4, (4000,), generator=generator)
        for order in ("z", "z-trans", "hilbert", "hilbert-trans"):
            same = torch.equal(encode(grid, batch, depth, order), ref_serialization.encode(grid, batch, depth, order))
            print(f"serialization depth={depth:2d} {order:13s} codes equal: {same}")
            if not same:
                failures.append(f"serialization {order} depth {depth}")
    return failures


def check_patch_layout(ref) -> list[str]:
    """Our layout against Pointcept's flash-path padding for samples longer and shorter than a patch."""
    failures = []
    for counts, k in [([100, 37, 64], 16), ([5, 48, 200], 48), ([1024, 3000, 17], 1024), ([7], 8)]:
        offset = torch.tensor(counts).cumsum(0)
        attn = ref.SerializedAttention(
            channels=8, num_heads=2, patch_size=k, enable_flash=True, upcast_attention=False, upcast_softmax=False
        )
        ref_pad, ref_unpad, cu_seqlens = attn.get_padding_and_inverse(AttrDict(offset=offset))
        pad, unpad, key_valid = patch_layout(offset, k)
        # Pointcept leaves a sample shorter than a patch unpadded; ours pads it to a full, masked patch.
        valid_slots = pad[key_valid.flatten()] if key_valid is not None else pad
        ours_segments = torch.cat(
            [
                torch.zeros(1, dtype=torch.long),
                (key_valid.sum(1) if key_valid is not None else torch.full((len(pad) // k,), k)).cumsum(0),
            ]
        )
        same = (
            torch.equal(valid_slots, ref_pad)
            and torch.equal(ours_segments, cu_seqlens.long())
            and torch.equal(unpad, _compact(ref_unpad, key_valid, k))
        )
        print(f"patch layout counts={counts} patch={k}: equal: {same}")
        if not same:
            failures.append(f"patch layout {counts} {k}")
    return failures


def _compact(ref_unpad, key_valid, k):
    """Map Pointcept's unpadded slot numbers into our fully padded slot numbering."""
    if key_valid is None:
        return ref_unpad
    ours_slot = torch.nonzero(key_valid.flatten()).flatten()
    return ours_slot[ref_unpad]


def check_layouts(ref, root: Path, write_keys: Path | None) -> list[str]:
    failures = []
    for name in CONFIGS:
        config = backbone_config(root, name)
        ref_model = ref.PointTransformerV3(**config)  # on CPU: Pointcept's constructor cannot run on meta
        with torch.device("meta"):
            ours = PointTransformerV3(PTv3Config(**config))
        ref_layout = {k: list(v.shape) for k, v in ref_model.state_dict().items()}
        our_layout = {k: list(v.shape) for k, v in ours.state_dict().items()}
        ref_count = sum(p.numel() for p in ref_model.parameters())
        our_count = sum(p.numel() for p in ours.parameters())
        same = ref_layout == our_layout and ref_count == our_count
        print(
            f"{name}: {len(ref_layout)} state-dict entries, parameters reference={ref_count} ours={our_count}, "
            f"layout equal: {same}"
        )
        if not same:
            failures.append(f"layout {name}")
        if name == "base" and write_keys is not None:
            lines = [f"{json.dumps(key)}: {json.dumps(shape)}" for key, shape in ref_layout.items()]
            write_keys.write_text("{\n" + ",\n".join(lines) + "\n}\n")
            print(f"wrote {write_keys}")
    return failures


def sample_batch(counts, in_channels, span, seed):
    generator = torch.Generator().manual_seed(seed)
    grid, batch = [], []
    for b, n in enumerate(counts):
        cells = torch.randperm(span**3, generator=generator)[:n]  # distinct voxels per sample
        grid.append(torch.stack([cells // span**2, cells // span % span, cells % span], dim=1))
        batch.append(torch.full((n,), b))
    grid_coord = torch.cat(grid)
    n = len(grid_coord)
    return dict(
        feat=torch.randn(n, in_channels, generator=generator),
        grid_coord=grid_coord,
        coord=grid_coord * 0.02 + torch.rand(n, 3, generator=generator) * 0.02,
        grid_size=0.02,
        offset=torch.tensor(counts).cumsum(0),
        mask=torch.rand(n, generator=generator) < 0.3,
    )


def compare_forward(ref, name: str, config: dict, counts, tolerance: float) -> list[str]:
    torch.manual_seed(0)
    ref_model = ref.PointTransformerV3(**config).eval()
    for module in ref_model.modules():  # Pointcept's pooling shuffles unless told not to
        if isinstance(module, ref.GridPooling):
            module.shuffle_orders = False
    ours = PointTransformerV3(PTv3Config(**config, pooling_shuffle_orders=False)).eval()
    with torch.no_grad():  # randomise every tensor so no parameter (layer scale, mask token) is trivial
        for p in ref_model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ours.load_state_dict(ref_model.state_dict(), strict=True)
    data = sample_batch(counts, config["in_channels"], span=24, seed=1)
    with torch.no_grad():
        ref_point = ref_model(dict(data))
        our_point = ours(dict(data))
    worst = 0.0
    level = 0
    while True:  # the output and, in encoder mode, every level up the pooling chain
        if not torch.equal(ref_point.grid_coord.long(), our_point.grid_coord.long()):
            print(f"{name}: level {level} grid coordinates differ")
            return [f"forward {name}"]
        diff = (ref_point.feat - our_point.feat).abs().max().item()
        worst = max(worst, diff)
        print(f"{name}: level {level} ({len(our_point.feat)} points) max abs diff {diff:.3e}")
        if "pooling_parent" not in our_point:
            break
        ref_point, our_point, level = ref_point.pooling_parent, our_point.pooling_parent, level + 1
    ok = worst <= tolerance
    print(f"{name}: max abs diff {worst:.3e} (tolerance {tolerance:g}) -> {'OK' if ok else 'FAIL'}")
    return [] if ok else [f"forward {name}"]


def small_config(**overrides) -> dict:
    config = dict(
        in_channels=6,
        order=("z", "z-trans", "hilbert", "hilbert-trans"),
        stride=(2, 2, 2),
        enc_depths=(2, 2, 2, 2),
        enc_channels=(16, 32, 48, 64),
        enc_num_head=(2, 4, 4, 8),
        enc_patch_size=(32, 32, 32, 32),
        dec_depths=(1, 1, 1),
        dec_channels=(16, 32, 48),
        dec_num_head=(2, 4, 4),
        dec_patch_size=(32, 32, 32),
        shuffle_orders=False,
        mask_token=True,
        drop_path=0.0,
        layer_scale=1e-5,
    )
    config.update(overrides)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pointcept", type=Path, required=True, help="extracted Pointcept source tree")
    parser.add_argument("--write-keys", type=Path, help="save the base backbone's state-dict layout as JSON")
    args = parser.parse_args()
    ref, ref_serialization = load_reference(args.pointcept)

    failures = check_serialization(ref_serialization)
    failures += check_layouts(ref, args.pointcept, args.write_keys)
    counts = [700, 450, 90]  # the last sample becomes shorter than a patch after pooling
    failures += compare_forward(
        ref,
        "plain path, decoder, rpe, upcast",
        small_config(enable_flash=False, enable_rpe=True, upcast_attention=True, upcast_softmax=True, traceable=True),
        counts,
        1e-5,
    )
    failures += compare_forward(
        ref,
        "plain path, encoder only, post-norm",
        small_config(enable_flash=False, enc_mode=True, pre_norm=False),
        counts,
        1e-5,
    )
    failures += check_patch_layout(ref)
    failures += compare_forward(
        ref,
        "flash path (bf16 qkv in Pointcept), encoder only",
        small_config(enable_flash=True, enc_mode=True),
        counts,
        2e-3,
    )
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
