"""The command line's search-and-serve commands: ``vlbridge index build|search`` and ``vlbridge serve``.

Their parsers and the two index commands live here so that ``cli.py`` keeps the model verbs, training and the
shared plumbing; ``serve`` hands over to :func:`vlbridge.serving.serve_main` like ``train`` and ``eval`` do.
"""

from __future__ import annotations

import argparse
import sys

from vlbridge.cli import (
    DTYPES,
    PROG,
    _emit,
    _json,
    _load,
    _model_options,
    _positive_int,
    check_images,
    cmd_deferred,
    safe_text,
)
from vlbridge.errors import InputError


def cmd_index_build(args: argparse.Namespace) -> int:
    """``vlbridge index build IMAGES_DIR --model M --out DIR``: see :func:`vlbridge.index.build_index`."""
    from vlbridge.index import AnnSettings, build_index

    ann = AnnSettings(kind=args.kind, nlist=args.nlist)
    model = _load(args)
    report = build_index(args.images_dir, model, args.out, model_source=args.model, batch_size=args.batch_size, ann=ann)
    for path, reason in report.skipped:
        print(f"{PROG}: skipped {safe_text(path)}: {safe_text(reason)}", file=sys.stderr)
    if args.json:
        _emit(_json(report.to_dict()))
    else:
        _emit(
            f"{report.images} images in {safe_text(args.out)} ({report.ann.get('kind')} index): {report.added} added, "
            f"{report.updated} re-embedded, {report.deleted} dropped, {report.unchanged} unchanged, "
            f"{len(report.skipped)} skipped, {report.seconds:.1f} s"
        )
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    """``vlbridge index search DIR "text"``: see :meth:`vlbridge.index.ImageIndex.search`."""
    from vlbridge.index import ImageIndex

    if args.image is None and not (args.text or "").strip():
        raise InputError("give a search text, or --image FILE")
    if args.image is not None:
        check_images([args.image])
    model = _load(args) if args.model else None
    index = ImageIndex.open(args.index_dir, model)
    text = args.text if args.image is None else None
    hits = index.search(text, image=args.image, k=args.k, rerank=args.rerank)
    for hit in hits:
        absolute = str(index.root / hit.path)
        if args.json:
            _emit(_json({**hit.to_dict(), "file": absolute}))
        else:
            _emit(f"{hit.score:.4f}  {safe_text(absolute)}")
    return 0


def add_serve_parser(sub) -> None:
    """``vlbridge serve``'s options (see :class:`vlbridge.serving.ServeSettings`)."""
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP",
        description="Serve a model over HTTP: OpenAI-style /v1/chat/completions, /v1/captions, /v1/embeddings, "
        "/v1/itm, /v1/search (with --index) and a web page at /.",
    )
    p.add_argument("--model", "-m", required=True, metavar="M", help="checkpoint folder, hub id or LAVIS .pth file")
    p.add_argument("--index", default=None, metavar="DIR", help="an index from 'vlbridge index build' for /v1/search")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="bearer key required on /v1/ (default: $VLBRIDGE_API_KEY); required with a non-loopback --host",
    )
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public hosts only)")
    p.add_argument("--max-batch-size", type=_positive_int, default=16, metavar="N", help="requests per model call")
    p.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS", help="how long a batch waits to fill")
    p.add_argument("--no-batching", action="store_true", help="one model call per request (batch size 1)")
    p.add_argument("--max-tokens", type=_positive_int, default=256, metavar="N", help="largest max_tokens accepted")
    p.add_argument("--max-body-mb", type=_positive_int, default=32, metavar="MB", help="request body limit (413)")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="S", help="seconds per request (504)")
    p.add_argument("--model-name", default=None, metavar="NAME", help="model id in responses (default: folder name)")
    p.add_argument("--device", default=None, metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the frozen parts (default: fp32)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_deferred)


def add_index_parser(sub) -> None:
    """``vlbridge index build`` and ``vlbridge index search``."""
    p = sub.add_parser("index", help="index a folder of images for search", description="Build or search an index.")
    index_sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = index_sub.add_parser(
        "build",
        help="embed a folder of images (resumable, incremental)",
        description="Embed every image below IMAGES_DIR into a FAISS index with an SQLite store; run it again to "
        "add new files, drop deleted ones and re-embed changed ones, or to finish an interrupted build.",
    )
    b.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images")
    b.add_argument("--out", "-o", required=True, metavar="DIR", help="index folder (updated in place)")
    _model_options(b, batch_size=16)
    b.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw"], default="auto", help="FAISS index kind")
    b.add_argument("--nlist", type=_positive_int, default=None, metavar="N", help="IVF cells (default 4*sqrt(n))")
    b.set_defaults(func=cmd_index_build)
    s_ = index_sub.add_parser("search", help="search an index by text or image", description="Search an index.")
    s_.add_argument("index_dir", metavar="DIR", help="index folder")
    s_.add_argument("text", nargs="?", default=None, help="search text")
    s_.add_argument("--image", default=None, metavar="FILE", help="search by this image instead of a text")
    s_.add_argument("--model", "-m", default=None, metavar="M", help="model (default: the one that built the index)")
    s_.add_argument("--device", default=None, metavar="D", help="torch device")
    s_.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="dtype of the frozen parts")
    s_.add_argument("-k", type=_positive_int, default=10, metavar="K", help="how many results")
    s_.add_argument("--rerank", action="store_true", help="re-score the ITC shortlist with ITM (text queries)")
    s_.add_argument("--json", action="store_true", help="print one JSON object per line")
    s_.set_defaults(func=cmd_index_search)
