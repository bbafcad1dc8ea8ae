"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE, computed with pycocoevalcap.

These are the numbers the COCO caption server, LAVIS and the BLIP-2 paper report. The scorers
are pycocoevalcap's own (``pip install pycocoevalcap``); this module prepares their inputs the way
``pycocoevalcap.eval.COCOEvalCap`` does and returns the corpus-level scores:

- **Tokenisation.** Every caption (references and predictions) goes through the Stanford
  PTBTokenizer shipped inside pycocoevalcap (``java -cp stanford-corenlp-3.4.1.jar
  edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase``), then the tokens pycocoevalcap
  treats as punctuation are dropped. We run the same jar with the same flags ourselves rather than
  through ``PTBTokenizer.tokenize`` so that nothing is written into the installed package and so
  that a failure is reported instead of silently mis-aligning captions. Two hardening steps
  differ from pycocoevalcap only where pycocoevalcap would break: every line-break character
  (not just ``"\\n"``) is turned into a space, and blank captions are not sent to Java (they
  tokenise to ``""``, as Java would).
- **CIDEr is CIDEr-D.** pycocoevalcap's ``Cider`` scorer (reported as ``"CIDEr"``) implements
  CIDEr-D: Gaussian length penalty (sigma 6), clipped n-gram counts, scores x10. Its document
  frequencies come from the references of the evaluated set itself, so CIDEr depends on which
  images are scored together.
- **METEOR** (``meteor-1.5.jar``) and **SPICE** (``spice-1.0.jar``) need Java. SPICE also needs
  Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use; we never trigger that
  download. SPICE is computed only when ``pycocoevalcap/spice/lib/stanford-corenlp-3.6.0.jar`` and
  ``...-models.jar`` are already present.

Without Java (``shutil.which("java")`` is ``None``) the captions are tokenised by
:func:`ptb_tokenize`, a pure-Python approximation of the PTB tokenizer, and METEOR and SPICE are
skipped. The approximation agrees with Java on ordinary captions (lower-casing, splitting off
punctuation and clitics such as ``'s`` and ``n't``, ``$``/``%``/``#`` around numbers, brackets to
``-lrb-`` etc.) but does not reproduce all of the Java tokenizer's rules (its full abbreviation
list, Unicode quote and dash normalisation, URLs, emoticons, ...), so scores on unusual text can
differ slightly from the official ones; ``caption_metrics(..., tokenizer="ptb")`` insists on Java.

Returned keys use pycocoevalcap's names: ``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``,
``CIDEr``, ``SPICE``. Values are the raw scores (fractions; CIDEr-D is on its usual 0-10 scale),
not percentages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from vlbridge.errors import InputError

__all__ = ["METRIC_NAMES", "available_metrics", "caption_metrics", "ptb_tokenize"]

#: Metric groups accepted by ``caption_metrics(metrics=...)``; ``"BLEU"`` yields Bleu_1..Bleu_4.
METRIC_NAMES: tuple[str, ...] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

_INSTALL_HINT = "caption metrics need pycocoevalcap: pip install pycocoevalcap"

# Tokens pycocoevalcap drops after tokenising. Its list also names "-LRB-", "-RRB-", "-LCB-" and
# "-RCB-", but the tokenizer runs with -lowerCase, so brackets arrive as "-lrb-" etc. and are kept.
_DROPPED_TOKENS = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})

# Anything Java's line reader (or str.splitlines) would treat as a line break.
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _pycocoevalcap_dir() -> Path:
    try:
        from pycocoevalcap.bleu import bleu  # pycocoevalcap is a namespace package: locate it via a module
    except ImportError as error:  # pragma: no cover - exercised only without the package
        raise ImportError(_INSTALL_HINT) from error
    return Path(bleu.__file__).resolve().parent.parent


def _java() -> str | None:
    return shutil.which("java")


def _spice_ready(package_dir: Path) -> bool:
    lib = package_dir / "spice" / "lib"
    needed = [
        package_dir / "spice" / "spice-1.0.jar",
        lib / "stanford-corenlp-3.6.0.jar",
        lib / "stanford-corenlp-3.6.0-models.jar",
    ]
    return all(path.is_file() for path in needed)


