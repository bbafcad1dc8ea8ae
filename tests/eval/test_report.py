"""HtmlReport: self-contained page (data: URIs only), decodable PNGs of the requested size, escaping, balanced tags."""

import base64
import io
import math
import re
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest
from PIL import Image, ImageDraw

from vlbridge.errors import ImageError, InputError
from vlbridge.eval.plots import _inner_ticks, _log_ticks, _nice_ticks, _tick_labels
from vlbridge.eval.report import HtmlReport, Percent

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


class _TagBalance(HTMLParser):
    """Records every start/end tag and fails on an end tag that does not close the innermost open element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _world_image(i: int) -> Image.Image:
    img = Image.new("RGB", (64, 64), (235, 235, 225))
    draw = ImageDraw.Draw(img)
    draw.ellipse((6 + 4 * i, 8, 28 + 4 * i, 30), fill=(220, 40, 40))
    draw.rectangle((34, 36, 58, 58), fill=(40, 160, 60))
    return img


def _parse(text: str) -> _TagBalance:
    parser = _TagBalance()
    parser.feed(text)
    parser.close()
    return parser


def _pngs(text: str) -> list[Image.Image]:
    images = []
    for b64 in PNG_URI.findall(text):
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        img.load()
        images.append(img)
    return images


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A report with every element, saved once: (path, html text, number of metrics rows)."""
    tmp = tmp_path_factory.mktemp("report")
    files = []
    for i in range(3):
        path = tmp / f"world_{i}.png"
        _world_image(i).save(path)
        files.append(path)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))

    report = HtmlReport("Demo <run>", subtitle="synthetic & small", generated=datetime(2025, 1, 2, 3, 4, tzinfo=UTC))
    report.heading("Overview")
    report.paragraph("Stage 1 trains the **Q-Former** with `ITC + <ITM>`; <script>alert(1)</script>")
    report.note("heads up <b>", kind="warn")
    report.note("fine", kind="ok")
    report.note("fyi")
    report.heading("Training curves")
    steps = range(0, 501, 25)
    report.line_plot(
        {
            "stage 1": [(s, 2.5 * math.exp(-s / 200) + 0.3) for s in steps],
            "stage 2": [(s, 3 * math.exp(-s / 300) + 0.5) for s in steps],
        },
        title="loss",
        xlabel="step",
        ylabel="loss",
        log_y=True,
    )
    report.line_plot(
        {"lr": [(s, 1e-4 * s / 500) for s in steps]}, title="lr", xlabel="step", ylabel="lr", width=500, height=250
    )
    report.heading("Metrics")
    rows = [
        {"model": "ours", "R@1 %": 0.612, "CIDEr": 1.2345, "loss": 0.41, "n": 12000, "ok": True},
        {"model": "blind <b>", "R@1 %": 0.11, "CIDEr": 0.31, "loss": 1.9, "n": 12000, "ok": False},
        {"model": "chance", "R@1 %": 0.02, "CIDEr": None, "loss": 2.3, "n": 12000},
    ]
    report.metrics(rows, caption="held-out <split>", highlight={"R@1 %": "max", "CIDEr": "max", "loss": "min"})
    report.bar_chart(
        {"R@1": 0.61, "VQA": 0.72},
        title="ours vs baselines",
        ylabel="score",
        reference={"chance": {"R@1": 0.02, "VQA": 0.25}, "blind": {"R@1": 0.1, "VQA": 0.4}},
        percent=True,
        width=480,
        height=240,
    )
    report.bar_chart(
        {"R@1": 0.61, "VQA": 0.72},
        title="ours vs chance",
        ylabel="score",
        reference={"R@1": 0.02},
        hlines={"goal": 0.8},
    )
    report.heading("Samples", level=3)
    report.image_gallery(
        [
            {"image": files[0], "title": "ok one", "lines": ["gt: red ball", "pred: <script>x</script>"], "ok": True},
            {"image": _world_image(3), "title": "bad one", "lines": ["pred: wrong"], "ok": False},
            {"image": rgba, "title": "transparent"},
            {"image": str(files[1])},
        ],
        columns=3,
        thumb=128,
    )
    report.heading("Retrieval")
    report.retrieval_examples(
        [
            {
                "query": "a red ball <left>",
                "results": [{"image": files[j], "score": 0.9 - 0.1 * j, "correct": j == 1} for j in range(3)],
            },
            {"query": "nothing matches", "results": [{"image": files[2], "score": 0.1, "correct": False}]},
        ],
        thumb=80,
    )
    report.raw_html('<div class="custom">raw <em>html</em></div>')
    path = report.save(tmp / "sub" / "report.html")
    return path, path.read_text(encoding="utf-8"), len(rows)


