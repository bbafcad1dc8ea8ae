"""The embedded default: the whole BLIP-2 recipe on the synthetic world, end to end, with an HTML report.

Nothing is downloaded. Every frozen part is trained here first (stage 0), saved in transformers formats and then
loaded through exactly the code path a hub model takes:

1. **world** — :func:`vlbridge.data.world.generate_world`: PNG images of coloured shapes, JSONL caption and VQA
   manifests, train / val / test / compositional splits.
2. **stage 0, vision** — a small ViT trained CLIP-style against a small text encoder
   (:func:`vlbridge.training.stage0_vision.train_vision_encoder`), saved as a ``CLIPVisionModel`` folder. Frozen.
3. **stage 0, text** — a BPE tokenizer and a small OPT trained on world text
   (:func:`vlbridge.training.stage0_text.train_language_model`). Frozen.
4. **stage 1** — the Q-Former learns to read the frozen image features: ITC + ITM + ITG on the training captions,
   reading the frozen features from a feature cache (computed once).
5. **stage 2** — the Q-Former and a projection become a 27-token soft prompt for the frozen OPT, trained on the
   captions (language-modelling loss on the caption only).
6. **instruction tuning** — InstructBLIP: the prompt (a question, or nothing for a caption) also goes into the
   Q-Former; trained on captions and questions together.
7. **evaluation** on the held-out in-distribution (test) and compositional splits: retrieval (ITC, then ITM
   re-ranking) with the stage-1 model; captions (CIDEr, BLEU-4, fact F1) and VQA accuracy (official metric) with
   the stage-2 and instruction-tuned models; against chance, the blind LM (no image) and the LM reading the true
   scene record (the ceiling a perfect bridge would reach).
8. **the comparison** — every bridge of ``bridges`` (Q-Former, instruction-aware Q-Former, LLaVA's MLP projector,
   MiniGPT-4's frozen Q-Former with a trained projection) trained the same way (``compare``: the same frozen
   encoder and LM, captions + VQA, the same steps) and evaluated on the test split side by side.
9. **report** — ``report.html``: a self-contained page with sample images, generated captions and answers,
   retrieval examples, metric tables and loss curves.

Every stage's result is cached under ``out_dir`` with a key of its settings and of every stage before it, so a
second run only redoes what changed; ``fresh=True`` redoes everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from vlbridge.data.world import WorldConfig
from vlbridge.errors import ConfigError
from vlbridge.recipes.world_eval import _evaluate, _generate, _score, _split_records, _write_json
from vlbridge.training.stage0_text import SCENE_LENGTH, Stage0TextConfig
from vlbridge.training.stage0_vision import Stage0VisionConfig

__all__ = ["BRIDGES", "BridgeTraining", "WorldRecipe", "run_world_recipe"]

_FORMAT_VERSION = 1
_STAGE_FILE = "stage.json"
# Words the prompts add to the world's vocabulary (the Q-Former reads them when instruction-aware).
_PROMPT_WORDS = ("question", "answer", "short", ":", "?", ",", ".")
# The bridges the comparison can train, and what each is.
BRIDGES = {
    "qformer": "Q-Former (BLIP-2), from stage 1",
    "qformer_instruct": "instruction-aware Q-Former (InstructBLIP), from stage 1",
    "projector": "MLP projector (LLaVA mlp2x_gelu), from scratch",
    "minigpt4": "frozen stage-1 Q-Former + trained projection (MiniGPT-4)",
}


@dataclass
class BridgeTraining:
    """How one bridge stage (1, 2 or instruction tuning) trains.

    Attributes:
        steps: Optimiser steps.
        batch_size: Samples per step.
        lr: Peak learning rate (after linear warmup; cosine decay to ``min_lr``).
        min_lr: Final learning rate.
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay.
    """

    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05


@dataclass
class WorldRecipe:
    """Everything that determines the embedded default run (round-trips to YAML with :mod:`vlbridge.config`).

    Attributes:
        seed: Seed of the bridge stages (the world and stage 0 have their own).
        world: The synthetic world.
        vision: Stage-0 vision encoder (CLIP-style).
        text: Stage-0 language model.
        vision_layer: Hidden state of the frozen ViT that the Q-Former reads (-2: the penultimate, as BLIP-2).
        qformer: Q-Former architecture (``QFormerConfig`` fields).
        cross_attention_frequency: A cross-attention block every this many Q-Former layers.
        image_position: Position on the Q-Former's image keys (`vlbridge.bridges.position`): the world's facts
            are places ("top left") and shapes, which a position-blind cross-attention cannot tell apart.
        embed_dim: Width of the stage-1 ITC embedding.
        stage1: Stage-1 training (ITC + ITM + ITG).
        stage2: Stage-2 training (captions through the frozen LM).
        instruct: Instruction tuning (captions and VQA, instruction-aware Q-Former).
        compare: Training of each bridge of the comparison (captions and VQA, every bridge the same).
        bridges: The bridges to compare (keys of ``BRIDGES``); empty: no comparison.
        precision: Autocast precision of the bridge stages. fp32 by default: at these widths (128) bf16 autocast
            is slower on a CPU (stage-1 step 0.79 s in bf16 vs 0.48 s in fp32 at batch 64, measured here).
        retrieval_k: ITC candidates per query re-ranked by ITM.
        eval_images: Held-out images per split to evaluate (None: all).
        gallery: Example images shown per split in the report.
    """

    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    vision: Stage0VisionConfig = field(default_factory=Stage0VisionConfig)
    text: Stage0TextConfig = field(default_factory=Stage0TextConfig)
    vision_layer: int = -2
    qformer: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "intermediate_size": 256,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        }
    )
    cross_attention_frequency: int = 1
    image_position: Literal["none", "sincos", "learned"] = "learned"
    embed_dim: int = 128
    stage1: BridgeTraining = field(default_factory=lambda: BridgeTraining(steps=450, lr=2e-3))
    stage2: BridgeTraining = field(default_factory=lambda: BridgeTraining(steps=400))
    instruct: BridgeTraining = field(default_factory=lambda: BridgeTraining(steps=400))
    compare: BridgeTraining = field(default_factory=lambda: BridgeTraining(steps=300))
    bridges: list[str] = field(default_factory=lambda: list(BRIDGES))
    precision: Literal["fp32", "bf16"] = "fp32"
    retrieval_k: int = 16
    eval_images: int | None = 300
    gallery: int = 12

    def validate(self) -> None:
        """Raise ConfigError if a setting is out of range."""
        self.world.validate()
        self.vision.validate()
        self.text.validate()
        for name in ("stage1", "stage2", "instruct", "compare"):
            stage = getattr(self, name)
            if stage.steps < 1 or stage.batch_size < 2:
                raise ConfigError(f"{name}: steps must be >= 1 and batch_size >= 2")
        unknown = [b for b in self.bridges if b not in BRIDGES]
        if unknown or len(set(self.bridges)) != len(self.bridges):
            raise ConfigError(f"bridges: {unknown or self.bridges} (each once, of {', '.join(BRIDGES)})")
        if self.retrieval_k < 1 or self.gallery < 0 or (self.eval_images is not None and self.eval_images < 1):
            raise ConfigError("retrieval_k and eval_images must be >= 1, gallery >= 0")
        if self.text.scene_fraction <= 0:
            raise ConfigError("text.scene_fraction must be > 0: the frozen LM must learn to read a scene record")


# ----------------------------------------------------------------------------------------------------------------------
# Stage caching


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Runs each stage once per key: a stage whose folder holds ``stage.json`` with the same key is skipped."""

    def __init__(self, out_dir: Path, fresh: bool, log: Callable[[str], None]) -> None:
        self.out_dir, self.fresh, self.log = out_dir, fresh, log
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, key: str, fn: Callable[[Path], dict[str, Any]], title: str) -> dict[str, Any]:
        folder = self.out_dir / name
        marker = folder / _STAGE_FILE
        if not self.fresh:
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads(marker.read_text())
                if saved.get("key") == key and saved.get("format_version") == _FORMAT_VERSION:
                    self.log(f"[{name}] {title}: cached ({saved['seconds']:.0f} s when it ran)")
                    self.results[name] = {**saved["result"], "cached": True, "seconds": saved["seconds"]}
                    return self.results[name]
        self.log(f"[{name}] {title} ...")
        folder.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        started = time.perf_counter()
        result = fn(folder)
        seconds = time.perf_counter() - started
        _write_json(marker, {"format_version": _FORMAT_VERSION, "key": key, "seconds": seconds, "result": result})
        self.log(f"[{name}] done in {seconds:.0f} s")
        self.results[name] = {**json.loads(json.dumps(result, default=str)), "cached": False, "seconds": seconds}
        return self.results[name]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------------
