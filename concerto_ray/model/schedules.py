"""Per-step schedules of the self-supervised models: mask size/ratio, teacher temperature, EMA momentum.

Each schedule is a linear warm-up from `start` to `base` followed by a half-cosine from `base` to
`final`, the shape Pointcept's `CosineScheduler` gives. Values are looked up by global step (0-based),
so a resumed run only needs the step count, not a stepped iterator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    base: float
    final: float
    total_steps: int
    start: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self):
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must lie in [0, {self.total_steps}], got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.total_steps:
            return self.final
        if step < self.warmup_steps:
            # Like numpy.linspace, the warm-up includes both ends (its last step already has the
            # base value) and a one-step warm-up holds only the start value.
            if self.warmup_steps == 1:
                return self.start
            return self.start + (self.base - self.start) * step / (self.warmup_steps - 1)
        cosine_steps = self.total_steps - self.warmup_steps
        progress = (step - self.warmup_steps) / cosine_steps
        return self.final + 0.5 * (self.base - self.final) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ScheduleValues:
    mask_size: float
    mask_ratio: float
    teacher_temp: float
    momentum: float


@dataclass(frozen=True)
class SslSchedules:
    """The four schedules of Sonata/Concerto, built from a model config and the run's total steps."""

    mask_size: CosineSchedule
    mask_ratio: CosineSchedule
    teacher_temp: CosineSchedule
    momentum: CosineSchedule

    @classmethod
    def from_config(cls, config, total_steps: int) -> SslSchedules:
        """`config` is a `SonataConfig` or `ConcertoConfig` (anything with the reference's field names)."""

        def warmed_up(start: float, base: float, warmup_ratio: float) -> CosineSchedule:
            # Warm-up, then constant at `base`: the reference passes final == base for these three.
            return CosineSchedule(
                base=base,
                final=base,
                total_steps=total_steps,
                start=start,
                warmup_steps=int(total_steps * warmup_ratio),
            )

        return cls(
            mask_size=warmed_up(config.mask_size_start, config.mask_size_base, config.mask_size_warmup_ratio),
            mask_ratio=warmed_up(config.mask_ratio_start, config.mask_ratio_base, config.mask_ratio_warmup_ratio),
            teacher_temp=warmed_up(
                config.teacher_temp_start, config.teacher_temp_base, config.teacher_temp_warmup_ratio
            ),
            momentum=CosineSchedule(base=config.momentum_base, final=config.momentum_final, total_steps=total_steps),
        )

    def at(self, step: int) -> ScheduleValues:
        return ScheduleValues(
            mask_size=self.mask_size(step),
            mask_ratio=self.mask_ratio(step),
            teacher_temp=self.teacher_temp(step),
            momentum=self.momentum(step),
        )
