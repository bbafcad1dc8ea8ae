"""AdamW with the BLIP-2 recipe: no weight decay on norms, biases, the temperature and the query tokens;
a per-step cosine schedule with linear warmup."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlbridge.training.recipe import OptimConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases and the temperature are 0/1-dimensional; the queries are named."""
    return param.ndim < 2 or name.endswith("query_tokens")


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with `bridge_lr`, the bridge's parameters get their own learning rate
    (LLaVA's projector lr next to the LLM's), following the same schedule (`lr_scale` = bridge_lr / lr)."""
    scale = 1.0 if cfg.bridge_lr is None else cfg.bridge_lr / cfg.lr
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        own = scale if name.startswith("bridge.") else 1.0
        groups.setdefault((no_decay(name, p), own), []).append(p)
    if not groups.keys() - {(True, 1.0), (False, 1.0)}:  # the usual two groups, in the usual order
        groups = {(False, 1.0): groups.get((False, 1.0), []), (True, 1.0): groups.get((True, 1.0), [])}
    params = [
        {"params": ps, "weight_decay": 0.0 if plain else cfg.weight_decay, "lr_scale": s}
        for (plain, s), ps in groups.items()
    ]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate after `step` optimiser steps: linear warmup, then cosine from lr to min_lr at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
