"""Load Pointcept's `DefaultImagePointDataset` from an extracted checkout, for timing it beside our pipeline.

Pointcept's dataset modules import packages that are not installed here. This module puts small stand-ins for
them into `sys.modules` before importing `pointcept/datasets/defaults.py` and `pointcept/datasets/transform.py`
directly (their package `__init__` files import every dataset and model, so they are bypassed):

* `torchvision.transforms` (also as `torchvision.transforms.transforms` and `.functional`), with the semantics
  torchvision has for the inputs Pointcept gives them:
  `Resize((h, w), interpolation)` on a PIL image -> `PIL.Image.resize((w, h), resample)`;
  `ToTensor` on a PIL RGB image -> HWC uint8 as a CHW float32 tensor / 255;
  `GaussianBlur(kernel_size, sigma=(lo, hi))` on an (N, C, H, W) tensor -> one sigma drawn uniformly per call,
  a normalised 2-D Gaussian kernel, reflect padding and a grouped `conv2d`;
  `Normalize(mean, std)` -> `(img - mean) / std` per channel, not in place;
  `functional.crop(img, top, left, height, width)` -> a slice of the last two axes (in-bounds crops only);
  `Compose` and `InterpolationMode` (BILINEAR / BICUBIC / NEAREST -> the PIL resampling filters).
  Pointcept's other torchvision transforms are only built by config entries the Concerto base config lacks.
* `pointcept`, `pointcept.utils` and `pointcept.datasets`: empty packages pointing at the checkout, so that
  `pointcept.utils.registry`, `.logger`, `.cache` and the two dataset modules are Pointcept's own code.
"""

from __future__ import annotations

import enum
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = Image.NEAREST
    BILINEAR = Image.BILINEAR
    BICUBIC = Image.BICUBIC


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    def __init__(self, size: tuple[int, int], interpolation: InterpolationMode = InterpolationMode.BILINEAR):
        self.height, self.width = size
        self.resample = interpolation.value

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.resize((self.width, self.height), self.resample)


class ToTensor:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)


class GaussianBlur:
    def __init__(self, kernel_size: int, sigma: tuple[float, float]):
        self.kernel_size = kernel_size
        self.sigma = sigma

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        half = (self.kernel_size - 1) / 2
        x = torch.linspace(-half, half, self.kernel_size)
        line = torch.exp(-0.5 * (x / sigma) ** 2)
        line = line / line.sum()
        channels = images.shape[-3]
        kernel = torch.outer(line, line).expand(channels, 1, self.kernel_size, self.kernel_size)
        batch = images.reshape(-1, channels, *images.shape[-2:])
        pad = self.kernel_size // 2
        padded = torch.nn.functional.pad(batch, [pad] * 4, mode="reflect")
        return torch.nn.functional.conv2d(padded, kernel, groups=channels).reshape(images.shape)


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


def crop(images: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    if top < 0 or left < 0 or top + height > images.shape[-2] or left + width > images.shape[-1]:
        raise ValueError(
            f"crop ({top}, {left}, {height}, {width}) leaves the {tuple(images.shape[-2:])} image; "
            "the stand-in does not pad"
        )
    return images[..., top : top + height, left : left + width]


def _module(name: str, path: Path | None = None, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _install_stand_ins(checkout: Path) -> None:
    functional = _module("torchvision.transforms.functional", crop=crop)
    transforms = _module(
        "torchvision.transforms",
        InterpolationMode=InterpolationMode,
        Compose=Compose,
        Resize=Resize,
        ToTensor=ToTensor,
        GaussianBlur=GaussianBlur,
        Normalize=Normalize,
        functional=functional,
    )
    transforms.transforms = transforms
    sys.modules["torchvision.transforms.transforms"] = transforms
    _module("torchvision", transforms=transforms)
    _module("pointcept", checkout / "pointcept")
    _module("pointcept.utils", checkout / "pointcept/utils")
    _module("pointcept.datasets", checkout / "pointcept/datasets")


def _base_config(checkout: Path) -> dict:
    """The top-level names of Pointcept's Concerto base pre-training config."""
    namespace: dict = {}
    exec((checkout / "configs/concerto/pretrain-concerto-v1m1-0-base.py").read_text(), namespace)
    return namespace


def write_absolute_splits(synth_root: Path, dest: Path) -> list[str]:
    """Copy the synthetic root's split files to `dest/splits` with absolute paths and return the split names.

    Our split files hold paths relative to the dataset root; Pointcept opens them as given, relative to its working
    directory, so the copies point at the synthetic files wherever the benchmark runs.
    """
    (dest / "splits").mkdir(parents=True, exist_ok=True)
    names = []
    for split_file in sorted((synth_root / "splits").glob("*.json")):
        entries = json.loads(split_file.read_text())
        absolute = {
            name: {
                "pointclouds": str(synth_root / entry["pointclouds"]),
                "images": [str(synth_root / p) for p in entry["images"]],
                "correspondences": [str(synth_root / p) for p in entry["correspondences"]],
            }
            for name, entry in entries.items()
        }
        (dest / "splits" / split_file.name).write_text(json.dumps(absolute, indent=1))
        names.append(split_file.stem)
    return names


def reference_dataset(checkout: Path, synth_root: Path, scratch: Path):
    """Pointcept's `DefaultImagePointDataset` over `synth_root` with the Concerto base config's transforms."""
    _install_stand_ins(checkout)
    defaults = importlib.import_module("pointcept.datasets.defaults")
    splits = write_absolute_splits(synth_root, scratch)
    config = _base_config(checkout)
    return defaults.DefaultImagePointDataset(
        split=splits,
        data_root=str(scratch),
        transform=config["transform"],
        crop_h=config["crop_h"],
        crop_w=config["crop_w"],
        patch_size=config["patch_size"],
    )
