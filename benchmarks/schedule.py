"""Which measurements run, in which order, within a time budget: the run as an iterator of outcomes.

:func:`plan` orders each op's (case, provider) pairs: the providers that do not compile, case by
case, then those that do (``Provider.compiles``), so that compile time - the largest unknown -
cannot crowd out the fastdensity and eager figures. :func:`run` then measures the plan and yields,
as each happens:

* the device-copy yardstick (a :class:`~.measure.Measurement` of op ``device_copy``), first;
* :class:`Running` before each (case, provider) starts, so a caller can show what is under way;
* one :class:`~.measure.Measurement` or :class:`~.measure.Skip` per (case, provider, mode) of the plan.

It records and prints nothing: the caller (``fastdensity bench``) writes rows and shows progress.

Budget. With ``budget_s`` seconds in all, each op gets an equal share of the time still left when it
starts (time an op leaves unused passes to the next). Within an op, compiling providers start only
while their reserve (``Provider.compile_reserve_s``, else the run's ``compile_reserve_s``: 30 s for
a full CPU run, where Inductor compiles C++; 10 s otherwise) is left of the op's share, because a
compilation cannot be stopped once started. Where :data:`COMPILE_SHARE` of the share is at least the
smallest reserve, the non-compiling providers stop when only that part is left, so that it goes to
compilation. Whatever the budget leaves out is a ``budget`` skip.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .cases import Case, Provider
from .measure import (Measurement, Skip, copy_measurement, input_sets, last_level_cache_bytes, make_timer, measure,
                      skip_for_error, tuned_convolutions)

__all__ = ["COMPILE_SHARE", "Step", "Running", "plan", "size", "run"]

#: The part of each op's time share kept for the providers that compile.
COMPILE_SHARE = 0.4


@dataclass
class Step:
    """One (case, provider) of the plan and the modes it is measured in."""

    case: Case
    provider: Provider
    modes: list[str]


@dataclass
class Running:
    """Yielded when a step starts (before its provider is built): what the run is busy with."""

    case: Case
    provider: Provider

    def __str__(self) -> str:
        return f"{self.case.op} {self.case.shape} {self.provider.name}"


def plan(cases_by_op: dict[str, list[Case]], *, providers: Sequence[str] | None = None,
         modes: Sequence[str] | None = None) -> dict[str, list[Step]]:
    """Each op's steps in running order, keeping only the named ``providers`` and ``modes`` (None: all)."""
    out = {}
    for op, cases in cases_by_op.items():
        steps = []
        for compiles in (False, True):
            for case in cases:
                case_modes = [m for m in case.modes if modes is None or m in modes]
                steps += [Step(case, p, case_modes) for p in case.providers
                          if p.compiles == compiles and (providers is None or p.name in providers)]
        out[op] = steps
    return out


def size(steps_by_op: dict[str, list[Step]]) -> int:
    """How many measurements (or skips) :func:`run` yields for the plan, the yardstick not counted."""
    return sum(len(step.modes) for steps in steps_by_op.values() for step in steps)


def run(steps_by_op: dict[str, list[Step]], *, device: torch.device, quick: bool = False,
        budget_s: float | None = None, timer=None, copy_bytes: int | None = None,
        compile_reserve_s: float | None = None) -> Iterator[Measurement | Skip | Running]:
    """Measure the plan within ``budget_s`` seconds (None: no limit); see the module docstring.

    ``timer`` defaults to :func:`~.measure.make_timer`; ``copy_bytes`` is the yardstick's size.
    """
    timer = timer or make_timer(device, quick)
    deadline = math.inf if budget_s is None else time.perf_counter() + budget_s
    yardstick = copy_measurement(device, timer, copy_bytes)
    yield yardstick
    cache = 0 if getattr(timer, "flushes_cache", False) else last_level_cache_bytes(device)
    if compile_reserve_s is None:
        compile_reserve_s = 30.0 if device.type == "cpu" and not quick else 10.0

    def reserve_of(provider: Provider) -> float:
        if not provider.compiles:
            return 0.0
        return compile_reserve_s if provider.compile_reserve_s is None else provider.compile_reserve_s

    with tuned_convolutions(device):
        for index, steps in enumerate(steps_by_op.values()):
            now = time.perf_counter()
            share = (deadline - now) / (len(steps_by_op) - index)
            op_deadline = now + share
            # Measured last, torch.compile would otherwise get only what the others leave, often
            # nothing; its part is kept only where it is enough to start a compilation at all.
            needs = [reserve_of(s.provider) for s in steps if s.provider.compiles and not s.case.unavailable]
            keep = COMPILE_SHARE * share if needs and COMPILE_SHARE * share >= min(needs) else 0.0
            split = op_deadline - keep if math.isfinite(op_deadline) else op_deadline
            for step in steps:
                if step.case.unavailable:
                    yield from _skips(step, "unavailable", step.case.unavailable)
                    continue
                yield Running(step.case, step.provider)
                compiles = step.provider.compiles
                spent = ("time budget of this op spent" if compiles or not keep else
                         "this op's time for providers that do not compile is spent (the rest is torch.compile's)")
                yield from _run_step(step, device=device, timer=timer, cache=cache, copy_gbps=yardstick.gbps,
                                     deadline=op_deadline if compiles else split, spent=spent,
                                     reserve=reserve_of(step.provider))


def _skips(step: Step, kind: str, reason: str) -> list[Skip]:
    return [Skip.of(step.case, step.provider.name, mode, kind, reason) for mode in step.modes]


def _run_step(step: Step, *, device, timer, cache, copy_gbps, deadline, spent, reserve) -> Iterator[Measurement | Skip]:
    """Build the provider (unavailable ones say why), then, while time is left before ``deadline``
    (``reserve`` seconds of it for a provider that compiles), measure each mode; past the deadline,
    a budget skip with the reason ``spent``."""
    case, provider = step.case, step.provider
    # Failures become skips outside the except blocks, whose tracebacks would otherwise stay alive
    # (with whatever tensors their frames hold) while the caller handles each skip.
    failed: list[Skip] | None = None
    try:
        runner = provider.build()
    except Exception as exc:
        failed = [skip_for_error(case, provider.name, mode, exc) for mode in step.modes]
    if failed is not None:
        yield from failed
        return
    left = deadline - time.perf_counter()
    if left <= 0 or left < reserve:
        yield from _skips(step, "budget", spent if left <= 0 else
                          f"under {reserve:.0f} s of this op's budget left, too little to compile")
        return
    try:
        sets = input_sets(case, cache)
    except Exception as exc:
        failed = [skip_for_error(case, provider.name, mode, exc) for mode in step.modes]
    if failed is not None:
        yield from failed
        return
    for mode in step.modes:
        if time.perf_counter() >= deadline:
            yield Skip.of(case, provider.name, mode, "budget", spent)
            continue
        yield measure(case, provider, runner, sets, mode, device=device, timer=timer, copy_gbps=copy_gbps)
