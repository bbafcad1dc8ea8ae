"""A small, dependency-free builder of self-contained HTML reports (tables, Pillow plots, image galleries).

Everything the page needs is inline: one ``<style>`` block, no scripts, no web fonts, and every image (plots,
thumbnails) embedded as a base64 PNG ``data:`` URI, so the single file can be mailed, archived or opened offline.
Plots are drawn with Pillow only (no matplotlib).

Typical use::

    report = HtmlReport("vlbridge demo", subtitle="BLIP-2 on a synthetic world")
    report.heading("Training")
    report.paragraph("Stage 1 trains the Q-Former with **ITC + ITM + ITG**; see `configs/demo.yaml`.")
    report.line_plot({"loss": [(0, 2.3), (100, 1.1)]}, title="Stage 1", xlabel="step", ylabel="loss", log_y=True)
    report.metrics([{"model": "ours", "R@1 %": 0.61}, {"model": "chance", "R@1 %": 0.02}], highlight="max")
    report.save("runs/demo/report.html")

All user text (titles, captions, table cells, queries) is HTML-escaped; :meth:`HtmlReport.paragraph` and
:meth:`HtmlReport.note` additionally understand inline ``**bold**`` and ```code```. Only :meth:`HtmlReport.raw_html`
inserts markup verbatim.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

from vlbridge.errors import ImageError, InputError
from vlbridge.eval.plots import as_python_scalar, render_bar_chart, render_line_plot
from vlbridge.utils.io import atomic_file

__all__ = ["HtmlReport", "Percent"]

ImageLike = str | os.PathLike | Image.Image
NoteKind = Literal["info", "warn", "ok"]


class Percent(float):
    """A fraction marked for display as a percentage: ``Percent(0.4213)`` is shown as ``42.1%`` in tables.

    Values in a :meth:`HtmlReport.metrics` column whose name ends with ``%`` are treated the same way, without the
    marker. Either way the value is a fraction (``0.42``), not an already-multiplied percentage (``42``).
    """

    def __repr__(self) -> str:
        return f"Percent({float(self)!r})"


_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--bg:#f1f3f7;--card:#fff;--line:#e5e7eb;--accent:#2563eb;
--ok:#16a34a;--bad:#dc2626;--warn:#d97706;--zebra:#f8fafc;--best:#dcfce7}
*{box-sizing:border-box}
html{color-scheme:light}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
.wrap{max-width:1100px;margin:0 auto;padding:0 16px 48px}
header.top{background:linear-gradient(135deg,#1e3a8a,#2563eb 60%,#0ea5e9);color:#fff;padding:32px 0 28px;
margin-bottom:24px}
header.top h1{margin:0;font-size:30px;line-height:1.2;letter-spacing:-.01em}
header.top .subtitle{margin:6px 0 0;font-size:17px;opacity:.92}
header.top .date{margin:10px 0 0;font-size:13px;opacity:.75}
.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 24px;margin:0 0 20px;
box-shadow:0 1px 2px rgba(15,23,42,.05),0 4px 12px rgba(15,23,42,.04)}
.card>:first-child{margin-top:0}
.card>:last-child{margin-bottom:0}
h2{font-size:21px;margin:0 0 12px;padding-bottom:8px;border-bottom:1px solid var(--line)}
h3{font-size:17px;margin:22px 0 8px}
h4{font-size:15px;margin:18px 0 6px;color:#374151}
h2 a.anchor,h3 a.anchor,h4 a.anchor{color:var(--line);text-decoration:none;margin-left:.35em;font-weight:400}
h2:hover a.anchor,h3:hover a.anchor,h4:hover a.anchor{color:var(--accent)}
p{margin:8px 0 12px}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;background:#f1f5f9;
border:1px solid #e2e8f0;border-radius:4px;padding:1px 5px}
nav.toc ol{margin:0;padding-left:22px;columns:2 260px;column-gap:32px}
nav.toc li{margin:2px 0;break-inside:avoid}
nav.toc li.l3{list-style:circle;margin-left:18px;font-size:14px}
nav.toc li.l4{list-style:square;margin-left:36px;font-size:13px}
nav.toc a{color:var(--accent);text-decoration:none}
nav.toc a:hover{text-decoration:underline}
.note{border-left:4px solid var(--accent);background:#eff6ff;border-radius:6px;padding:10px 14px;margin:12px 0}
.note.warn{border-color:var(--warn);background:#fffbeb}
.note.ok{border-color:var(--ok);background:#f0fdf4}
.note .tag{font-weight:600;margin-right:6px}
.table-wrap{overflow-x:auto;margin:12px 0}
table.metrics{border-collapse:collapse;width:auto;min-width:50%;font-size:14px}
table.metrics caption{caption-side:top;text-align:left;color:var(--muted);font-size:13px;padding:0 0 6px}
table.metrics th,table.metrics td{padding:6px 12px;border-bottom:1px solid var(--line);text-align:left;
white-space:nowrap}
table.metrics thead th{background:#f1f5f9;font-weight:600;border-bottom:2px solid #cbd5e1}
table.metrics tbody tr:nth-child(even){background:var(--zebra)}
table.metrics tbody tr:hover{background:#eef2ff}
table.metrics .num{text-align:right;font-variant-numeric:tabular-nums}
table.metrics td.best{font-weight:700;background:var(--best)}
table.metrics td.missing{color:#9ca3af}
figure.plot{margin:14px 0;text-align:center}
figure.plot img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:8px}
figure.plot figcaption{color:var(--muted);font-size:13px;margin-top:4px}
.gallery{display:grid;gap:12px;margin:12px 0}
.tile{margin:0;background:#fafafa;border:1px solid var(--line);border-radius:10px;padding:8px;text-align:center;
min-width:0}
.tile img,.res img{image-rendering:crisp-edges;image-rendering:pixelated;display:block;margin:0 auto;
border:4px solid #e5e7eb;border-radius:6px;max-width:100%;height:auto}
.tile img,.res img{box-sizing:content-box}
.retr-q .badge{margin-left:0}
.tile.ok img,.res.ok img{border-color:var(--ok)}
.tile.bad img,.res.bad img{border-color:var(--bad)}
.tile figcaption{margin-top:6px;font-size:13px;line-height:1.35;overflow-wrap:anywhere}
.tile .t{font-weight:600;display:block;margin-bottom:2px}
.tile .l{display:block;color:#4b5563}
.badge{display:inline-block;font-size:11px;font-weight:700;border-radius:999px;padding:0 7px;margin-left:4px;
vertical-align:1px;color:#fff;background:#9ca3af}
.badge.ok{background:var(--ok)}
.badge.bad{background:var(--bad)}
.retr{margin:12px 0}
.retr-row{display:flex;gap:16px;align-items:center;padding:10px 0;border-bottom:1px solid var(--line)}
.retr-row:last-child{border-bottom:0}
.retr-q{flex:0 0 230px;font-size:14px;overflow-wrap:anywhere}
.retr-q .q{font-weight:600;display:block;margin-bottom:4px}
.retr-res{display:flex;gap:10px;flex-wrap:wrap}
.res{margin:0;text-align:center;font-size:12px;color:#4b5563;font-variant-numeric:tabular-nums}
.res figcaption{margin-top:3px}
.res.ok figcaption{color:var(--ok);font-weight:600}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:28px}
@media (max-width:640px){.retr-row{flex-direction:column;align-items:flex-start}.retr-q{flex-basis:auto}
.card{padding:16px}header.top h1{font-size:24px}}
@media print{body{background:#fff}.card{box-shadow:none;break-inside:avoid}header.top{color:#000;background:none}}
"""


