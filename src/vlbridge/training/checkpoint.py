"""Training checkpoints: only what training changes, in safetensors + JSON, written atomically, checksummed.

A checkpoint folder `step-000123/` holds `trainable.safetensors` (parameters with requires_grad),
`optimizer.safetensors` + `optimizer.json` (AdamW moments and hyper-parameters), `state.json` (step,
epoch, position in the epoch, RNG states as base64, the config) and `checksums.json` (size and digest of
each of those files, written last). A folder is written as `.step-000123.*` and renamed when complete;
`latest` names the newest complete folder and is replaced only after that. Nothing is unpickled.

Guarantees: a checkpoint with a non-finite parameter or optimiser moment is never written; pruning keeps
the newest `keep` folders by step and never the one just written; `--resume` reads the newest folder that
passes every check (:func:`resume_checkpoint`) and says which ones it passed over and why.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlbridge.errors import CheckpointError, TrainingError
from vlbridge.utils.io import folder_digests, replace_dir, storage_error, verify_digests, write_text

FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")
CHECKSUMS = "checksums.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def step_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The complete-looking `step-*` folders of a run, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_orphans(output_dir: str | os.PathLike) -> list[Path]:
    """Delete `.step-*` folders (and a stray `.latest.tmp`) left by a process killed while saving."""
    root = Path(output_dir)
    removed = [p for p in root.glob(".step-*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    (root / ".latest.tmp").unlink(missing_ok=True)
    return removed


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `output_dir/step-XXXXXX` atomically and point `latest` at it; keep the newest `keep` folders.

    Raises:
        TrainingError: A parameter or optimiser moment is not finite (nothing is written).
        StorageError: The folder cannot be written (full disk, read-only); the earlier checkpoints stay intact.
    """
    root = Path(output_dir)
    name = f"step-{state['step']:07d}"
    trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    bad = non_finite(trainable) + non_finite(tensors)
    if bad:
        raise TrainingError(
            f"training diverged: {len(bad)} tensors are not finite at step {state['step']} (e.g. {bad[0]}); "
            "no checkpoint written (lower optim.lr, set optim.grad_clip, or use more warmup)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    except OSError as exc:
        raise storage_error(exc, root / name) from exc
    try:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": opt["param_groups"], "scalars": scalars}))
        (tmp / "state.json").write_text(json.dumps({**state, "rng": _rng_state()}, indent=2, allow_nan=False))
        (tmp / CHECKSUMS).write_text(json.dumps(folder_digests(tmp, list(FILES)), indent=1))
        final = root / name
        replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # a full disk, a read-only folder
            raise storage_error(exc, root / name) from exc
        raise
    write_text(root / "latest", name)
    _prune(root, final, keep)
    return final


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Delete all but the `keep` highest-step folders; never `newest` (the one just written)."""
    folders = [p for p in step_folders(root) if p != newest]
    for old in folders[: max(0, len(folders) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` names, else the highest-step folder, else None (no check of its contents)."""
    pointer = Path(output_dir) / "latest"
    if pointer.is_file():
        folder = Path(output_dir) / pointer.read_text().strip()
        if folder.is_dir() and _STEP_RE.match(folder.name):
            return folder
    folders = step_folders(output_dir)
    return folders[-1] if folders else None


def check_checkpoint(folder: Path, *, full: bool = True) -> str | None:
    """The first reason `folder` cannot be resumed from (missing, truncated or corrupted files), or None."""
    if not folder.is_dir():
        return "not a folder"
    if not (folder / CHECKSUMS).exists() and all((folder / f).is_file() for f in FILES):
        return None  # written before checksums existed: load_checkpoint's own checks decide
    try:
        digests = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{CHECKSUMS} is missing or unreadable ({type(exc).__name__})"
    if not isinstance(digests, dict) or set(digests) != set(FILES):
        return f"{CHECKSUMS} does not list the checkpoint's files"
    return verify_digests(folder, digests, full=full)


def resume_checkpoint(
    output_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Load the newest intact checkpoint of a run into `model` and `optimizer`; returns its training state.

    Newer folders that are damaged (truncated or zero-byte files, bad checksums, invalid JSON, no RNG state) are
    renamed `step-XXXXXXX.damaged` with a warning, and the next older one is tried.

    Raises:
        CheckpointError: No intact checkpoint at all, or the checkpoints do not fit the model (changed config).
    """
    root = Path(output_dir)
    passed: list[str] = []
    for folder in reversed(step_folders(root)):
        problem = check_checkpoint(folder)
        state = None
        if problem is None:
            try:
                state = load_checkpoint(folder, model=model, optimizer=optimizer)
            except _Misfit:
                raise
            except CheckpointError as exc:
                problem = str(exc).removeprefix(f"{folder}: ")
        if state is not None:
            if passed:
                print(f"vlbridge: warning: resuming from {folder.name}, the newest intact checkpoint", file=sys.stderr)
            write_text(root / "latest", folder.name)
            return state
        warning = f"vlbridge: warning: checkpoint {folder.name} is damaged ({problem}); trying an older one"
        print(warning, file=sys.stderr)
        passed.append(folder.name)
        with contextlib.suppress(OSError):  # set aside, so that pruning and `latest` never pick it again
            folder.rename(folder.with_name(f"{folder.name}.damaged"))
    if passed:
        raise CheckpointError(f"--resume: no intact checkpoint in {root} (damaged: {', '.join(passed)})")
    raise CheckpointError(f"--resume: no checkpoint in {root}")


class _Misfit(CheckpointError):
    """The checkpoint is fine but belongs to a differently shaped model: an older one will not fit either."""


def read_state(folder: Path) -> dict[str, Any]:
    """`state.json` of a checkpoint (step, epoch, batch, config, ...), without touching any model."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable state.json ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("step", "epoch", "batch")):
        raise CheckpointError(f"{folder}: state.json lacks step / epoch / batch")
    if not isinstance(state.get("rng"), dict) or "torch" not in state["rng"]:
        raise CheckpointError(f"{folder}: state.json lacks the RNG state")
    return state


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore parameters, optimiser and RNG state; returns the saved training state (step, epoch, ...).

    Everything is read and checked before anything is changed, so a failure leaves model and optimiser as they
    were (and a caller can try an older checkpoint).

    Raises:
        CheckpointError: A file is unreadable or malformed, or the parameters do not fit this model.
    """
    state = read_state(folder)
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
    except Exception as exc:  # OSError, or safetensors' own error on a truncated / garbled header
        raise CheckpointError(f"{folder}: unreadable trainable.safetensors ({exc})") from exc
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(trainable) - set(params))
    missing = sorted(set(params) - set(trainable))
    if unknown or missing:
        raise _Misfit(
            f"{folder}: the checkpoint does not fit this model (not in the model: {unknown[:3]}, "
            f"not in the checkpoint: {missing[:3]}); was the model config changed?"
        )
    shapes = [(n, list(v.shape), list(params[n].shape)) for n, v in trainable.items() if v.shape != params[n].shape]
    if shapes:
        name, saved, now = shapes[0]
        raise _Misfit(
            f"{folder}: {len(shapes)} parameters changed shape since the checkpoint (e.g. {name}: {saved} -> {now}); "
            "was the model config changed?"
        )
    opt_state = None
    if optimizer is not None:
        try:
            tensors = load_file(str(folder / "optimizer.safetensors"))
            meta = json.loads((folder / "optimizer.json").read_text())
            entries: dict[int, dict[str, Any]] = {}
            for key, value in [*tensors.items(), *meta["scalars"].items()]:
                index, name = key.split(".", 1)
                entries.setdefault(int(index), {})[name] = value
            opt_state = {"state": entries, "param_groups": meta["param_groups"]}
            groups = optimizer.state_dict()["param_groups"]
            if [len(g["params"]) for g in opt_state["param_groups"]] != [len(g["params"]) for g in groups]:
                raise ValueError("parameter groups differ from this model's")
        except Exception as exc:  # noqa: BLE001 - any malformation means the same: unusable optimiser state
            raise CheckpointError(f"{folder}: unreadable optimiser state ({type(exc).__name__}: {exc})") from exc
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    if opt_state is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{folder}: optimiser state does not fit ({exc})") from exc
    try:
        _set_rng_state(state.pop("rng"))
    except Exception as exc:  # noqa: BLE001 - bad base64, wrong length
        raise CheckpointError(f"{folder}: unreadable RNG state ({exc})") from exc
    return state