def available_metrics() -> tuple[str, ...]:
    """The metric groups ``caption_metrics`` can compute in this environment.

    Returns:
        A subset of :data:`METRIC_NAMES`: BLEU, ROUGE_L and CIDEr always (given pycocoevalcap);
        METEOR when Java is on the PATH; SPICE when Java is present and SPICE's CoreNLP jars are
        already installed.
    """
    package_dir = _pycocoevalcap_dir()
    names = ["BLEU", "ROUGE_L", "CIDEr"]
    if _java() is not None:
        names.insert(1, "METEOR")
        if _spice_ready(package_dir):
            names.append("SPICE")
    return tuple(names)


# ----------------------------------------------------------------------------------------------
# Pure-Python stand-in for the Stanford PTB tokenizer (used only when Java is missing).
# ----------------------------------------------------------------------------------------------

_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "etc", "inc", "ltd", "co", "corp", "mt", "ft"}
    | {"jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
)
# Words the PTB tokenizer splits into two tokens.
_SPLIT_WORDS = {
    "cannot": "can not",
    "gonna": "gon na",
    "gotta": "got ta",
    "wanna": "wan na",
    "gimme": "gim me",
    "lemme": "lem me",
    "'tis": "'t is",
    "'twas": "'t was",
    "'n'": "'n'",  # kept whole ("rock 'n' roll")
}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
# Tokens the PTB tokenizer keeps whole despite the leading apostrophe: clitics, 'em, 'n', '90s.
_KEEPS_LEADING_APOSTROPHE = re.compile(r"^'(s|m|d|ll|re|ve|em|n'?|\d0s)$")
_SEPARABLE = re.compile(r"(--|[?!]+|[;`])")


def _split_token(token: str) -> list[str]:
    """Split one whitespace-delimited, lower-cased chunk into PTB-like tokens."""
    if token in _SPLIT_WORDS:
        return _SPLIT_WORDS[token].split()
    leading: list[str] = []
    trailing: list[str] = []
    # Peel punctuation off the front.
    while token:
        if token[0] == "'" and len(token) > 1 and not _KEEPS_LEADING_APOSTROPHE.match(token):
            leading.append(token[0])
            token = token[1:]
        else:
            break
    # Peel punctuation off the back (commas and colons inside numbers such as 1,000 or 3:30 stay).
    while token:
        if token[-1] in ",:%'" and len(token) > 1:
            trailing.insert(0, token[-1])
            token = token[:-1]
        elif token.endswith(".") and len(token) > 1:
            stem = token[:-1]
            if "." in stem or stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
                break  # "u.s.", "p.m.", "mr." and initials such as "j." keep their period
            trailing.insert(0, ".")
            token = stem
        else:
            break
    if token in _SPLIT_WORDS:
        middle = _SPLIT_WORDS[token].split()
    else:
        match = _CLITIC.match(token)
        if match is not None:
            stem, clitic = match.groups()
            if clitic == "n't" and stem == "ca":
                middle = ["ca", "n't"]
            elif clitic == "n't" and stem == "wo":
                middle = ["wo", "n't"]
            else:
                middle = [stem, clitic]
        else:
            middle = [token] if token else []
    return leading + middle + trailing


def ptb_tokenize(text: str) -> str:
    """Tokenise a caption the way pycocoevalcap does, without Java (an approximation).

    Lower-cases, splits off punctuation, brackets (as ``-lrb-`` etc.), currency/percent/hash signs
    around numbers and English clitics (``dog's`` → ``dog 's``, ``can't`` → ``ca n't``), then drops
    the tokens pycocoevalcap treats as punctuation. See the module docstring for how this differs
    from the Stanford tokenizer.

    Args:
        text: One caption.

    Returns:
        Space-joined tokens.
    """
    text = _LINE_BREAKS.sub(" ", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace('"', " ")  # the PTB tokenizer turns these into `` / '', which are dropped
    text = text.replace("\u2013", " -- ").replace("\u2014", " -- ")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, name)
    text = re.sub(r"\.{2,}", " ... ", text)  # the PTB tokenizer turns any run of periods into "..."
    text = _SEPARABLE.sub(r" \1 ", text)
    # "$5" / "#1": symbol before a digit; "50%": percent after a digit; "at&t" -> "at & t".
    text = re.sub(r"([$#])(?=\d)", r"\1 ", text)
    text = text.replace("&", " & ")
    tokens: list[str] = []
    for chunk in text.split():
        # A comma or colon that is not between digits separates tokens.
        chunk = re.sub(r"(?<!\d)([,:])|([,:])(?!\d)", lambda m: f" {m.group(0)} ", chunk)
        for piece in chunk.split():
            tokens.extend(_split_token(piece))
    return " ".join(token for token in tokens if token and token not in _DROPPED_TOKENS)