# The bridge stages


def _train_config(
    recipe: WorldRecipe, stage: str, folder: Path, paths: dict[str, Path], progress: bool, bridge: str | None = None
):
    """The training config of a bridge stage; ``stage="compare"`` with ``bridge``: one bridge of the comparison."""
    from vlbridge.config import from_dict
    from vlbridge.training.recipe import TrainConfig

    settings: BridgeTraining = getattr(recipe, stage)
    world = paths["world"]
    model: dict[str, Any] = {
        "vision": str(paths["vision"]),
        "vision_layer": recipe.vision_layer,
        "tokenizer": str(paths["qformer_tokenizer"]),
        "qformer": dict(recipe.qformer),
        "num_query_tokens": SCENE_LENGTH,
        "cross_attention_frequency": recipe.cross_attention_frequency,
        "image_position": recipe.image_position,
        "embed_dim": recipe.embed_dim if stage == "stage1" else None,
    }
    data: dict[str, Any] = {
        "train": [str(world / "captions_train.jsonl")],
        "batch_size": settings.batch_size,
        "num_workers": 0,
        "augment": False,  # captions name left and right, top and bottom: no flips, no crops
        "hflip": 0.0,
        "max_text_length": 32,
        "feature_cache": str(paths["feature_cache"]),
    }
    if stage != "stage1":
        model |= {"language_model": str(paths["lm"]), "init_from": str(paths["init_from"])}
    if stage == "instruct":
        model["instruct"] = True
        data["vqa"] = [str(world / "vqa_train.jsonl")]
    if stage == "compare":  # every bridge: captions + VQA, the same steps; a Q-Former starts from stage 1
        data["vqa"] = [str(world / "vqa_train.jsonl")]
        if bridge == "qformer_instruct":
            model["instruct"] = True
        elif bridge == "minigpt4":
            model["freeze_qformer"] = True
        elif bridge == "projector":  # no Q-Former: every image token of the same frozen layer, projected
            model = {
                "vision": str(paths["vision"]),
                "vision_layer": recipe.vision_layer,
                "language_model": str(paths["lm"]),
                "bridge": {"kind": "projector", "projector_type": "mlp2x_gelu"},
                "vision_select": "all",
                "embed_dim": None,
            }
    raw = {
        "stage": "stage1" if stage == "stage1" else "stage2",
        "model": model,
        "data": data,
        "optim": {
            "lr": settings.lr,
            "min_lr": settings.min_lr,
            "warmup_steps": settings.warmup_steps,
            "weight_decay": settings.weight_decay,
        },
        "run": {
            "output_dir": str(folder),
            "max_steps": settings.steps,
            "save_every": settings.steps,
            "log_every": 10,
            "seed": recipe.seed,
            "precision": recipe.precision,
            "progress": progress,
        },
    }
    return from_dict(TrainConfig, raw)


