"""Inference API behaviour: KV cache agreement, chat history, sampling, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge.errors import ImageError, InputError
from vlbridge.inference.tasks import _prompt_tokens, _soft_prompts, assemble_prefix

from factory import Sizes, build_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("opt"), family="opt", sizes=Sizes(image_size=32), seed=7)
    return vlbridge.load(path)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("t5"), family="t5", sizes=Sizes(image_size=32), seed=8)
    return vlbridge.load(path)


@pytest.fixture()
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def greedy_without_cache(model, pixels, prompt, steps):
    """Reference decoding: re-run the whole sequence every step, no KV cache."""
    lm = model.language_model
    with torch.no_grad():
        soft = _soft_prompts(model, pixels, [prompt] * len(pixels))
        embeds, mask, _, _ = assemble_prefix(model, soft, [_prompt_tokens(model, prompt)] * len(pixels))
        out = []
        for _ in range(steps):
            if lm.config.is_encoder_decoder:
                start = torch.full((len(pixels), 1), lm.config.decoder_start_token_id)
                dec = torch.cat([start, *[t[:, None] for t in out]], dim=1)
                logits = lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            else:
                tokens = torch.stack(out, 1) if out else torch.zeros(len(pixels), 0, dtype=torch.long)
                e = torch.cat([embeds, lm.get_input_embeddings()(tokens)], dim=1)
                m = torch.cat([mask, torch.ones_like(tokens)], dim=1)
                logits = lm(inputs_embeds=e, attention_mask=m).logits[:, -1]
            logits[:, model.tokenizer.eos_token_id] = -float("inf")  # as min_new_tokens does
            out.append(logits.argmax(-1))
    return [t.strip() for t in model.tokenizer.batch_decode(torch.stack(out, 1), skip_special_tokens=True)]


@pytest.mark.parametrize("which", ["model", "t5"])
def test_kv_cache_agrees_with_full_recompute(which, request, pixels):
    m = request.getfixturevalue(which)
    steps = 7
    ours = m.caption(pixels, "a photo of", max_new_tokens=steps, min_new_tokens=steps)
    assert ours == greedy_without_cache(m, pixels, "a photo of", steps)


def test_sampling_is_reproducible_and_varies(model, pixels):
    from vlbridge.inference.generation import GenerationSettings
    from vlbridge.inference.tasks import generate_text

    s = GenerationSettings(max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.5)
    runs = [
        generate_text(model, pixels, ["a photo of"] * 2, s, generator=torch.Generator().manual_seed(k))
        for k in (0, 0, 1, 2)
    ]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) > 1


def test_chat_keeps_history(model, pixels):
    chat = model.chat(pixels[0], max_new_tokens=4)
    first = chat.ask("what is it ?")
    assert chat.history == [("what is it ?", first)]
    prompt = chat.prompt("what colour is it ?")
    assert prompt.startswith(f"Question: what is it ? Answer: {first}") and prompt.endswith("Answer:")
    chat.ask("what colour is it ?")
    assert len(chat.history) == 2


def test_answer_uses_the_vqa_template(model, t5, pixels):
    assert model.config.prompts.vqa_template == "Question: {} Answer:"
    assert t5.config.prompts.vqa_template == "Question: {} Short answer:"
    direct = model.caption(pixels, "Question: how many ? Answer:", max_new_tokens=5)
    assert model.answer(pixels, "how many ?", max_new_tokens=5) == direct


def test_images_from_files_and_pil(model, tmp_path):
    img = Image.new("RGB", (50, 30), (200, 30, 40))
    img.save(tmp_path / "a.png")
    by_path = model.caption([tmp_path / "a.png"], max_new_tokens=4)
    by_pil = model.caption(img, max_new_tokens=4)
    assert by_path == by_pil and len(by_path) == 1


def test_missing_image_path(model, tmp_path):
    with pytest.raises(ImageError, match="nope.jpg"):
        model.caption([tmp_path / "nope.jpg"])


def test_text_file_named_jpg(model, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg"):
        model.caption(tmp_path / "notes.jpg")


def test_empty_prompt_and_question(model, pixels):
    with pytest.raises(InputError, match="empty prompt"):
        model.caption(pixels, "  ")
    with pytest.raises(InputError, match="empty question"):
        model.answer(pixels, ["", "what ?"])


def test_mismatched_lengths(model, pixels):
    with pytest.raises(InputError, match="2 images but 3"):
        model.answer(pixels, ["a ?", "b ?", "c ?"])
    with pytest.raises(InputError, match="2 images but 1"):
        model.score(pixels, ["one"])


def test_no_images(model):
    with pytest.raises(InputError, match="no images"):
        model.caption([])


def test_wrong_tensor_shape(model):
    with pytest.raises(InputError):
        model.caption(torch.randn(2, 3, 17, 17))