# ----------------------------------------------------------------------------------------------
# Java PTB tokenizer, invoked the way pycocoevalcap invokes it.
# ----------------------------------------------------------------------------------------------


def _ptb_tokenize_java(sentences: list[str], package_dir: Path) -> list[str]:
    """Tokenise with pycocoevalcap's Stanford PTBTokenizer jar (same flags, same punctuation filter)."""
    cleaned = [_LINE_BREAKS.sub(" ", sentence) for sentence in sentences]
    to_send = [index for index, sentence in enumerate(cleaned) if sentence.strip()]
    result = [""] * len(sentences)
    if not to_send:
        return result
    jar = package_dir / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    handle, path = tempfile.mkstemp(prefix="vlbridge-ptb-", suffix=".txt")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write("\n".join(cleaned[index] for index in to_send).encode())
        cmd = [
            "java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.remove(path)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"the Java PTB tokenizer failed (exit {proc.returncode}): {message}")
    lines = proc.stdout.decode().split("\n")
    if lines and lines[-1] == "" and len(lines) == len(to_send) + 1:
        lines.pop()
    if len(lines) != len(to_send):
        raise RuntimeError(f"the Java PTB tokenizer returned {len(lines)} lines for {len(to_send)} captions")
    for index, line in zip(to_send, lines):
        result[index] = " ".join(token for token in line.rstrip().split(" ") if token not in _DROPPED_TOKENS)
    return result


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------


def _pair_up(
    predictions: Mapping[Hashable, str] | Sequence[str],
    references: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
) -> tuple[list[str], list[list[str]]]:
    """Validate the inputs and return predictions and references aligned by position."""
    if isinstance(predictions, Mapping):
        if not isinstance(references, Mapping):
            raise InputError("predictions is a dict, so references must be a dict with the same ids")
        missing = [key for key in predictions if key not in references]
        extra = [key for key in references if key not in predictions]
        if missing or extra:
            raise InputError(
                f"predictions and references must have the same ids: {len(missing)} predicted ids lack references"
                f" (e.g. {missing[:3]!r}), {len(extra)} referenced ids lack a prediction (e.g. {extra[:3]!r})"
            )
        keys = list(predictions)
        preds = [predictions[key] for key in keys]
        refs = [references[key] for key in keys]
    else:
        if isinstance(predictions, str) or isinstance(references, (str, Mapping)):
            raise InputError("predictions and references must both be dicts keyed by id, or both sequences")
        if len(predictions) != len(references):
            raise InputError(f"{len(predictions)} predictions but {len(references)} reference lists")
        keys = list(range(len(predictions)))
        preds = list(predictions)
        refs = list(references)
    if not preds:
        raise InputError("no captions to evaluate")
    out_refs: list[list[str]] = []
    for key, pred, ref in zip(keys, preds, refs):
        if not isinstance(pred, str):
            raise InputError(f"prediction for id {key!r} must be a string, got {type(pred).__name__}")
        if isinstance(ref, str) or not isinstance(ref, Sequence):
            raise InputError(f"references for id {key!r} must be a list of strings")
        if not ref:
            raise InputError(f"id {key!r} has no reference captions")
        if not all(isinstance(item, str) for item in ref):
            raise InputError(f"references for id {key!r} must all be strings")
        out_refs.append(list(ref))
    return preds, out_refs


def caption_metrics(
    predictions: Mapping[Hashable, str] | Sequence[str],
    references: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
    *,
    metrics: Collection[str] | None = None,
    tokenizer: Literal["auto", "ptb", "python"] = "auto",
) -> dict[str, float]:
    """Corpus-level COCO caption metrics for one generated caption per image.

    Args:
        predictions: One generated caption per image, as ``{id: caption}`` (ids of any hashable
            type, e.g. int or str) or as a list.
        references: The ground-truth captions per image, ``{id: [caption, ...]}`` with the same ids
            as ``predictions``, or a list aligned with the ``predictions`` list.
        metrics: Metric groups to compute, from :data:`METRIC_NAMES`. ``None`` computes every group
            :func:`available_metrics` reports. Naming METEOR or SPICE when it cannot run raises.
        tokenizer: ``"ptb"``: the Stanford PTB tokenizer via Java (as pycocoevalcap); ``"python"``:
            :func:`ptb_tokenize`; ``"auto"``: Java when available, else Python.

    Returns:
        Scores keyed ``Bleu_1`` .. ``Bleu_4``, ``METEOR``, ``ROUGE_L``, ``CIDEr`` (CIDEr-D) and
        ``SPICE``, for the groups computed.

    Raises:
        InputError: On mismatched ids or lengths, empty or non-string captions, unknown metric
            names, or a metric/tokenizer that needs Java (or SPICE's jars) that are missing.
        ImportError: If pycocoevalcap is not installed.
        RuntimeError: If a Java scorer fails.
    """
    package_dir = _pycocoevalcap_dir()
    preds, refs = _pair_up(predictions, references)

    java = _java()
    if tokenizer not in ("auto", "ptb", "python"):
        raise InputError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
    if tokenizer == "ptb" and java is None:
        raise InputError("tokenizer='ptb' needs Java on the PATH (install a JRE, or use tokenizer='python')")
    use_java_tokenizer = tokenizer == "ptb" or (tokenizer == "auto" and java is not None)

    if metrics is None:
        wanted = set(available_metrics())
    else:
        if isinstance(metrics, str):
            metrics = [metrics]
        wanted = set(metrics)
        unknown = wanted - set(METRIC_NAMES)
        if unknown:
            raise InputError(f"unknown caption metrics {sorted(unknown)}; choose from {list(METRIC_NAMES)}")
        if wanted & {"METEOR", "SPICE"} and java is None:
            raise InputError("METEOR and SPICE need Java on the PATH")
        if "SPICE" in wanted and not _spice_ready(package_dir):
            raise InputError(
                "SPICE needs Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib (stanford-corenlp-3.6.0.jar and"
                " stanford-corenlp-3.6.0-models.jar); run pycocoevalcap.spice.get_stanford_models once, online"
            )

    # Tokenise (references first, then predictions, as COCOEvalCap does).
    flat_refs = [caption for group in refs for caption in group]
    if use_java_tokenizer:
        tokenized_refs = _ptb_tokenize_java(flat_refs, package_dir)
        tokenized_preds = _ptb_tokenize_java(preds, package_dir)
    else:
        tokenized_refs = [ptb_tokenize(caption) for caption in flat_refs]
        tokenized_preds = [ptb_tokenize(caption) for caption in preds]
    gts: dict[int, list[str]] = {}
    start = 0
    for index, group in enumerate(refs):
        gts[index] = tokenized_refs[start : start + len(group)]
        start += len(group)
    res: dict[int, list[str]] = {index: [caption] for index, caption in enumerate(tokenized_preds)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    if "BLEU" in wanted:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, value in enumerate(bleu, start=1):
            scores[f"Bleu_{n}"] = float(value)
    if "METEOR" in wanted:
        scores["METEOR"] = _meteor(gts, res)
    if "ROUGE_L" in wanted:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in wanted:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    except (ValueError, BrokenPipeError) as error:
        stderr = b""
        if scorer.meteor_p.poll() is not None and scorer.meteor_p.stderr is not None:
            stderr = scorer.meteor_p.stderr.read()
        detail = stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"METEOR (meteor-1.5.jar) failed: {detail or error}") from error
    finally:
        del scorer
