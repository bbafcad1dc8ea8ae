"""VQA accuracy: normalisation and scoring checked against hand-computed values of the official rule."""

import itertools
import random

import pytest

from vlbridge.errors import InputError
from vlbridge.eval.vqa import (
    evaluate_vqa,
    normalize_vqa_answer,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number word -> digit
        ("two.", "2"),  # trailing period removed, then number mapped
        ("none", "0"),  # the official table maps "none" to 0
        ("A dog", "dog"),  # article dropped, lower-cased
        ("an apple", "apple"),
        ("The Answer\tIs\nYes ", "answer is yes"),  # tabs/newlines -> spaces, stripped
        ("yes.", "yes"),
        ("what?", "what"),
        ("dont", "don't"),  # contraction table
        ("isnt", "isn't"),
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("Im", "im"),  # the table's key is "Im" but lookup happens after lower-casing
        ("1,000", "1000"),  # digit,digit -> every punctuation mark deleted
        ("1,000 and 2-3", "1000 and 23"),  # ... including the hyphen, because of the comma rule
        ("black-and-white", "black and white"),  # hyphen not touching a space -> space
        ("hot - dog", "hot dog"),  # hyphen touching a space -> deleted
        ("a, b", "b"),  # ", " -> comma deleted, then "a" is an article
        ("2.5", "2.5"),  # period before a digit kept
        ("e.g.", "eg"),  # other periods deleted
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_period_rule_removes_at_most_32_periods():
    # The official call passes re.UNICODE (32) as sub()'s count argument.
    assert process_punctuation("." * 40) == "." * 8


def test_ten_answer_accuracy_table():
    # With ten answers and m of them matching, mean over leave-one-out subsets of min(1, matches/3):
    # m=0: 0
    # m=1: (1*min(1,0/3) + 9*min(1,1/3)) / 10 = 3/10        = 0.3
    # m=2: (2*(1/3)      + 8*(2/3))      / 10 = (18/3)/10    = 0.6
    # m=3: (3*(2/3)      + 7*1)          / 10 = 9/10         = 0.9   (not 1.0)
    # m=4: (4*1          + 6*1)          / 10                = 1.0
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 7: 1.0, 10: 1.0}
    for m, value in expected.items():
        answers = ["dog"] * m + ["cat"] * (10 - m)
        assert vqa_accuracy("dog", answers) == pytest.approx(value)


def test_multiple_different_answers():
    answers = ["red"] * 5 + ["dark red"] * 3 + ["maroon"] * 2
    assert vqa_accuracy("red", answers) == pytest.approx(1.0)  # 5 matches
    assert vqa_accuracy("Dark red.", answers) == pytest.approx(0.9)  # 3 matches
    assert vqa_accuracy("maroon", answers) == pytest.approx(0.6)  # 2 matches
    assert vqa_accuracy("blue", answers) == 0.0


def test_number_words_and_articles_on_the_prediction():
    assert vqa_accuracy("two", ["2"] * 10) == pytest.approx(1.0)  # "two" -> "2", 10 matches
    # 3 x "dog" -> 0.9 as in the table; "a dog" normalises to "dog".
    assert vqa_accuracy("a dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_references_get_punctuation_only_when_annotators_disagree():
    # Disagreeing answers are punctuation-processed: "yes." -> "yes", so all ten match "Yes".
    assert vqa_accuracy("Yes", ["yes."] * 2 + ["yes"] * 8) == pytest.approx(1.0)
    # Unanimous answers are compared as they are (the official annotations are pre-normalised).
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["two"] * 10) == 0.0  # prediction becomes "2", reference stays "two"
    # normalize_references=True opts into full normalisation of the references.
    assert vqa_accuracy("yes", ["Yes"] * 10, normalize_references=True) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["two"] * 10, normalize_references=True) == pytest.approx(1.0)


