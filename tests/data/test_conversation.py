"""LLaVA conversation data: exactly which tokens are targets under each template, images, truncation, errors."""

import json
import logging

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlbridge.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    VICUNA_SYSTEM,
    get_template,
    tokenize_conversation,
)
from vlbridge.data.conversation_data import ConversationCollator, ConversationDataset, read_conversations
from vlbridge.data.datasets import SkippedSample
from vlbridge.errors import InputError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM_WORDS = VICUNA_SYSTEM.lower().split()  # 23 words: the word-level tokenizer lowercases
EXTRA_WORDS = "user: assistant: what is in picture? cat on mat describe it more two cats sitting system you are kind"
WORDS = SYSTEM_WORDS + EXTRA_WORDS.split() + ["user", "assistant"]

ONE_TURN = [
    {"from": "human", "value": "<image>\nwhat is in the picture?"},
    {"from": "gpt", "value": "a cat on the mat"},
]
TWO_TURNS = ONE_TURN + [
    {"from": "human", "value": "describe it more"},
    {"from": "gpt", "value": "two cats sitting"},
]


def word_tokenizer(*, bos: bool = True, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level, lowercasing; "\\n" is a token of its own (so the plain template's separator shows)."""
    vocab = {tok: i for i, tok in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.add_tokens([AddedToken("\n", normalized=False)])
    out.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    out.chat_template = chat_template
    return out


def tokens(tok: PreTrainedTokenizerFast, ids: list[int], image_id: int = IMAGE_TOKEN_INDEX) -> list[str]:
    return ["<IMG>" if i == image_id else tok.convert_ids_to_tokens(i) for i in ids]


def split(tok: PreTrainedTokenizerFast, out: dict[str, list[int]]) -> tuple[list[str], list[str]]:
    """(target tokens, masked tokens); also checks every label is its token's id or -100."""
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == IMAGE_TOKEN_INDEX)
    targets = [t for t, label in zip(tokens(tok, ids), labels) if label != IGNORE_INDEX]
    masked = [t for t, label in zip(tokens(tok, ids), labels) if label == IGNORE_INDEX]
    return targets, masked


# --------------------------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_template():
    assert sorted(TEMPLATES) == ["chat_template", "plain", "vicuna_v1"]
    assert get_template("plain") is TEMPLATES["plain"]
    with pytest.raises(InputError, match=r"unknown conversation template 'llama_9'.*chat_template, plain, vicuna_v1"):
        get_template("llama_9")


def test_plain_targets_are_the_caption_and_newline():
    tok = word_tokenizer()
    out = tokenize_conversation(ONE_TURN, tok, template="plain")
    assert tokens(tok, out["input_ids"]) == ["<s>", "<IMG>", "a", "cat", "on", "the", "mat", "\n"]
    assert out["labels"][:2] == [IGNORE_INDEX, IGNORE_INDEX]
    targets, _ = split(tok, out)
    assert targets == ["a", "cat", "on", "the", "mat", "\n"]
    assert out["labels"][2:] == out["input_ids"][2:]


def test_plain_takes_exactly_one_exchange():
    with pytest.raises(InputError, match=r"sample 7: template 'plain' takes one human and one gpt turn, got 4"):
        tokenize_conversation(TWO_TURNS, word_tokenizer(), template="plain", where="sample 7")


def test_vicuna_v1_one_turn():
    tok = word_tokenizer()
    out = tokenize_conversation(ONE_TURN, tok, template="vicuna_v1")
    prompt = ["<s>", *SYSTEM_WORDS, "user:", "<IMG>", "\n", "what", "is", "in", "the", "picture?", "assistant:"]
    assert tokens(tok, out["input_ids"]) == prompt + ["a", "cat", "on", "the", "mat", "</s>"]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + out["input_ids"][len(prompt) :]
    assert out["input_ids"].count(IMAGE_TOKEN_INDEX) == 1
    assert tok.decode([i for i in out["labels"] if i != IGNORE_INDEX]) == "a cat on the mat </s>"


def test_vicuna_v1_multi_turn_targets_each_reply_and_its_eos():
    tok = word_tokenizer()
    out = tokenize_conversation(TWO_TURNS, tok, template="vicuna_v1")
    targets, masked = split(tok, out)
    assert targets == ["a", "cat", "on", "the", "mat", "</s>", "two", "cats", "sitting", "</s>"]
    # the second exchange follows the first reply's </s> directly, its USER:/ASSISTANT: markers masked
    seq = tokens(tok, out["input_ids"])
    first_eos = seq.index("</s>")
    assert seq[first_eos:] == [
        "</s>",
        "user:",
        "describe",
        "it",
        "more",
        "assistant:",
        "two",
        "cats",
        "sitting",
        "</s>",
    ]
    assert masked[-5:] == ["user:", "describe", "it", "more", "assistant:"]


def test_vicuna_v1_without_bos_when_the_tokenizer_adds_none():
    tok = word_tokenizer(bos=False)
    out = tokenize_conversation(ONE_TURN, tok, template="vicuna_v1")
    assert tokens(tok, out["input_ids"])[:2] == ["a", "chat"]  # the system prompt, no <s>


def test_chat_template_targets_are_the_content_and_end_of_turn():
    tok = word_tokenizer(chat_template=CHATML)
    out = tokenize_conversation(ONE_TURN, tok, template="chat_template")
    prompt = ["<|im_start|>", "user", "\n", "<IMG>", "\n", "what", "is", "in", "the", "picture?", "<|im_end|>", "\n"]
    prompt += ["<|im_start|>", "assistant", "\n"]
    reply = ["a", "cat", "on", "the", "mat", "<|im_end|>", "\n"]
    assert tokens(tok, out["input_ids"]) == prompt + reply  # no BOS: the template writes its own
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + out["input_ids"][len(prompt) :]


def test_chat_template_multi_turn_with_system():
    tok = word_tokenizer(chat_template=CHATML)
    conv = [{"from": "system", "value": "you are kind"}] + TWO_TURNS
    out = tokenize_conversation(conv, tok, template="chat_template")
    targets, masked = split(tok, out)
    assert targets == ["a", "cat", "on", "the", "mat", "<|im_end|>", "\n", "two", "cats", "sitting", "<|im_end|>", "\n"]
    assert masked[:6] == ["<|im_start|>", "system", "\n", "you", "are", "kind"]
    assert masked[-6:] == ["more", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]


def test_chat_template_not_prefix_stable_is_refused():
    unstable = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.content }} {% endfor %}"
    with pytest.raises(InputError, match=r"s1: the tokenizer's chat template is not prefix-stable"):
        tokenize_conversation(TWO_TURNS, word_tokenizer(chat_template=unstable), template="chat_template", where="s1")


