"""Texts against the model's limits, undecodable arguments, hostile file names, NaN pixels: one clear line, or
a correct result (chat history trimmed from the oldest turn)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

import vlbridge
from reliability.faults import one_line_error
from vlbridge.cli import main
from vlbridge.errors import InputError
from vlbridge.inference.prefix import expanded_length
from vlbridge.inference.tasks import _prompt_tokens, max_positions


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    from factory import Sizes, build_checkpoint

    root = tmp_path_factory.mktemp("opt")
    path = build_checkpoint(root / "m", family="opt", sizes=Sizes(image_size=32), seed=7)
    image = root / "cat.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    return path, vlbridge.load(path), image


LONG = "word " * 300


def test_texts_longer_than_the_model_are_refused_clearly(opt):
    _, model, image = opt
    assert max_positions(model) == 128
    with pytest.raises(InputError, match="prompt too long: .* 128 positions"):
        model.caption([image], prompt=LONG)
    with pytest.raises(InputError, match="too long"):
        model.answer([image], LONG)
    with pytest.raises(InputError, match="text too long"):
        model.score([image], [LONG])
    with pytest.raises(InputError, match="at most \\d+ new tokens"):
        model.caption([image], max_new_tokens=500)
    assert len(model.caption([image], max_new_tokens=3)) == 1  # within the limits all is well


def test_max_new_tokens_too_large_on_the_command_line_is_one_line(opt, capsys):
    path, _, image = opt
    line = one_line_error(capsys, ["caption", "--model", str(path), str(image), "--max-new-tokens", "1000"])
    assert "max_new_tokens=1000" in line


def test_chat_history_is_trimmed_from_the_oldest_turn(opt):
    _, model, image = opt
    chat = model.chat(image, max_new_tokens=20)
    budget = 128 - 20
    questions = [f"question number {i} about the colours and the shapes in this picture" for i in range(8)]
    for q in questions:
        chat.ask(q)
    assert len(chat.history) == 8
    prompt = chat.prompt("and now?")
    assert expanded_length(_prompt_tokens(model, prompt), model.num_visual_tokens) <= budget
    assert questions[-1] in prompt and questions[0] not in prompt  # the newest turns kept, the oldest dropped


def test_invalid_utf8_in_a_text_argument_is_one_line(opt, capsys):
    path, _, image = opt
    bad = b"a \xff b".decode("utf-8", "surrogateescape")  # what Python makes of such a byte in argv
    line = one_line_error(capsys, ["caption", "--model", str(path), str(image), "--prompt", bad])
    assert "--prompt" in line and "0xff" in line
    line = one_line_error(capsys, ["ask", "--model", str(path), str(image), "-q", bad])
    assert "--question" in line


def test_file_names_are_printed_safely(opt, tmp_path, capsys):
    path, _, image = opt
    hostile = tmp_path / "evil\nfake: line\x1b[31m.png"
    hostile.write_bytes(image.read_bytes())
    assert main(["caption", "--model", str(path), str(hostile), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "\\n" in out[0] and "\\x1b" in out[0] and "\x1b" not in out[0]
    assert main(["caption", "--model", str(path), str(hostile), "--max-new-tokens", "2", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["image"] == str(hostile)


def test_nan_pixel_values_are_refused(opt):
    _, model, _ = opt
    pixels = torch.zeros(1, 3, 32, 32)
    pixels[0, 1, 5, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        model.caption(pixels)
    with pytest.raises(InputError, match="NaN"):
        model.caption([pixels[0]])


def test_captioning_prints_no_transformers_future_warning(opt):
    _, model, image = opt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.caption([image], max_new_tokens=2)
        model.caption([image], max_new_tokens=2, num_beams=2)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
