"""`vlbridge train`: one explicit training loop for stage 1 (ITC + ITM + ITG).

Set-up, then for each micro-batch: forward under optional bf16 autocast, backward, and every
`accumulate` micro-batches clip, step, schedule, log, checkpoint. Resuming restores parameters,
optimiser, RNG and the position in the epoch, so an interrupted run continues exactly.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlbridge.config import save_yaml, to_dict
from vlbridge.data.datasets import SkipReport
from vlbridge.errors import ConfigError
from vlbridge.models.blip2 import Blip2
from vlbridge.models.builder import build_model
from vlbridge.objectives.stage1 import Stage1Output, stage1_losses
from vlbridge.training import distributed as D
from vlbridge.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vlbridge.training.data import EpochSampler, TokenizingCollate
from vlbridge.training.optim import lr_at, make_optimizer, set_lr
from vlbridge.training.recipe import TrainConfig


class Stage1Module(nn.Module):
    """The model plus its objective behind one `forward`, so DistributedDataParallel sees the whole step."""

    def __init__(self, model: Blip2, dec_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.dec_token_id = dec_token_id

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> Stage1Output:
        device = self.model.device
        if "vision_feats" in batch:
            feats = batch["vision_feats"].to(device)
        else:
            feats = self.model.vision(batch["pixel_values"].to(device))
        ids = D.id_codes(batch["image_id"]).to(device)
        return stage1_losses(
            self.model,
            feats,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            ids,
            dec_token_id=self.dec_token_id,
            generator=generator,
        )


def read_records(cfg: TrainConfig, sources: list[str]):
    from vlbridge.data.datasets import read_caption_manifest, read_coco_karpathy

    records = []
    for source in sources:
        if cfg.data.format == "jsonl":
            records.extend(read_caption_manifest(source))
        else:
            if cfg.data.image_root is None:
                raise ConfigError("data.image_root is required for COCO-format data")
            records.extend(read_coco_karpathy(source, cfg.data.image_root, cfg.data.coco_split))
    return records


def _transform(cfg: TrainConfig, model: Blip2):
    from vlbridge.data.transforms import EvalTransform, TrainTransform

    image_config = model.image_processor.config
    return TrainTransform(image_config, hflip=cfg.data.hflip) if cfg.data.augment else EvalTransform(image_config)


def _feature_cache(cfg: TrainConfig, model: Blip2, images: list):
    from vlbridge.data.feature_cache import FeatureCache

    build = dict(
        transform_config=model.image_processor.config,
        views=cfg.data.cache_views if cfg.data.augment else 1,
        train_augment=cfg.data.augment,
        seed=cfg.run.seed,
        train_transform_kwargs={"hflip": cfg.data.hflip} if cfg.data.augment else None,
    )
    cache = None
    if D.is_main():  # one rank encodes; the others wait, then open the finished cache
        cache = FeatureCache.get_or_build(
            model.vision, images, cfg.data.feature_cache, progress=cfg.run.progress, **build
        )
    D.barrier()
    if cache is None:
        cache = FeatureCache.get_or_build(model.vision, images, cfg.data.feature_cache, progress=False, **build)
    return cache


def stage1_data(cfg: TrainConfig, model: Blip2):
    """(dataset, collate, module) for stage 1."""
    from vlbridge.data.datasets import CaptionDataset

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one caption manifest")
    if cfg.model.embed_dim is None:
        raise ConfigError("stage 1 needs model.embed_dim (the ITC/ITM/ITG heads)")
    records = read_records(cfg, cfg.data.train)
    if cfg.data.feature_cache is not None:
        from vlbridge.data.feature_cache import CachedCaptionDataset

        cache = _feature_cache(cfg, model, [r.image for r in records])
        dataset, key = CachedCaptionDataset(records, cache, seed=cfg.run.seed), "vision_feats"
    else:
        dataset, key = CaptionDataset(records, _transform(cfg, model), seed=cfg.run.seed), "pixel_values"
    tokenizer = model.qformer_tokenizer
    module = Stage1Module(model, dec_token_id=tokenizer.convert_tokens_to_ids("[DEC]"))
    return dataset, TokenizingCollate(tokenizer, cfg.data.max_text_length, key), module


def stage2_data(cfg: TrainConfig, model: Blip2):
    """(dataset, collate, module) for stage 2 / instruction tuning."""
    from vlbridge.training.stage2 import (
        PromptCollate,
        PromptedDataset,
        PromptRecord,
        Stage2Module,
        chat_records,
        vqa_records,
    )

    if model.language_model is None:
        raise ConfigError("stage 2 needs model.language_model")
    records = [PromptRecord(r.image, r.image_id, (r.caption,)) for r in read_records(cfg, cfg.data.train)]
    for path in cfg.data.vqa:
        records.extend(vqa_records(path))
    for path in cfg.data.chat:
        records.extend(chat_records(path))
    if not records:
        raise ConfigError("no training data: set data.train, data.vqa or data.chat")
    if cfg.data.feature_cache is not None:
        cache = _feature_cache(cfg, model, sorted({str(r.image) for r in records}))
        dataset, key = PromptedDataset(records, cache=cache, seed=cfg.run.seed), "vision_feats"
    else:
        dataset, key = PromptedDataset(records, transform=_transform(cfg, model), seed=cfg.run.seed), "pixel_values"
    return dataset, PromptCollate(model, max_text_length=cfg.data.max_text_length, feature_key=key), Stage2Module(model)


STAGES = {"stage1": stage1_data, "stage2": stage2_data}


def train(
    cfg: TrainConfig, *, resume: bool = False, on_step: Callable[[int, dict[str, float]], None] | None = None
) -> dict[str, Any]:
    """Run stage-1 training as configured; returns a summary (final losses, paths, evaluation)."""
    D.init_from_env()
    rank, world = D.rank(), D.world_size()
    torch.manual_seed(cfg.run.seed)
    out_dir = Path(cfg.run.output_dir)
    model = build_model(cfg.model).to(cfg.run.device)
    model.train()
    model.qformer.gradient_checkpointing = cfg.run.gradient_checkpointing
    dataset, collate, module = STAGES[cfg.stage](cfg, model)
    B, accumulate = cfg.data.batch_size, cfg.optim.accumulate
    sampler = EpochSampler(len(dataset), batch_size=B, seed=cfg.run.seed, rank=rank, world=world)
    micro_per_epoch = sampler.batches_per_epoch()
    if micro_per_epoch < accumulate:
        raise ConfigError(f"{len(dataset)} samples do not fill one step of {B} x {world} ranks x {accumulate}")
    steps_per_epoch = micro_per_epoch // accumulate
    total = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch

    step_module = module
    if world > 1:  # stage 2 leaves the Q-Former's text side unused unless instruction-aware
        step_module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=cfg.stage != "stage1")
    optimizer = make_optimizer(model, cfg.optim)
    state = {"step": 0, "epoch": 0, "batch": 0}
    if resume:
        found = latest_checkpoint(out_dir)
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {out_dir}")
        state = load_checkpoint(found, model=model, optimizer=optimizer)
        state = {k: state[k] for k in ("step", "epoch", "batch")}
    if D.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "config.yaml")
    log = _Logger(out_dir, enabled=D.is_main(), resume=resume)
    autocast = (
        torch.autocast(device_type=torch.device(cfg.run.device).type, dtype=torch.bfloat16)
        if cfg.run.precision == "bf16"
        else nullcontext()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = _progress(total, state["step"], cfg.run.progress and D.is_main())
    skipped = SkipReport()
    last: dict[str, float] = {}
    started = time.perf_counter()
    micro = 0
    while state["step"] < total:
        sampler.set_epoch(state["epoch"], start_batch=state["batch"])
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state["epoch"])
        loader = DataLoader(
            dataset,
            batch_size=B,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.run.seed + state["epoch"]),  # never touch the global RNG
        )
        for batch in loader:
            skipped.update(batch)
            state["batch"] += 1
            if batch["batch_size"] == 0:
                continue
            # Negatives: a generator keyed by (seed, step, micro-batch), identical on every rank and after a resume.
            generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + state["step"] * 131 + micro)
            sync = micro + 1 == accumulate
            with nullcontext() if sync or world == 1 else step_module.no_sync(), autocast:
                out = step_module(batch, generator)
            (out.loss / accumulate).backward()
            micro = 0 if sync else micro + 1
            if not sync:
                continue
            if cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
            lr = lr_at(state["step"], total, cfg.optim)
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            last = {**out.logs(), "lr": lr}
            if cfg.stage == "stage1":
                last["temp"] = float(model.temp.detach())
            if state["step"] % cfg.run.log_every == 0 or state["step"] == total:
                log.write(state["step"], state["epoch"], last)
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.3f}")
            if D.is_main() and (state["step"] % cfg.run.save_every == 0 or state["step"] == total):
                save_checkpoint(
                    out_dir, model=model, optimizer=optimizer, state=_state_for_save(state, micro_per_epoch, cfg)
                )
            if on_step is not None:
                on_step(state["step"], last)
            if state["step"] >= total:
                break
        if state["batch"] >= micro_per_epoch:
            if skipped.count and D.is_main():
                print(f"epoch {state['epoch']}: {skipped.summary()}", file=sys.stderr)
            state["epoch"] += 1
            state["batch"] = 0
    progress.close()
    log.close()
    summary: dict[str, Any] = {
        "steps": state["step"],
        "final": last,
        "seconds": time.perf_counter() - started,
        "skipped": skipped.to_dict(),
        "output_dir": str(out_dir),
    }
    if D.is_main():
        model.eval()
        model.save(out_dir / "model", format="native")
        summary["model"] = str(out_dir / "model")
        if cfg.data.val and cfg.stage == "stage1":
            from vlbridge.data.datasets import read_caption_manifest
            from vlbridge.inference.retrieval import evaluate_retrieval, write_report

            result = evaluate_retrieval(
                model, read_caption_manifest(cfg.data.val), k=cfg.run.eval_k, progress=cfg.run.progress
            )
            write_report(result, out_dir / "eval.json")
            summary["eval"] = result.get("metrics", result)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _state_for_save(state: dict[str, int], micro_per_epoch: int, cfg: TrainConfig) -> dict[str, Any]:
    saved = dict(state)
    if saved["batch"] >= micro_per_epoch:  # the epoch is finished: the resumed run starts the next one
        saved["epoch"] += 1
        saved["batch"] = 0
    saved["config"] = to_dict(cfg)
    return saved


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step", dynamic_ncols=True)


class _Logger:
    """CSV (always) and TensorBoard (when installed) logs on rank 0."""

    def __init__(self, out_dir: Path, *, enabled: bool, resume: bool) -> None:
        self.enabled = enabled
        self.file = self.writer = self.tb = None
        if not enabled:
            return
        path = out_dir / "log.csv"
        self.file = open(path, "a" if resume and path.exists() else "w", newline="")  # noqa: SIM115
        self.fields: list[str] | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **values}
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            if self.file.tell() == 0:
                self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
