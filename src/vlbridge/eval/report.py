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
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from vlbridge.errors import ImageError, InputError

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


# Tableau 10: distinct, colour-blind-friendlier than the classic matplotlib cycle.
PALETTE: tuple[str, ...] = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)

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
def _scalar(value: Any) -> Any:
    """Unwrap numpy / torch scalars to Python numbers (leaves everything else alone)."""
    if isinstance(value, str | bytes | bool | int | float) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


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


def _format_value(value: float, percent: bool = False) -> str:
    """Short label for a number drawn on a chart (3 significant digits)."""
    if percent:
        return f"{100.0 * value:.1f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


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


# ------------------------------------------------------------------------------------------------------------ drawing
_FONT_FILES = {
    False: ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf", "arial.ttf", "Helvetica.ttc"),
    True: ("DejaVuSans-Bold.ttf", "LiberationSans-Bold.ttf", "Arial Bold.ttf", "arialbd.ttf", "Helvetica.ttc"),
}
_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation", "/usr/share/fonts/TTF")


@lru_cache(maxsize=32)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A TrueType font of ``size`` px: DejaVu/Liberation/Arial when installed, else Pillow's bundled default."""
    for name in _FONT_FILES[bold]:
        for candidate in (name, *(os.path.join(d, name) for d in _FONT_DIRS)):
            try:
                return ImageFont.truetype(candidate, size)
            except OSError:
                continue
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


