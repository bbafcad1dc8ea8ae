"""Progress off a terminal: periodic plain lines with an estimate, never carriage-return bars."""

from __future__ import annotations

import io

from vlbridge.eval.progress import PlainProgress, progress_bar


def test_a_file_gets_plain_lines_with_an_estimate():
    out = io.StringIO()
    bar = progress_bar(10, "itm re-rank", "pair", True, file=out, every=0.0)
    assert isinstance(bar, PlainProgress)
    with bar:
        for _ in range(4):
            bar.update(1)
        bar.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("itm re-rank: 1/10 pair (") and "left" in lines[0]
    assert lines[-1].startswith("itm re-rank: 4/10 pair") and lines[-1].endswith("loss=0.5")


def test_lines_are_rate_limited_and_the_total_can_come_later():
    out = io.StringIO()
    with progress_bar(None, "x", "it", True, file=out, every=3600.0) as bar:
        bar.reset(total=100)
        bar.update(60)
    assert out.getvalue().count("\n") == 1 and "60/100" in out.getvalue()  # only the closing line
    quiet = io.StringIO()
    with progress_bar(5, "x", "it", False, file=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""