def _train_bridge(cfg, folder: Path, measure: bool = False) -> dict[str, Any]:
    """Train one bridge stage; ``measure``: also its trainable parameters, visual tokens and s/step."""
    import csv

    from vlbridge.training.loop import train

    summary = train(cfg, overwrite=True)  # the stage cache decided to redo this stage: replace its run
    with open(folder / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    curve = {
        name: [[int(r["step"]), float(r[name])] for r in rows if r.get(name) not in (None, "")]
        for name in rows[0]
        if name.startswith("loss")
    } if rows else {}  # fmt: skip
    result = {"model": str(folder / "model"), "final": summary["final"], "train_seconds": summary["seconds"],
              "curves": curve}  # fmt: skip
    if measure:
        from vlbridge.models.builder import build_model

        model = build_model(cfg.model)  # as training built it: what requires grad is what trained
        result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result["visual_tokens"] = model.num_visual_tokens
        # s/step between the first and the last log row: the steady state, without building and the last save
        timed = [(int(r["step"]), float(r["time"])) for r in rows if r.get("time") not in (None, "")]
        if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
            result["s_per_step"] = (timed[-1][1] - timed[0][1]) / (timed[-1][0] - timed[0][0])
        else:
            result["s_per_step"] = summary["seconds"] / max(summary["steps"], 1)
        result["steps"] = summary["steps"]
    return result


def _compare_one(cfg, bridge: str, recipe: WorldRecipe, world: Path, folder: Path, progress: bool) -> dict[str, Any]:
    """One bridge of the comparison: trained (``_train_bridge``), then captions and answers on the test split."""
    import vlbridge

    result = _train_bridge(cfg, folder, measure=True)
    model = vlbridge.load(folder / "model")
    images, questions = _split_records(world, "test", recipe.eval_images)
    out = _generate(model, world, images, questions, f"test: {bridge}", progress)
    scores = _score(images, questions, out["captions"], out["answers"])
    scores.pop("fact_f1_per_image")
    examples = [{"image_id": r["image_id"], "caption": c} for r, c in zip(images[: recipe.gallery], out["captions"])]
    return {**result, "test": scores, "images": len(images), "questions": len(questions),
            "frozen_stage1_qformer": bool(cfg.model.freeze_qformer),
            "captions_per_s": len(images) / max(out["caption_seconds"], 1e-9), "examples": examples}  # fmt: skip


def _bridges(recipe: WorldRecipe, stages: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """The comparison's numbers per bridge, for ``summary.json`` and the report.

    Retrieval needs ITC heads: only MiniGPT-4's Q-Former is the stage-1 one unchanged (frozen), so its retrieval is
    the stage-1 model's; the trained Q-Formers lose their heads in stage 2 and a projector has no text side: None.
    """
    test = metrics.get("test", {})
    out: dict[str, Any] = {}
    for bridge in recipe.bridges:
        r = stages[f"compare_{bridge}"]
        retrieval = None
        if r.get("frozen_stage1_qformer") and "retrieval" in test:
            m = test["retrieval"]["metrics"]
            itm = m.get("itm", {})
            retrieval = {"text_to_image_r1_itc": m["itc"]["img_r1"], "text_to_image_r1_itm": itm.get("img_r1"),
                         "image_to_text_r1_itm": itm.get("txt_r1"), "source": "stage1"}  # fmt: skip
        out[bridge] = {
            "label": BRIDGES[bridge],
            "vqa_accuracy": r["test"]["vqa"]["accuracy"],
            "vqa_per_type": r["test"]["vqa"]["per_type"],
            "fact_f1": r["test"]["caption"]["fact_f1"],
            "cider": r["test"]["caption"].get("CIDEr"),
            "retrieval": retrieval,
            "trainable_params": r["trainable_params"],
            "visual_tokens": r["visual_tokens"],
            "train_s_per_step": r["s_per_step"],
            "captions_per_s": r["captions_per_s"],
            "steps": r["steps"],
            "images": r["images"],
            "questions": r["questions"],
        }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The whole recipe


def run_world_recipe(
    out_dir: str | os.PathLike = "runs/demo",
    recipe: WorldRecipe | None = None,
    *,
    fresh: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the embedded default end to end (see the module docstring) and write ``out_dir/report.html``.

    Args:
        out_dir: Where every stage's output, ``summary.json`` and ``report.html`` go.
        recipe: The settings; defaults to ``WorldRecipe()`` (about 11 minutes on a 2-core CPU, the comparison included).
        fresh: Redo every stage even when a cached result matches.
        progress: Show progress bars.
        verbose: Print a line per stage and the final summary.

    Returns:
        ``{"out_dir", "report", "summary", "stages": {name: result}, "metrics": {split: ...}, "bridges": {name: ...},
        "seconds"}``: ``bridges`` holds the comparison's numbers per bridge (test split).
    """
    from vlbridge.data.world import world_vocabulary
    from vlbridge.recipes.tokenizers import build_bert_tokenizer
    from vlbridge.training.stage0_text import train_language_model
    from vlbridge.training.stage0_vision import train_vision_encoder

    recipe = recipe or WorldRecipe()
    recipe.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log = print if verbose else (lambda _message: None)
    stages = _Stages(out, fresh, log)
    paths: dict[str, Path] = {"world": out / "world"}

    with _quiet_transformers():
        world_key = _key(asdict(recipe.world))
        stages.run("world", world_key, lambda f: _world(f, recipe.world, progress), "generating the world")

        def stage0(train, config):  # stages run one at a time: each may use every thread torch is set to use
            return lambda f: train(paths["world"], f, config=replace(config, num_threads=None), progress=progress,
                                   fresh=fresh)  # fmt: skip

        vision_key = _key(world_key, asdict(recipe.vision))
        vision = stages.run(
            "stage0_vision",
            vision_key,
            stage0(train_vision_encoder, recipe.vision),
            "stage 0: CLIP-style vision encoder",
        )
        # Paths are rebuilt from out_dir, not read back from the results, so that a moved run folder still works.
        paths["vision"] = out / "stage0_vision" / Path(vision["vision_dir"]).name

        text_key = _key(world_key, asdict(recipe.text))
        text = stages.run(
            "stage0_text",
            text_key,
            stage0(train_language_model, recipe.text),
            "stage 0: language model",
        )
        paths["lm"] = out / "stage0_text" / Path(text["lm_dir"]).name

        paths["qformer_tokenizer"] = build_bert_tokenizer(
            [*world_vocabulary(), *_PROMPT_WORDS], out / "qformer_tokenizer"
        )
        paths["feature_cache"] = out / "feature_cache"
        bridge = _key(vision_key, text_key, recipe.seed, recipe.vision_layer, recipe.qformer,
                      recipe.cross_attention_frequency, recipe.precision, recipe.image_position)  # fmt: skip
        keys = {"stage1": _key(bridge, recipe.embed_dim, asdict(recipe.stage1))}
        keys["stage2"] = _key(keys["stage1"], asdict(recipe.stage2))
        keys["instruct"] = _key(keys["stage2"], asdict(recipe.instruct))
        titles = {
            "stage1": "stage 1: Q-Former representation learning (ITC + ITM + ITG)",
            "stage2": "stage 2: generative learning through the frozen LM",
            "instruct": "instruction tuning (instruction-aware Q-Former, captions + VQA)",
        }
        previous = None
        for stage in ("stage1", "stage2", "instruct"):
            if previous is not None:
                paths["init_from"] = paths[previous]
            cfg = _train_config(recipe, stage, out / stage, paths, progress)
            result = stages.run(stage, keys[stage], lambda f, cfg=cfg: _train_bridge(cfg, f), titles[stage])
            paths[stage] = out / stage / Path(result["model"]).name
            previous = stage

        eval_key = _key(keys["instruct"], recipe.retrieval_k, recipe.eval_images, recipe.gallery)
        metrics = stages.run(
            "evaluate",
            eval_key,
            lambda f: _evaluate(paths, recipe, f, progress, log),
            "evaluating on the held-out splits",
        )

        # The comparison: every bridge trained the same way, from stage 1 where it has a Q-Former.
        paths["init_from"] = paths["stage1"]
        for name in recipe.bridges:
            cfg = _train_config(recipe, "compare", out / f"compare_{name}", paths, progress, bridge=name)
            start = keys["stage1"] if cfg.model.init_from else bridge
            key = _key(start, asdict(recipe.compare), name, recipe.eval_images, recipe.gallery)
            stages.run(
                f"compare_{name}",
                key,
                lambda f, cfg=cfg, name=name: _compare_one(cfg, name, recipe, paths["world"], f, progress),
                f"comparison: {BRIDGES[name]}",
            )

    seconds = time.perf_counter() - started
    from vlbridge.recipes.world_report import summary_lines, write_report

    bridges = _bridges(recipe, stages.results, metrics)
    report = write_report(out / "report.html", recipe, stages.results, seconds, bridges)
    result = {
        "out_dir": str(out),
        "report": str(report),
        "stages": stages.results,
        "metrics": {split: _headline(m) for split, m in metrics.items() if isinstance(m, dict) and "retrieval" in m},
        "bridges": bridges,
        "seconds": seconds,
    }
    result["summary"] = str(out / "summary.json")
    _write_json(out / "summary.json", {k: v for k, v in result.items() if k != "stages"})
    if verbose:
        print("\n".join(summary_lines(result)))
    return result


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers the issue asks for, per split."""
    retrieval = m["retrieval"]["metrics"]
    return {
        "text_to_image_r1_itc": retrieval["itc"]["img_r1"],
        "text_to_image_r1_itm": retrieval.get("itm", {}).get("img_r1"),
        "image_to_text_r1_itm": retrieval.get("itm", {}).get("txt_r1"),
        "chance_r1": 1 / m["images"],
        "vqa_accuracy": m["instruct"]["vqa"]["accuracy"],
        "vqa_accuracy_stage2_zero_shot": m["stage2"]["vqa"]["accuracy"],
        "vqa_accuracy_blind": m["blind"]["vqa"]["accuracy"],
        "vqa_accuracy_oracle": m["oracle"]["vqa"]["accuracy"],
        "cider": m["instruct"]["caption"].get("CIDEr"),
        "cider_stage2": m["stage2"]["caption"].get("CIDEr"),
        "fact_f1": m["instruct"]["caption"]["fact_f1"],
        "fact_f1_stage2": m["stage2"]["caption"]["fact_f1"],
        "fact_f1_blind": m["blind"]["caption"]["fact_f1"],
        "fact_f1_oracle": m["oracle"]["caption"]["fact_f1"],
    }


def _world(folder: Path, config: WorldConfig, progress: bool) -> dict[str, Any]:
    from vlbridge.data.world import generate_world

    paths = generate_world(folder, config, progress=progress)
    return {"manifests": {k: str(v) for k, v in paths.items()}, "held_out": [list(p) for p in config.held_out_pairs()]}
