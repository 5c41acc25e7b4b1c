"""Semantic segmentation fine-tuning on Ray Train: streamed training split -> TorchTrainer -> evaluation rounds.

Training is cut into `eval_epochs` rounds as in Pointcept: a round is one pass over the training scenes repeated
`epochs // eval_epochs` times (`RoundPlan` has the reference's step count). After each round every worker runs the
validation pass (`evaluate.py`: the validation transform, one forward per scene) over its share of the validation
scenes; the confusion matrices are summed over the workers, so all of them report the same val metrics with a
checkpoint (`round-NNNN/`, the layout of `concerto_ray.train.state`). With `run.checkpoint_every_minutes`, training
also checkpoints inside a round (`step-NNNNNNNN/`, no val metrics). Ray Train keeps the `run.checkpoints_to_keep`
best by val mIoU, plus the latest, from which a failure restart or `resume=True` continues where it stopped. After
the last round the best round's model (Pointcept's `model_best`) goes through the full test protocol (fragments and
test-time augmentations), again spread over the workers; its metrics are reported as test_*.

MLflow (one run per fine-tuning run, a child run when it is a sweep trial): per-step loss, lr and gradient norm;
per round val_miou / val_macc / val_all_acc and, as artifacts, the per-class IoU table and the confusion matrix
(`eval/round-NNNN/`); at the end test_miou / test_macc / test_all_acc with their table and matrix (`eval/test/`),
and the best round's metrics and checkpoint (tag `best_checkpoint`).

Data-efficient settings act on the training data only: limited reconstructions filter the training split by scene
name, limited annotations rewrite each decoded scene's labels before the transforms (which keep the labelled
points).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import itertools
import json
import math
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from concerto_ray.config import from_dict, to_dict
from concerto_ray.console import StageBar, post_progress
from concerto_ray.data import storage
from concerto_ray.data.pipeline import (
    EpochReadAhead,
    StreamConfig,
    batch_to_device,
    build_dataset,
    iter_batches,
)
from concerto_ray.data.record import decode_record, row_to_record
from concerto_ray.data.shards import read_shards
from concerto_ray.data.sources import StreamPosition
from concerto_ray.errors import ConfigError
from concerto_ray.finetune.configs import FinetuneConfig
from concerto_ray.finetune.data_efficiency import annotation_limiter
from concerto_ray.finetune.evaluate import evaluate, protocol_confusion, validation_confusion
from concerto_ray.finetune.metrics import (
    SegMetrics,
    per_class_table,
    save_confusion_png,
    segmentation_metrics,
)
from concerto_ray.finetune.multi_dataset import compose_round
from concerto_ray.finetune.run_config import (
    FinetunePlan,
    FinetuneRun,
    RoundPlan,
    plan_finetune,
)
from concerto_ray.finetune.segmentor import build_segmentor, for_evaluation, param_groups
from concerto_ray.node_cache import local_copy
from concerto_ray.train.optim import adamw_one_cycle
from concerto_ray.train.runtime import (
    CheckpointCadence,
    NonFiniteGuard,
    agree_across_workers,
    clip_gradients,
    close_epoch,
    commit_metrics,
    epoch_steps,
    report_checkpoint,
    seed_draws,
    seed_model_init,
    wait_for_uploads,
    world_size,
)
from concerto_ray.train.state import (
    MODEL_FILE,
    Progress,
    load_checkpoint,
    save_checkpoint,
)
from concerto_ray.train.tracking import StepMetrics, close_run, node_system_metrics
from concerto_ray.train.trainer import (
    TrackedRun,
    fit,
    ray_run_config,
    scaling_config,
    start_tracked_run,
)
from concerto_ray.viz import FeatureImages

CHECKPOINT_DIR_FORMAT = "round-{:04d}"
STEP_CHECKPOINT_DIR_FORMAT = "step-{:08d}"  # a checkpoint inside a round (run.checkpoint_every_minutes)
SCORE = "val_miou"  # what the best checkpoint, and a sweep, is chosen by (higher is better)
ROUNDS_KEY = "rounds"  # in each round's report: the run's number of rounds, so a sweep's scheduler knows the last
BEST_CHECKPOINT_TAG = "best_checkpoint"
TRAIN_DATASET = "train"
SOURCE_DATASET = "train_{}"  # PPT: the training stream of source i
CONDITION_METRIC = "ppt_condition"  # PPT: per step, the index of its batch's condition in ppt.conditions
VAL_DATASET = "val_{}"  # the validation samples of worker rank i
TEST_DATASET = "test_{}"  # the decoded validation scenes of worker rank i, for the test protocol
SUBMISSION_DIR = "submit"  # in the run folder: the test scenes' benchmark prediction files (`finetune.submission`)
BEST_FILE = "best.json"  # in each checkpoint: the best round so far, for the test after a restart
SCALER_FILE = "scaler.pt"  # in each checkpoint when float16 AMP scales the loss
# Workers meet in collectives after uneven work: the evaluation shares and, longest, the final test protocol
# (thirteen passes over each scene). Two hours leave room for the slowest share of a full validation split.
COLLECTIVE_TIMEOUT_S = 2 * 3600
METRIC_KEYS = ("miou", "macc", "all_acc")


def run_finetune(
    run: FinetuneRun,
    resume: bool = False,
    *,
    parent_run_id: str | None = None,
    callbacks: Sequence[ray.train.UserCallback] = (),
    show_progress: bool = False,
) -> ray.train.Result:
    """Fine-tune for `finetune.eval_epochs` rounds; with `resume`, continue the stopped run of the same `run.name`.

    `parent_run_id` makes the MLflow run a child of that run (sweeps); `callbacks` go to Ray Train's RunConfig
    (a sweep trial passes Ray Tune's report callback); `show_progress`: a progress bar of the optimizer steps on
    stderr and a summary line (the CLI's, the demo's)."""
    if callbacks and run.run.checkpoint_every_minutes is not None:
        # Tune's ASHA counts the reports of a trial as its rounds; a checkpoint inside a round would be one more.
        raise ConfigError("run.checkpoint_every_minutes: not available in sweep trials, which checkpoint every round")
    plan = plan_finetune(run)
    tracked = start_tracked_run(run, run.run, run.mlflow, resume, parent_run_id)
    positions = {name: StreamPosition() for name in training_stream_names(run)}
    datasets = training_datasets(run, plan, positions)
    train_names = list(datasets)
    workers = run.run.num_workers
    for rank, share in enumerate(scene_shares(plan.val_scenes, workers) if plan.val_scenes else []):
        verify = run.data.verify_checksums and rank == 0  # the validation shards once
        datasets[VAL_DATASET.format(rank)] = validation_samples(run, share, verify)
    for rank, share in enumerate(scene_shares(plan.test_scenes, workers)):
        verify = run.data.verify_checksums and rank == 0 and run.finetune.test_split != run.finetune.val_split
        datasets[TEST_DATASET.format(rank)] = read_test_scenes(run, share, verify)
    # Without validation the rounds have no score: the latest checkpoints are kept.
    score = SCORE if run.finetune.evaluate else None
    checkpoints = ray.train.CheckpointConfig(
        num_to_keep=run.run.checkpoints_to_keep, checkpoint_score_attribute=score, checkpoint_score_order="max"
    )
    with StageBar(run.run.name, plan.total_steps, enabled=show_progress) as bar:
        trainer = ray.train.torch.TorchTrainer(
            finetune_loop_per_worker,
            train_loop_config={
                "run": to_dict(run),
                "round": dataclasses.asdict(plan.round),
                "rounds": plan.rounds,
                "stream_positions": positions,
                "tracking_uri": tracked.tracking_uri,
                "mlflow_run_id": tracked.mlflow_run_id,
                "progress": bar.board,
            },
            torch_config=ray.train.torch.TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
            scaling_config=scaling_config(run.run),
            run_config=ray_run_config(run.run, checkpoints, callbacks),
            datasets=datasets,
            # Only the training streams are split; each worker reads its own evaluation datasets whole.
            dataset_config=ray.train.DataConfig(datasets_to_split=train_names),
        )
        result = fit(trainer, tracked)
    if show_progress:
        print(bar.summary())
    log_best_checkpoint(tracked, result)
    close_run(tracked.tracking_uri, tracked.mlflow_run_id, succeeded=True)
    return result


def training_stream_names(run: FinetuneRun) -> list[str]:
    """The training streams' Ray Train names: "train", or for PPT one per source ("train_0", ...)."""
    if run.finetune.ppt is None:
        return [TRAIN_DATASET]
    return [SOURCE_DATASET.format(i) for i in range(len(run.finetune.ppt.sources))]


def training_datasets(
    run: FinetuneRun, plan: FinetunePlan, positions: dict[str, StreamPosition]
) -> dict[str, ray.data.Dataset]:
    """The training streams by their Ray Train name, each epoch padded so that every worker gets
    ceil(samples / workers), as the reference's DistributedSampler; `positions` name the epoch each pass reads."""
    if run.finetune.ppt is None:
        return {TRAIN_DATASET: training_dataset(run, plan, positions[TRAIN_DATASET])}
    return {
        name: build_dataset(stream, workers=run.run.num_workers, position=positions[name])
        for name, stream in zip(training_stream_names(run), run.source_streams(plan.round))
    }


def training_dataset(run: FinetuneRun, plan: FinetunePlan, position: StreamPosition) -> ray.data.Dataset:
    """One round of training samples: the (selected) training scenes `loop` times, plus the padding that gives
    every worker the same number of samples (`RoundPlan`)."""
    limiter = annotation_limiter(run.finetune.data_efficiency, run.finetune.ignore_index)
    scenes = plan.train_scenes if plan.limited_scenes else None
    stream = run.stream(plan.round)
    samples = build_dataset(stream, scenes=scenes, scene_hook=limiter, position=position)
    if not plan.round.padding:
        return samples
    # The padding: the first samples of a further single pass (its shards are checked already).
    one_pass = dataclasses.replace(
        stream, sources=[dataclasses.replace(stream.sources[0], loop=1)], verify_checksums=False
    )
    padding = build_dataset(one_pass, scenes=scenes, scene_hook=limiter, position=position)
    return samples.union(padding.limit(plan.round.padding))


def scene_shares(scenes: Sequence[str], workers: int) -> list[list[str]]:
    """The scenes each worker evaluates: every `workers`-th of the sorted names, so shares differ by one at most."""
    names = sorted(scenes)
    return [names[rank::workers] for rank in range(workers)]


def validation_samples(run: FinetuneRun, scenes: Sequence[str], verify: bool) -> ray.data.Dataset:
    """The validation transform's samples (voxelised, with `inverse` and `origin_segment`) of `scenes`."""
    stream = StreamConfig(
        shards=run.data.shards,
        mode="semseg_val",
        splits=list(run.finetune.val_split),
        endpoint_url=run.data.endpoint_url,
        batch_size=1,
        verify_checksums=verify,
        segment_asset=run.data.segment_asset,
        semseg=run.finetune.transform,
    )
    return build_dataset(stream, scenes=scenes)


def read_test_scenes(
    run: FinetuneRun, scenes: Sequence[str] | None = None, verify: bool | None = None
) -> ray.data.Dataset:
    """Decoded full-resolution test scenes (name, coord, color, normal, segment), one per row; only those named in
    `scenes` when given. Unlabelled ones (all `segment` ignored) only where the run writes a submission."""
    ds = read_shards(
        run.data.shards,
        splits=list(run.finetune.test_splits),
        endpoint_url=run.data.endpoint_url,
        verify=run.data.verify_checksums if verify is None else verify,
        scenes=True,
    )
    if scenes is not None:
        ds = ds.filter(NamedScenes(scenes))
    return ds.map(DecodeScene(run.data.segment_asset, labels_optional=run.finetune.submission))


class NamedScenes:
    """Row filter on the sample name; picklable for Ray Data tasks."""

    def __init__(self, names: Collection[str]):
        self.names = frozenset(names)

    def __call__(self, row: dict) -> bool:
        return str(row["name"]) in self.names


class DecodeScene:
    """A shard row -> the point arrays the test protocol reads; picklable for Ray Data tasks. A scene without its
    label array is an error, unless `labels_optional` (a benchmark's test split): its `segment` is then all -1."""

    KEYS = ("name", "coord", "color", "normal", "segment")

    def __init__(self, segment_asset: str, labels_optional: bool = False):
        self.segment_asset = segment_asset
        self.labels_optional = labels_optional

    def __call__(self, row: dict) -> dict:
        record = row_to_record(row)
        if self.labels_optional and self.segment_asset not in record.point_assets:
            data = decode_record(record, with_frames=False)
            data["segment"] = np.full_like(data["segment"], -1)  # no other label array may stand in
        else:
            data = decode_record(record, segment_asset=self.segment_asset, with_frames=False, require_labels=True)
        return {key: data[key] for key in self.KEYS if key in data}


def log_best_checkpoint(tracked: TrackedRun, result: ray.train.Result) -> None:
    """The best round's validation metrics (as best_*) and checkpoint URI on the MLflow run."""
    # not those inside a round, nor those of a run without validation (`evaluate` off)
    rounds = [pair for pair in result.best_checkpoints if not math.isnan(pair[1].get(SCORE, math.nan))]
    if not rounds:
        return
    checkpoint, metrics = max(rounds, key=lambda pair: pair[1][SCORE])
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


def evaluate_checkpoint(run: FinetuneRun, checkpoint: str) -> SegMetrics:
    """The full test protocol on demand: the model of a fine-tuning checkpoint folder (local or `s3://`) over the
    run's test scenes (`test_split`, else `val_split`), in this process, with order shuffling off so that a rerun
    gives the same numbers."""
    model = load_finetuned(run.finetune, local_copy(checkpoint, run.run.endpoint_url, field="--checkpoint"))
    model.backbone.set_order_shuffling(False)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return evaluate(for_evaluation(model, run.finetune), read_test_scenes(run).iter_rows(), run.finetune)


# ------------------------------------------------------------------------------------------------ the workers


def finetune_loop_per_worker(loop_config: dict) -> None:
    """`loop_config`: {"run": the FinetuneRun as a dict, "round": the RoundPlan as a dict, "rounds",
    "stream_positions": {training stream name: its StreamPosition}, "tracking_uri", "mlflow_run_id", "progress": the
    driver's ProgressBoard or None}."""
    run = from_dict(FinetuneRun, loop_config["run"])
    tracking_uri, run_id = loop_config["tracking_uri"], loop_config["mlflow_run_id"]
    with node_system_metrics(tracking_uri, run_id, run.mlflow.system_metrics_interval_s):
        FinetuneWorker(
            run,
            RoundPlan(**loop_config["round"]),
            loop_config["rounds"],
            tracking_uri,
            run_id,
            loop_config.get("progress"),
            stream_positions=loop_config["stream_positions"],
        ).run()


@dataclasses.dataclass
class BestRound:
    round: int = 0  # 0: none evaluated yet
    val_miou: float = -math.inf

    def after(self, round_index: int, val_miou: float) -> BestRound:
        """The best round once `round_index` scored `val_miou`: only a higher score takes the place (the reference's
        `current > best`), so on a tie the earlier round stays."""
        return BestRound(round_index, val_miou) if val_miou > self.val_miou else self


class FinetuneWorker:
    def __init__(
        self,
        run: FinetuneRun,
        round_plan: RoundPlan,
        rounds: int,
        tracking_uri: str,
        mlflow_run_id: str,
        board: ray.actor.ActorHandle | None = None,
        *,
        stream_positions: dict[str, StreamPosition],
    ):
        self.run_config = run
        self.cfg = cfg = run.finetune
        self.round = round_plan
        self.rounds = rounds
        self.stream_positions = stream_positions
        self.rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()

        seed_model_init(run.run.seed)  # the same initial head (and decoder) too
        self.segmentor = build_segmentor(cfg, run.run.endpoint_url)
        self.model = ray.train.torch.prepare_model(self.segmentor)
        schedule = cfg.schedule
        self.optimizer, self.scheduler = adamw_one_cycle(
            param_groups(self.segmentor, cfg),
            cfg.weight_decay,
            round_plan.steps * rounds,
            pct_start=schedule.pct_start,
            anneal_strategy=schedule.anneal_strategy,
            div_factor=schedule.div_factor,
            final_div_factor=schedule.final_div_factor,
        )
        self.amp = cfg.enable_amp and self.device.type == "cuda"
        self.amp_dtype = getattr(torch, cfg.amp_dtype)
        # float16 needs loss scaling (its range underflows small gradients); bfloat16 does not.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and cfg.amp_dtype == "float16" else None
        self.progress = Progress()  # its epoch counts rounds
        self.best = BestRound()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            self.progress = load_checkpoint(checkpoint, self.segmentor, self.optimizer, self.scheduler)
            with checkpoint.as_directory() as folder:
                self.best = BestRound(**json.loads((Path(folder) / BEST_FILE).read_text()))
                if self.scaler is not None and (Path(folder) / SCALER_FILE).is_file():
                    self.scaler.load_state_dict(torch.load(Path(folder) / SCALER_FILE, weights_only=True))
        # Augmentation draws in the model (drop path) and Mix3D differ per worker and per resumption.
        self.mix_rng = np.random.default_rng(seed_draws(run.run.seed, self.rank, self.progress.global_step))

        self.nonfinite_guard = NonFiniteGuard(run.run.max_nonfinite_steps)
        # Round ends always checkpoint; by time, also inside a round.
        self.cadence = CheckpointCadence(None, run.run.checkpoint_every_minutes, self.device)
        self.metrics = StepMetrics(tracking_uri, mlflow_run_id) if self.rank == 0 else None
        # One fixed validation scene's feature picture at every evaluation, so a run can be judged by eye in MLflow.
        self.feature_images = (
            FeatureImages(
                run.data.shards,
                cfg.val_split[0],
                run.data.endpoint_url,
                up_cast_levels=self.segmentor.up_cast_levels,
                feat_keys=cfg.transform.feat_keys,
            )
            if cfg.evaluate
            else None
        )
        self.board = board if self.rank == 0 else None  # the driver's progress bar
        self.run_dir = storage.resolve(run.run.run_uri, run.run.endpoint_url)

    def run(self) -> None:
        while self.progress.epoch < self.rounds:
            round_index = self.progress.epoch
            if self.cfg.ppt is None:
                shard = ray.train.get_dataset_shard(TRAIN_DATASET)
                if self.rank == 0:  # the round's epoch (a resumed round reads it from the start: `train_round`)
                    self.stream_positions[TRAIN_DATASET].set(round_index)
                # A round is one Ray Data epoch. No reading ahead into the next one: the evaluation's Ray Data
                # pipelines must not compete for CPUs with tasks that would sit paused, waiting for training.
                with EpochReadAhead(shard, self.run_config.stream(self.round), 1) as reader:
                    self.train_round(reader.next_epoch())
            else:
                self.train_round(self.joint_round_batches())
            close_epoch(self.progress, round_index)
            self.end_round()

    def train_round(self, batches: Iterator[dict]) -> None:
        round_index = self.progress.epoch
        done = self.progress.step_in_epoch  # a resumed round's stream starts over: its done steps are dropped
        for (batch,), _ in epoch_steps(batches, 1, self.round.steps - done, dropped_steps=done):
            values = self.optimizer_step(batch)
            if self.cfg.ppt is not None:  # which dataset the step trained on, as its index among the conditions
                values[CONDITION_METRIC] = float(self.cfg.ppt.conditions.index(batch["condition"]))
            self.progress.advance(self.round.steps)
            if self.metrics is not None:
                self.metrics.add(self.progress.global_step, values)
            post_progress(self.board, self.progress.global_step, loss=values["loss"])
            # not at a round's last step: the round's end checkpoints right after
            if self.progress.epoch == round_index and self.cadence.due(self.progress.global_step):
                self.checkpoint_in_round(values)

    def joint_round_batches(self) -> Iterator[dict]:
        """PPT: the sources' batches in the reference's turns (`multi_dataset.compose_round`), each batch with its
        source's condition. A source that runs out mid-round starts a new pass (a new Ray Data epoch)."""
        sources = self.cfg.ppt.sources
        streams = self.run_config.source_streams(self.round)
        round_index = self.progress.epoch

        def passes(i: int):
            name = SOURCE_DATASET.format(i)
            shard = ray.train.get_dataset_shard(name)
            count = itertools.count()

            def new_pass():
                if self.rank == 0:  # pass k of round r: an epoch of its own, the same in every run of the seed
                    self.stream_positions[name].set(next(count) * self.rounds + round_index)
                return iter_batches(shard, streams[i])

            return new_pass

        for i, batch in compose_round([passes(i) for i in range(len(sources))], self.round.ratios):
            yield {**batch, "condition": sources[i].condition}

    def optimizer_step(self, batch: dict) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.mix_rng.random() < self.cfg.mix_prob:
            batch = mix3d(batch)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            loss = self.model(batch_to_device(batch, self.device))["loss"]
        scaler = self.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.optimizer, self.cfg.clip_grad)
        # Under loss scaling an overflowing gradient is routine: the scaler skips that step and lowers the scale.
        # Only a non-finite loss (or, unscaled, gradient) counts as a bad step.
        nonfinite = not bool(torch.isfinite(loss)) or (scaler is None and not bool(torch.isfinite(grad_norm)))
        nonfinite, (total_loss,) = agree_across_workers(nonfinite, [float(loss)], self.device)
        schedule_step = True  # the lr schedule stays tied to the data position, except as below
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_steps += 1
            if scaler is not None:
                scaler.update()  # closes this step's unscale_ (and lowers the scale)
        elif scaler is not None:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            # As Pointcept: a step the scaler skipped (its scale went down) does not advance the lr schedule.
            schedule_step = scale <= scaler.get_scale()
        else:
            self.optimizer.step()
        self.nonfinite_guard.record(nonfinite, self.progress.global_step + 1)
        lrs = {f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups}
        if schedule_step:
            self.scheduler.step()
        values = dict(
            lrs,
            loss=total_loss / world_size(),
            grad_norm=float(grad_norm),
            skipped_steps=self.progress.skipped_steps,
            epoch=self.progress.epoch,
        )
        if scaler is not None:
            values["loss_scale"] = scaler.get_scale()
        return values

    def end_round(self) -> None:
        """Validate (with `evaluate` on), then (after the last round) test the best or last model, and report with a
        checkpoint."""
        round_index = self.progress.epoch
        values = self.validate() if self.cfg.evaluate else {}
        values.update(
            epoch=round_index,
            round=round_index,
            step=self.progress.global_step,
            best_round=self.best.round,
            **{ROUNDS_KEY: self.rounds},
        )
        if round_index == self.rounds and (test := self.test_model()) is not None:
            values.update(self.log_evaluation("eval/test", test, "test"))
        name = CHECKPOINT_DIR_FORMAT.format(round_index)
        report_checkpoint(name, values, self.save)
        self.cadence.saved()
        if self.metrics is not None:
            if round_index == self.rounds:  # the MLflow run points at the last round's checkpoint once it is uploaded
                wait_for_uploads()
            commit_metrics(self.metrics, self.run_dir)

    def checkpoint_in_round(self, values: dict[str, float]) -> None:
        """A checkpoint inside a round, with the step's metrics. Its score is NaN (not evaluated): Ray Train ranks it
        below every round's and keeps it only while it is the latest."""
        values = dict(values, step=self.progress.global_step, **{SCORE: math.nan})
        report_checkpoint(STEP_CHECKPOINT_DIR_FORMAT.format(self.progress.global_step), values, self.save)
        self.cadence.saved()
        if self.metrics is not None:
            commit_metrics(self.metrics, self.run_dir)

    def validate(self) -> dict[str, float]:
        """The round's validation pass over all workers' shares: its metrics, logged, and the best round updated."""
        round_index = self.progress.epoch
        rows = ray.train.get_dataset_shard(VAL_DATASET.format(self.rank)).iter_rows()
        model = for_evaluation(self.segmentor, self.cfg)
        val = segmentation_metrics(self.sum_over_workers(validation_confusion(model, rows, self.cfg)))
        self.best = self.best.after(round_index, val.miou)
        values = self.log_evaluation(f"eval/round-{round_index:04d}", val, "val")
        if self.metrics is not None:
            self.feature_images.log(
                self.metrics.client, self.metrics.run_id, self.segmentor.backbone, f"eval/round-{round_index:04d}"
            )
        return values

    def test_model(self) -> SegMetrics | None:
        """The full test protocol on this worker's share of the test scenes, with the best round's weights (the
        last round's with `test_last`); with `submission`, each scene's prediction file goes to `submit/`. None
        when no test scene of any worker is labelled (a benchmark's test split: its submission is the outcome)."""
        model = self.segmentor
        if not self.cfg.test_last and self.best.round != self.progress.epoch:
            # an earlier round's checkpoint, from the run's storage
            wait_for_uploads()  # it may still be on its way there
            raw = self.run_dir.read_bytes(f"{CHECKPOINT_DIR_FORMAT.format(self.best.round)}/{MODEL_FILE}")
            model = copy.deepcopy(self.segmentor)
            state = torch.load(io.BytesIO(raw), map_location=self.device, weights_only=True)["state_dict"]
            model.load_state_dict(state)
        scenes = ray.train.get_dataset_shard(TEST_DATASET.format(self.rank)).iter_rows()
        write = self.write_submission if self.cfg.submission else None
        confusion = self.sum_over_workers(protocol_confusion(for_evaluation(model, self.cfg), scenes, self.cfg, write))
        return segmentation_metrics(confusion) if confusion.any() else None

    def write_submission(self, scene: str, text: str) -> None:
        self.run_dir.write_bytes(f"{SUBMISSION_DIR}/{scene}.txt", text.encode())

    def sum_over_workers(self, confusion: np.ndarray) -> np.ndarray:
        if world_size() == 1:
            return confusion
        total = torch.from_numpy(confusion).to(self.device)
        dist.all_reduce(total)
        return total.cpu().numpy()

    def save(self, folder: Path) -> None:
        save_checkpoint(folder, self.segmentor, self.optimizer, self.scheduler, self.progress)
        (folder / BEST_FILE).write_text(json.dumps(dataclasses.asdict(self.best)))
        if self.scaler is not None:
            torch.save(self.scaler.state_dict(), folder / SCALER_FILE)

    def log_evaluation(self, folder: str, metrics: SegMetrics, prefix: str) -> dict[str, float]:
        """The metrics as {prefix_miou, ...}; rank 0 logs them (sent with the checkpoint) and the per-class table
        and confusion matrix (now) under `folder`."""
        values = {f"{prefix}_{key}": getattr(metrics, key) for key in METRIC_KEYS}
        if self.metrics is None:
            return values
        self.metrics.add(self.progress.global_step, values)
        client, run_id = self.metrics.client, self.metrics.run_id
        client.log_text(run_id, per_class_table(metrics, self.cfg.class_names) + "\n", f"{folder}/per_class_iou.txt")
        with tempfile.TemporaryDirectory() as tmp:
            png = save_confusion_png(metrics.confusion, self.cfg.class_names, Path(tmp) / "confusion.png")
            client.log_artifact(run_id, str(png), folder)
        return values


def mix3d(batch: dict) -> dict:
    """Mix3D as the reference's collate applies it: consecutive pairs of samples become one scene, by dropping
    every other offset (a batch of one sample is left as it is)."""
    offset = batch["offset"]
    return {**batch, "offset": torch.cat([offset[1:-1:2], offset[-1:]])}
