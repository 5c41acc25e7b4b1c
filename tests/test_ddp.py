"""DDP over two gloo processes, as Ray Train wraps the pre-training model (issue 13): every trainable parameter of
Sonata and Concerto takes part in every step, so DDP finds nothing unused and `run.find_unused_parameters` (a
graph walk per step, on by default in Pointcept's Concerto configs) can stay off. The tiny configs have the
paper configs' modules at a smaller width: the same backbone stages (encoder only, mask token), heads and up-cast
levels. Also what the ranks agree on after each step (`reduce_step`): the finiteness flag, the summed loss and the
work balance across ranks (`points_imbalance`), which rank 0 logs every step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ssl_models import add_images, make_batch

from concerto_ray.model.build import build_ssl_model
from concerto_ray.model.configs import get_model_config
from concerto_ray.train.runtime import reduce_step

WORLD_SIZE = 2
STEPS = 2


def train_steps(rank: int, name: str, dinov2: str | None, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks, as Ray Train's workers build them
        config = get_model_config(name)
        if dinov2 is not None:
            config.image_encoder.weights = dinov2
        model = torch.nn.parallel.DistributedDataParallel(build_ssl_model(config).train(), find_unused_parameters=True)
        unused = []
        for step in range(STEPS):
            batch = make_batch(seed=WORLD_SIZE * step + rank)  # each rank its own scenes
            if dinov2 is not None:
                batch = add_images(batch, config.patch_h, config.patch_w, config.image_encoder.image_size, seed=step)
            model.zero_grad()
            model(batch)["loss"].backward()
            # bytes; DDP has no public getter, and it leaves the key out while it has found none
            unused.append(model._get_ddp_logging_data().get("unused_parameter_size", 0))
        without_grad = [n for n, p in model.module.named_parameters() if p.requires_grad and p.grad is None]
        # rank 1 with twice rank 0's points (the most, 200, over the mean, 150) and a non-finite step
        totals = reduce_step(
            torch.tensor(rank == 1),
            torch.tensor(1.5 * (rank + 1), dtype=torch.float64),
            100 * (rank + 1),
            torch.tensor([float(rank), 7.0]),
        )
        report = {
            "unused_bytes": unused,
            "without_grad": without_grad,
            "agreed": [totals.nonfinite, totals.loss, totals.points, totals.points_imbalance],
            "logged": totals.logged,
        }
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing the process group down: freeing gloo's process group (with DDP's reducer) joins its
    # worker threads while holding the GIL, and a worker thread still freeing a finished all-reduce's tensors needs
    # the GIL: a deadlock now and then (seen in CI: both threads' stacks). The results are written already.
    os._exit(0)


@pytest.mark.parametrize("name", ["tiny-sonata", "tiny-concerto"])
def test_ddp_finds_no_unused_parameters_on_two_gloo_ranks(name, dinov2_dir, tmp_path):
    dinov2 = str(dinov2_dir) if "concerto" in name else None
    mp.spawn(train_steps, args=(name, dinov2, tmp_path), nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        expected = {
            "unused_bytes": [0] * STEPS,
            "without_grad": [],
            "agreed": [True, 4.5, 300.0, 200 / 150],
            "logged": [float(rank), 7.0],  # each rank's own values
        }
        assert report == expected, (rank, report)