def test_saved_atomically_and_self_contained(full_report):
    path, text, _ = full_report
    assert path.is_file() and path.name == "report.html"
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left behind
    assert text.startswith("<!DOCTYPE html>")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    sources = re.findall(r'\ssrc="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    hrefs = re.findall(r'\shref="([^"]*)"', text)
    assert hrefs and all(h.startswith("#") for h in hrefs)  # only in-page anchors (table of contents)


def test_html_is_balanced(full_report):
    _, text, _ = full_report
    parser = _parse(text)
    assert parser.errors == []
    assert parser.stack == []
    for tag in ("html", "head", "body", "main", "header", "nav", "table", "style", "title"):
        assert parser.counts.get(tag, 0) >= 1, tag


def test_pngs_decode_with_requested_sizes(full_report):
    _, text, _ = full_report
    images = _pngs(text)
    # 4 plots, 4 gallery thumbnails, 4 retrieval thumbnails
    assert len(images) == 12
    assert all(img.format == "PNG" for img in images)
    assert [img.size for img in images[:4]] == [(640, 320), (500, 250), (480, 240), (640, 320)]
    assert [img.size for img in images[4:8]] == [(128, 128)] * 4
    assert [img.size for img in images[8:]] == [(80, 80)] * 4
    # <img> width/height attributes match the pixels
    attrs = [tuple(map(int, m)) for m in re.findall(r'<img [^>]*width="(\d+)" height="(\d+)"', text)]
    assert attrs == [img.size for img in images]


def test_plots_are_drawn(full_report):
    _, text, _ = full_report
    loss = _pngs(text)[0].convert("RGB")
    colours = {c for _, c in loss.getcolors(maxcolors=1 << 20)}
    assert len(colours) > 50  # antialiased lines and text, not a blank canvas
    # both series colours appear (Tableau blue and orange)
    assert any(abs(r - 0x4E) < 12 and abs(g - 0x79) < 12 and abs(b - 0xA7) < 12 for r, g, b in colours)
    assert any(abs(r - 0xF2) < 12 and abs(g - 0x8E) < 12 and abs(b - 0x2B) < 12 for r, g, b in colours)


def test_thumbnails_are_nearest_upscaled(full_report):
    _, text, _ = full_report
    thumb = _pngs(text)[4].convert("RGB")  # 64 -> 128 is exactly 2x: every source pixel a 2x2 block
    source = _world_image(0)
    assert thumb.resize((64, 64), Image.Resampling.NEAREST).tobytes() == source.tobytes()
    assert {c for _, c in thumb.getcolors(maxcolors=1 << 16)} == {c for _, c in source.getcolors(maxcolors=1 << 16)}
    transparent = _pngs(text)[6].convert("RGB")  # alpha composited onto white
    assert transparent.getcolors() == [(128 * 128, (255, 255, 255))]


def test_text_is_escaped(full_report):
    _, text, _ = full_report
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text  # gallery caption line
    assert "<title>Demo &lt;run&gt;</title>" in text
    assert "synthetic &amp; small" in text
    assert "blind &lt;b&gt;" in text and "held-out &lt;split&gt;" in text and "a red ball &lt;left&gt;" in text
    assert "heads up &lt;b&gt;" in text
    # inline markup survives escaping, and code spans are literal
    assert "<strong>Q-Former</strong>" in text and "<code>ITC + &lt;ITM&gt;</code>" in text
    assert '<div class="custom">raw <em>html</em></div>' in text  # raw_html is verbatim


def test_metrics_table(full_report):
    _, text, n_rows = full_report
    table = re.search(r'<table class="metrics">.*?</table>', text, re.S).group(0)
    body = re.search(r"<tbody>(.*)</tbody>", table, re.S).group(1)
    assert body.count("<tr>") == n_rows
    assert table.count("<th ") == 6
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]
    assert cells[0] == ["ours", "61.2%", "1.234", "0.410", "12,000", "✓"]
    assert cells[2] == ["chance", "2.0%", "—", "2.300", "12,000", "—"]
    best = re.findall(r'<td class="num best">(.*?)</td>', body)
    assert best == ["61.2%", "1.234", "0.410"]  # max recall, max CIDEr, min loss; the constant n column is not marked


