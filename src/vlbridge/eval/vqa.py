"""VQA accuracy, scored the way the official VQA evaluation script scores it.

The reference is ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` in GT-Vision-Lab/VQA (the code
behind the EvalAI VQA v2 leaderboard, and the code LAVIS ships for BLIP-2's VQA numbers).
This module reimplements its rules; nothing here imports it.

How the official script scores one question:

1. The **prediction** is cleaned: newlines and tabs become spaces, surrounding whitespace is
   stripped, then :func:`process_punctuation` and :func:`process_digit_article` run
   (:func:`normalize_vqa_answer` is exactly this pipeline).
2. The **reference answers** are *not* put through the full pipeline. Only when the annotators
   disagree (more than one distinct answer string) does each answer get
   :func:`process_punctuation`; number words, articles, case and contractions are left alone.
   The official annotation files (VQA v1/v2, OK-VQA, ...) are already normalised, so this is
   harmless there; for answers from another source pass ``normalize_references=True``
   (a documented deviation from the official script).
3. Accuracy is the mean over the leave-one-out subsets of the reference answers: for each
   answer *i*, count how many of the *other* answers equal the prediction and score
   ``min(1, count / 3)``. Leaving out is by position, not by value (the official script
   compares answer records that carry a unique ``answer_id``).

With the usual ten answers this gives, for ``m`` matching answers::

    m:        0    1    2    3    4+
    accuracy: 0.0  0.3  0.6  0.9  1.0

(three matches give 0.9, not 1.0: in the three subsets that leave out a matching answer only two
matches remain). With ``n`` answers, ``accuracy = (m * min(1, (m-1)/3) + (n-m) * min(1, m/3)) / n``.

Fewer than ten answers are handled the way the official loop would: leave-one-out over however
many answers there are. Consequences worth knowing: a question with a single reference answer
always scores 0 (its only subset is empty), and with three or fewer answers even a prediction
that matches all of them scores below 1 (``n=3, m=3`` gives 2/3). Datasets with one answer per
question should use exact match on :func:`normalize_vqa_answer` instead.

Scores are returned as fractions in [0, 1] without rounding (the official script prints
percentages rounded to two decimals).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from vlbridge.errors import InputError

__all__ = [
    "evaluate_vqa",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
]

# --- The official tables. These are data, reproduced entry for entry (including the entries that
# --- can never fire, such as capitalised keys looked up after lower-casing).

_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# Number words become digits; "none" counts as zero.
_NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Characters handled by process_punctuation. Apostrophes, colons, periods, '#', '$', '%', '&', '*'
# and '|' are not in the list (periods get their own rule below).
_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# "digit, comma, digit" anywhere in the answer switches every punctuation mark to deletion.
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")

# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group was meant as a look-behind but is
# written as a negative look-ahead for the text "<=digit", which can never fail in front of a
# period; in effect the pattern deletes every period that is not followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")

# The official call is ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in the ``count``
# argument, so at most 32 periods (re.UNICODE == 32) are removed. Kept for exactness.
_PERIOD_MAX_REMOVALS = 32


def process_punctuation(text: str) -> str:
    """Apply the official ``processPunctuation`` step.

    For each punctuation mark in the official list: delete it if it touches a space anywhere in
    the (original) answer, or if the answer contains a digit-comma-digit sequence such as
    ``"1,000"``; otherwise replace it with a space (so ``"black-and-white"`` becomes
    ``"black and white"`` but ``"1,000"`` becomes ``"1000"``). Finally delete periods that are not
    followed by a digit (``"yes."`` → ``"yes"``, ``"2.5"`` unchanged).

    Args:
        text: Raw answer text.

    Returns:
        The text with punctuation handled; case and spacing are otherwise untouched.
    """
    out = text
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        # The condition inspects the original text, not the progressively edited one.
        if delete_all or (mark + " " in text) or (" " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digit_article(text: str) -> str:
    """Apply the official ``processDigitArticle`` step.

    Lower-cases, splits on whitespace, maps number words ``zero``..``ten`` (and ``none``) to
    digits, drops the articles ``a``/``an``/``the``, expands apostrophe-less contractions
    (``"dont"`` → ``"don't"``) and joins with single spaces.

    Args:
        text: Answer text, normally already passed through :func:`process_punctuation`.

    Returns:
        The normalised answer.
    """
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


@lru_cache(maxsize=65536)
def normalize_vqa_answer(text: str) -> str:
    """Normalise a predicted answer exactly as the official evaluation normalises predictions.

    Newlines and tabs become spaces, the text is stripped, then :func:`process_punctuation` and
    :func:`process_digit_article` are applied. Examples: ``"Two."`` → ``"2"``, ``"A dog"`` →
    ``"dog"``, ``"dont"`` → ``"don't"``, ``"1,000"`` → ``"1000"``.

    Args:
        text: A predicted answer.

    Returns:
        The normalised answer.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


