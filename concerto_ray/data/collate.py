"""Per-sample dicts (numpy) -> one offset-batched torch dict, as Pointcept's collate_fn builds it.

Point arrays of all samples are concatenated along the first axis; a key containing "offset" holds cumulative
point counts, so the batch's offset is the cumulative count over all samples (int64); strings become a list and
Python floats (grid_size) a float64 tensor of one value per sample. Array dtypes follow Pointcept's ToTensor:
floating -> float32, integer -> int64.
"""

from __future__ import annotations

import numpy as np
import torch

from concerto_ray.errors import DataError


def collate_semseg(samples: list[dict]) -> dict:
    _check_same_keys(samples)
    _check_offsets(samples)
    return {key: _collate_key(key, [sample[key] for sample in samples]) for key in samples[0]}


def collate_concerto(samples: list[dict]) -> dict:
    """Like `collate_semseg`, but each correspondence array (points, frames, 2) is first padded with -1 to the
    largest frame count in the batch, so that the arrays of all samples can be concatenated. Samples without
    frames (for a model without the 2D-3D term) have no images, img_num or correspondence: nothing to pad."""
    _check_same_keys(samples)
    _check_offsets(samples)
    max_frames = max(
        (int(np.asarray(sample["img_num"]).reshape(-1)[0]) for sample in samples if "img_num" in sample), default=0
    )
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if "correspondence" in key:
            values = [_pad_frames(value, max_frames) for value in values]
        batch[key] = _collate_key(key, values)
    return batch


def _check_same_keys(samples: list[dict]) -> None:
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    keys = set(samples[0])
    for sample in samples[1:]:
        if set(sample) != keys:
            raise DataError(
                f"keys {sorted(set(sample) ^ keys)} are not shared by every sample of the batch",
                sample=str(sample.get("name", "?")),
            )


def _check_offsets(samples: list[dict]) -> None:
    """Every `<prefix>offset` must split its `<prefix>coord` rows into non-empty pieces.

    Checked here, on the CPU and once per batch, so that the model's forward needs no device sync for it."""
    for sample in samples:
        for key in sample:
            coord_key = key.removesuffix("offset") + "coord"
            if not key.endswith("offset") or coord_key not in sample:
                continue
            counts = np.diff(np.asarray(sample[key], dtype=np.int64).reshape(-1), prepend=0)
            num_points = len(sample[coord_key])
            if len(counts) == 0 or counts.min() <= 0 or counts.sum() != num_points:
                raise DataError(
                    f"{np.asarray(sample[key]).tolist()} must be strictly increasing and end at the "
                    f"{num_points} rows of {coord_key!r}",
                    sample=str(sample.get("name", "?")),
                    field=key,
                )


def _pad_frames(correspondence: np.ndarray, num_frames: int) -> np.ndarray:
    points, frames, _ = correspondence.shape
    padded = np.full((points, num_frames, 2), -1, dtype=correspondence.dtype)
    padded[:, :frames] = correspondence
    return padded


def _collate_key(key: str, values: list):
    if isinstance(values[0], str):
        return [str(value) for value in values]
    if isinstance(values[0], float):
        return torch.tensor(values, dtype=torch.float64)
    if "offset" in key:
        counts = [np.diff(np.asarray(value, dtype=np.int64), prepend=0) for value in values]
        return torch.from_numpy(np.cumsum(np.concatenate(counts)))
    return torch.cat([_to_tensor(np.asarray(value)) for value in values])


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    if np.issubdtype(array.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if array.dtype == bool:
        return torch.from_numpy(np.ascontiguousarray(array))
    raise DataError(f"cannot turn an array of dtype {array.dtype} into a tensor")
