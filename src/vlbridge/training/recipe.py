"""The training recipe as typed config sections (round-trips to YAML; see `vlbridge.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vlbridge.models.builder import ModelConfig


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # caption data: JSONL manifests or COCO Karpathy JSON
    vqa: list[str] = field(default_factory=list)  # stage 2: VQA manifests {"image", "question", "answers"}
    chat: list[str] = field(default_factory=list)  # stage 2: {"image", "turns": [[question, answer], ...]}
    format: Literal["jsonl", "coco"] = "jsonl"
    image_root: str | None = None  # COCO: folder the image paths are relative to
    coco_split: str = "train"
    val: str | None = None  # a caption manifest (JSONL) for retrieval evaluation at the end
    max_text_length: int = 32
    batch_size: int = 32
    num_workers: int = 2
    augment: bool = True  # RandomResizedCrop(0.5-1) + flip
    hflip: float = 0.5  # set 0 when captions mention left/right
    feature_cache: str | None = None  # folder: cache the frozen encoder's output (once per image and view)
    cache_views: int = 1  # augmented views cached per image (with augment); epochs cycle through them


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    accumulate: int = 1  # gradient accumulation: micro-batches per optimiser step


@dataclass
class RunConfig:
    output_dir: str = "runs/stage1"
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    save_every: int = 1000  # optimiser steps between checkpoints (and one at the end)
    log_every: int = 10
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast for the forward pass
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True
    eval_k: int = 128  # retrieval re-ranking shortlist


@dataclass
class TrainConfig:
    stage: Literal["stage1", "stage2"] = "stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