def test_contractions_and_numbers_with_commas():
    # "dont" -> "don't": 3 of 10 match -> 0.9
    assert vqa_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # "1,000" -> "1000"; the disagreeing references also lose their comma: 2 x "1000" + 1 x "1,000" = 3 -> 0.9
    assert vqa_accuracy("1,000", ["1000"] * 2 + ["1,000"] + ["100"] * 7) == pytest.approx(0.9)
    # two matches -> 0.6
    assert vqa_accuracy("1,000", ["1000"] * 2 + ["10"] * 8) == pytest.approx(0.6)


def test_fewer_than_ten_answers_use_leave_one_out_over_all_of_them():
    # n=3, all match: each subset of 2 has 2 matches -> 2/3.
    assert vqa_accuracy("dog", ["dog"] * 3) == pytest.approx(2 / 3)
    # n=5, m=2: (2*(1/3) + 3*(2/3)) / 5 = (8/3)/5 = 8/15
    assert vqa_accuracy("dog", ["dog", "dog", "cat", "cat", "cow"]) == pytest.approx(8 / 15)
    # n=1: the only subset is empty, so the score is 0 whatever the prediction.
    assert vqa_accuracy("dog", ["dog"]) == 0.0


def _loop_reference(prediction, answers):
    """The official per-subset loop, written out (by position), for a randomised cross-check."""
    refs = list(answers)
    if len(set(refs)) > 1:
        refs = [process_punctuation(ref) for ref in refs]
    pred = normalize_vqa_answer(prediction)
    scores = []
    for left_out in range(len(refs)):
        others = [ref for index, ref in enumerate(refs) if index != left_out]
        scores.append(min(1.0, sum(ref == pred for ref in others) / 3))
    return sum(scores) / len(scores)


def test_closed_form_matches_the_official_loop():
    rng = random.Random(0)
    pool = ["yes", "yes.", "no", "2", "two", "a dog", "dog", "1,000", "1000", "black-and-white", "Red"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(rng.randint(1, 10))]
        prediction = rng.choice(pool)
        assert vqa_accuracy(prediction, answers) == pytest.approx(_loop_reference(prediction, answers))


def test_evaluate_vqa_overall_and_per_type():
    predictions = ["yes", "2", "cat"]
    answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["dog"] * 10]
    types = ["yes/no", "number", "other"]
    result = evaluate_vqa(predictions, answers, types)
    assert result["count"] == 3
    assert result["accuracy"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert result["per_question"] == pytest.approx([1.0, 0.6, 0.0])
    assert result["per_type"] == pytest.approx({"yes/no": 1.0, "number": 0.6, "other": 0.0})
    assert result["per_type_count"] == {"yes/no": 1, "number": 1, "other": 1}

    grouped = evaluate_vqa(predictions, answers, ["a", "a", "b"])
    assert grouped["per_type"] == pytest.approx({"a": 0.8, "b": 0.0})
    assert "per_type" not in evaluate_vqa(predictions, answers)


@pytest.mark.parametrize(
    "call",
    [
        lambda: evaluate_vqa(["yes"], [["yes"], ["no"]]),
        lambda: evaluate_vqa(["yes", "no"], [["yes"], ["no"]], ["t"]),
        lambda: evaluate_vqa([], []),
        lambda: evaluate_vqa(["yes"], [[]]),
        lambda: vqa_accuracy("yes", []),
        lambda: vqa_accuracy("yes", "yes"),
        lambda: vqa_accuracy(3, ["3"]),
    ],
)
def test_invalid_inputs_raise_input_error(call):
    with pytest.raises(InputError):
        call()


def test_order_of_answers_does_not_matter():
    answers = ["dog", "dog", "cat", "cow", "dog", "cat", "cat", "cat", "hen", "dog"]
    first = vqa_accuracy("dog", answers)
    for permutation in itertools.islice(itertools.permutations(answers), 0, 50, 7):
        assert vqa_accuracy("dog", list(permutation)) == pytest.approx(first)