@lru_cache(maxsize=65536)
def _punctuation_cached(text: str) -> str:
    return process_punctuation(text)


def _prepare_references(answers: Sequence[str], normalize_references: bool) -> list[str]:
    if isinstance(answers, str):
        raise InputError("answers must be a sequence of answer strings, not a single string")
    refs = list(answers)
    if not refs:
        raise InputError("a question needs at least one reference answer")
    for ref in refs:
        if not isinstance(ref, str):
            raise InputError(f"reference answers must be strings, got {type(ref).__name__}")
    if normalize_references:
        return [normalize_vqa_answer(ref) for ref in refs]
    if len(set(refs)) > 1:
        return [_punctuation_cached(ref) for ref in refs]
    return refs


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_references: bool = False) -> float:
    """Score one predicted answer against the annotators' answers with the official VQA rule.

    Args:
        prediction: The model's answer (raw; it is normalised here).
        answers: The reference answers (ten for VQA v2), one entry per annotator, duplicates kept.
        normalize_references: Also pass the references through :func:`normalize_vqa_answer`.
            ``False`` (the default) reproduces the official script, which only applies
            :func:`process_punctuation` to the references and only when they disagree.

    Returns:
        The accuracy in [0, 1]: the mean over leave-one-out subsets of ``min(1, matches / 3)``.

    Raises:
        InputError: If ``answers`` is empty, a single string, or holds non-strings, or if
            ``prediction`` is not a string.
    """
    if not isinstance(prediction, str):
        raise InputError(f"prediction must be a string, got {type(prediction).__name__}")
    refs = _prepare_references(answers, normalize_references)
    pred = normalize_vqa_answer(prediction)
    n = len(refs)
    matches = sum(ref == pred for ref in refs)
    # Leaving out a matching answer leaves matches - 1 among the others; leaving out any other
    # answer leaves all of them. This is the official per-subset loop in closed form.
    total = matches * min(1.0, (matches - 1) / 3.0) + (n - matches) * min(1.0, matches / 3.0)
    return total / n


def evaluate_vqa(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    question_types: Sequence[str] | None = None,
    *,
    normalize_references: bool = False,
) -> dict:
    """Official VQA accuracy over a set of questions.

    Args:
        predictions: One predicted answer per question.
        answers: For each question, its reference answers (duplicates kept).
        question_types: Optional label per question (the official ``question_type`` such as
            ``"what color is the"``, or an ``answer_type`` such as ``"yes/no"``); each label gets
            its own mean accuracy.
        normalize_references: See :func:`vqa_accuracy`.

    Returns:
        ``{"accuracy": float, "count": int, "per_question": list[float]}`` plus, when
        ``question_types`` is given, ``"per_type": {label: accuracy}`` and
        ``"per_type_count": {label: count}``. Accuracies are fractions in [0, 1], unrounded.

    Raises:
        InputError: If the sequences differ in length, are empty, or hold invalid entries.
    """
    if isinstance(predictions, str):
        raise InputError("predictions must be a sequence of strings, not a single string")
    if len(predictions) != len(answers):
        raise InputError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if question_types is not None:
        if isinstance(question_types, str):
            raise InputError("question_types must be a sequence of strings, not a single string")
        if len(question_types) != len(predictions):
            raise InputError(f"{len(predictions)} predictions but {len(question_types)} question types")
    if len(predictions) == 0:
        raise InputError("no predictions to evaluate")

    scores: list[float] = []
    for index, (prediction, refs) in enumerate(zip(predictions, answers)):
        try:
            scores.append(vqa_accuracy(prediction, refs, normalize_references=normalize_references))
        except InputError as error:
            raise InputError(f"question {index}: {error}") from None

    result: dict = {"accuracy": sum(scores) / len(scores), "count": len(scores), "per_question": scores}
    if question_types is not None:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for label, score in zip(question_types, scores):
            sums[label] = sums.get(label, 0.0) + score
            counts[label] = counts.get(label, 0) + 1
        result["per_type"] = {label: sums[label] / counts[label] for label in sums}
        result["per_type_count"] = counts
    return result