def test_header_toc_and_cards(full_report):
    _, text, _ = full_report
    assert "2025-01-02 03:04" in text
    toc = re.search(r'<nav class="toc card">.*?</nav>', text, re.S).group(0)
    assert re.findall(r'href="#([^"]+)"', toc) == ["overview", "training-curves", "metrics", "samples", "retrieval"]
    for anchor in ("overview", "training-curves", "metrics", "samples", "retrieval"):
        assert f'id="{anchor}"' in text
    assert text.count('<section class="card">') == 4  # one per level-2 heading
    assert 'class="note warn"' in text and 'class="note ok"' in text and 'class="note info"' in text
    assert 'class="tile ok"' in text and 'class="tile bad"' in text
    assert "hit@2" in text and "miss@1" in text
    assert text.count('class="res ok"') == 1


def test_metrics_formatting_and_highlight_options():
    report = HtmlReport("t")
    report.metrics(
        [{"a": Percent(0.5), "b": 3, "c": "x"}, {"a": 0.25, "b": 5, "c": "y"}], columns=["c", "a", "b"], highlight="min"
    )
    text = report.render()
    assert re.findall(r"<td[^>]*>(.*?)</td>", text) == ["x", "50.0%", "3", "y", "0.250", "5"]
    assert re.findall(r'class="num best">(.*?)<', text) == ["3", "0.250"]
    with pytest.raises(InputError):
        report.metrics([{"a": 1}], highlight="best")
    with pytest.raises(InputError):
        report.metrics([{"a": 1}], highlight={"zzz": "max"})
    with pytest.raises(InputError):
        report.metrics([])


def test_numpy_scalars_and_single_image():
    np = pytest.importorskip("numpy")
    report = HtmlReport("t")
    report.metrics([{"acc": np.float32(0.5), "n": np.int64(1234)}])
    report.image(_world_image(0), caption="a **figure**", pixelated=True)
    text = report.render()
    assert re.findall(r"<td[^>]*>(.*?)</td>", text) == ["0.500", "1,234"]
    assert [img.size for img in _pngs(text)] == [(64, 64)]
    assert "image-rendering:pixelated" in text and "<figcaption>a <strong>figure</strong></figcaption>" in text


def test_heading_ids_are_unique_and_bad_inputs_fail(tmp_path):
    report = HtmlReport("t")
    report.heading("Results")
    report.heading("Results", level=3)
    report.heading("Contents", level=3)
    text = report.render()
    assert 'id="results"' in text and 'id="results-2"' in text and 'id="contents-2"' in text
    with pytest.raises(InputError):
        report.heading("x", level=1)
    with pytest.raises(InputError):
        report.note("x", kind="danger")
    with pytest.raises(InputError):
        report.line_plot({"a": [(0, -1.0), (1, 0.0)]}, title="t", xlabel="x", ylabel="y", log_y=True)
    with pytest.raises(InputError):
        report.bar_chart({"a": 1.0}, title="t", ylabel="y", reference={"typo": 0.5})
    with pytest.raises(ImageError):
        report.image_gallery([{"image": tmp_path / "missing.png"}])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ImageError):
        report.retrieval_examples([{"query": "q", "results": [{"image": tmp_path / "junk.png", "score": 1.0}]}])


def test_save_overwrites(tmp_path):
    path = tmp_path / "r.html"
    path.write_text("old")
    report = HtmlReport("new")
    assert report.save(path) == path
    assert "<h1>new</h1>" in path.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def test_tick_helpers():
    assert _nice_ticks(0.03, 0.97, 5) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert _tick_labels([0.0, 0.25, 0.5]) == ["0", "0.25", "0.50"]
    assert _tick_labels([0.0, 0.2, 0.4], percent=True) == ["0%", "20%", "40%"]
    assert _tick_labels([0.0, 20000.0, 40000.0]) == ["0", "20k", "40k"]
    assert _tick_labels([0.0, 5e-5, 1e-4]) == ["0", "5e−5", "1e−4"]
    ticks, lo, hi = _inner_ticks(3.0, 997.0, 5)
    assert (lo, hi) == (3.0, 997.0) and ticks == [200.0, 400.0, 600.0, 800.0]
    major, _, t0, t1 = _log_ticks(0.3, 0.85, 200, 18)
    assert (10**t0, 10**t1) == pytest.approx((0.2, 1.0)) and {0.2, 0.5, 1.0} <= set(major)
    major, minor, t0, t1 = _log_ticks(1e-6, 1e3, 180, 18)
    assert (t0, t1) == (-6.0, 3.0) and 1e-6 in major and all(v in major or v in minor for v in (1e-5, 1e-4))
