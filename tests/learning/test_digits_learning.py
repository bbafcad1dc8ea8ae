"""What the bridge learns from real scanned handwriting: the ink colour (solved) and the digit (not yet).

Real images from a package (scikit-learn's digits, drawn in four inks, `vlbridge.data.digits`); a frozen random
ViT; stage 1 through the public training loop with the defaults that decide it (identical captions are true
matches, learned positions on the Q-Former's image keys). Captions repeat (40 strings for 720 images): by image
id alone, ITC's targets are noise and the ink is learnt only half the time (49% on the benchmark); with text
identity it is learnt fully. The digit — which lives in the layout, and which a linear probe reads from the same
frozen tokens at ~93% — is not: zero-shot digit accuracy stays near chance after this budget (issue 14's open
part, `benchmarks/learning_digits.py`). That half is reported as an expected failure (xfail, with both numbers)
until the bridge reads the digit; then the test simply passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("sklearn")

STEPS = 200


def _vision(folder: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=4
    )
    transformers.CLIPVisionModel(config).save_pretrained(folder)
    return folder


def _train(tmp: Path, manifests: dict, vision: Path, **overrides) -> Path:
    from vlbridge.config import apply_overrides, from_dict
    from vlbridge.data.digits import DIGIT_WORDS, INKS
    from vlbridge.recipes.tokenizers import build_bert_tokenizer
    from vlbridge.training.loop import train
    from vlbridge.training.recipe import TrainConfig

    settings = {
        "model.vision": str(vision),
        "model.vision_layer": -1,
        # the captions' own words: a 30k-word BERT vocabulary would make the ITG head most of the compute
        "model.tokenizer": str(
            build_bert_tokenizer([*DIGIT_WORDS, *INKS, "the", "digit", "written", "in", "ink"], tmp / "tok")
        ),
        "model.qformer": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128},
        "model.num_query_tokens": 8,
        "model.cross_attention_frequency": 1,
        "model.embed_dim": 64,
        "model.image_position": "learned",
        "data.train": [str(manifests["train"])],
        "data.batch_size": 32,
        "data.num_workers": 0,
        "data.augment": False,
        "data.max_text_length": 12,
        "data.feature_cache": str(tmp / "cache"),
        "optim.lr": 2e-3,
        "optim.warmup_steps": 20,
        "run.max_steps": STEPS,
        "run.output_dir": str(tmp / "run"),
        "run.progress": False,
        "run.save_every": 10_000,
        "run.log_every": 40,
        **overrides,
    }
    cfg = from_dict(TrainConfig, apply_overrides({}, [f"{k}={json.dumps(v)}" for k, v in settings.items()]))
    return Path(train(cfg)["model"])


def _probe(vision: Path, train_records, test_records) -> float:
    from sklearn.linear_model import LogisticRegression

    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig, load_image
    from vlbridge.encoders.vision import FrozenVisionEncoder, load_vision_model

    enc = FrozenVisionEncoder(load_vision_model(vision), layer=-1).eval()
    proc = ImageProcessor(ImageProcessorConfig(image_size=(32, 32)))

    def feats(records):
        with torch.no_grad():
            return enc(proc([load_image(r["image"]) for r in records])).flatten(1).numpy()

    clf = LogisticRegression(max_iter=1000, C=0.1).fit(feats(train_records), [r["label"] for r in train_records])
    return float((clf.predict(feats(test_records)) == np.asarray([r["label"] for r in test_records])).mean())


def _records(path: Path) -> list[dict]:
    out = [json.loads(line) for line in path.read_text().splitlines()]
    for r in out:
        r["image"] = str(path.parent / r["image"])
    return out


def test_bridge_learns_the_ink_from_repeated_captions_and_is_measured_on_the_digit(tmp_path):
    import vlbridge
    from vlbridge.data.digits import DIGIT_WORDS, INKS, DigitsConfig, write_digits
    from vlbridge.inference.zero_shot import zero_shot_classify

    torch.set_num_threads(2)  # this test's own; the suite's autouse fixture restores one thread afterwards
    cfg = DigitsConfig(image_size=32, limit=900)
    manifests = write_digits(tmp_path / "digits", cfg)
    vision = _vision(tmp_path / "vit")
    train_records, test_records = _records(manifests["train"]), _records(manifests["test"])
    probe = _probe(vision, train_records, test_records)

    model = vlbridge.load(str(_train(tmp_path, manifests, vision)))
    templates = [cfg.template.replace("{digit}", "{}").replace("{colour}", ink) for ink in INKS]
    labels = [DIGIT_WORDS.index(r["label"]) for r in test_records]
    result = zero_shot_classify(
        model, [r["image"] for r in test_records], list(DIGIT_WORDS), labels, template=templates
    )
    digit = result["accuracy"]["top1"]
    colours = list(INKS)
    colour = zero_shot_classify(
        model,
        [r["image"] for r in test_records],
        colours,
        [colours.index(r["colour"]) for r in test_records],
        template=[cfg.template.replace("{digit}", d).replace("{colour}", "{}") for d in DIGIT_WORDS],
    )["accuracy"]["top1"]
    print(f"digit: bridge {digit:.3f}, linear probe {probe:.3f}; ink colour {colour:.3f}")
    assert colour > 0.9  # chance is 0.25
    assert probe > 0.8  # the digit is in the frozen tokens
    if digit < 0.5 or digit < probe - 0.3:  # chance is 0.1
        pytest.xfail(f"the bridge does not read the digit yet: {digit:.2f} against a linear probe's {probe:.2f}")
