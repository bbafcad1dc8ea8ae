"""Settings chosen from the machine and the run length: what `"auto"` means in a training config.

Three settings have no value that suits every machine and every run, so they default to ``"auto"`` and are
resolved when training starts, once the run length is known (:func:`apply_defaults`, called by the loop):

- ``run.precision``: ``bf16`` autocast on a GPU that supports it; ``fp32`` on a CPU, where bf16 autocast was
  measured slower than fp32 at the widths a CPU run uses (the world recipe's stage-1 step: 0.79 s in bf16 vs
  0.48 s in fp32 at width 128, batch 64, on 2 cores).
- ``data.num_workers``: 0 when frozen features come from the feature cache (reading rows is cheap) or when a
  process has at most 2 cores (workers would compete with the training threads, and each epoch pays their
  start-up); otherwise half the cores of each process, at most 8.
- ``optim.warmup_steps``: 5% of the run's optimiser steps, at least 1 and at most 2000 (the paper's 2000 is
  under 1% of its runs; a 300-step first run gets 15).

The chosen values, with the reason for each, are printed at the start of the run and saved in the run's
``config.yaml``; any of them can be set explicitly instead (``run.precision=bf16``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from vlbridge.training.recipe import TrainConfig

__all__ = ["AUTO", "Choice", "apply_defaults", "available_cores", "resolve_defaults"]

AUTO = "auto"
WARMUP_FRACTION = 0.05
MAX_WARMUP = 2000
MAX_WORKERS = 8


@dataclass(frozen=True)
class Choice:
    """One resolved setting."""

    key: str  # dotted config key
    value: Any
    reason: str


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _precision(device: str) -> tuple[str, str]:
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16", "a GPU with bf16: autocast halves activation memory and uses the tensor cores"
        return "fp32", "this GPU has no bf16"
    if kind == "cpu":
        return "fp32", "CPU: bf16 autocast measured slower than fp32 at small widths"
    return "fp32", f"device {device!r}: fp32 is the safe choice"


def _workers(cores: int, *, world: int, feature_cache: bool) -> tuple[int, str]:
    if feature_cache:
        return 0, "features come from the feature cache: loading is cheap"
    per_process = max(1, cores // max(1, world))
    if per_process <= 2:
        return 0, f"{per_process} core(s) per process: workers would compete with training"
    n = min(MAX_WORKERS, per_process // 2)
    return n, f"half of the {per_process} cores per process (at most {MAX_WORKERS})"


def _warmup(total_steps: int) -> tuple[int, str]:
    n = max(1, min(MAX_WARMUP, round(WARMUP_FRACTION * total_steps)))
    return n, f"{WARMUP_FRACTION:.0%} of {total_steps} steps (at most {MAX_WARMUP})"


def resolve_defaults(
    cfg: TrainConfig, *, total_steps: int, world: int = 1, cores: int | None = None
) -> tuple[TrainConfig, list[Choice]]:
    """Replace every ``"auto"`` setting of `cfg` by a value for this machine and run.

    Args:
        cfg: The training config (not modified).
        total_steps: Optimiser steps the run will take.
        world: Training processes (each gets its share of the cores).
        cores: CPU cores to plan for (default: :func:`available_cores`).

    Returns:
        The resolved config (a copy) and the choices made, in a fixed order (empty when nothing was ``"auto"``).
    """
    cores = available_cores() if cores is None else cores
    choices: list[Choice] = []
    run, data, optim = cfg.run, cfg.data, cfg.optim
    if run.precision == AUTO:
        value, why = _precision(run.device)
        run = dataclasses.replace(run, precision=value)
        choices.append(Choice("run.precision", value, why))
    if data.num_workers == AUTO:
        value, why = _workers(cores, world=world, feature_cache=data.feature_cache is not None)
        data = dataclasses.replace(data, num_workers=value)
        choices.append(Choice("data.num_workers", value, why))
    if optim.warmup_steps == AUTO:
        value, why = _warmup(total_steps)
        optim = dataclasses.replace(optim, warmup_steps=value)
        choices.append(Choice("optim.warmup_steps", value, why))
    return dataclasses.replace(cfg, run=run, data=data, optim=optim), choices


def apply_defaults(
    cfg: TrainConfig,
    *,
    total_steps: int,
    world: int = 1,
    announce: bool = True,
    stream: TextIO | None = None,
) -> TrainConfig:
    """:func:`resolve_defaults`, printing each choice (one line each, on stderr) when `announce`."""
    resolved, choices = resolve_defaults(cfg, total_steps=total_steps, world=world)
    if announce and choices:
        out = stream if stream is not None else sys.stderr
        print("vlbridge: settings chosen for this machine and run (set them to override):", file=out)
        for c in choices:
            print(f"  {c.key}={c.value}  ({c.reason})", file=out)
    return resolved
