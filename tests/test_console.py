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


ODD = "runs/a[/]b [red]c[/red] :x: d\\"  # rich markup, an emoji code and a trailing backslash in one path


def test_paths_warnings_tables_and_progress_print_user_text_verbatim(capsys):
    from rich.markup import escape

    from maskx_cli.console import console, metrics_table, print_paths, warn

    print_paths(checkpoint=f"{ODD}/model_final.pth")
    warn(f"{ODD}/x.png: skipped: image cannot be read")
    console.print(metrics_table(f"AP of {ODD}", {ODD: {"AP": 0.5}}))
    out = io.StringIO()
    with progress_bars(console=Console(file=out, force_terminal=False, width=300)) as progress:
        progress.log(f"waiting for {ODD}.lock")
        progress.task(f"predict {ODD}", total=1).close()
    captured = capsys.readouterr()
    assert f"checkpoint: {ODD}/model_final.pth" in captured.out.splitlines()
    assert f"warning: {ODD}/x.png: skipped: image cannot be read" in captured.err.splitlines()
    assert f"AP of {ODD}" in captured.out and f"│ {ODD} │" in captured.out
    assert f"waiting for {ODD}.lock" in out.getvalue().splitlines()
    assert f"predict {ODD} 0/1 (-  it/s, eta ?) done" in out.getvalue().splitlines()
    assert "❌" not in captured.out + captured.err + out.getvalue() and escape(ODD) != ODD


def test_error_line_names_a_path_with_markup_and_emoji_codes_as_it_is(tmp_path):
    from typer.testing import CliRunner

    from maskx_cli.main import app

    results = tmp_path / "r[red]x.json"
    results.write_text("[]")
    r = CliRunner().invoke(app, ["eval", "--gt", "no:x:such[/]ann.json", "--results", str(results)])
    assert r.exit_code == 2
    assert [line for line in r.output.splitlines() if line.strip()] == ["error: no:x:such[/]ann.json: annotation file not found"]


def test_training_into_a_folder_named_with_markup_finishes_and_lists_it(tmp_path):
    from typer.testing import CliRunner

    from maskx_cli.main import app
    from tests.engine.tiny_runs import cli_overrides, make_world

    world = make_world(tmp_path, train_images=4, val_images=1)
    out = tmp_path / "a[/]b :x: [red]c"
    r = CliRunner().invoke(app, ["detect-train", "--config", "synthetic", "--out", str(out), "--iterations", "1",
                                 *cli_overrides(world)], env={"MASKX_CONSOLE_WIDTH": "400"})
    assert r.exit_code == 0, r.output
    assert (out / "model_final.pth").is_file()
    assert f"checkpoint: {out / 'model_final.pth'}" in r.output.splitlines()
    assert f"config: {out / 'config.yaml'}" in r.output.splitlines()