def test_chat_template_missing_is_a_clear_error():
    with pytest.raises(InputError, match=r"s2: the tokenizer's chat template failed"):
        tokenize_conversation(ONE_TURN, word_tokenizer(), template="chat_template", where="s2")


# --------------------------------------------------------------------------------------------------------------------
# Images and truncation
# --------------------------------------------------------------------------------------------------------------------


def test_several_image_placeholders_stay_where_they_are():
    tok = word_tokenizer(bos=False)
    conv = [{"from": "human", "value": "<image> what is in <image> the picture?"}, {"from": "gpt", "value": "a cat"}]
    out = tokenize_conversation(conv, tok, template="vicuna_v1", image_token_id=-7)
    n = len(SYSTEM_WORDS)
    assert tokens(tok, out["input_ids"], image_id=-7)[n:] == [
        "user:", "<IMG>", "what", "is", "in", "<IMG>", "the", "picture?", "assistant:", "a", "cat", "</s>"
    ]  # fmt: skip
    assert [i for i, t in enumerate(out["input_ids"]) if t == -7] == [n + 1, n + 5]
    assert all(out["labels"][i] == IGNORE_INDEX for i in (n + 1, n + 5))
    # a custom placeholder text
    conv = [{"from": "human", "value": "[img] what"}, {"from": "gpt", "value": "cat"}]
    out = tokenize_conversation(conv, tok, template="vicuna_v1", image_token="[img]")
    assert out["input_ids"].count(IMAGE_TOKEN_INDEX) == 1


