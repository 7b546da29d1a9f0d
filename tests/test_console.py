"""Progress output: rates as it/s or s/it, in the bars and in the plain status lines of a log."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from maskx_cli.console import RateColumn, _RichTask, format_rate, progress_bars


def test_format_rate():
    assert format_rate(None) == "  -  it/s"
    assert format_rate(2.4).strip() == "2.4 it/s"
    assert format_rate(1 / 40).strip() == "40.0 s/it"
    assert format_rate(0.5).strip() == "2.0 s/it"


@pytest.mark.parametrize("seconds_per_item, shown", [(40.0, "40.0 s/it"), (2.5, "2.5 s/it"), (0.25, "4.0 it/s")])
def test_status_lines_and_bar_show_the_rate(monkeypatch, seconds_per_item, shown):
    """A log (stderr not a terminal) gets status lines; a 40-s item must not read '0.00 it/s'."""
    monkeypatch.setattr(_RichTask, "LOG_EVERY_S", 0.0)  # a status line after every item
    clock = [0.0]
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with progress_bars(console=console, get_time=lambda: clock[0]) as progress:
        task = progress.task("detect-train", total=10)
        for _ in range(3):
            clock[0] += seconds_per_item
            task.advance()
        rich_task = progress._p.tasks[0]
        assert RateColumn().render(rich_task).plain.strip() == shown
        task.close()
    lines = [line for line in out.getvalue().splitlines() if line.startswith("detect-train")]
    assert len(lines) == 4  # three status lines and the closing one
    eta = round(7 * seconds_per_item)
    assert lines[2] == f"detect-train 3/10 ({shown}, eta {eta}s)"
    assert lines[3] == f"detect-train 3/10 ({shown}, eta {eta}s) done"
    assert "0.00 it/s" not in out.getvalue()
