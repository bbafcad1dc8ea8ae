"""The ``vlbridge`` command line: ``caption``, ``ask``, ``match``, ``train``, ``eval``, ``demo``, ``world``, ``serve``,
``index``.

Every command is a thin wrapper over Python functions you can call yourself:

- ``caption`` → :func:`load_model` + ``Blip2.caption``
- ``ask`` → :func:`load_model` + ``Blip2.answer``
- ``match`` → :func:`load_model` + :func:`match_grid` (``Blip2.itm`` and ``Blip2.itc``)
- ``demo`` → :func:`vlbridge.recipes.world.run_world_recipe` (``--smoke``: :func:`vlbridge.demo.run_demo`)
- ``world`` → :func:`vlbridge.data.world.generate_world`
- ``index build`` → :func:`vlbridge.index.build_index`; ``index search`` → :meth:`vlbridge.index.ImageIndex.search`
- ``train`` / ``eval`` → ``vlbridge.training.train_main`` / ``eval_main``; ``serve`` → ``vlbridge.serving.serve_main``
  (looked up when the command runs, so they are picked up as soon as those modules provide them)

Exit codes: 0 success; 1 a user error (a bad image, checkpoint, config or argument combination, or an OSError such
as a full disk; reported as one line ``vlbridge: error: ...`` on stderr, without a traceback); 2 a command-line
usage error, or a command that is not implemented yet; 130 interrupted. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from vlbridge.errors import InputError, VlbridgeError

if TYPE_CHECKING:
    import torch

    from vlbridge.models.vlm import VisionLanguageModel

PROG = "vlbridge"
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# Commands whose implementation lives in a module that may not exist yet: command -> (module, function).
DEFERRED: dict[str, tuple[str, str]] = {
    "train": ("vlbridge.training", "train_main"),
    "eval": ("vlbridge.training", "eval_main"),
    "serve": ("vlbridge.serving", "serve_main"),
}


# ------------------------------------------------------------------------------------------------------------ library
def resolve_device(device: str | None) -> str:
    """The device to run on: ``device`` itself, or ``"cuda"`` when a GPU is available and ``"cpu"`` otherwise.

    Args:
        device: A torch device string, or None / ``"auto"`` to choose.

    Returns:
        A torch device string.
    """
    if device not in (None, "auto"):
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    source: str, *, device: str | None = None, dtype: str | torch.dtype | None = None
) -> VisionLanguageModel:
    """``vlbridge.load`` with transformers' logging and progress bars turned down to errors only.

    Args:
        source: A checkpoint folder, hub id or LAVIS ``.pth`` file (see :func:`vlbridge.load`).
        device: Torch device; None picks CUDA when available, else CPU.
        dtype: dtype of the frozen parts: a torch dtype, a torch name (``"bfloat16"``) or a short name
            (``"fp32"``, ``"bf16"``, ``"fp16"``); None keeps float32.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: The checkpoint is missing or cannot be read.
    """
    import transformers

    import vlbridge

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, dtype)
    return vlbridge.load(source, device=resolve_device(device), dtype=dtype)


def check_images(paths: Sequence[str | os.PathLike]) -> None:
    """Open and decode every image once, so that a typo or a bad file fails before any model work.

    Args:
        paths: Image files.

    Raises:
        ImageError: A file is missing or is not a usable image; the message names it.
    """
    from vlbridge.data.images import load_image

    for path in paths:
        load_image(path)


def match_grid(
    model: VisionLanguageModel, images: Sequence[Any], texts: Sequence[str], *, batch_size: int = 8
) -> list[dict]:
    """Score every (image, text) pair of the full grid with the ITM head and ITC similarity.

    Args:
        model: A model with stage-1 heads (a retrieval / stage-1 checkpoint).
        images: Image paths (or PIL images); ``str(image)`` is reported as ``"image"``.
        texts: Texts to match against every image.
        batch_size: Images per forward pass.

    Returns:
        One dict per pair, image-major: ``{"image", "text", "itm": match probability, "itc": cosine similarity}``.

    Raises:
        InputError: The model has no ITM/ITC heads, or an input list is empty.
    """
    images, texts = list(images), list(texts)
    if not images or not texts:
        raise InputError("match needs at least one image and one text")
    sims = model.itc(images, texts, batch_size=batch_size)  # [I, T]
    pair_images = [image for image in images for _ in texts]
    pair_texts = [text for _ in images for text in texts]
    probs = model.itm(pair_images, pair_texts, batch_size=batch_size)
    return [
        {"image": str(image), "text": text, "itm": float(p), "itc": float(sims[k // len(texts), k % len(texts)])}
        for k, (image, text, p) in enumerate(zip(pair_images, pair_texts, probs))
    ]


# ------------------------------------------------------------------------------------------------------------ output
def _emit(line: str) -> None:
    """Print one result line to stdout now (so pipes see results as they come), above any progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _batches(items: Sequence[Any], batch_size: int, desc: str) -> Iterator[list[Any]]:
    """Yield ``items`` in batches, with a progress bar on stderr when it is a terminal and there is more than one."""
    from tqdm import tqdm

    show = len(items) > batch_size and sys.stderr.isatty()
    with tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, disable=not show, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            batch = list(items[start : start + batch_size])
            yield batch
            bar.update(len(batch))


