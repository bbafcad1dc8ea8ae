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
    # stage "conversation": LLaVA conversation files (.json list or .jsonl) {"image", "conversations": [...]}
    conversations: list[str] = field(default_factory=list)
    template: str = "vicuna_v1"  # "plain" (LLaVA stage 1) | "vicuna_v1" | "chat_template" (the tokenizer's own)
    image_folder: str | None = None  # conversation image paths are relative to it (default: the file's folder)
    format: Literal["jsonl", "coco"] = "jsonl"
    image_root: str | None = None  # COCO: folder the image paths are relative to
    coco_split: str = "train"
    val: str | None = None  # a caption manifest (JSONL) for retrieval evaluation at the end
    val_samples: int = 200  # images of `val` (first ones) used by the periodic validation (run.val_every)
    max_text_length: int = 32
    batch_size: int = 32
    # "auto" (here and in optim.warmup_steps, run.precision): chosen at train start from the machine and the run
    # length by `vlbridge.training.defaults`, printed, and saved resolved in the run's config.yaml.
    num_workers: int | Literal["auto"] = "auto"
    augment: bool = True  # RandomResizedCrop(0.5-1) + flip
    hflip: float = 0.5  # set 0 when captions mention left/right
    feature_cache: str | None = None  # folder: cache the frozen encoder's output (once per image and view)
    cache_views: int = 1  # augmented views cached per image (with augment); epochs cycle through them
    max_skip_fraction: float = 0.5  # stop with an error when an epoch skips more than this share of its samples
    # Stage 1: identical captions on different images are true matches (ITC targets, never ITM negatives).
    # False: by image id alone (BLIP-2/LAVIS).
    text_positives: bool = True
    # Stage 1: a manifest field whose equal values also make true matches (e.g. a class when every caption is just
    # the class name). Off by default: records of one class whose captions differ (the ink, the place) are not
    # matches of each other's captions.
    match_field: str | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    bridge_lr: float | None = None  # the bridge's own peak learning rate when the LLM trains too; None: lr
    min_lr: float = 1e-5
    warmup_steps: int | Literal["auto"] = "auto"  # "auto": 5% of the run's steps, at most 2000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    accumulate: int = 1  # gradient accumulation: micro-batches per optimiser step
    max_bad_steps: int = 5  # non-finite loss / gradient: the step is skipped; this many in a row stop the run


@dataclass
class LossConfig:
    """Stage 1: the weights of its three losses in the sum that is back-propagated (BLIP-2: 1, 1, 1)."""

    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0
    label_smoothing: float = 0.1  # of the ITC targets and the ITG tokens


@dataclass
class RunConfig:
    output_dir: str = "runs/stage1"
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    save_every: int = 1000  # optimiser steps between checkpoints (and one at the end)
    log_every: int = 10
    seed: int = 0
    precision: Literal["fp32", "bf16", "auto"] = "auto"  # bf16 autocast for the forward pass; "auto": bf16 on a GPU
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True
    eval_k: int | None = None  # retrieval re-ranking shortlist; null: 5% of each gallery, 16 to 128
    val_every: int | None = None  # steps between cheap validations on data.val (training/validation.py); null: none


@dataclass
class TrainConfig:
    stage: Literal["stage1", "stage2", "conversation"] = "stage1"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate(cfg: TrainConfig) -> None:
    """Check every numeric setting once, at load, so a bad value is one clear line rather than a crash later.

    Values that are not numbers (e.g. a machine-resolved ``"auto"``) are left to whoever resolves them.

    Raises:
        ConfigError: The first setting out of range, named by its dotted key.
    """
    from vlbridge.errors import ConfigError

    def check(key: str, value: object, ok, need: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if value != value or not ok(value):  # NaN fails every range
            raise ConfigError(f"config key '{key}': must be {need}, got {value!r}")

    d, o, r = cfg.data, cfg.optim, cfg.run
    for key, value in (
        ("data.batch_size", d.batch_size),
        ("data.max_text_length", d.max_text_length),
        ("data.cache_views", d.cache_views),
        ("optim.accumulate", o.accumulate),
        ("optim.max_bad_steps", o.max_bad_steps),
        ("run.epochs", r.epochs),
        ("run.save_every", r.save_every),
        ("run.log_every", r.log_every),
        ("run.eval_k", r.eval_k),
        ("run.val_every", r.val_every),
        ("data.val_samples", d.val_samples),
    ):
        check(key, value, lambda v: v >= 1, ">= 1")
    if r.max_steps is not None:
        check("run.max_steps", r.max_steps, lambda v: v >= 1, ">= 1 (or null: run.epochs decides)")
    check("data.num_workers", d.num_workers, lambda v: v >= 0, ">= 0")
    check("optim.warmup_steps", o.warmup_steps, lambda v: v >= 0, ">= 0")
    check("optim.lr", o.lr, lambda v: 0 < v < float("inf"), "a positive number")
    check("optim.min_lr", o.min_lr, lambda v: 0 <= v <= o.lr, f"between 0 and optim.lr ({o.lr})")
    check("optim.weight_decay", o.weight_decay, lambda v: 0 <= v < float("inf"), ">= 0")
    for i, beta in enumerate(o.betas):
        check(f"optim.betas[{i}]", beta, lambda v: 0 <= v < 1, "in [0, 1)")
    if o.grad_clip is not None:
        check("optim.grad_clip", o.grad_clip, lambda v: 0 < v < float("inf"), "a positive number (or null: none)")
    check("data.hflip", d.hflip, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
    check("data.max_skip_fraction", d.max_skip_fraction, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
    for key in ("itc", "itm", "itg"):
        check(f"loss.{key}", getattr(cfg.loss, key), lambda v: 0 <= v < float("inf"), ">= 0")
    check("loss.label_smoothing", cfg.loss.label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)")
    if not str(r.output_dir).strip():
        raise ConfigError("config key 'run.output_dir': must name a folder")
