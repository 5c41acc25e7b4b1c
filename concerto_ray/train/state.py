"""The training state in a checkpoint folder: what is saved, and loading it back with clear errors.

model.pt       {"state_dict": ...}  student, teacher and heads (concerto-ray's checkpoint layout, so fine-tuning
                                    and `concerto-ray model convert` read it); the frozen image encoder is left
                                    out, since it comes from its own weights and would dwarf the rest
optimizer.pt   {"optimizer": ..., "scheduler": ...}  AdamW moments and the OneCycleLR position
progress.json  global step, epoch, optimizer steps done in that epoch, skipped non-finite steps
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import torch
from torch import nn

from concerto_ray.config import from_dict
from concerto_ray.errors import ConfigError, TrainingError
from concerto_ray.model.checkpoint import MODEL_NAME_KEY

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"
FROZEN_PREFIX = "enc2d_model."  # Concerto's image encoder


def save_model(model: nn.Module, path: Path, model_name: str | None = None) -> None:
    """The model's weights as model.pt holds them (what fine-tuning and `concerto-ray model convert` read), with
    the name of its model config, so that `embed` and `viz` need not be told which model it is."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}
    torch.save({"state_dict": state, **({MODEL_NAME_KEY: model_name} if model_name else {})}, path)


class CheckpointError(TrainingError):
    """A checkpoint cannot be used to resume; the message names the checkpoint and the file."""


@dataclass
class Progress:
    global_step: int = 0  # optimizer steps done, skipped non-finite ones included
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`; their batches are dropped on resume
    skipped_steps: int = 0

    def advance(self, steps_per_epoch: int) -> None:
        """Count one optimizer step; an epoch ends after `steps_per_epoch` of them."""
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    model_name: str | None = None,
) -> None:
    save_model(model, directory / MODEL_FILE, model_name)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, directory / OPTIMIZER_FILE)
    (directory / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))


def load_checkpoint(
    checkpoint: ray.train.Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> Progress:
    """Restore model, optimizer and scheduler (None: leave it as it is) in place; returns where training stopped."""
    where = checkpoint_uri(checkpoint)
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        model_state = _load_torch(folder, MODEL_FILE, where)
        optimizer_state = _load_torch(folder, OPTIMIZER_FILE, where)
        try:
            progress = from_dict(Progress, json.loads(_require(folder, PROGRESS_FILE, where).read_text()))
        except (ValueError, ConfigError) as exc:
            raise CheckpointError(f"checkpoint {where}: {PROGRESS_FILE} is not valid ({exc})") from exc
    try:
        result = model.load_state_dict(model_state["state_dict"], strict=False)
        optimizer.load_state_dict(optimizer_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(optimizer_state["scheduler"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {where} does not fit this model and optimizer: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(FROZEN_PREFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {where} does not fit this model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return progress


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    if isinstance(checkpoint.filesystem, pafs.S3FileSystem):
        return f"s3://{checkpoint.path}"
    return checkpoint.path


def _require(folder: Path, name: str, where: str) -> Path:
    if not (folder / name).is_file():
        raise CheckpointError(f"checkpoint {where} has no {name}")
    return folder / name


def _load_torch(folder: Path, name: str, where: str) -> dict:
    path = _require(folder, name, where)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files (pickle, zip, EOF, runtime)
        raise CheckpointError(f"checkpoint {where}: {name} cannot be loaded ({type(exc).__name__}: {exc})") from exc
