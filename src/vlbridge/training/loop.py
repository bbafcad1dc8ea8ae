"""`vlbridge train`: one explicit training loop for every stage (`training.tasks`: what each stage trains).

Set-up, then for each micro-batch: forward under optional bf16 autocast, backward, and every
`accumulate` micro-batches clip, step, schedule, log, checkpoint. Resuming restores parameters,
optimiser, RNG and the position in the epoch, so an interrupted run continues exactly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlbridge.config import from_dict, save_yaml, to_dict
from vlbridge.data.datasets import SkipReport
from vlbridge.errors import ConfigError, TrainingError
from vlbridge.models.builder import build_model
from vlbridge.training import distributed as D
from vlbridge.training.checkpoint import (
    latest_checkpoint,
    non_finite,
    remove_orphans,
    resume_checkpoint,
    save_checkpoint,
    step_folders,
)
from vlbridge.training.data import EpochSampler
from vlbridge.training.defaults import apply_defaults
from vlbridge.training.optim import lr_at, make_optimizer, set_lr
from vlbridge.training.recipe import TrainConfig, validate
from vlbridge.training.tasks import STAGES
from vlbridge.training.validation import make_validator
from vlbridge.utils.io import dumps, finite, recover_dir, storage_error, write_json, write_text


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_changed: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run training as configured; returns a summary (final losses, paths, evaluation).

    Args:
        cfg: The recipe (validated here: every numeric setting is range-checked first).
        resume: Continue from the newest intact checkpoint of `cfg.run.output_dir` (damaged newer ones are set
            aside with a warning). Settings that differ from the checkpoint's are refused unless `allow_changed`.
        overwrite: Replace a run already in `cfg.run.output_dir` (without it, reusing a run folder is an error).
        allow_changed: With `resume`, accept changed settings; they are recorded in `config_changes.jsonl`.
        on_step: Called after every optimiser step with (step, logged values).

    Raises:
        ConfigError: A bad setting, a run folder that is already used, changed settings on resume.
        TrainingError: Training diverged (non-finite losses or gradients `optim.max_bad_steps` times in a row),
            or an epoch skipped (nearly) all of its samples.
        StorageError: The run folder cannot be written (full disk, read-only); earlier checkpoints stay intact.
    """
    validate(cfg)
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
    D.init_from_env()
    rank, world = D.rank(), D.world_size()
    out_dir = Path(cfg.run.output_dir)
    if D.is_main():
        _prepare_run_dir(out_dir, resume=resume, overwrite=overwrite)
    D.barrier()
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model).to(cfg.run.device)
    model.train()
    model.bridge.set_gradient_checkpointing(cfg.run.gradient_checkpointing)
    task = STAGES[cfg.stage](cfg, model)
    dataset, collate, module = task.dataset, task.collate, task.module
    validator = make_validator(cfg, model)  # run.val_every: cheap held-out metrics in log.csv (None: off)
    B, accumulate = cfg.data.batch_size, cfg.optim.accumulate
    sampler = EpochSampler(len(dataset), batch_size=B, seed=cfg.run.seed, rank=rank, world=world)
    micro_per_epoch = sampler.batches_per_epoch()
    if micro_per_epoch < accumulate:
        raise ConfigError(f"{len(dataset)} samples do not fill one step of {B} x {world} ranks x {accumulate}")
    steps_per_epoch = micro_per_epoch // accumulate
    total = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch
    cfg = apply_defaults(cfg, total_steps=total, world=world, announce=D.is_main())  # "auto" settings resolved

    step_module = module
    if world > 1:  # stage 2 leaves the Q-Former's text side unused unless instruction-aware
        step_module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=not task.uses_every_parameter)
    optimizer = make_optimizer(model, cfg.optim)
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0}
    bad_total, elapsed_before = 0, 0.0
    last: dict[str, float] = {}
    if resume:
        saved = resume_checkpoint(out_dir, model=model, optimizer=optimizer)
        changes = config_changes(saved.get("config"), cfg)
        if changes and not allow_changed:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:5])
            raise ConfigError(
                f"--resume with changed settings ({shown}); resume with the run's own settings, or pass "
                "--allow-changed to continue with the new ones (they are recorded in config_changes.jsonl)"
            )
        state = {k: saved[k] for k in ("step", "epoch", "batch")}
        bad_total = int(saved.get("bad_steps", 0))
        elapsed_before = float(saved.get("elapsed", 0.0))
        last = dict(saved.get("last") or {})
        if changes and D.is_main():
            print(f"vlbridge: warning: resuming with changed settings: {', '.join(changes)}", file=sys.stderr)
            with open(out_dir / "config_changes.jsonl", "a", encoding="utf-8") as f:
                f.write(dumps({"step": state["step"], "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    if D.is_main():
        save_yaml(cfg, out_dir / "config.yaml")
    log = _Logger(out_dir, enabled=D.is_main(), resume_step=state["step"] if resume else None)
    autocast = (
        torch.autocast(device_type=torch.device(cfg.run.device).type, dtype=torch.bfloat16)
        if cfg.run.precision == "bf16"
        else nullcontext()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    progress = _progress(total, state["step"], cfg.run.progress and D.is_main())
    skipped, epoch_skipped = SkipReport(), SkipReport()
    started = time.perf_counter()
    clock = {"time": started, "step": state["step"]}  # for samples_per_s between log rows
    micro, bad_micro, in_a_row = 0, False, 0
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
        epoch_samples = (micro_per_epoch - state["batch"]) * B
        for batch in loader:
            epoch_skipped.update(batch)
            _check_skips(epoch_skipped, state["epoch"], epoch_samples, cfg.data.max_skip_fraction, final=False)
            state["batch"] += 1
            if batch["batch_size"] == 0:
                continue
            if task.check_batch is not None:
                task.check_batch(batch)
            # Negatives: a generator keyed by (seed, step, micro-batch), identical on every rank and after a resume.
            generator = torch.Generator().manual_seed(cfg.run.seed * 7919 + state["step"] * 131 + micro)
            sync = micro + 1 == accumulate
            with nullcontext() if sync or world == 1 else step_module.no_sync(), autocast:
                out = step_module(batch, generator)
            bad_micro = bad_micro or not bool(torch.isfinite(out.loss.detach()))
            (out.loss / accumulate).backward()  # always: every rank must take part in the gradient all-reduce
            micro = 0 if sync else micro + 1
            if not sync:
                continue
            # The guard: a non-finite loss or gradient skips the update (counted); too many in a row stop the run.
            norm = torch.nn.utils.clip_grad_norm_(
                trainable, cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
            )
            bad = torch.tensor(float(bad_micro or not bool(torch.isfinite(norm))))
            if world > 1:
                torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            bad_micro = False
            if bool(bad):
                optimizer.zero_grad(set_to_none=True)
                bad_total, in_a_row = bad_total + 1, in_a_row + 1
                if D.is_main():
                    print(
                        f"vlbridge: warning: step {state['step'] + 1}: non-finite loss or gradient, update skipped "
                        f"({in_a_row} in a row, {bad_total} in the run)",
                        file=sys.stderr,
                    )
                if in_a_row >= cfg.optim.max_bad_steps:
                    good = latest_checkpoint(out_dir)
                    raise TrainingError(
                        f"training diverged: {in_a_row} steps in a row with a non-finite loss or gradient after step "
                        f"{state['step']}; last good checkpoint: {good if good else 'none'} (lower optim.lr, set "
                        "optim.grad_clip, or use more optim.warmup_steps)"
                    )
                continue
            in_a_row = 0
            lr = lr_at(state["step"], total, cfg.optim)
            set_lr(optimizer, lr)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            last = {**out.logs(), "lr": lr}
            if task.after_step is not None:
                last.update(task.after_step())
            validated = validator is not None and validator.due(state["step"], total)
            if validated:  # its time is kept out of samples_per_s
                val_started = time.perf_counter()
                last.update(validator(model))
                clock["time"] += time.perf_counter() - val_started
            if state["step"] % cfg.run.log_every == 0 or state["step"] == total or validated:
                now = time.perf_counter()
                rate = (state["step"] - clock["step"]) * B * accumulate * world / max(now - clock["time"], 1e-9)
                clock.update(time=now, step=state["step"])
                timing = {"bad_steps": bad_total, "time": round(elapsed_before + now - started, 3)}
                log.write(state["step"], state["epoch"], {**last, **timing, "samples_per_s": round(rate, 2)})
            progress.update(1)
            progress.set_postfix(loss=f"{last['loss']:.3f}")
            if D.is_main() and (state["step"] % cfg.run.save_every == 0 or state["step"] == total):
                extra = {"bad_steps": bad_total, "elapsed": elapsed_before + time.perf_counter() - started}
                save_checkpoint(
                    out_dir,
                    model=model,
                    optimizer=optimizer,
                    state={**_state_for_save(state, micro_per_epoch, cfg), **extra, "last": finite(last)},
                )
            if on_step is not None:
                on_step(state["step"], last)
            if state["step"] >= total:
                break
        if state["batch"] >= micro_per_epoch:
            report = epoch_skipped.all_gather()
            if report.count and D.is_main():
                print(f"epoch {state['epoch']}: {report.summary()}", file=sys.stderr)
            _check_skips(report, state["epoch"], report.count + report.samples, cfg.data.max_skip_fraction, final=True)
            skipped.merge(report)
            epoch_skipped.reset()
            state["epoch"] += 1
            state["batch"] = 0
    progress.close()
    log.close()
    skipped.merge(epoch_skipped.all_gather())
    summary: dict[str, Any] = {
        "steps": state["step"],
        "final": finite(last),
        "bad_steps": bad_total,
        "seconds": elapsed_before + time.perf_counter() - started,  # over all sessions of the run
        "skipped": skipped.to_dict(),
        "output_dir": str(out_dir),
    }
    if D.is_main():
        bad = non_finite({n: p.detach() for n, p in model.named_parameters()})
        if bad:  # never reached through the guarded steps above; a last line of defence for the saved model
            raise TrainingError(
                f"training diverged: {len(bad)} parameters are not finite (e.g. {bad[0]}); no model saved"
            )
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
        write_json(out_dir / "summary.json", summary)
    return finite(summary)


# Files and folders a run writes into its output folder (what --overwrite removes; what marks a folder as used).
RUN_FILES = ("log.csv", "latest", "config.yaml", "summary.json", "eval.json", "config_changes.jsonl")
RUN_FOLDERS = ("model", "tensorboard")
RUN_MARKERS = ("latest", "summary.json", "model")  # what makes a folder "a run" that only --overwrite replaces


def _prepare_run_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that is a file, unwritable, or already holds a run (unless resuming or overwriting)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run.output_dir {out_dir} is a file, not a folder")
    # A folder with only config.yaml / log.csv (a run that stopped before its first checkpoint) may be reused.
    used = [n for n in RUN_MARKERS if (out_dir / n).exists()] + [p.name for p in step_folders(out_dir)]
    if used and not resume and not overwrite:
        raise ConfigError(
            f"run.output_dir {out_dir} already holds a training run ({', '.join(used[:4])}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another run.output_dir"
        )
    if resume and not used:
        raise ConfigError(f"--resume: {out_dir} holds no training run (no checkpoint)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise storage_error(exc, out_dir) from exc
    if overwrite:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
        for folder in [*(out_dir / n for n in RUN_FOLDERS), *step_folders(out_dir)]:
            shutil.rmtree(folder, ignore_errors=True)
    remove_orphans(out_dir)
    recover_dir(out_dir / "model")  # a kill between the two renames of the final save


# Settings that may differ on resume without changing what is trained.
RESUME_FREE = {
    "run.output_dir", "run.progress", "run.device", "run.log_every", "run.save_every", "run.eval_k",
    "data.num_workers", "data.val", "data.val_samples", "run.val_every",
}  # fmt: skip


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict[str, Any] | None, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """`{dotted key: (checkpoint's value, new value)}` for settings that differ (beyond :data:`RESUME_FREE`)."""
    if not isinstance(saved, dict):
        return {}
    with contextlib.suppress(ConfigError):  # fields added since the checkpoint was written take their defaults
        saved = to_dict(from_dict(TrainConfig, saved))
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if k not in RESUME_FREE and old.get(k) != new.get(k)
    }


def _check_skips(report: SkipReport, epoch: int, epoch_samples: int, max_fraction: float, *, final: bool) -> None:
    """Stop when an epoch cannot be useful: no usable sample at all, or more than `max_fraction` skipped."""
    if not report.count:
        return
    first = report.entries[0]
    doomed = report.count > max_fraction * max(epoch_samples, 1)
    if report.samples == 0 and (final or doomed):
        raise TrainingError(
            f"epoch {epoch}: no usable sample, all {report.count} read so far were skipped "
            f"(first: {first[0]}: {first[1]})"
        )
    if doomed:
        raise TrainingError(
            f"epoch {epoch}: {report.count} of {epoch_samples} samples skipped, more than data.max_skip_fraction="
            f"{max_fraction} (first: {first[0]}: {first[1]}); fix the data or raise data.max_skip_fraction"
        )


def _state_for_save(state: dict[str, int], micro_per_epoch: int, cfg: TrainConfig) -> dict[str, Any]:
    saved = dict(state)
    if saved["batch"] >= micro_per_epoch:  # the epoch is finished: the resumed run starts the next one
        saved["epoch"] += 1
        saved["batch"] = 0
    saved["config"] = to_dict(cfg)
    return saved


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on a terminal; a plain progress line every 30 s when stderr is a file or a pipe."""
    from vlbridge.eval.progress import progress_bar

    return progress_bar(total, "training", "step", enabled, initial=initial, leave=True)


class _Logger:
    """CSV (always) and TensorBoard (when installed) logs on rank 0.

    On resume, rows after the resumed step (logged by the interrupted run after its last checkpoint) are dropped,
    so every step appears once. A row with a new column rewrites the file with the wider header.
    """

    def __init__(self, out_dir: Path, *, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.file = self.writer = self.tb = None
        self.fields: list[str] = []
        if not enabled:
            return
        self.path = out_dir / "log.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or [])
                rows = [r for r in reader if _int(r.get("step")) is not None and _int(r.get("step")) <= resume_step]
        self._rewrite(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        if self.file is not None:
            self.file.close()
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.fields, restval="")
        if self.fields:
            writer.writeheader()
            writer.writerows(rows)
        write_text(self.path, text.getvalue())
        self.file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = csv.DictWriter(self.file, fieldnames=self.fields, restval="") if self.fields else None

    def write(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, **values}
        if self.writer is None or not set(row) <= set(self.fields):
            self.file.close()
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f)) if self.fields else []
            self.fields = self.fields + [k for k in row if k not in self.fields]
            self._rewrite(rows)
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
