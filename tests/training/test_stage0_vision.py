"""Stage 0, vision: the CLIP dual encoder learns on a tiny world, saves a loadable frozen encoder, and caches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import CLIPModel, CLIPVisionConfig

from vlbridge.data.images import ImageProcessor, ImageProcessorConfig
from vlbridge.data.world import WorldConfig, generate_world, world_vocabulary
from vlbridge.encoders.vision import FrozenVisionEncoder, load_vision_model
from vlbridge.errors import ConfigError
from vlbridge.models.clip import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    ClipDualEncoder,
    build_word_tokenizer,
    clip_loss,
    text_config_for,
    tokenize,
)
from vlbridge.training import stage0_vision
from vlbridge.training.stage0_vision import Stage0VisionConfig, train_vision_encoder

TINY = dict(
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=1,
    text_heads=2,
    embed_dim=32,
    batch_size=32,
    steps=60,
    lr=2e-3,
    warmup_steps=4,
    log_every=5,
    num_threads=None,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, WorldConfig(n_train=80, n_val=8, n_test=16, n_compositional=8, image_size=32), progress=False)
    return root


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage0")
    return out, train_vision_encoder(world, out, config=Stage0VisionConfig(**TINY), progress=False)


def tiny_model(image_size: int = 32) -> tuple[ClipDualEncoder, object]:
    tok = build_word_tokenizer(world_vocabulary())
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    text = text_config_for(
        tok,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=40,
    )
    return ClipDualEncoder(vision, text, embed_dim=16), tok


def test_loss_decreases_and_recall_is_reported(trained):
    out, summary = trained
    assert not summary["cached"]
    curve = [loss for _, loss in summary["loss_curve"]]
    assert len(curve) == TINY["steps"] // TINY["log_every"]
    # below chance (uniform over the batch) by a margin, and falling
    assert curve[-1] < math.log(TINY["batch_size"]) - 0.3, curve
    assert curve[-1] < curve[len(curve) // 2] < curve[0], curve
    for split in ("test", "compositional"):
        metrics = summary["metrics"][split]
        assert 0.0 <= metrics["img_r1"] <= 1.0 and 0.0 <= metrics["txt_r1"] <= 1.0
        assert metrics["txt_r10"] >= metrics["txt_r1"]
    stored = json.loads((out / "stage0_vision.json").read_text())
    assert stored["metrics"] == summary["metrics"] and "cached" not in stored


def test_saved_vision_tower_is_a_frozen_encoder(trained, world):
    out, _ = trained
    model = load_vision_model(out / "vision")
    assert model.config.model_type == "clip_vision_model"
    processor = ImageProcessor(ImageProcessorConfig.from_pretrained(out / "vision"))
    pixels = processor(sorted((world / "images" / "test").glob("*.png"))[:3])
    assert pixels.shape == (3, 3, 32, 32)
    encoder = FrozenVisionEncoder(model, layer=-2)
    features = encoder(pixels)
    assert features.shape == (3, 1 + (32 // 8) ** 2, TINY["vision_width"])  # [B, N, Dv]: [CLS] + 16 patches
    assert torch.isfinite(features).all()
    # the whole dual encoder loads too, and agrees with the vision folder
    clip = ClipDualEncoder.from_pretrained(out / "clip")
    with torch.no_grad():
        ours = clip.vision_model(pixel_values=pixels).pooler_output
        theirs = load_vision_model(out / "vision")(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, theirs)


def test_second_call_is_cached(trained, world, monkeypatch):
    out, summary = trained

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the result is cached")

    monkeypatch.setattr(stage0_vision, "_build", no_training)
    again = train_vision_encoder(world, out, config=Stage0VisionConfig(**TINY), progress=False)
    assert again["cached"] and again["metrics"] == summary["metrics"]
    # another config, or a forced run, is not served from the cache
    assert stage0_vision._cached(out, Stage0VisionConfig(**{**TINY, "steps": 41}), summary["world_sha256"]) is None
    with pytest.raises(AssertionError, match="retrained"):
        train_vision_encoder(world, out, config=Stage0VisionConfig(**TINY), progress=False, fresh=True)


def test_logit_scale_is_clamped():
    model, _ = tiny_model()
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(LOGIT_SCALE_MAX)
    model.scale().backward()
    assert model.logit_scale.grad.item() == 0.0  # no push beyond the clamp
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(LOGIT_SCALE_MAX))


def test_clip_loss_symmetric_with_shared_captions():
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    loss, logits = clip_loss(images, texts, scale)
    assert logits.shape == (4, 4)
    swapped, _ = clip_loss(texts, images, scale)
    torch.testing.assert_close(loss, swapped)  # symmetric in the two directions
    torch.testing.assert_close(clip_loss(images, texts, scale, torch.arange(4))[0], loss)
    # texts 0 and 1 are the same string: each is a positive of both images 0 and 1, with half the target mass
    grouped, _ = clip_loss(images, texts, scale, torch.tensor([7, 7, 1, 2]))
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    expected = sum(-(targets * torch.log_softmax(m, dim=1)).sum(1).mean() for m in (logits, logits.t())) / 2
    torch.testing.assert_close(grouped, expected)
    # matched embeddings of distinct captions give a small loss
    assert clip_loss(images, images, torch.tensor(100.0))[0].item() < 0.1


def test_dual_encoder_round_trip_through_transformers(tmp_path):
    model, tok = tiny_model()
    model.eval()
    ids, mask = tokenize(tok, ["a red circle", "there is a small blue square at the top left"])
    assert (ids[mask.bool()] == tok.eos_token_id).sum() == 2  # every text ends with [EOS]
    pixels = torch.randn(2, 3, 32, 32)
    model.save(tmp_path / "clip", tokenizer=tok)
    again = ClipDualEncoder.from_pretrained(tmp_path / "clip")
    torch.testing.assert_close(again.similarity(pixels, ids, mask), model.similarity(pixels, ids, mask))
    hf = CLIPModel.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(hf_image, dim=-1), model.encode_image(pixels))
    # truncation keeps the final [EOS]
    ids, mask = tokenize(tok, ["a red circle and a blue square"], max_length=4)
    assert ids.shape == (1, 4) and ids[0, -1].item() == tok.eos_token_id


def test_config_must_fit_the_world(world, tmp_path):
    with pytest.raises(ConfigError, match="patch_size"):
        train_vision_encoder(world, tmp_path, config=Stage0VisionConfig(**{**TINY, "patch_size": 5}), progress=False)
    with pytest.raises(ConfigError):
        Stage0VisionConfig(vision_width=30, vision_heads=4)


def test_shift_augmentation_keeps_shape_and_content():
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    shifted = stage0_vision._shift(pixels, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == (4, 3, 16, 16)
    torch.testing.assert_close(stage0_vision._shift(pixels, 0, torch.Generator()), pixels.float())