def _status(message: str) -> None:
    """A progress note for people watching a terminal; silent when stderr is redirected."""
    if sys.stderr.isatty():
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _json(obj: dict) -> str:
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not valid UTF-8 (kept as surrogates): escape it
        text = json.dumps(obj, ensure_ascii=True)
    return text


def safe_text(text: object) -> str:
    """``text`` for a terminal: control characters (newlines, ANSI escapes) and undecodable bytes escaped.

    A file name is data; printed raw, a newline in it would fake an output line and an escape code could
    rewrite the screen.
    """
    out = []
    for ch in str(text):
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    """Rows of cells as aligned text lines; columns in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        cells = (cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    return [line(row) for row in rows]


# ------------------------------------------------------------------------------------------------------------ commands
def _load(args: argparse.Namespace) -> VisionLanguageModel:
    _status(f"loading {args.model}")
    return load_model(args.model, device=args.device, dtype=args.dtype)


def _seed(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def cmd_caption(args: argparse.Namespace) -> int:
    """``vlbridge caption``: one caption per image."""
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("empty --prompt: leave it out to use the checkpoint's default prompt")
    if args.sample and args.num_beams > 1:
        raise InputError("--sample cannot be combined with --num-beams > 1")
    check_images(args.images)
    model = _load(args)
    _seed(args.seed)
    for batch in _batches(args.images, args.batch_size, "captioning"):
        captions = model.caption(
            batch,
            prompt=args.prompt,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            do_sample=args.sample,
            top_p=args.top_p,
            temperature=args.temperature,
        )
        for image, caption in zip(batch, captions):
            _emit(
                _json({"image": image, "caption": caption})
                if args.json
                else f"{safe_text(image)}: {safe_text(caption)}"
            )
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """``vlbridge ask``: one answer per ``--question`` about one image."""
    for question in args.question:
        if not question.strip():
            raise InputError("empty --question")
    check_images([args.image])
    model = _load(args)
    answers = model.answer(
        [args.image] * len(args.question),
        args.question,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    for question, answer in zip(args.question, answers):
        if args.json:
            _emit(_json({"image": args.image, "question": question, "answer": answer}))
        else:
            _emit(f"{safe_text(args.image)}: Q: {safe_text(question)}  A: {safe_text(answer)}")
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    """``vlbridge match``: ITM probability and ITC similarity of every (image, text) pair."""
    for text in args.text:
        if not text.strip():
            raise InputError("empty --text")
    check_images(args.image)
    model = _load(args)
    if model.retrieval is None:
        raise InputError(
            f"{args.model} has no ITM/ITC heads (a generation-only checkpoint): match needs a stage-1 / retrieval "
            "model such as a Blip2ForImageTextRetrieval checkpoint"
        )
    results = match_grid(model, args.image, args.text, batch_size=args.batch_size)
    if args.json:
        for row in results:
            _emit(_json(row))
        return 0
    rows = [["image", "text", "itm", "itc"]]
    rows += [[safe_text(r["image"]), safe_text(r["text"]), f"{r['itm']:.3f}", f"{r['itc']:.3f}"] for r in results]
    for line in _table(rows, right={2, 3}):
        _emit(line)
    return 0


def _with_overrides(cls: type, config: str | None, overrides: Sequence[str]):
    """A config dataclass from an optional YAML file plus ``key=value`` overrides."""
    from vlbridge.config import apply_overrides, from_dict, load_yaml

    if config is not None:
        return load_yaml(cls, config, overrides)
    return from_dict(cls, apply_overrides({}, overrides))


def cmd_demo(args: argparse.Namespace) -> int:
    """``vlbridge demo``: see :func:`vlbridge.recipes.world.run_world_recipe` (``--smoke``: :func:`run_demo`)."""
    if args.smoke:
        from vlbridge.demo import run_demo

        run_demo(args.out_dir)
        return 0
    from vlbridge.recipes.world import WorldRecipe, run_world_recipe

    recipe = _with_overrides(WorldRecipe, args.config, args.overrides)
    run_world_recipe(args.out_dir, recipe, fresh=args.fresh)
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    """``vlbridge world OUT_DIR [key=value ...]``: see :func:`vlbridge.data.world.generate_world`."""
    from vlbridge.data.world import WorldConfig, generate_world

    paths = generate_world(args.out_dir, _with_overrides(WorldConfig, args.config, args.overrides))
    for name, path in paths.items():
        _emit(f"{name}\t{path}")
    return 0


def deferred_command(command: str) -> Callable[[argparse.Namespace], int | None] | None:
    """The function that implements ``command`` (train, eval, serve), or None while its module lacks it.

    Args:
        command: A key of :data:`DEFERRED`.

    Returns:
        ``module.function`` taking the parsed arguments, or None.
    """
    module_name, function = DEFERRED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the module exists but one of its own imports is missing: a real problem
            raise
        return None
    return getattr(module, function, None)


def cmd_deferred(args: argparse.Namespace) -> int:
    """``vlbridge train | eval | serve``: hand over to the implementing module, if there is one yet."""
    run = deferred_command(args.command)
    if run is None:
        print(f"{PROG} {args.command}: not implemented yet in this version", file=sys.stderr)
        return 2
    code = run(args)
    return int(code or 0)


# ------------------------------------------------------------------------------------------------------------ parser
class UsageError(Exception):
    """A command-line usage error (bad or missing argument): exit code 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _model_options(p: argparse.ArgumentParser, *, batch_size: int = 8) -> None:
    p.add_argument("--model", "-m", required=True, metavar="M", help="checkpoint folder, hub id or LAVIS .pth file")
    p.add_argument("--device", default=None, metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the frozen parts (default: fp32)")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size, metavar="N", help="images per batch")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")


