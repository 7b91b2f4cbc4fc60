"""Learning-rate schedules, stepped once per iteration (milestones and warm-up are in iterations)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from volsynth.config import ScheduleConfig


def lr_factor(schedule: ScheduleConfig, iteration: int, iterations: int) -> float:
    """Multiplier of the base learning rate after ``iteration`` scheduler steps (a pure function, testable).

    ``warmup`` ramps linearly from 1/warmup to 1 over the first iterations for every kind (large early steps are
    what makes freshly initialised GANs and UNets diverge); ``onecycle`` always warms up (5 % by default).
    """
    warmup = schedule.warmup
    if schedule.kind == "onecycle" and warmup == 0:
        warmup = max(1, iterations // 20)
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    if schedule.kind == "multistep":
        return schedule.gamma ** sum(iteration >= m for m in schedule.milestones)
    if schedule.kind == "linear_decay":
        start, span = schedule.decay_start, max(1, iterations - schedule.decay_start)
        return 1.0 if iteration < start else max(0.0, 1.0 - (iteration - start) / span)
    if schedule.kind in ("cosine", "onecycle"):
        span = max(1, iterations - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (iteration - warmup) / span)))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, iterations: int,
                   clock: Callable[[int], int] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule as a ``LambdaLR`` (its state is just the step count: resume is exact).

    ``clock`` maps the step count to the iteration the schedule is evaluated at (train.time_box: further along
    when the time budget runs out faster than the iterations); None = the step count itself.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(schedule, clock(it) if clock is not None else it, iterations))