def test_truncation_counts_image_positions():
    tok = word_tokenizer()
    # <s>=1, image=5, then a, cat: 8 positions
    out = tokenize_conversation(ONE_TURN, tok, template="plain", max_length=8, image_tokens=5)
    assert tokens(tok, out["input_ids"]) == ["<s>", "<IMG>", "a", "cat"]
    assert split(tok, out)[0] == ["a", "cat"]
    # the image itself does not fit: it is not cut in half, and nothing is left to learn
    assert tokenize_conversation(ONE_TURN, tok, template="plain", max_length=5, image_tokens=5) is None
    # the image fits, no target does
    assert tokenize_conversation(ONE_TURN, tok, template="plain", max_length=6, image_tokens=5) is None
    out = tokenize_conversation(ONE_TURN, tok, template="plain", max_length=7, image_tokens=5)
    assert split(tok, out)[0] == ["a"]


def test_all_masked_after_truncation_is_skipped_and_counted(caplog):
    tok = word_tokenizer()
    records = [
        {"id": "short", "image": "a.jpg", "conversations": [{"from": "human", "value": "what"}, ONE_TURN[1]]},
        {"id": "long", "image": "b.jpg", "conversations": TWO_TURNS},
    ]
    # the short one (BOS, 23 system words, USER:, image, \n, what, ASSISTANT:) is 29 positions before its reply
    # "a cat"; the long one's prompt is 33
    dataset = ConversationDataset(records, tok, template="vicuna_v1", max_length=31, image_folder="imgs")
    first, second = dataset[0], dataset[1]
    assert isinstance(second, SkippedSample) and second.path == "records[1] (id 'long')"
    assert "max_length=31" in second.reason
    assert dataset.skipped == 1
    assert tokens(tok, first["input_ids"].tolist())[-6:] == ["<IMG>", "\n", "what", "assistant:", "a", "cat"]
    collate = ConversationCollator(pad_token_id=tok.pad_token_id)
    with caplog.at_level(logging.WARNING, logger="vlbridge.data.conversation_data"):
        batch = collate([first, second])
    assert batch["batch_size"] == 1 and batch["skipped"] == [(second.path, second.reason)]
    assert collate.skipped == 1
    assert "skipped 1 of 2 conversation samples" in caplog.text
    assert batch["labels"].shape == (1, 31) and (batch["labels"] != IGNORE_INDEX).sum() == 2
    assert batch["images"] == [dataset.image_folder / "a.jpg"]
    assert collate([second]) == {"skipped": [(second.path, second.reason)], "batch_size": 0}
    assert collate.skipped == 2


# --------------------------------------------------------------------------------------------------------------------
# Dataset and collation
# --------------------------------------------------------------------------------------------------------------------


