"""Check our Point Prompt Training model against Pointcept's own `PPT-v1m3`, on CPU.

Usage: PYTHONPATH=. python benchmarks/compare_reference_ppt.py --pointcept /tmp/pointcept [--write-keys FILE]

`--pointcept` is an extracted Pointcept source tree. Its PT-v3m2 backbone is loaded as
`compare_reference_ptv3.py` loads it; its PPT-v1m3 module then gets two more stand-ins: `pointcept.models.losses`
(the criteria, unused here) and OpenAI's `clip` package, which the reference calls for `clip.load`,
`clip.tokenize`, `encode_text`, `text_projection` and `logit_scale`. The stand-in serves these from the same
`transformers` CLIP (a random tiny one written by `text_encoder.write_random_clip`), so the check covers everything
after the text tower: the class-embedding layout and normalisation, the projection head, the feature
normalisation, the per-condition similarity and its scale, and the parameter names (Pointcept's state dict loads
strictly into ours). Whether `transformers`' CLIP text tower equals OpenAI's own is not checked here (neither the
`clip` package nor its weights can be had on these machines).

For two conditions of three, and for a decoder and an encoder-only backbone: the reference's seg_logits and ours
on the same batch must agree to 1e-5. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_reference_ptv3 import load_reference, sample_batch, small_config  # noqa: E402

from concerto_ray.finetune.ppt import PointPromptTraining  # noqa: E402
from concerto_ray.model.ptv3 import PTv3Config  # noqa: E402
from concerto_ray.model.text_encoder import class_text_embeddings, write_random_clip  # noqa: E402

CONDITIONS = ("Structured3D", "ScanNet", "S3DIS")
CLASS_NAMES = (
    ("wall", "floor", "cabinet", "bed", "chair"),
    ("wall", "floor", "shower curtain", "otherfurniture"),
    ("ceiling", "floor", "wall", "beam", "column", "clutter"),
)


def clip_stand_in(folder: Path) -> types.ModuleType:
    """OpenAI's `clip` module as the reference uses it, backed by the transformers CLIP in `folder`."""
    from transformers import CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = CLIPModel.from_pretrained(folder).float().eval()
            self.logit_scale = self.model.logit_scale
            # OpenAI's text_projection is (width, embed_dim); the reference reads its shape[1]
            self.text_projection = self.model.text_projection.weight.t()

        def encode_text(self, tokens):
            features = self.model.get_text_features(input_ids=tokens)
            return features if isinstance(features, torch.Tensor) else features.pooler_output

    module = types.ModuleType("clip")
    module.load = lambda name, device="cpu", download_root=None: (TextTower(), None)
    module.tokenize = lambda prompts: tokenizer(list(prompts), padding=True, return_tensors="pt")["input_ids"]
    return module


def load_reference_ppt(root: Path, clip_folder: Path):
    ptv3, _ = load_reference(root)
    builder = sys.modules["pointcept.models.builder"]
    builder.MODELS.build = lambda cfg: ptv3.PointTransformerV3(**{k: v for k, v in cfg.items() if k != "type"})
    losses = types.ModuleType("pointcept.models.losses")
    losses.build_criteria = lambda cfg: None
    sys.modules["pointcept.models.losses"] = losses
    sys.modules["clip"] = clip_stand_in(clip_folder)
    package = types.ModuleType("pointcept.models.point_prompt_training")
    package.__path__ = [str(root / "pointcept/models/point_prompt_training")]
    sys.modules[package.__name__] = package
    return ptv3, importlib.import_module("pointcept.models.point_prompt_training.point_prompt_training_v1m3_neo")


def compare(ptv3, ppt, clip_folder: Path, name: str, config: dict, write_keys: Path | None) -> list[str]:
    backbone_out = sum(config["enc_channels"]) if config.get("enc_mode") else config["dec_channels"][0]
    torch.manual_seed(0)
    reference = ppt.PointPromptTraining(
        backbone=dict(type="PT-v3m2", **config),
        backbone_out_channels=backbone_out,
        conditions=CONDITIONS,
        template="[x]",
        clip_model="ViT-B/16",
        class_names=[list(names) for names in CLASS_NAMES],
    ).eval()
    for module in reference.modules():  # Pointcept's pooling shuffles unless told not to
        if isinstance(module, ptv3.GridPooling):
            module.shuffle_orders = False
    with torch.no_grad():  # every trainable tensor random, so that none is trivial
        for p in reference.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    text = class_text_embeddings(str(clip_folder), CLASS_NAMES)
    ours = PointPromptTraining(
        PTv3Config(**config, pooling_shuffle_orders=False), CONDITIONS, text, backbone_out_channels=backbone_out
    ).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    if write_keys is not None:
        layout = {k: list(v.shape) for k, v in reference.state_dict().items() if not k.startswith("backbone.")}
        write_keys.write_text(json.dumps(layout, indent=1) + "\n")
    failures = []
    for condition in ("ScanNet", "S3DIS"):
        data = sample_batch([500, 300], config["in_channels"], span=24, seed=1)
        with torch.no_grad():
            theirs = reference(dict(data, condition=[condition, condition]))["seg_logits"]
            mine = ours(dict(data, condition=condition))["seg_logits"]
        diff = (theirs - mine).abs().max().item()
        ok = theirs.shape == mine.shape and diff <= 1e-5
        verdict = "OK" if ok else "FAIL"
        print(f"{name}, {condition}: seg_logits {tuple(mine.shape)}, max abs diff {diff:.3e} -> {verdict}")
        if not ok:
            failures.append(f"{name} {condition}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pointcept", type=Path, required=True, help="extracted Pointcept source tree")
    parser.add_argument("--write-keys", type=Path, help="save the non-backbone state-dict layout as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clip_folder = write_random_clip(Path(tmp) / "clip")
        ptv3, ppt = load_reference_ppt(args.pointcept, clip_folder)
        decoder = small_config(enable_flash=False, traceable=True)
        encoder_only = small_config(enable_flash=False, enc_mode=True, traceable=True)
        failures = compare(ptv3, ppt, clip_folder, "decoder", decoder, args.write_keys)
        failures += compare(ptv3, ppt, clip_folder, "encoder only", encoder_only, None)
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
