"""Plots drawn with Pillow alone for the HTML report: line plots (linear or log y) and grouped bar charts.

Each renderer returns a PIL image at twice the requested size (for sharp display on high-density screens); the
report embeds it as a PNG. Ticks are "nice" numbers (1, 2, 5 x 10^k) on linear axes and powers of ten, with
intermediate labels when the range is short, on log axes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from vlbridge.errors import InputError

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


def as_python_scalar(value: Any) -> Any:
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


def _format_value(value: float, percent: bool = False) -> str:
    """Short label for a number drawn on a chart (3 significant digits)."""
    if percent:
        return f"{100.0 * value:.1f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


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


def render_line_plot(
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
                x, y = (float(as_python_scalar(v)) for v in point)
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


def render_bar_chart(
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
        (series_label, {str(k): float(as_python_scalar(v)) for k, v in values.items()})
    ]
    markers: dict[str, float] = {}
    for key, ref in (reference or {}).items():
        if isinstance(ref, Mapping):
            unknown = sorted(set(map(str, ref)) - set(metrics))
            if unknown:
                raise InputError(f"bar_chart: reference {key!r} has values for unknown metrics {unknown}")
            series.append((str(key), {str(k): float(as_python_scalar(v)) for k, v in ref.items()}))
        elif str(key) in metrics:
            markers[str(key)] = float(as_python_scalar(ref))
        else:
            raise InputError(
                f"bar_chart: reference key {key!r} is not one of the metrics {metrics}; give per-metric reference "
                "values as {metric: value}, named reference series as {name: {metric: value}}, or use hlines="
            )
    lines = {str(k): float(as_python_scalar(v)) for k, v in (hlines or {}).items()}
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
