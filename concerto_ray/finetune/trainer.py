"""Semantic segmentation fine-tuning on Ray Train: streamed training split -> TorchTrainer -> evaluation rounds.

The config's `epochs` are cut into `eval_epochs` equal rounds (Pointcept's `eval_epoch`). After each round rank 0
evaluates the full-resolution validation scenes with the reference's test protocol (`evaluate.py`); every worker
then reports the validation metrics with a checkpoint (`round-NNNN/`, the layout of `concerto_ray.train.state`).
Ray Train keeps the `run.checkpoints_to_keep` best by val mIoU, plus the latest, from which a failure restart or
`resume=True` continues at the next round.

MLflow (one run per fine-tuning run, a child run when it is a sweep trial): per-step loss, lr and gradient norm;
per round val_miou / val_macc / val_all_acc and, as artifacts, the per-class IoU table and the confusion matrix
(`eval/round-NNNN/`); at the end the best round's metrics and checkpoint (tag `best_checkpoint`).

Data-efficient settings act on the training data only: limited reconstructions filter the training split by scene
name, limited annotations rewrite each decoded scene's labels before the transforms.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from concerto_ray.config import from_dict, to_dict
from concerto_ray.data import storage
from concerto_ray.data.pipeline import EpochReadAhead, batch_to_device, build_dataset
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.shards import read_shards
from concerto_ray.finetune.configs import FinetuneConfig
from concerto_ray.finetune.data_efficiency import annotation_limiter
from concerto_ray.finetune.evaluate import evaluate
from concerto_ray.finetune.metrics import SegMetrics, per_class_table, save_confusion_png
from concerto_ray.finetune.run_config import FinetuneRun, plan_finetune
from concerto_ray.finetune.segmentor import build_segmentor, param_groups
from concerto_ray.train.loop import (
    NonFiniteGuard,
    agree_across_workers,
    epoch_steps,
    report_checkpoint,
    world_size,
)
from concerto_ray.train.optim import adamw_one_cycle
from concerto_ray.train.state import MODEL_FILE, Progress, load_checkpoint, save_checkpoint
from concerto_ray.train.trainer import TrackedRun, fit, ray_run_config, scaling_config, start_tracked_run
from concerto_ray.train.tracking import StepMetrics, close_run

CHECKPOINT_DIR_FORMAT = "round-{:04d}"
SCORE = "val_miou"  # what the best checkpoint, and a sweep, is chosen by (higher is better)
BEST_CHECKPOINT_TAG = "best_checkpoint"


def run_finetune(run: FinetuneRun, resume: bool = False, *, parent_run_id: str | None = None,
                 callbacks: Sequence[ray.train.UserCallback] = ()) -> ray.train.Result:
    """Fine-tune until `finetune.epochs` are done; with `resume`, continue the stopped run of the same `run.name`.

    `parent_run_id` makes the MLflow run a child of that run (sweeps); `callbacks` go to Ray Train's RunConfig
    (a sweep trial passes Ray Tune's report callback)."""
    plan = plan_finetune(run)
    tracked = start_tracked_run(run, run.run, run.mlflow, resume, parent_run_id)
    limiter = annotation_limiter(run.finetune.data_efficiency, run.finetune.ignore_index)
    train = build_dataset(run.stream(), scenes=plan.train_scenes if plan.limited_scenes else None,
                          scene_hook=limiter)
    checkpoints = ray.train.CheckpointConfig(num_to_keep=run.run.checkpoints_to_keep,
                                             checkpoint_score_attribute=SCORE, checkpoint_score_order="max")
    trainer = ray.train.torch.TorchTrainer(
        finetune_loop_per_worker,
        train_loop_config={"run": to_dict(run), "steps_per_epoch": plan.steps_per_epoch,
                           "tracking_uri": tracked.tracking_uri, "mlflow_run_id": tracked.mlflow_run_id},
        scaling_config=scaling_config(run.run),
        run_config=ray_run_config(run.run, checkpoints, callbacks),
        datasets={"train": train, "val": validation_scenes(run)},
        # The validation scenes are not split: rank 0 evaluates all of them.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = fit(trainer, tracked)
    log_best_checkpoint(tracked, result)
    close_run(tracked.tracking_uri, tracked.mlflow_run_id, succeeded=True)
    return result


def validation_scenes(run: FinetuneRun) -> ray.data.Dataset:
    """Decoded full-resolution validation scenes (name, coord, color, normal, segment), one per row."""
    ds = read_shards(run.data.shards, splits=list(run.finetune.val_split), endpoint_url=run.data.endpoint_url,
                     verify=run.data.verify_checksums)
    return ds.map(DecodeScene(run.data.segment_asset))


class DecodeScene:
    """A shard row -> the point arrays the test protocol reads; picklable for Ray Data tasks."""

    KEYS = ("name", "coord", "color", "normal", "segment")

    def __init__(self, segment_asset: str | None):
        self.segment_asset = segment_asset

    def __call__(self, row: dict) -> dict:
        data = decode_record(row_to_record(row), segment_asset=self.segment_asset, with_frames=False,
                             require_labels=True)
        return {key: data[key] for key in self.KEYS if key in data}


def log_best_checkpoint(tracked: TrackedRun, result: ray.train.Result) -> None:
    """The best round's validation metrics (as best_*) and checkpoint URI on the MLflow run."""
    if not result.best_checkpoints:
        return
    checkpoint, metrics = max(result.best_checkpoints, key=lambda pair: pair[1][SCORE])
    client = MlflowClient(tracked.tracking_uri)
    for key in ("val_miou", "val_macc", "val_all_acc"):
        client.log_metric(tracked.mlflow_run_id, f"best_{key}", metrics[key], step=metrics["step"])
    client.set_tag(tracked.mlflow_run_id, BEST_CHECKPOINT_TAG, tracked.run_dir.uri_of_path(checkpoint.path))


def load_finetuned(config: FinetuneConfig, checkpoint: str | Path) -> torch.nn.Module:
    """The segmentor of `config` with the weights of a fine-tuning checkpoint folder (local), in eval mode."""
    # the checkpoint holds every weight: no pre-trained backbone to load first
    model = build_segmentor(dataclasses.replace(config, pretrained=dataclasses.replace(config.pretrained, path=None)))
    state = torch.load(Path(checkpoint) / MODEL_FILE, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------------------------ the workers


def finetune_loop_per_worker(loop_config: dict) -> None:
    """`loop_config`: {"run": the FinetuneRun as a dict, "steps_per_epoch", "tracking_uri", "mlflow_run_id"}."""
    run = from_dict(FinetuneRun, loop_config["run"])
    FinetuneWorker(run, loop_config["steps_per_epoch"], loop_config["tracking_uri"],
                   loop_config["mlflow_run_id"]).run()


class FinetuneWorker:
    def __init__(self, run: FinetuneRun, steps_per_epoch: int, tracking_uri: str, mlflow_run_id: str):
        self.run_config = run
        self.cfg = cfg = run.finetune
        self.steps_per_epoch = steps_per_epoch
        self.epochs_per_round = cfg.epochs // cfg.eval_epochs
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

        torch.manual_seed(run.run.seed)  # the same initial head (and decoder) on every worker
        self.segmentor = build_segmentor(cfg, run.run.endpoint_url)
        self.model = ray.train.torch.prepare_model(self.segmentor)
        schedule = cfg.schedule
        self.optimizer, self.scheduler = adamw_one_cycle(
            param_groups(self.segmentor, cfg), cfg.weight_decay, steps_per_epoch * cfg.epochs,
            pct_start=schedule.pct_start, anneal_strategy=schedule.anneal_strategy,
            div_factor=schedule.div_factor, final_div_factor=schedule.final_div_factor)
        checkpoint = ray.train.get_checkpoint()
        self.progress = Progress()
        if checkpoint is not None:
            self.progress = load_checkpoint(checkpoint, self.segmentor, self.optimizer, self.scheduler)
        # Augmentation draws in the model (drop path) and Mix3D differ per worker and per resumption.
        seed = np.random.SeedSequence([run.run.seed, self.rank, self.progress.global_step])
        torch.manual_seed(int(seed.generate_state(1)[0]))
        self.mix_rng = np.random.default_rng(seed)

        self.amp = cfg.enable_amp and self.device.type == "cuda"  # bf16 autocast: no gradient scaler needed
        self.guard = NonFiniteGuard(run.run.max_nonfinite_steps)
        self.metrics = StepMetrics(tracking_uri, mlflow_run_id) if self.rank == 0 else None
        self.run_dir = storage.resolve(run.run.run_uri, run.run.endpoint_url)

    def run(self) -> None:
        shard = ray.train.get_dataset_shard("train")
        stream = self.run_config.stream()
        while self.progress.epoch < self.cfg.epochs:
            # Read ahead within an evaluation round only: the evaluation's Ray Data pipeline must not compete for
            # CPUs with tasks of the next epoch's that would sit paused, waiting for training to take their batches.
            round_end = (self.progress.epoch // self.epochs_per_round + 1) * self.epochs_per_round
            with EpochReadAhead(shard, stream, round_end - self.progress.epoch) as reader:
                while self.progress.epoch < round_end:
                    epoch = self.progress.epoch
                    steps = epoch_steps(reader.next_epoch(), 1, self.progress.step_in_epoch, self.steps_per_epoch)
                    for (batch,), _ in steps:
                        values = self.optimizer_step(batch)
                        self.progress.advance(self.steps_per_epoch)
                        if self.metrics is not None:
                            self.metrics.add(self.progress.global_step, values)
                    if self.progress.epoch == epoch:  # the stream ended early: samples were skipped as bad
                        self.progress.epoch += 1
                        self.progress.step_in_epoch = 0
            self.evaluate_and_report()

    def optimizer_step(self, batch: dict) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.mix_rng.random() < self.cfg.mix_prob:
            batch = mix3d(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.model(batch_to_device(batch, self.device))["loss"]
        loss.backward()
        clip = self.cfg.clip_grad
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        nonfinite = not (bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)))
        nonfinite, (total_loss,) = agree_across_workers(nonfinite, [float(loss)], self.device)
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_steps += 1
        else:
            self.optimizer.step()
        self.guard.record(nonfinite, self.progress.global_step + 1)
        lrs = {f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        self.scheduler.step()
        return dict(lrs, loss=total_loss / world_size(), grad_norm=float(grad_norm),
                    skipped_steps=self.progress.skipped_steps, epoch=self.progress.epoch)

    def evaluate_and_report(self) -> None:
        round_index = self.progress.epoch // self.epochs_per_round
        scores = torch.zeros(3, dtype=torch.float64, device=self.device)
        if self.rank == 0:
            scenes = ray.train.get_dataset_shard("val").iter_rows()
            metrics = evaluate(self.segmentor, scenes, self.cfg)
            scores[:] = torch.tensor([metrics.miou, metrics.macc, metrics.all_acc], dtype=torch.float64)
            self.log_evaluation(round_index, metrics)
        if world_size() > 1:  # every worker reports the same scores
            dist.all_reduce(scores)
        values = dict(zip(("val_miou", "val_macc", "val_all_acc"), scores.tolist()),
                      epoch=self.progress.epoch, round=round_index, step=self.progress.global_step)
        name = CHECKPOINT_DIR_FORMAT.format(round_index)
        report_checkpoint(name, values, lambda folder: save_checkpoint(folder, self.segmentor, self.optimizer,
                                                                       self.scheduler, self.progress))
        if self.metrics is not None:
            self.metrics.commit(self.run_dir.uri_of(name))

    def log_evaluation(self, round_index: int, metrics: SegMetrics) -> None:
        """Round metrics (sent with the checkpoint) and the per-class table and confusion matrix (now)."""
        self.metrics.add(self.progress.global_step, {"val_miou": metrics.miou, "val_macc": metrics.macc,
                                                     "val_all_acc": metrics.all_acc})
        folder = f"eval/round-{round_index:04d}"
        client, run_id = self.metrics.client, self.metrics.run_id
        client.log_text(run_id, per_class_table(metrics, self.cfg.class_names) + "\n", f"{folder}/per_class_iou.txt")
        with tempfile.TemporaryDirectory() as tmp:
            png = save_confusion_png(metrics.confusion, self.cfg.class_names, Path(tmp) / "confusion.png")
            client.log_artifact(run_id, str(png), folder)


def mix3d(batch: dict) -> dict:
    """Mix3D as the reference's collate applies it: consecutive pairs of samples become one scene, by dropping
    every other offset (a batch of one sample is left as it is)."""
    offset = batch["offset"]
    return {**batch, "offset": torch.cat([offset[1:-1:2], offset[-1:]])}
