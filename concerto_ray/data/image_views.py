"""Camera frames for the 2D-3D term: image preparation, image augmentation and point<->pixel remapping.

Follows Pointcept's DefaultImagePointDataset + ImgAugmentation: each frame is centre-cropped to the largest
multiple of the patch grid that fits, resized (PIL bilinear) to the grid of `crop_h // patch_size` x
`crop_w // patch_size` patches of `patch_size` pixels, and every pixel that sees a point becomes that point's
position on the patch grid, a float (row, col) with -1 where a frame does not see the point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from concerto_ray.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def center_crop_box(width: int, height: int, patch_h: int, patch_w: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred crop whose size is the largest multiple of the patch grid."""
    multiple = max(min(width // patch_w, height // patch_h), 1)
    crop_w, crop_h = multiple * patch_w, multiple * patch_h
    return (
        int((width - crop_w) / 2),
        int((height - crop_h) / 2),
        int((width + crop_w) / 2),
        int((height + crop_h) / 2),
    )


def remap_correspondence(
    rows: np.ndarray, box: tuple[int, int, int, int], out_h: int, out_w: int, patch_size: int
) -> np.ndarray:
    """[pixel_x, pixel_y, point] rows of the original frame -> unique [patch_row, patch_col, point] rows.

    Pixels outside the crop box are dropped; the rest are shifted into the crop, scaled to the resized image and
    divided by the patch size (kept fractional, in float32 like Pointcept).
    """
    left, top, right, bottom = box
    rows = rows.astype(np.float32)
    x, y = rows[:, 0], rows[:, 1]
    inside = (y >= top) & (y < bottom) & (x >= left) & (x < right)
    rows = rows[inside]
    patch_row = ((rows[:, 1] - top) * out_h / (bottom - top) / patch_size).astype(np.float32)
    patch_col = ((rows[:, 0] - left) * out_w / (right - left) / patch_size).astype(np.float32)
    return np.unique(np.stack([patch_row, patch_col, rows[:, 2]], axis=1), axis=0)


def prepare_frames(
    frames_color: list[np.ndarray],
    frames_correspondence: list[np.ndarray],
    num_points: int,
    crop_h: int,
    crop_w: int,
    patch_size: int,
    *,
    sample: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames -> images (n, 3, H, W) float32 in 0..1 and correspondence (num_points, n, 2) float32.

    H, W = crop_h, crop_w rounded down to whole patches. A frame's correspondence table may be the single row
    (-1, -1, -1), Pointcept's marker for a frame that sees no point.
    """
    if len(frames_color) != len(frames_correspondence):
        raise DataError(
            f"{len(frames_color)} frame images but {len(frames_correspondence)} correspondence tables",
            sample=sample,
            field="frames_correspondence",
        )
    patch_h, patch_w = crop_h // patch_size, crop_w // patch_size
    out_h, out_w = patch_h * patch_size, patch_w * patch_size
    images = np.empty((len(frames_color), 3, out_h, out_w), dtype=np.float32)
    correspondence = np.full((num_points, len(frames_color), 2), -1, dtype=np.float32)
    for i, (color, rows) in enumerate(zip(frames_color, frames_correspondence)):
        if color.ndim != 3 or color.shape[2] != 3 or color.dtype != np.uint8:
            raise DataError(
                f"frame {i}: expected a uint8 (H, W, 3) image, got {color.dtype} {color.shape}",
                sample=sample,
                field="frames_color",
            )
        box = center_crop_box(color.shape[1], color.shape[0], patch_h, patch_w)
        resized = Image.fromarray(color).crop(box).resize((out_w, out_h), Image.BILINEAR)
        images[i] = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        if rows.shape == (1, 3) and np.all(rows == -1):
            continue
        remapped = remap_correspondence(rows, box, out_h, out_w, patch_size)
        point = remapped[:, 2].astype(np.int64)  # in range: record.check_correspondence checked it on decode
        # Several pixels of one point: as in Pointcept, the last row after sorting wins.
        correspondence[point, i] = remapped[:, :2]
    return images, correspondence


@dataclass(frozen=True)
class ImageAugmentation:
    """Pointcept's ImgAugmentation for Concerto: colour shift, Gaussian blur, then mean/std normalisation.

    Pointcept's crop step is omitted: its crop equals the resized patch grid (the config requires crop sizes
    that are whole patches), so it never moves a pixel.
    """

    jitter_p: float = 0.95
    jitter_std: float = 0.05
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 9
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """images: (n, 3, H, W) float32 in 0..1, all frames of a sample augmented alike."""
        if rng.random() < self.jitter_p:
            shift = (rng.random(3) * self.jitter_std).astype(np.float32)  # non-negative, as in Pointcept
            images = np.clip(images + shift[:, None, None], 0, 1)
        if rng.random() < self.blur_p:
            images = gaussian_blur(images, rng.uniform(*self.blur_sigma), self.blur_kernel_size)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return ((images - mean) / std).astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
    """torchvision's GaussianBlur on (n, 3, H, W): a separable kernel with reflect padding."""
    half = (kernel_size - 1) / 2
    kernel = np.exp(-0.5 * (np.linspace(-half, half, kernel_size) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    pad = kernel_size // 2
    height, width = images.shape[2:]
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    rows_blurred = sum(k * padded[:, :, i : i + height, :] for i, k in enumerate(kernel))
    return sum(k * rows_blurred[:, :, :, j : j + width] for j, k in enumerate(kernel)).astype(np.float32)