def test_dataset_from_jsonl_and_right_padded_batch(tmp_path):
    tok = word_tokenizer()
    path = tmp_path / "chat.jsonl"
    lines = [
        {"id": "first", "image": "img/1.jpg", "conversations": ONE_TURN},
        {"conversations": [{"from": "human", "value": "what is it"}, {"from": "gpt", "value": "a cat"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    dataset = ConversationDataset(path, tok, template="vicuna_v1")
    a, b = dataset[0], dataset[1]
    assert a["id"] == "first" and a["image"] == tmp_path / "img" / "1.jpg"
    assert b["id"] == "1"  # no id: its index
    assert b["image"] is None and IMAGE_TOKEN_INDEX not in b["input_ids"].tolist()
    batch = ConversationCollator(pad_token_id=tok.pad_token_id)([a, b])
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert la - lb == 7  # "<image> \n what is in the picture?" vs "what is it"; "a cat on the mat" vs "a cat"
    assert batch["input_ids"].shape == (2, la)
    assert torch.equal(batch["input_ids"][1, lb:], torch.full((la - lb,), tok.pad_token_id))
    assert torch.equal(batch["labels"][1, lb:], torch.full((la - lb,), IGNORE_INDEX))
    assert batch["attention_mask"].sum(dim=1).tolist() == [la, lb]
    assert torch.equal(batch["input_ids"][0], a["input_ids"]) and torch.equal(batch["labels"][1, :lb], b["labels"])
    assert batch["ids"] == ["first", "1"] and batch["images"] == [a["image"], None]
    assert batch["skipped"] == [] and batch["batch_size"] == 2


def test_dataset_puts_a_missing_placeholder_first_and_refuses_one_without_image():
    tok = word_tokenizer()
    record = {"image": "x.jpg", "conversations": [{"from": "human", "value": "what is it"}, ONE_TURN[1]]}
    item = ConversationDataset([record], tok, template="vicuna_v1")[0]
    seq = tokens(tok, item["input_ids"].tolist())
    assert seq[len(SYSTEM_WORDS) + 1 : len(SYSTEM_WORDS) + 5] == ["user:", "<IMG>", "\n", "what"]
    no_image = {"id": "t", "conversations": ONE_TURN}
    with pytest.raises(InputError, match=r"records\[0\] \(id 't'\): 1 '<image>' placeholder\(s\) but no 'image'"):
        ConversationDataset([no_image], tok)
    with pytest.raises(InputError, match=r"template 'plain' needs an image"):
        ConversationDataset([no_image], tok, template="plain")


# --------------------------------------------------------------------------------------------------------------------
# Bad turns and bad files
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conversations", "message"),
    [
        ([ONE_TURN[1], ONE_TURN[0]], r"turn 0 is from 'gpt' but should be from 'human'"),
        ([ONE_TURN[0], ONE_TURN[0]], r"turn 1 is from 'human' but should be from 'gpt'"),
        ([ONE_TURN[0], {"from": "bot", "value": "hi"}], r"turn 1 has unknown 'from' 'bot'"),
        ([{"from": "system", "value": "be kind"}] + ONE_TURN, r"this template has no place for a 'system' turn"),
        ([ONE_TURN[0], {"from": "gpt", "value": None}], r"turn 1 'value' must be a string, got NoneType"),
        ([], r"'conversations' must be a non-empty list"),
    ],
)
def test_bad_turns_name_the_sample(conversations, message):
    records = [{"image": "x.jpg", "conversations": ONE_TURN}, {"id": "q42", "conversations": conversations}]
    with pytest.raises(InputError, match=r"records\[1\] \(id 'q42'\): " + message):
        ConversationDataset(records, word_tokenizer())


def test_system_turn_is_accepted_by_chat_template_only_first():
    tok = word_tokenizer(chat_template=CHATML)
    late = [*ONE_TURN, {"from": "system", "value": "be kind"}, ONE_TURN[1]]
    with pytest.raises(InputError, match=r"id 9: turn 2 is from 'system' but should be from 'human'"):
        tokenize_conversation(late, tok, template="chat_template", where="id 9")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.jsonl", '{"conversations": []}', r"a.jsonl:1: 'conversations' must be a non-empty list"),
        ("b.jsonl", json.dumps({"conversations": ONE_TURN}) + "\n{oops\n", r"b.jsonl:2: invalid JSON"),
        ("c.jsonl", "[1, 2]\n", r"c.jsonl:1: expected a JSON object, got list"),
        ("d.json", '{"conversations": []}', r"d.json: expected a JSON list of records, got dict"),
        (
            "e.json",
            json.dumps([{"conversations": ONE_TURN}, {"id": 3}]),
            r"e.json\[1\] \(id 3\): missing required key 'conversations'",
        ),
        ("f.json", "[\n{\n", r"f.json: invalid JSON \(.* at line 3"),
        ("g.json", "[]", r"g.json: no records"),
        ("h.txt", "[]", r"h.txt: expected a .json"),
        ("i.json", json.dumps([{"image": ["a", "b"], "conversations": ONE_TURN}]), r"i.json\[0\]: 'image' must be"),
    ],
)
def test_bad_files_name_file_and_place(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        read_conversations(tmp_path / name)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(InputError, match=r"nope.json not found"):
        read_conversations(tmp_path / "nope.json")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match=r"bin.jsonl: not UTF-8"):
        read_conversations(tmp_path / "bin.jsonl")


def test_read_json_list(tmp_path):
    records = [{"id": "a", "image": "x.jpg", "conversations": ONE_TURN}, {"conversations": TWO_TURNS}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    assert read_conversations(tmp_path / "llava.json") == records


# --------------------------------------------------------------------------------------------------------------------
# Real-world tokenizers: the pieces concatenate to what tokenising the whole text gives
# --------------------------------------------------------------------------------------------------------------------

CORPUS = [VICUNA_SYSTEM, "USER: what is in the picture? ASSISTANT: a cat on the mat", "two cats sitting here"] * 20


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-2-style (its tokenizer.json): spaces become "▁" and one more is put in front of every text, BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges stay inside words, as in SP
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS + ["\n"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2-style: spaces belong to the following word (Ġword), no BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize(
    ("make", "first_target", "alone"),
    [(sentencepiece_like, "▁a", " a cat on the mat"), (byte_level_bpe, "Ġa", "a cat on the mat")],
)
def test_vicuna_pieces_match_whole_text_tokenisation(make, first_target, alone):
    tok = make()
    conv = [{"from": "human", "value": "what is in the picture?"}, {"from": "gpt", "value": "a cat on the mat"}]
    out = tokenize_conversation(conv, tok, template="vicuna_v1")
    prompt = VICUNA_SYSTEM + " USER: what is in the picture? ASSISTANT:"
    whole = tok(prompt + " a cat on the mat").input_ids + [tok.eos_token_id]
    assert out["input_ids"] == whole
    target = [i for i in out["labels"] if i != IGNORE_INDEX]
    assert target == whole[len(tok(prompt).input_ids) :]
    assert tok.convert_ids_to_tokens(target)[0] == first_target
    # the reply tokenised on its own starts differently: "▁" then "▁a" (SentencePiece), or "a" (byte-level)
    assert tok.convert_ids_to_tokens(tok(alone, add_special_tokens=False).input_ids)[0] in ("▁", "a")


@pytest.mark.parametrize("make", [sentencepiece_like, byte_level_bpe])
def test_vicuna_multi_turn_matches_whole_text_tokenisation(make):
    tok = make()
    conv = [
        {"from": "human", "value": "what is in the picture?"},
        {"from": "gpt", "value": "a cat on the mat"},
        {"from": "human", "value": "what is in the picture?"},
        {"from": "gpt", "value": "two cats sitting here"},
    ]
    out = tokenize_conversation(conv, tok, template="vicuna_v1")
    text = VICUNA_SYSTEM + " USER: what is in the picture? ASSISTANT: a cat on the mat</s>"
    text += "USER: what is in the picture? ASSISTANT: two cats sitting here"
    assert out["input_ids"] == tok(text).input_ids + [tok.eos_token_id]
    target = [i for i in out["labels"] if i != IGNORE_INDEX]
    eos = tok.eos_token_id
    assert tok.decode(target).replace(" ", "") == "acatonthemat</s>twocatssittinghere</s>"
    assert target.count(eos) == 2