# ------------------------------------------------------------------------------------------------------------ text
def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CODE_RE = re.compile(r"`([^`]+)`")
_BOLD_RE = re.compile(r"\*\*(.+?)\*\*", re.S)


def _inline(text: str) -> str:
    """Escape ``text`` and render inline ``**bold**`` and ```code``` (code spans are taken literally)."""
    out: list[str] = []
    pos = 0
    for m in _CODE_RE.finditer(text):
        out.append(_BOLD_RE.sub(r"<strong>\1</strong>", _esc(text[pos : m.start()])))
        out.append(f"<code>{_esc(m.group(1))}</code>")
        pos = m.end()
    out.append(_BOLD_RE.sub(r"<strong>\1</strong>", _esc(text[pos:])))
    return "".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "section"


# ------------------------------------------------------------------------------------------------------------ values


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format_cell(value: Any, percent: bool) -> str:
    """Table text for one value: 3 decimals for floats, ``42.1%`` for percent values, thousands separators for ints."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if _is_number(value):
        as_float = float(value)
        if math.isnan(as_float):
            return "nan"
        if math.isinf(as_float):
            return "∞" if as_float > 0 else "−∞"
        if percent or isinstance(value, Percent):
            return f"{100.0 * as_float:.1f}%"
        if isinstance(value, numbers.Integral):
            return f"{int(value):,}"
        return f"{as_float:.3f}"
    return str(value)


# ------------------------------------------------------------------------------------------------------------ images
def _load_image(image: ImageLike) -> Image.Image:
    """An RGB copy of ``image`` (a path or a PIL image); transparency is composited onto white."""
    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            with Image.open(image) as opened:
                img = ImageOps.exif_transpose(opened)
                img.load()
        except FileNotFoundError:
            raise ImageError(f"{image}: no such image file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{image}: cannot read image ({e})") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{image}: empty image")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        img = img.point(lambda v: v / 257).convert("L")
    return img.convert("RGB")


def _thumbnail(image: ImageLike, size: int) -> Image.Image:
    """Fit ``image`` into ``size`` x ``size``: NEAREST when enlarging (crisp pixels), LANCZOS when shrinking."""
    img = _load_image(image)
    scale = size / max(img.width, img.height)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if new == img.size:
        return img
    return img.resize(new, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9 if img.width * img.height <= 300_000 else 6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(img: Image.Image, alt: str, cls: str | None = None) -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} src="{_png_data_uri(img)}" width="{img.width}" height="{img.height}" alt="{_esc(alt)}">'


# ------------------------------------------------------------------------------------------------------------ report
@dataclass
class _Block:
    html: str
    level: int | None = None  # set on headings


class HtmlReport:
    """Builds one self-contained HTML page: add elements in order, then :meth:`save`.

    Level-2 headings start a new card; the table of contents lists every heading. The page has no external
    references: styles are inline and images are base64 PNG ``data:`` URIs.

    Args:
        title: Page title (shown in the header and the browser tab).
        subtitle: Optional line under the title.
        generated: Timestamp shown in the header; defaults to now (local time).
    """

    def __init__(self, title: str, subtitle: str | None = None, *, generated: datetime | None = None) -> None:
        self.title = str(title)
        self.subtitle = subtitle
        self.generated = generated or datetime.now().astimezone()
        self._blocks: list[_Block] = []
        self._toc: list[tuple[int, str, str]] = []
        self._ids: set[str] = {"contents"}

    # -------------------------------------------------------------------------------------------------- text
    def heading(self, text: str, level: int = 2) -> None:
        """Add a heading; ``level`` 2 starts a new card, 3 and 4 are sub-headings. All appear in the contents."""
        if level not in (2, 3, 4):
            raise InputError(f"heading level must be 2, 3 or 4 (1 is the report title), got {level!r}")
        base = _slug(text)
        anchor, n = base, 2
        while anchor in self._ids:
            anchor, n = f"{base}-{n}", n + 1
        self._ids.add(anchor)
        self._toc.append((level, anchor, str(text)))
        self._blocks.append(
            _Block(
                f'<h{level} id="{anchor}">{_esc(text)}<a class="anchor" href="#{anchor}" aria-label="link">#</a>'
                f"</h{level}>",
                level,
            )
        )

    def paragraph(self, text: str) -> None:
        """Add a paragraph of escaped text; inline ``**bold**`` and ```code``` are rendered."""
        self._blocks.append(_Block(f"<p>{_inline(str(text))}</p>"))

    def note(self, text: str, kind: NoteKind = "info") -> None:
        """Add a coloured callout box: ``info`` (blue), ``warn`` (amber) or ``ok`` (green); inline markup allowed."""
        tags = {"info": "ℹ Note", "warn": "⚠ Warning", "ok": "✓"}
        if kind not in tags:
            raise InputError(f"note kind must be one of {sorted(tags)}, got {kind!r}")
        self._blocks.append(
            _Block(f'<div class="note {kind}"><span class="tag">{tags[kind]}</span>{_inline(str(text))}</div>')
        )

    def raw_html(self, html: str) -> None:
        """Insert ``html`` verbatim (not escaped). Keep it self-contained: no external URLs."""
        self._blocks.append(_Block(str(html)))

    # -------------------------------------------------------------------------------------------------- tables
    def metrics(
        self,
        rows: Sequence[Mapping[str, Any]],
        columns: Sequence[str] | None = None,
        caption: str | None = None,
        highlight: str | Mapping[str, str] | None = None,
    ) -> None:
        """Add a table with one row per mapping in ``rows``.

        Floats are shown with 3 decimals; values in a column whose name ends with ``%``, and :class:`Percent` values,
        are fractions shown as percentages (``0.4213`` → ``42.1%``); ints get thousands separators; bools ✓/✗;
        missing cells and ``None`` —. Numeric columns are right-aligned.

        Args:
            rows: Table rows; keys are column names.
            columns: Columns to show, in order; default every key, in order of first appearance.
            caption: Optional caption above the table (inline markup as in :meth:`paragraph`).
            highlight: ``"max"`` or ``"min"`` to mark the best value of every numeric column (ties all marked), or
                ``{column: "max" | "min"}`` for chosen columns (e.g. recall up, loss down).
        """
        rows = [dict(r) for r in rows]
        if columns is None:
            columns = list(dict.fromkeys(k for r in rows for k in r))
        columns = [str(c) for c in columns]
        if not columns:
            raise InputError("metrics: no columns to show (empty rows and no columns=)")
        if isinstance(highlight, str):
            directions = {c: highlight for c in columns}
        else:
            directions = {str(k): v for k, v in (highlight or {}).items()}
            unknown = sorted(set(directions) - set(columns))
            if unknown:
                raise InputError(f"metrics: highlight names unknown columns {unknown}")
        bad = sorted({d for d in directions.values() if d not in ("max", "min")})
        if bad:
            raise InputError(f"metrics: highlight must be 'max' or 'min', got {bad}")

        cells = [[as_python_scalar(r.get(c)) for c in columns] for r in rows]
        numeric = [
            any(_is_number(row[j]) for row in cells) and all(_is_number(row[j]) or row[j] is None for row in cells)
            for j in range(len(columns))
        ]
        best: list[float | None] = []
        for j, column in enumerate(columns):
            nums = [float(row[j]) for row in cells if _is_number(row[j]) and not math.isnan(float(row[j]))]
            if column in directions and numeric[j] and len(nums) >= 2 and min(nums) != max(nums):
                best.append(max(nums) if directions[column] == "max" else min(nums))
            else:
                best.append(None)

        num_attr = ' class="num"'
        head = "".join(f'<th scope="col"{num_attr if numeric[j] else ""}>{_esc(c)}</th>' for j, c in enumerate(columns))
        body: list[str] = []
        for row in cells:
            tds = []
            for j, value in enumerate(row):
                classes = []
                if numeric[j]:
                    classes.append("num")
                if best[j] is not None and _is_number(value) and float(value) == best[j]:
                    classes.append("best")
                if value is None:
                    classes.append("missing")
                klass = f' class="{" ".join(classes)}"' if classes else ""
                text = _esc(_format_cell(value, columns[j].rstrip().endswith("%")))
                tds.append(f"<td{klass}>{text}</td>")
            body.append(f"<tr>{''.join(tds)}</tr>")
        cap = f"<caption>{_inline(str(caption))}</caption>" if caption else ""
        self._blocks.append(
            _Block(
                f'<div class="table-wrap"><table class="metrics">{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table></div>"
            )
        )

    # -------------------------------------------------------------------------------------------------- charts
    def _figure(self, img: Image.Image, title: str, caption: str | None = None) -> None:
        cap = f"<figcaption>{_inline(caption)}</figcaption>" if caption else ""
        self._blocks.append(_Block(f'<figure class="plot">{_img_tag(img, title)}{cap}</figure>'))

    def line_plot(
        self,
        series: Mapping[str, Iterable[tuple[float, float]]],
        *,
        title: str,
        xlabel: str,
        ylabel: str,
        width: int = 640,
        height: int = 320,
        log_y: bool = False,
        caption: str | None = None,
    ) -> None:
        """Add a line chart as a ``width`` x ``height`` PNG: one coloured line per series, legend if several.

        Non-finite points are skipped, and so are points with ``y <= 0`` when ``log_y``. Series with at most 40
        points also get a marker at every point.

        Args:
            series: ``{name: [(x, y), ...]}``; points are drawn in the order given.
            title: Title drawn above the plot (also the image's alt text).
            xlabel: X-axis label.
            ylabel: Y-axis label (drawn vertically).
            width: Image width in pixels.
            height: Image height in pixels.
            log_y: Logarithmic y axis (decades labelled, minor gridlines).
            caption: Optional caption under the image.
        """
        _check_size(width, height)
        self._figure(render_line_plot(series, title, xlabel, ylabel, width, height, log_y), title, caption)

    def bar_chart(
        self,
        values: Mapping[str, float],
        *,
        title: str,
        ylabel: str,
        reference: Mapping[str, float | Mapping[str, float]] | None = None,
        hlines: Mapping[str, float] | None = None,
        series_label: str = "ours",
        reference_label: str = "reference",
        percent: bool = False,
        width: int = 640,
        height: int = 320,
        caption: str | None = None,
    ) -> None:
        """Add a bar chart of ``values`` (one bar per metric), optionally against baselines.

        ``reference`` takes two shapes (they can be mixed):

        - ``{metric: value}``: a dashed black marker across that metric's bars, labelled ``reference_label``
          (e.g. the chance level of each metric);
        - ``{name: {metric: value}}``: a named baseline drawn as a grey/coloured bar beside ours in every metric
          it has a value for (e.g. ``{"chance": {...}, "blind": {...}}``).

        Args:
            values: ``{metric: value}`` for our model.
            title: Title drawn above the chart.
            ylabel: Y-axis label.
            reference: Baselines, as above.
            hlines: ``{label: value}`` dashed horizontal lines across the whole chart.
            series_label: Legend name of ``values``.
            reference_label: Legend name of the per-metric markers.
            percent: Values are fractions; label the axis and bars as percentages.
            width: Image width in pixels.
            height: Image height in pixels.
            caption: Optional caption under the image.
        """
        _check_size(width, height)
        img = render_bar_chart(
            values, title, ylabel, reference, hlines, series_label, reference_label, percent, width, height
        )
        self._figure(img, title, caption)

    def image(self, image: ImageLike, *, caption: str | None = None, alt: str = "", pixelated: bool = False) -> None:
        """Add one image at its own size (e.g. a figure drawn elsewhere); ``pixelated`` keeps upscaled pixels crisp."""
        img = _load_image(image)
        style = "image-rendering:pixelated" if pixelated else ""
        tag = _img_tag(img, alt or caption or "image").replace("<img ", f'<img style="{style}" ' if style else "<img ")
        cap = f"<figcaption>{_inline(caption)}</figcaption>" if caption else ""
        self._blocks.append(_Block(f'<figure class="plot">{tag}{cap}</figure>'))

    # -------------------------------------------------------------------------------------------------- images
    def image_gallery(self, items: Sequence[Mapping[str, Any]], *, columns: int = 4, thumb: int = 160) -> None:
        """Add a grid of captioned thumbnails (at most ``columns`` per row; fewer on narrow screens).

        Each item is ``{"image": path | PIL.Image, "title": str, "lines": [str, ...], "ok": bool | None}`` (all but
        ``image`` optional). Images are fitted into ``thumb`` px, enlarged with NEAREST so small renders stay crisp;
        ``ok`` True/False gives a green/red border and a ✓/✗ badge.
        """
        if columns < 1 or thumb < 8:
            raise InputError(f"image_gallery: columns must be >= 1 and thumb >= 8, got {columns}, {thumb}")
        cell, gap = thumb + 26, 12
        tiles = []
        for i, item in enumerate(items):
            if "image" not in item:
                raise InputError(f"image_gallery: item {i} has no 'image'")
            img = _thumbnail(item["image"], thumb)
            ok = item.get("ok")
            ok = None if ok is None else bool(ok)
            state = {True: " ok", False: " bad", None: ""}[ok]
            badge = ""
            if ok is not None:
                badge = '<span class="badge ok">✓</span>' if ok else '<span class="badge bad">✗</span>'
            title = str(item.get("title", "") or "")
            lines = item.get("lines") or []
            if isinstance(lines, str):
                lines = [lines]
            caption = (f'<span class="t">{_esc(title)}{badge}</span>' if title or badge else "") + "".join(
                f'<span class="l">{_esc(line)}</span>' for line in lines
            )
            tiles.append(
                f'<figure class="tile{state}">{_img_tag(img, title or f"image {i + 1}")}'
                f"{f'<figcaption>{caption}</figcaption>' if caption else ''}</figure>"
            )
        style = (
            f"grid-template-columns:repeat(auto-fill,minmax({cell}px,1fr));"
            f"max-width:{columns * cell + (columns - 1) * gap}px"
        )
        self._blocks.append(_Block(f'<div class="gallery" style="{style}">{"".join(tiles)}</div>'))

    def retrieval_examples(self, items: Sequence[Mapping[str, Any]], *, thumb: int = 96) -> None:
        """Add retrieval examples: one row per text query with its top-k images, scores and ranks.

        Each item is ``{"query": str, "results": [{"image": path | PIL.Image, "score": float, "correct": bool},
        ...]}`` with results best first. Correct results are outlined green; the row says at which rank the first
        correct one came (or that none is in the top k).
        """
        if thumb < 8:
            raise InputError(f"retrieval_examples: thumb must be >= 8, got {thumb}")
        rows = []
        for i, item in enumerate(items):
            if "query" not in item:
                raise InputError(f"retrieval_examples: item {i} has no 'query'")
            results = list(item.get("results") or [])
            figs = []
            first_hit = None
            for rank, res in enumerate(results, start=1):
                if "image" not in res:
                    raise InputError(f"retrieval_examples: item {i} result {rank} has no 'image'")
                correct = bool(res.get("correct", False))
                if correct and first_hit is None:
                    first_hit = rank
                score = as_python_scalar(res.get("score"))
                score_text = f" · {float(score):.3f}" if _is_number(score) else ""
                img = _thumbnail(res["image"], thumb)
                mark = " ✓" if correct else ""
                figs.append(
                    f'<figure class="res{" ok" if correct else ""}">{_img_tag(img, f"rank {rank}")}'
                    f"<figcaption>#{rank}{score_text}{mark}</figcaption></figure>"
                )
            if first_hit is None:
                status = f'<span class="badge bad">miss@{len(results)}</span>' if results else ""
            else:
                status = f'<span class="badge ok">hit@{first_hit}</span>'
            rows.append(
                f'<div class="retr-row"><div class="retr-q"><span class="q">“{_esc(item["query"])}”</span>'
                f'{status}</div><div class="retr-res">{"".join(figs)}</div></div>'
            )
        self._blocks.append(_Block(f'<div class="retr">{"".join(rows)}</div>'))

    # -------------------------------------------------------------------------------------------------- output
    def render(self) -> str:
        """The whole page as a string."""
        toc = ""
        if len(self._toc) >= 2:
            items = "".join(f'<li class="l{lvl}"><a href="#{a}">{_esc(t)}</a></li>' for lvl, a, t in self._toc)
            toc = f'<nav class="toc card"><h2 id="contents">Contents</h2><ol>{items}</ol></nav>'
        sections: list[str] = []
        current: list[str] = []
        for block in self._blocks:
            if block.level == 2 and current:
                sections.append(f'<section class="card">{"".join(current)}</section>')
                current = []
            current.append(block.html)
        if current:
            sections.append(f'<section class="card">{"".join(current)}</section>')
        subtitle = f'<p class="subtitle">{_esc(self.subtitle)}</p>' if self.subtitle else ""
        date = self.generated.strftime("%Y-%m-%d %H:%M %Z").strip()
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="generator" content="vlbridge"><title>{_esc(self.title)}</title>'
            f"<style>{_CSS}</style></head>\n<body>"
            f'<header class="top"><div class="wrap"><h1>{_esc(self.title)}</h1>{subtitle}'
            f'<p class="date">Generated {_esc(date)}</p></div></header>\n'
            f'<main class="wrap">{toc}\n' + "\n".join(sections) + "\n"
            "<footer>Generated by vlbridge · self-contained HTML, no external resources</footer></main>"
            "</body></html>\n"
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` atomically (temp file + rename, parents created) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.render()
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o644)
        return path


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, int) and isinstance(height, int)) or width < 120 or height < 80:
        raise InputError(f"plot size must be integers of at least 120 x 80 px, got {width!r} x {height!r}")
    if width * height > 4_000_000:
        raise InputError(f"plot size {width} x {height} is too large (at most 4 megapixels)")
