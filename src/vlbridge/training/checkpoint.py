"""Training checkpoints: only what training changes, in safetensors + JSON, written atomically.

A checkpoint folder `step-000123/` holds `trainable.safetensors` (parameters with requires_grad),
`optimizer.safetensors` + `optimizer.json` (AdamW moments and hyper-parameters), `state.json` (step,
epoch, position in the epoch, RNG states as base64, the config). `latest` names the newest complete
folder; it is replaced only after the folder is fully written, so a crash never leaves a half checkpoint
that `--resume` would read. Nothing is unpickled.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlbridge.errors import CheckpointError


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write `output_dir/step-XXXXXX` atomically and point `latest` at it; keep the newest `keep` folders."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = value.contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": opt["param_groups"], "scalars": scalars}))
        (tmp / "state.json").write_text(json.dumps({**state, "rng": _rng_state()}, indent=2))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    pointer = Path(output_dir) / "latest"
    if not pointer.exists():
        return None
    folder = Path(output_dir) / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore parameters, optimiser and RNG state; returns the saved training state (step, epoch, ...)."""
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({exc})") from exc
    params = dict(model.named_parameters())
    unknown = sorted(set(trainable) - set(params))
    if unknown:
        raise CheckpointError(f"{folder}: parameters not in this model: {unknown[:5]}")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    if optimizer is not None:
        tensors = load_file(str(folder / "optimizer.safetensors"))
        meta = json.loads((folder / "optimizer.json").read_text())
        entries: dict[int, dict[str, Any]] = {}
        for key, value in [*tensors.items(), *meta["scalars"].items()]:
            index, name = key.split(".", 1)
            entries.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": entries, "param_groups": meta["param_groups"]})
    _set_rng_state(state.pop("rng"))
    return state
