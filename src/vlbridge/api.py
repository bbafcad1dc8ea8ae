"""`vlbridge.load`: one entry point for every checkpoint kind we read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlbridge.errors import CheckpointError
from vlbridge.models.vlm import VisionLanguageModel


def load(
    source: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None, **kwargs
) -> VisionLanguageModel:
    """Load a vision-language model (BLIP-2, InstructBLIP, LLaVA, or any vlbridge checkpoint).

    Args:
        source: a vlbridge checkpoint folder; a transformers checkpoint folder or hub id
            (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`, `Blip2ForImageTextRetrieval`,
            `LlavaForConditionalGeneration`);
            or a LAVIS `.pth` file (then pass `language_model=` a hub id or folder of its frozen LLM, if it has one).
        device: where to put the model.
        dtype: dtype of the frozen vision encoder and LLM (the bridge stays float32), e.g. torch.bfloat16.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = Path(source).expanduser()
    if path.suffix in (".pth", ".pt", ".bin") or path.is_file():
        if not path.exists():
            raise CheckpointError(f"{source}: no such file")
        from vlbridge.interop.lavis_load import load_lavis

        return load_lavis(path, device=device, dtype=dtype, **kwargs).eval()
    from vlbridge.interop.native import is_native, load_native

    if path.is_dir() and is_native(path) and set(kwargs) <= {"verify"}:  # verify=True: check every byte first
        return load_native(path, device=device, dtype=dtype, verify=bool(kwargs.get("verify"))).eval()
    if kwargs:
        raise TypeError(f"unexpected arguments for this checkpoint kind: {', '.join(kwargs)}")
    from vlbridge.interop.hf import load_hf, read_config
    from vlbridge.interop.llava import is_llava, load_llava
    from vlbridge.utils.hub import resolve

    folder = resolve(source)
    if is_llava(read_config(folder)):
        return load_llava(folder, device=device, dtype=dtype).eval()
    return load_hf(folder, device=device, dtype=dtype).eval()