def build_parser() -> argparse.ArgumentParser:
    """The ``vlbridge`` argument parser.

    Returns:
        The parser; each sub-command sets ``func``, the function that runs it.
    """
    from vlbridge import __version__

    parser = _Parser(
        prog=PROG,
        description="BLIP-2: caption images, answer questions and match images with texts.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("caption", help="caption images", description="Write one caption per image.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _model_options(p)
    p.add_argument("--prompt", default=None, metavar="P", help="text the caption continues (default: the model's)")
    p.add_argument("--num-beams", type=_positive_int, default=1, metavar="N", help="beam search width")
    p.add_argument("--max-new-tokens", type=_positive_int, default=30, metavar="N", help="caption length limit")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy / beam search")
    p.add_argument("--top-p", type=_probability, default=1.0, metavar="P", help="nucleus mass with --sample")
    p.add_argument("--temperature", type=_positive_float, default=1.0, metavar="T", help="temperature with --sample")
    p.add_argument("--seed", type=int, default=None, help="random seed (makes --sample repeatable)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("ask", help="answer questions about an image", description="Answer questions about one image.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--question", "-q", action="append", required=True, metavar="Q", help="a question (repeatable)")
    _model_options(p)
    p.add_argument("--num-beams", type=_positive_int, default=1, metavar="N", help="beam search width")
    p.add_argument("--max-new-tokens", type=_positive_int, default=10, metavar="N", help="answer length limit")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "match",
        help="score image-text pairs (ITM + ITC)",
        description="ITM match probability and ITC similarity of every (image, text) pair; needs a stage-1 model.",
    )
    p.add_argument("--image", "-i", nargs="+", action="extend", required=True, metavar="I", help="image files")
    p.add_argument("--text", "-t", nargs="+", action="extend", required=True, metavar="T", help="texts")
    _model_options(p)
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("train", help="train from a config", description="Train a model from a YAML config.")
    p.add_argument("config", metavar="CONFIG.yaml", help="training config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint of the run")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a run already in run.output_dir (refused without it)"
    )
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="with --resume: accept settings that differ from the run's (recorded in config_changes.jsonl)",
    )
    p.set_defaults(func=cmd_deferred)

    p = sub.add_parser("eval", help="evaluate from a config", description="Evaluate a model from a YAML config.")
    p.add_argument("config", metavar="CONFIG.yaml", help="evaluation config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_deferred)

    p = sub.add_parser(
        "demo",
        help="run the whole BLIP-2 recipe on the embedded synthetic world",
        description="Generate the synthetic world, train stage 0 (frozen ViT and LM), stage 1, stage 2 and "
        "instruction tuning, evaluate on held-out splits and write report.html. Stages are cached: a second run "
        "only redoes what changed.",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. stage2.steps=300")
    p.add_argument("--out-dir", default="runs/demo", metavar="DIR", help="where to write (default runs/demo)")
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe settings (see vlbridge.recipes.world)")
    p.add_argument("--fresh", action="store_true", help="redo every stage even if a cached result matches")
    p.add_argument("--smoke", action="store_true", help="only a seconds-long smoke run of the API, untrained")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "world", help="generate the synthetic world", description="Write the synthetic world's PNGs and manifests."
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="world settings, e.g. n_train=1000 seed=3")
    p.add_argument("--config", metavar="WORLD.yaml", help="world settings file")
    p.set_defaults(func=cmd_world)

    from vlbridge.cli_search import add_index_parser, add_serve_parser  # cli is loaded by now: no import circle

    add_serve_parser(sub)
    add_index_parser(sub)
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {safe_text(' '.join(message.split()))}", file=sys.stderr, flush=True)


# Arguments that are text for the model (not file names, which may be any bytes): they must be valid UTF-8.
TEXT_ARGUMENTS = ("prompt", "question", "text", "overrides")


def check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse text arguments holding bytes that are not UTF-8 (Python keeps them as lone surrogates).

    Raises:
        InputError: Names the argument and the first bad byte.
    """
    for name in TEXT_ARGUMENTS:
        value = getattr(args, name, None)
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(text[exc.start]) - 0xDC00 if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else None
                where = f" (byte 0x{byte:02x})" if byte is not None else ""
                option = name if name == "overrides" else f"--{name}"
                raise InputError(f"{option}: not valid UTF-8 text{where}") from None


def _describe(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vlbridge`` command line.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv``.

    Returns:
        The exit code (see the module docstring).
    """
    parser = build_parser()
    try:
        # Overrides may come after the flags too (`train c.yaml --resume optim.lr=1e-4`), which argparse cannot
        # parse with a sub-command, so stray `key=value` items join the command's overrides.
        args, extra = parser.parse_known_args(argv)
        if extra:
            if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
    except UsageError as exc:
        _error(str(exc))
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    # The one place where user errors become one line on stderr and exit 1, for every command. A VlbridgeError is
    # a user error by definition; so is an OSError (a missing file, a full disk, a read-only folder: the machine
    # said no, the message names the path). Anything else is a bug and keeps its traceback.
    try:
        check_text_arguments(args)
        return int(args.func(args) or 0)
    except VlbridgeError as exc:
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # `vlbridge caption ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        _error(_describe(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
