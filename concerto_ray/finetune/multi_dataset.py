"""The order of a joint multi-dataset round (Point Prompt Training), as Pointcept's `MultiDatasetDataloader` has it.

Every batch comes from one dataset. The datasets take turns, dataset i giving `ratios[i]` batches a turn (its
config's `loop`, which here is a sampling ratio, not a repeat count). The first dataset sets the round's length:
its end ends the round, wherever in a turn; every other dataset that runs out starts a new pass and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

Batch = TypeVar("Batch")


def round_steps(main_batches: int, ratios: Sequence[int]) -> int:
    """Batches in a round whose first dataset gives `main_batches` (the reference's `__len__`)."""
    _check(ratios)
    return main_batches // ratios[0] * sum(ratios) + main_batches % ratios[0]


def compose_round(
    passes: Sequence[Callable[[], Iterable[Batch]]], ratios: Sequence[int]
) -> Iterator[tuple[int, Batch]]:
    """(dataset index, batch) in the round's order; `passes[i]()` gives a new pass over dataset i's batches."""
    _check(ratios)
    if len(passes) != len(ratios):
        raise ValueError(f"{len(passes)} datasets but {len(ratios)} ratios")
    iterators = [iter(start()) for start in passes]
    while True:
        for i, ratio in enumerate(ratios):
            for _ in range(ratio):
                batch = next(iterators[i], _END)
                if batch is _END:
                    if i == 0:
                        return
                    iterators[i] = iter(passes[i]())
                    batch = next(iterators[i], _END)
                    if batch is _END:
                        raise ValueError(f"dataset {i} of the round gives no batch at all")
                yield i, batch


_END = object()


def _check(ratios: Sequence[int]) -> None:
    if not ratios or any(r < 1 for r in ratios):
        raise ValueError(f"ratios must be integers >= 1, one per dataset; got {list(ratios)}")
