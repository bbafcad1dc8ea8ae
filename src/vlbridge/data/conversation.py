"""LLaVA-format conversations: templates, and tokenising a conversation with its labels built turn by turn.

A record is LLaVA's JSON object ``{"id"?, "image"?, "conversations": [{"from": "human"|"gpt", "value": "..."}]}``,
read from a ``.json`` list or a ``.jsonl`` file by ``conversation_data.read_conversations``. ``image`` is
optional (text-only samples are allowed). ``from`` may also be ``user``/``assistant``, and a leading ``system``
turn is allowed where the template has a place for it (``chat_template``).

Labels are built while tokenising, never checked afterwards: a :class:`ConversationTemplate` turns the turns into
pieces (a text, or a single token id such as EOS), each marked target or not; the pieces are tokenised one by one
and concatenated, and a token's label is its own id in a target piece and -100 elsewhere. Since the labels come
from the very pieces that make up ``input_ids``, there is no "tokenization mismatch" to detect (LLaVA masks such
samples silently). Templates:

- ``plain`` (LLaVA stage 1, ``preprocess_plain``): ``<image>`` + caption + ``"\\n"``; the human text is dropped,
  the caption and the ``"\\n"`` are the targets.
- ``vicuna_v1`` (LLaVA ``conv_vicuna_v1``): system + ``" USER: " + human + " ASSISTANT: " + gpt + "</s>"``, the
  next turn following ``</s>`` directly; the targets are each reply and its EOS (not the ``ASSISTANT:`` marker).
- ``chat_template``: the tokenizer's own chat template; each assistant turn's targets are what rendering it adds
  after the generation prompt (its content and the template's end-of-turn text). Templates that re-render earlier
  turns differently as the conversation grows are refused (they are not prefix-stable).

Images: each occurrence of the placeholder (``"<image>"``) in the text becomes one sentinel id (``image_token_id``,
LLaVA's -200) in ``input_ids``, labelled -100, where a model splices in its visual tokens.

Tokenisation: text is tokenised without special tokens; ``plain`` and ``vicuna_v1`` start with the tokenizer's BOS
when it adds one to ordinary text (chat templates write their own). A text piece that continues text (a reply
after ``ASSISTANT:``) is tokenised as it would be mid-text: SentencePiece tokenizers otherwise add a word-start
``▁`` to every piece, byte-level BPE ones drop the space of ``" reply"``. Text right after an image or a special
token starts afresh, as in LLaVA's ``tokenizer_image_token``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from vlbridge.errors import InputError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "TEMPLATES",
    "ConversationTemplate",
    "Piece",
    "Turn",
    "check_turns",
    "get_template",
    "register_template",
    "tokenize_conversation",
]


IGNORE_INDEX = -100  # label of every token that is not a target (PyTorch's cross-entropy ignore_index)
IMAGE_TOKEN_INDEX = -200  # LLaVA's sentinel id for an image position in input_ids

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Tokenised before a piece that continues text, then cut off again: the piece's first token comes out as it
# would mid-text. A newline rarely merges with what follows; if it does, the piece is tokenised on its own.
_ANCHOR = "\n"


# --------------------------------------------------------------------------------------------------------------------
# Turns and templates
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One checked turn: ``role`` is ``system``, ``user`` or ``assistant`` (LLaVA's human/gpt mapped)."""

    role: str
    text: str


@dataclass(frozen=True)
class Piece:
    """A run of a tokenised conversation: a text (image placeholders allowed), or one token id placed as is.

    Attributes:
        text: Text to tokenise; ignored when ``token_id`` is set.
        target: Whether its tokens are targets (label = token id) or context (label -100).
        token_id: A single token (e.g. EOS) to put in place of text.
    """

    text: str = ""
    target: bool = False
    token_id: int | None = None


Builder = Callable[[Sequence[Turn], PreTrainedTokenizerBase, str], list[Piece]]  # (turns, tokenizer, image token)


@dataclass(frozen=True)
class ConversationTemplate:
    """How a conversation becomes pieces.

    Attributes:
        name: The registry name.
        build: ``(turns, tokenizer, image_token) -> pieces``; the turns are already checked (alternating, starting
            with the user, a system turn only first and only if ``allow_system``).
        add_bos: Start with the tokenizer's BOS when it adds one to ordinary text (chat templates write their own).
        allow_system: Whether a leading ``system`` turn is accepted.
    """

    name: str
    build: Builder
    add_bos: bool = True
    allow_system: bool = False


TEMPLATES: dict[str, ConversationTemplate] = {}


