"""What of the language model trains: nothing (BLIP-2, MiniGPT-4, LLaVA stage 1), everything (LLaVA stage 2), or
LoRA adapters on every linear layer but the LM head (LLaVA's LoRA recipe), through `peft`.

The adapters are injected in place (`peft.inject_adapter_in_model`), so the LM keeps its own class and every
caller of `model.language_model` sees the same module; they can be merged into the base weights
(`merge_lora`) or saved on their own in PEFT's format (`save_adapter`: `adapter_config.json` +
`adapter_model.safetensors`, loadable with `peft.PeftModel.from_pretrained` on the base LM).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vlbridge.errors import ConfigError
from vlbridge.utils.formats import register_saver

MODES = ("frozen", "full", "lora")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1, got {self}")


def lora_targets(lm: nn.Module) -> list[str]:
    """Names (last component) of the LM's linear layers, the output head excepted."""
    head = lm.get_output_embeddings()
    linear = [name for name, m in lm.named_modules() if isinstance(m, nn.Linear) and m is not head]
    # With adapters injected, a target is `<path>.base_layer` beside its `lora_A/B.<adapter>` layers.
    paths = {name.removesuffix(".base_layer") for name in linear if ".lora_" not in name}
    return sorted({name.rsplit(".", 1)[-1] for name in paths})


def _peft_config(lm: nn.Module, settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=lora_targets(lm)
    )


def set_language_training(lm: nn.Module, mode: str, lora: LoraSettings | None = None) -> None:
    """Freeze the LM, unfreeze it, or give it trainable LoRA adapters (the rest frozen)."""
    if mode not in MODES:
        raise ConfigError(f"language_training must be one of {MODES}, got {mode!r}")
    if mode == "lora":
        from peft import inject_adapter_in_model

        inject_adapter_in_model(_peft_config(lm, lora or LoraSettings()), lm)
    for name, p in lm.named_parameters():
        p.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in name))
    if mode == "frozen":
        lm.eval()


def has_lora(lm: nn.Module) -> bool:
    return any("lora_" in name for name, _ in lm.named_parameters())


def merge_lora(lm: nn.Module) -> None:
    """Fold every adapter into its base layer and put the plain layer back (the LM is then LoRA-free)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            setattr(parent, child, module.get_base_layer())


@register_saver("adapter")
def save_model_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """`model.save(dir, format="adapter")`: the LM's LoRA adapters alone, in PEFT's format."""
    return save_adapter(model.language_model, LoraSettings(**model.config.lora), directory)


def save_adapter(lm: nn.Module, settings: LoraSettings, directory: str | os.PathLike) -> Path:
    """Write the LM's adapters in PEFT's format (the base LM not included)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from vlbridge.utils.io import atomic_dir

    if not has_lora(lm):
        raise ConfigError("this language model has no LoRA adapters to save")
    config = _peft_config(lm, settings)
    config.base_model_name_or_path = getattr(lm.config, "_name_or_path", None) or None
    config.task_type = "CAUSAL_LM"
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(lm).items()}
    # PEFT names adapter weights as inside a PeftModel: `base_model.model.<module path>`.
    state = {f"base_model.model.{k}": v for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        meta = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        (tmp / "adapter_config.json").write_text(json.dumps(meta, indent=2, default=str))

    return atomic_dir(directory, write)