class _Canvas:
    """A Pillow canvas drawn at ``scale``x and downsampled on :meth:`finish`, which gives antialiased lines and text.

    All coordinates and sizes passed in are in output pixels.
    """

    def __init__(self, width: int, height: int, scale: int = 3) -> None:
        self.width, self.height, self.s = width, height, scale
        self.img = Image.new("RGB", (width * scale, height * scale), "white")
        self.draw = ImageDraw.Draw(self.img)

    def font(self, size: float, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        return _font(max(1, round(size * self.s)), bold)

    def text_width(self, text: str, size: float, bold: bool = False) -> float:
        return self.draw.textlength(text, font=self.font(size, bold)) / self.s

    def line_height(self, size: float, bold: bool = False) -> float:
        font = self.font(size, bold)
        if hasattr(font, "getmetrics"):
            ascent, descent = font.getmetrics()
            return (ascent + descent) / self.s
        box = self.draw.textbbox((0, 0), "Ag", font=font)
        return (box[3] - box[1]) / self.s

    def text(
        self,
        xy: tuple[float, float],
        text: str,
        size: float = 11,
        fill: str = "#374151",
        anchor: str = "lt",
        bold: bool = False,
    ) -> None:
        """Draw ``text``; ``anchor`` is horizontal ``l``/``m``/``r`` then vertical ``t``/``m``/``b`` of the line box."""
        x, y = xy
        w, h = self.text_width(text, size, bold), self.line_height(size, bold)
        x -= {"l": 0.0, "m": w / 2, "r": w}[anchor[0]]
        y -= {"t": 0.0, "m": h / 2, "b": h}[anchor[1]]
        self.draw.text((x * self.s, y * self.s), text, font=self.font(size, bold), fill=fill)

    def vtext(self, xy: tuple[float, float], text: str, size: float = 11, fill: str = "#374151") -> None:
        """Draw ``text`` rotated 90° counter-clockwise, centred on ``xy``."""
        font = self.font(size)
        w = max(1, math.ceil(self.draw.textlength(text, font=font)))
        h = max(1, math.ceil(self.line_height(size) * self.s))
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
        mask = mask.rotate(90, expand=True)
        solid = Image.new("RGB", mask.size, fill)
        x, y = xy[0] * self.s - mask.width / 2, xy[1] * self.s - mask.height / 2
        self.img.paste(solid, (round(x), round(y)), mask)

    def line(self, points: Sequence[tuple[float, float]], fill: str, width: float = 1.0) -> None:
        pts = [(x * self.s, y * self.s) for x, y in points]
        self.draw.line(pts, fill=fill, width=max(1, round(width * self.s)), joint="curve")

    def dashed(self, p0: tuple[float, float], p1: tuple[float, float], fill: str, width: float = 1.5) -> None:
        (x0, y0), (x1, y1) = p0, p1
        length = math.hypot(x1 - x0, y1 - y0)
        dash, gap = 6.0, 4.0
        t = 0.0
        while t < length:
            t1 = min(t + dash, length)
            a, b = t / length, t1 / length
            self.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill, width)
            t = t1 + gap

    def rect(self, box: tuple[float, float, float, float], fill: str | None = None, outline: str | None = None) -> None:
        x0, y0, x1, y1 = box
        self.draw.rectangle(
            (x0 * self.s, y0 * self.s, x1 * self.s - 1, y1 * self.s - 1),
            fill=fill,
            outline=outline,
            width=self.s if outline else 0,
        )

    def dot(self, xy: tuple[float, float], r: float, fill: str) -> None:
        x, y = xy[0] * self.s, xy[1] * self.s
        rs = r * self.s
        self.draw.ellipse((x - rs, y - rs, x + rs, y + rs), fill=fill, outline="white", width=max(1, self.s // 2))

    def finish(self) -> Image.Image:
        return self.img.resize((self.width, self.height), Image.Resampling.LANCZOS)


def _nice_ticks(lo: float, hi: float, target: int) -> list[float]:
    """Round tick values (1/2/2.5/5 x 10^k steps) covering ``[lo, hi]``, about ``target`` intervals."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    count = round((stop - start) / step)
    return [_clean(start + i * step) for i in range(count + 1)]


def _clean(v: float) -> float:
    """Remove floating-point noise from a tick value (0.30000000000000004 -> 0.3)."""
    return 0.0 if v == 0 else round(v, 12 - max(0, math.floor(math.log10(abs(v)))))


def _tick_labels(ticks: Sequence[float], percent: bool = False) -> list[str]:
    """Labels for evenly spaced ticks with just enough decimals; ``k``/``M`` suffixes for big values."""
    if percent:
        ticks = [100.0 * t for t in ticks]
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(ticks[0]) or 1.0
    biggest = max(abs(t) for t in ticks)
    if 0 < biggest < 1e-3:  # 0.00002 reads badly: 2e−5
        return [_sci(t) + ("%" if percent else "") for t in ticks]
    div, suffix = 1.0, ""
    if biggest >= 1e6 and step >= 1e5:
        div, suffix = 1e6, "M"
    elif biggest >= 1e4 and step >= 1e3:
        div, suffix = 1e3, "k"
    step /= div
    decimals = 0
    while decimals < 8 and abs(round(step, decimals) - step) > 1e-9 * max(1.0, step):
        decimals += 1
    pct = "%" if percent else ""
    return [("0" if t == 0 else f"{t / div:.{decimals}f}".replace("-", "−") + suffix) + pct for t in ticks]


def _sci(v: float) -> str:
    """Compact scientific notation: 2.5e-05 -> ``2.5e−5``, 0 -> ``0``."""
    if v == 0:
        return "0"
    mant, exp = f"{v:.6e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}".replace("-", "−")


def _log_ticks(lo: float, hi: float, length: float, min_gap: float) -> tuple[list[float], list[float], float, float]:
    """Labelled ticks, minor gridline values and the axis range (log10) for a log axis over ``[lo, hi]``.

    Decades are labelled first, then 5x/2x and, on a short range, the other mantissas, each only where it keeps
    ``min_gap`` px from every label already placed on an axis ``length`` px long.
    """
    e0, e1 = math.floor(math.log10(lo) + 1e-12), math.ceil(math.log10(hi) - 1e-12)
    if e1 <= e0:
        e1 = e0 + 1
    candidates = [_clean(m * 10.0**e) for e in range(e0, e1 + 1) for m in range(1, 10)]
    candidates = [v for v in candidates if v <= 10.0**e1 * (1 + 1e-9)]
    t0, t1 = float(e0), float(e1)
    if e1 - e0 == 1:  # data within about a decade: trim the axis to the nearest 1/2/5 values around it
        round_ones = [v for v in candidates if round(v / 10.0 ** math.floor(math.log10(v) + 1e-9)) in (1, 2, 5)]
        t0 = math.log10(max(v for v in round_ones if v <= lo * (1 + 1e-9)))
        t1 = math.log10(min(v for v in round_ones if v >= hi * (1 - 1e-9)))
    inside = [v for v in candidates if t0 - 1e-9 <= math.log10(v) <= t1 + 1e-9]

    def pos(v: float) -> float:
        return (math.log10(v) - t0) / (t1 - t0) * length

    def priority(v: float) -> int:
        m = round(v / 10.0 ** math.floor(math.log10(v) + 1e-9))
        return {1: 0, 5: 1, 2: 2}.get(m, 3)

    allowed = 3 if t1 - t0 <= 1 + 1e-9 else 2 if t1 - t0 <= 3 + 1e-9 else 0
    major: list[float] = []
    for v in sorted(inside, key=priority):
        if priority(v) <= allowed and all(abs(pos(v) - pos(u)) >= min_gap for u in major):
            major.append(v)
    minor = [v for v in inside if v not in major]
    if length / (t1 - t0) < 40:  # decades too short for 2..9 gridlines: keep the unlabelled decades only
        minor = [v for v in minor if priority(v) == 0]
    return sorted(major), minor, t0, t1


def _inner_ticks(lo: float, hi: float, target: int) -> tuple[list[float], float, float]:
    """Round tick values inside ``[lo, hi]`` (at least two) and the axis range, which is the data range itself."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    for n in range(max(1, target), max(1, target) + 8):
        ticks = [t for t in _nice_ticks(lo, hi, n) if lo - 1e-9 * (hi - lo) <= t <= hi + 1e-9 * (hi - lo)]
        if len(ticks) >= 2:
            return ticks, lo, hi
    return [lo, hi], lo, hi


def _log_label(v: float) -> str:
    e = math.floor(math.log10(v) + 1e-9)
    if -3 <= e <= 4:
        return f"{v:.{max(0, -e)}f}"
    mant = v / 10.0**e
    return (f"{mant:g}×" if abs(mant - 1) > 1e-9 else "") + f"1e{e}".replace("-", "−")


@dataclass
class _Legend:
    name: str
    colour: str
    style: Literal["line", "box", "dash"] = "line"


def _legend_rows(c: _Canvas, entries: Sequence[_Legend], max_width: float, size: float) -> list[list[_Legend]]:
    rows: list[list[_Legend]] = [[]]
    used = 0.0
    for entry in entries:
        w = 22 + c.text_width(entry.name, size) + 16
        if rows[-1] and used + w > max_width:
            rows.append([])
            used = 0.0
        rows[-1].append(entry)
        used += w
    return rows if rows[0] else []


def _draw_legend(c: _Canvas, rows: list[list[_Legend]], top: float, size: float) -> None:
    lh = c.line_height(size) + 6
    for r, row in enumerate(rows):
        total = sum(22 + c.text_width(e.name, size) + 16 for e in row) - 16
        x = (c.width - total) / 2
        y = top + r * lh + lh / 2
        for e in row:
            if e.style == "box":
                c.rect((x + 3, y - 6, x + 15, y + 6), fill=e.colour)
            elif e.style == "dash":
                c.dashed((x, y), (x + 18, y), e.colour, 2)
            else:
                c.line([(x, y), (x + 18, y)], e.colour, 2.5)
            c.text((x + 22, y), e.name, size, anchor="lm")
            x += 22 + c.text_width(e.name, size) + 16


def _frame(
    c: _Canvas, title: str, legend: Sequence[_Legend], xlabel: str, ylabel: str, x_tick_rows: int = 1
) -> tuple[float, float, float, list[list[_Legend]]]:
    """Title, legend rows and the vertical extent of the plot area: returns (top, bottom, ylabel_x, legend rows)."""
    pad, fs = 10.0, 11.0
    y = pad
    if title:
        c.text((c.width / 2, y), title, 14, fill="#111827", anchor="mt", bold=True)
        y += c.line_height(14, True) + 4
    rows = _legend_rows(c, legend, c.width - 2 * pad, fs) if len(legend) > 1 else []
    if rows:
        _draw_legend(c, rows, y, fs)
        y += len(rows) * (c.line_height(fs) + 6)
    top = y + 10
    bottom = c.height - pad - (c.line_height(fs) + 4 if xlabel else 0) - x_tick_rows * (c.line_height(fs) + 2) - 6
    ylabel_x = pad + c.line_height(fs) / 2
    return top, bottom, ylabel_x, rows


def _render_line_plot(
    series: Mapping[str, Iterable[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int,
    height: int,
    log_y: bool,
) -> Image.Image:
    if not series:
        raise InputError("line_plot: no series given")
    clean: list[tuple[str, list[tuple[float, float]]]] = []
    for name, points in series.items():
        pts: list[tuple[float, float]] = []
        for point in points:
            try:
                x, y = (float(_scalar(v)) for v in point)
            except (TypeError, ValueError):
                raise InputError(
                    f"line_plot: series {name!r} has a point that is not an (x, y) pair: {point!r}"
                ) from None
            if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y):
                pts.append((x, y))
        clean.append((str(name), pts))
    xs = [x for _, pts in clean for x, _ in pts]
    ys = [y for _, pts in clean for _, y in pts]
    if not xs:
        what = "finite, positive" if log_y else "finite"
        raise InputError(f"line_plot {title!r}: no {what} points to draw")

    c = _Canvas(width, height)
    fs = 11.0
    legend = [_Legend(name, PALETTE[i % len(PALETTE)]) for i, (name, _) in enumerate(clean)]
    top, bottom, ylabel_x, _ = _frame(c, title, legend, xlabel, ylabel)
    plot_h = max(10.0, bottom - top)

    if log_y:
        y_major, y_minor, t0, t1 = _log_ticks(min(ys), max(ys), plot_h, c.line_height(fs) + 6)
        y_labels = [_log_label(v) for v in y_major]

        def ty(v: float) -> float:
            return math.log10(v)

    else:
        y_major = _nice_ticks(min(ys), max(ys), max(2, int(plot_h // 45)))
        y_minor = []
        y_labels = _tick_labels(y_major)
        t0, t1 = y_major[0], y_major[-1]

        def ty(v: float) -> float:
            return v

    left = ylabel_x + (c.line_height(fs) / 2 + 6 if ylabel else 0) + max(c.text_width(s, fs) for s in y_labels) + 8
    right = width - 18.0
    plot_w = max(10.0, right - left)
    target = max(2, int(plot_w // 90))
    while True:
        x_ticks, x0, x1 = _inner_ticks(min(xs), max(xs), target)
        x_labels = _tick_labels(x_ticks)
        spacing = plot_w * (x_ticks[1] - x_ticks[0]) / (x1 - x0)
        if target <= 2 or max(c.text_width(s, fs) for s in x_labels) + 12 < spacing:
            break
        target -= 1

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    def py(v: float) -> float:
        return bottom - (ty(v) - t0) / (t1 - t0) * plot_h

    c.rect((left, top, right, bottom), fill="#fbfcfe")
    for v in y_minor:
        c.line([(left, py(v)), (right, py(v))], "#f1f3f6", 0.8)
    for v, label in zip(y_major, y_labels):
        c.line([(left, py(v)), (right, py(v))], "#e3e7ee", 1)
        c.line([(left - 4, py(v)), (left, py(v))], "#6b7280", 1)
        c.text((left - 7, py(v)), label, fs, anchor="rm")
    for v, label in zip(x_ticks, x_labels):
        c.line([(px(v), top), (px(v), bottom)], "#eef1f5", 1)
        c.line([(px(v), bottom), (px(v), bottom + 4)], "#6b7280", 1)
        c.text((px(v), bottom + 6), label, fs, anchor="mt")
    c.line([(left, top), (left, bottom), (right, bottom)], "#6b7280", 1.2)
    if xlabel:
        c.text(((left + right) / 2, height - 10), xlabel, fs, fill="#111827", anchor="mb")
    if ylabel:
        c.vtext((ylabel_x, (top + bottom) / 2), ylabel, fs, fill="#111827")

    for (_, pts), entry in zip(clean, legend):
        coords = [(px(x), py(y)) for x, y in pts]
        if len(coords) > 1:
            c.line(coords, entry.colour, 2.0)
        if len(coords) <= 12 or (len(coords) <= 40 and len(clean) <= 3):
            for xy in coords:
                c.dot(xy, 3.2, entry.colour)
    return c.finish()


def _render_bar_chart(
    values: Mapping[str, float],
    title: str,
    ylabel: str,
    reference: Mapping[str, float | Mapping[str, float]] | None,
    hlines: Mapping[str, float] | None,
    series_label: str,
    reference_label: str,
    percent: bool,
    width: int,
    height: int,
) -> Image.Image:
    if not values:
        raise InputError("bar_chart: no values given")
    metrics = [str(k) for k in values]
    series: list[tuple[str, dict[str, float]]] = [
        (series_label, {str(k): float(_scalar(v)) for k, v in values.items()})
    ]
    markers: dict[str, float] = {}
    for key, ref in (reference or {}).items():
        if isinstance(ref, Mapping):
            unknown = sorted(set(map(str, ref)) - set(metrics))
            if unknown:
                raise InputError(f"bar_chart: reference {key!r} has values for unknown metrics {unknown}")
            series.append((str(key), {str(k): float(_scalar(v)) for k, v in ref.items()}))
        elif str(key) in metrics:
            markers[str(key)] = float(_scalar(ref))
        else:
            raise InputError(
                f"bar_chart: reference key {key!r} is not one of the metrics {metrics}; give per-metric reference "
                "values as {metric: value}, named reference series as {name: {metric: value}}, or use hlines="
            )
    lines = {str(k): float(_scalar(v)) for k, v in (hlines or {}).items()}
    everything = [v for _, vals in series for v in vals.values()] + list(markers.values()) + list(lines.values())
    finite = [v for v in everything if math.isfinite(v)]
    if not finite:
        raise InputError(f"bar_chart {title!r}: no finite values to draw")

    c = _Canvas(width, height)
    fs = 11.0
    ref_colours = ("#9ca3af", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#e15759")
    colours = [PALETTE[0]] + [ref_colours[i % len(ref_colours)] for i in range(len(series) - 1)]
    line_colours = ("#dc2626", "#7c3aed", "#0891b2", "#65a30d")
    legend = [_Legend(name, colour, "box") for (name, _), colour in zip(series, colours)]
    if markers:
        legend.append(_Legend(reference_label, "#111827", "dash"))
    legend += [_Legend(name, line_colours[i % len(line_colours)], "dash") for i, name in enumerate(lines)]
    top, bottom, ylabel_x, _ = _frame(c, title, legend if len(legend) > 1 else [], "", ylabel)
    plot_h = max(10.0, bottom - top - 14)  # headroom for value labels
    top += 14

    ticks = _nice_ticks(min(0.0, *finite), max(0.0, *finite), max(2, int(plot_h // 45)))
    labels = _tick_labels(ticks, percent)
    lo, hi = ticks[0], ticks[-1]
    left = ylabel_x + (c.line_height(fs) / 2 + 6 if ylabel else 0) + max(c.text_width(s, fs) for s in labels) + 8
    right = width - 14.0
    plot_w = max(10.0, right - left)

    def py(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * plot_h

    for v, label in zip(ticks, labels):
        c.line([(left, py(v)), (right, py(v))], "#e3e7ee", 1)
        c.text((left - 7, py(v)), label, fs, anchor="rm")
    group = plot_w / len(metrics)
    bar_w = group * 0.72 / len(series)
    for i, metric in enumerate(metrics):
        g0 = left + i * group + group * 0.14
        for j, ((_, vals), colour) in enumerate(zip(series, colours)):
            v = vals.get(metric)
            if v is None or not math.isfinite(v):
                continue
            x0, x1 = g0 + j * bar_w + 1, g0 + (j + 1) * bar_w - 1
            y0, y1 = sorted((py(v), py(0.0)))
            c.rect((x0, y0, x1, max(y1, y0 + 1)), fill=colour)
            text = _format_value(v, percent)
            if c.text_width(text, 9.5) <= bar_w + 6:
                if v >= 0:
                    c.text(((x0 + x1) / 2, y0 - 2), text, 9.5, fill="#374151", anchor="mb")
                else:
                    c.text(((x0 + x1) / 2, y1 + 2), text, 9.5, fill="#374151", anchor="mt")
        if metric in markers and math.isfinite(markers[metric]):
            y = py(markers[metric])
            c.dashed((g0 - 4, y), (g0 + len(series) * bar_w + 4, y), "#111827", 2)
        name = metric
        while len(name) > 1 and c.text_width(name, fs) > group - 4:
            name = name[:-2] + "…"
        c.text((left + (i + 0.5) * group, bottom + 6), name, fs, fill="#111827", anchor="mt")
    for k, v in enumerate(lines.values()):
        if math.isfinite(v):
            c.dashed((left, py(v)), (right, py(v)), line_colours[k % len(line_colours)], 1.6)
    c.line([(left, top - 14), (left, bottom)], "#6b7280", 1.2)
    c.line([(left, py(0.0)), (right, py(0.0))], "#6b7280", 1.2)
    if ylabel:
        c.vtext((ylabel_x, (top + bottom) / 2), ylabel, fs, fill="#111827")
    return c.finish()


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

        cells = [[_scalar(r.get(c)) for c in columns] for r in rows]
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
        self._figure(_render_line_plot(series, title, xlabel, ylabel, width, height, log_y), title, caption)

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
        img = _render_bar_chart(
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
                score = _scalar(res.get("score"))
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
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _check_size(width: int, height: int) -> None:
    if not (isinstance(width, int) and isinstance(height, int)) or width < 120 or height < 80:
        raise InputError(f"plot size must be integers of at least 120 x 80 px, got {width!r} x {height!r}")
    if width * height > 4_000_000:
        raise InputError(f"plot size {width} x {height} is too large (at most 4 megapixels)")
