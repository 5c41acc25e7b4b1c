"""The order of a joint multi-dataset round against Pointcept's own `MultiDatasetDataloader` (datasets/dataloader.py).

The expected orders below are written out (turns of `ratios[i]` batches, a finished secondary dataset restarted, the
first one's end ending the round); the reference's own `__iter__` and `__len__`, run on the same lists of batches
(2026-12-07), gave exactly these orders and lengths.
"""

import pytest

from concerto_ray.finetune.multi_dataset import compose_round, round_steps


def _passes(*sizes):
    def start(i, size):
        return lambda: iter(f"{'msl'[i]}{j}" for j in range(size))

    return [start(i, size) for i, size in enumerate(sizes)]


@pytest.mark.parametrize(
    "sizes, ratios, expected",
    [
        # 0d/3d configs: Structured3D loop 2, ScanNet loop 1 (S3DIS 1): two main batches, then one of each other
        ((5, 2), (2, 1), ["m0", "m1", "s0", "m2", "m3", "s1", "m4"]),
        # a secondary dataset shorter than its share starts again
        ((3, 1), (1, 2), ["m0", "s0", "s0", "m1", "s0", "s0", "m2", "s0", "s0"]),
        ((4, 3, 1), (2, 1, 1), ["m0", "m1", "s0", "l0", "m2", "m3", "s1", "l0"]),
    ],
)
def test_a_round_takes_turns_as_the_reference_dataloader(sizes, ratios, expected):
    order = [batch for _, batch in compose_round(_passes(*sizes), ratios)]
    assert order == expected
    assert len(order) == round_steps(sizes[0], ratios)


def test_every_batch_says_its_dataset_and_bad_ratios_are_refused():
    assert [i for i, _ in compose_round(_passes(2, 2), (1, 1))] == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="ratios must be integers >= 1"):
        list(compose_round(_passes(2, 2), (1, 0)))
    with pytest.raises(ValueError, match="dataset 1 of the round gives no batch"):
        list(compose_round(_passes(2, 0), (1, 1)))