def register_template(template: ConversationTemplate) -> ConversationTemplate:
    """Add a template to :data:`TEMPLATES` under its name (replacing one of the same name) and return it."""
    TEMPLATES[template.name] = template
    return template


def get_template(template: str | ConversationTemplate) -> ConversationTemplate:
    """The template of that name (a :class:`ConversationTemplate` is returned as is).

    Raises:
        InputError: No template of that name.
    """
    if isinstance(template, ConversationTemplate):
        return template
    if template not in TEMPLATES:
        raise InputError(f"unknown conversation template {template!r}: choose from {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[template]


def _plain(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, image_token: str) -> list[Piece]:
    if [t.role for t in turns] != ["user", "assistant"]:
        raise InputError(f"template 'plain' takes one human and one gpt turn, got {len(turns)} turns")
    return [Piece(image_token), Piece(turns[1].text + "\n", target=True)]


def _vicuna_v1(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, image_token: str) -> list[Piece]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("template 'vicuna_v1' ends each reply with EOS, but the tokenizer has no eos_token")
    pieces: list[Piece] = []
    context = VICUNA_SYSTEM + " "
    for turn in turns:
        if turn.role == "user":
            context += f"USER: {turn.text} ASSISTANT:"
        else:
            pieces += [Piece(context), Piece(" " + turn.text, target=True), Piece(token_id=eos, target=True)]
            context = ""
    if context:  # a trailing human turn: context without a reply (LLaVA keeps it too)
        pieces.append(Piece(context.removesuffix(" ASSISTANT:")))
    return pieces


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # no template (ValueError) or the template's own raise_exception (TemplateError)
        raise InputError(f"the tokenizer's chat template failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(text, str):
        raise InputError(f"the tokenizer's chat template returned {type(text).__name__}, not text")
    return text


def _require_prefix(prefix: str, text: str, what: str) -> None:
    if not text.startswith(prefix):
        at = next((i for i, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
        raise InputError(
            f"the tokenizer's chat template is not prefix-stable: {what} does not start with the shorter rendering "
            f"(they differ at character {at}: {prefix[at : at + 30]!r} vs {text[at : at + 30]!r}); "
            "per-turn labels need a template that leaves earlier turns unchanged"
        )


def _chat_template(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, image_token: str) -> list[Piece]:
    messages = [{"role": t.role, "content": t.text} for t in turns]
    pieces: list[Piece] = []
    done = ""  # the rendering so far, ending with the last assistant turn
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _require_prefix(done, prompt, f"the prompt before turn {i}")
        _require_prefix(prompt, full, f"the conversation up to turn {i}")
        pieces += [Piece(prompt[len(done) :]), Piece(full[len(prompt) :], target=True)]
        done = full
    if turns[-1].role != "assistant":  # a trailing user turn: context only
        full = _render(tokenizer, messages, generation_prompt=False)
        _require_prefix(done, full, "the whole conversation")
        pieces.append(Piece(full[len(done) :]))
    return pieces


register_template(ConversationTemplate("plain", _plain))
register_template(ConversationTemplate("vicuna_v1", _vicuna_v1))
register_template(ConversationTemplate("chat_template", _chat_template, add_bos=False, allow_system=True))


def check_turns(conversations: Any, *, allow_system: bool = True, where: str = "conversation") -> list[Turn]:
    """Check a LLaVA ``conversations`` list and return its turns.

    Args:
        conversations: ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` (``user``/``assistant`` too).
        allow_system: Whether a leading ``system`` turn is accepted.
        where: Names the sample in error messages (file and line, or id).

    Raises:
        InputError: Not a non-empty list of such objects, an unknown ``from``, or turns that do not alternate
            human/gpt starting with human.
    """
    if not isinstance(conversations, list) or not conversations:
        raise InputError(f"{where}: 'conversations' must be a non-empty list, got {conversations!r:.80}")
    turns: list[Turn] = []
    for i, entry in enumerate(conversations):
        if not isinstance(entry, dict):
            raise InputError(f"{where}: turn {i} must be an object with 'from' and 'value', got {entry!r:.80}")
        speaker, value = entry.get("from"), entry.get("value")
        if speaker not in ROLES:
            raise InputError(f"{where}: turn {i} has unknown 'from' {speaker!r} (expected human, gpt or system)")
        if not isinstance(value, str):
            raise InputError(f"{where}: turn {i} 'value' must be a string, got {type(value).__name__}")
        turns.append(Turn(ROLES[speaker], value))
    start = 1 if turns[0].role == "system" else 0
    if start and not allow_system:
        raise InputError(f"{where}: this template has no place for a 'system' turn")
    for i, turn in enumerate(turns[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turn.role != expected:
            got = conversations[i]["from"]
            want = "human" if expected == "user" else "gpt"
            raise InputError(f"{where}: turn {i} is from {got!r} but should be from {want!r} (turns alternate)")
    if len(turns) == start:
        raise InputError(f"{where}: a system turn alone is no conversation")
    return turns


# --------------------------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------------------------


class _Encoder:
    """Tokenises pieces into ``input_ids`` and ``labels``, one sentinel id per image placeholder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token: str, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.anchor = self._ids(_ANCHOR)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text(self, text: str, after_text: bool) -> list[int]:
        if not after_text:
            return self._ids(text)
        ids = self._ids(_ANCHOR + text)
        n = len(self.anchor)
        return ids[n:] if ids[:n] == self.anchor else self._ids(text)

    def bos(self) -> list[int]:
        """``[bos]`` if the tokenizer puts BOS before ordinary text, else ``[]``."""
        bos = self.tokenizer.bos_token_id
        plain = self._ids("x")
        with_special = list(self.tokenizer("x")["input_ids"])
        return [bos] if bos is not None and with_special[: len(plain) + 1] == [bos, *plain] else []

    def encode(self, pieces: Sequence[Piece], start: list[int]) -> tuple[list[int], list[int]]:
        ids, labels = list(start), [IGNORE_INDEX] * len(start)
        after_text = False  # whether the last thing placed was text (so the next text continues it)
        for piece in pieces:
            if piece.token_id is not None:
                ids.append(piece.token_id)
                labels.append(piece.token_id if piece.target else IGNORE_INDEX)
                after_text = False
                continue
            for k, chunk in enumerate(piece.text.split(self.image_token)):
                if k:  # an image placeholder stood before this chunk
                    ids.append(self.image_token_id)
                    labels.append(IGNORE_INDEX)
                    after_text = False
                if chunk:
                    new = self._text(chunk, after_text)
                    ids += new
                    labels += new if piece.target else [IGNORE_INDEX] * len(new)
                    after_text = True
        return ids, labels


def _truncate(ids: list[int], max_length: int, image_token_id: int, image_tokens: int) -> int:
    """How many ids fit in ``max_length`` positions, an image counting ``image_tokens`` (never cut in half)."""
    used = 0
    for n, token in enumerate(ids):
        used += image_tokens if token == image_token_id else 1
        if used > max_length:
            return n
    return len(ids)


def tokenize_conversation(
    conversations: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str | ConversationTemplate = "vicuna_v1",
    max_length: int | None = None,
    image_token: str = "<image>",
    image_token_id: int = IMAGE_TOKEN_INDEX,
    image_tokens: int = 1,
    where: str = "conversation",
) -> dict[str, list[int]] | None:
    """Tokenise one LLaVA conversation, with labels on the assistant turns only.

    Args:
        conversations: The record's ``conversations`` list.
        tokenizer: A transformers tokenizer (for ``chat_template``, one with a chat template).
        template: A name in :data:`TEMPLATES` or a :class:`ConversationTemplate`.
        max_length: Truncate to this many positions (``None``: no limit).
        image_token: The placeholder text marking an image; each occurrence becomes one ``image_token_id``.
        image_token_id: The sentinel id put in ``input_ids`` for an image (its label is -100).
        image_tokens: Positions an image takes in the model (its visual tokens), for ``max_length``.
        where: Names the sample in error messages.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length, or ``None`` when no target token is left
        (all truncated away, or no reply at all): such a sample must be skipped, not trained on.

    Raises:
        InputError: Bad turns (unknown ``from``, wrong order), bad settings, or a chat template that fails or is
            not prefix-stable; the message starts with ``where``.
    """
    chosen = get_template(template)
    if not image_token:
        raise InputError("image_token must be a non-empty string")
    if image_tokens < 1:
        raise InputError(f"image_tokens must be >= 1, got {image_tokens}")
    if max_length is not None and max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    turns = check_turns(conversations, allow_system=chosen.allow_system, where=where)
    encoder = _Encoder(tokenizer, image_token, image_token_id)
    try:
        pieces = chosen.build(turns, tokenizer, image_token)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    ids, labels = encoder.encode(pieces, encoder.bos() if chosen.add_bos else [])
    if max_length is not None:
        keep = _truncate(ids, max_length, image_token_id, image_tokens)
        ids, labels = ids[:keep], labels[:keep]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------
