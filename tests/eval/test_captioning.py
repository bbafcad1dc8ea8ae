"""Caption metrics: parity with pycocoevalcap's scorers, id handling, the no-Java fallback."""

import shutil

import pytest

pytest.importorskip("pycocoevalcap.bleu.bleu")

from vlbridge.errors import InputError  # noqa: E402
from vlbridge.eval import captioning  # noqa: E402
from vlbridge.eval.captioning import caption_metrics, ptb_tokenize  # noqa: E402

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for the Stanford tokenizer/METEOR")

REFERENCES = {
    "391895": [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
    ],
    "522418": [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cuts a large sheet cake.",
    ],
    "184613": [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "A boy holding an umbrella while standing next to livestock.",
    ],
    "318219": [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "A young boy is using a computer (with headphones).",
    ],
}
PREDICTIONS = {
    "391895": "a man riding a motorcycle on a dirt road",
    "522418": "A woman cutting a cake!",
    "184613": "a boy with an umbrella next to some cows",
    "318219": "a child's computer, with headphones",
}
CHEAP = ["BLEU", "ROUGE_L", "CIDEr"]


class _SharedMeteor:
    """Stands in for ``Meteor()`` so both sides of the parity test share one METEOR process (slow to start)."""

    def __init__(self, real):
        self.real = real
        self.meteor_p = real.meteor_p
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self

    def compute_score(self, gts, res):
        return self.real.compute_score(gts, res)


def _direct_pycocoevalcap(predictions, references, meteor=None):
    """The scores pycocoevalcap's own classes give, wired as COCOEvalCap wires them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": value for n, value in enumerate(bleu, start=1)}
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor is not None:
        scores["METEOR"] = meteor.compute_score(gts, res)[0]
    return scores


@needs_java
def test_matches_pycocoevalcap_scorers_called_directly(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    shared = _SharedMeteor(meteor_module.Meteor())
    monkeypatch.setattr(meteor_module, "Meteor", shared)
    ours = caption_metrics(PREDICTIONS, REFERENCES, metrics=["BLEU", "METEOR", "ROUGE_L", "CIDEr"])
    assert shared.calls == 1
    theirs = _direct_pycocoevalcap(PREDICTIONS, REFERENCES, meteor=shared.real)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-9), name
    assert all(isinstance(value, float) for value in ours.values())


@needs_java
def test_perfect_prediction_scores_high():
    perfect = {key: refs[0] for key, refs in REFERENCES.items()}
    scores = caption_metrics(perfect, REFERENCES, metrics=CHEAP)
    assert scores["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-6)
    worse = caption_metrics(PREDICTIONS, REFERENCES, metrics=CHEAP)
    assert scores["CIDEr"] > 2.0 > worse["CIDEr"]


@needs_java
def test_string_ids_int_ids_and_lists_agree():
    by_str = caption_metrics(PREDICTIONS, REFERENCES, metrics=CHEAP)
    keys = list(REFERENCES)
    by_int = caption_metrics(
        {int(k): PREDICTIONS[k] for k in keys}, {int(k): REFERENCES[k] for k in keys}, metrics=CHEAP
    )
    by_list = caption_metrics([PREDICTIONS[k] for k in keys], [REFERENCES[k] for k in keys], metrics=CHEAP)
    assert by_str == pytest.approx(by_int) and by_str == pytest.approx(by_list)
    # Dict order of the predictions does not matter.
    shuffled = {k: PREDICTIONS[k] for k in reversed(keys)}
    assert caption_metrics(shuffled, REFERENCES, metrics=CHEAP) == pytest.approx(by_str)


@needs_java
def test_python_tokenizer_agrees_with_java_on_ordinary_captions():
    captions = [caption for refs in REFERENCES.values() for caption in refs] + list(PREDICTIONS.values())
    captions += ["The dog's bone ... at 3:30 p.m. in the U.S.", "He can't go, won't he?", "a $5 hot-dog, 50% off"]
    captions += ["plan B.", "J. Smith's cat"]
    java = captioning._ptb_tokenize_java(captions, captioning._pycocoevalcap_dir())
    assert [ptb_tokenize(caption) for caption in captions] == java
    # Line breaks inside a caption do not shift the following captions; blank captions become "".
    assert captioning._ptb_tokenize_java(["a\rb", "", "cat."], captioning._pycocoevalcap_dir()) == ["a b", "", "cat"]


def test_python_tokenizer_examples():
    assert ptb_tokenize("A man (left) can't ride, won't he?") == "a man -lrb- left -rrb- ca n't ride wo n't he"
    assert ptb_tokenize('The dog\'s 1,000 "toys".') == "the dog 's 1,000 toys"


def test_without_java_falls_back_and_skips_meteor(monkeypatch):
    monkeypatch.setattr(captioning, "_java", lambda: None)
    scores = caption_metrics(PREDICTIONS, REFERENCES)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    python_tokenized = caption_metrics(PREDICTIONS, REFERENCES, tokenizer="python", metrics=CHEAP)
    assert scores == pytest.approx(python_tokenized)
    with pytest.raises(InputError, match="Java"):
        caption_metrics(PREDICTIONS, REFERENCES, metrics=["METEOR"])
    with pytest.raises(InputError, match="Java"):
        caption_metrics(PREDICTIONS, REFERENCES, tokenizer="ptb")


@pytest.mark.parametrize(
    ("predictions", "references", "kwargs"),
    [
        ({"a": "x"}, {"b": ["x"]}, {}),  # different ids
        ({"a": "x"}, [["x"]], {}),  # dict vs list
        (["x", "y"], [["x"]], {}),  # lengths differ
        (["x"], [[]], {}),  # no references
        (["x"], ["x"], {}),  # references not a list of lists
        ([3], [["x"]], {}),  # non-string prediction
        ([], [], {}),
        (["x"], [["x"]], {"metrics": ["BLEU-5"]}),
        (["x"], [["x"]], {"tokenizer": "nltk"}),
    ],
)
def test_bad_inputs_raise_input_error(predictions, references, kwargs):
    with pytest.raises(InputError):
        caption_metrics(predictions, references, **kwargs)
