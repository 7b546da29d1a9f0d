"""Shared rich console, progress bars with rate and ETA, error guard and result tables."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from maskx_cli.options import command_flags
from pipelines.errors import MaskxError

# Under torchrun only rank 0 prints (every rank runs the same command).
_QUIET = int(os.environ.get("RANK", "0")) != 0
_WIDTH = int(os.environ["MASKX_CONSOLE_WIDTH"]) if "MASKX_CONSOLE_WIDTH" in os.environ else None
console = Console(width=_WIDTH, quiet=_QUIET)
err_console = Console(stderr=True, width=_WIDTH, quiet=_QUIET)

STATE = {"verbose": False}


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("  -  it/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:6.1f} it/s", style="progress.data.speed")
        return Text(f"{1 / speed:6.1f} s/it", style="progress.data.speed")


class _RichTask:
    """One bar. When stderr is not a terminal (a log file, CI), a plain status line is printed
    every ``LOG_EVERY_S`` seconds instead, so long jobs still show rate and ETA."""

    LOG_EVERY_S = 30.0

    def __init__(self, progress: Progress, task_id: Any):
        self._p, self._id = progress, task_id
        self._last_log = time.monotonic()

    def advance(self, n: int = 1, **fields: object) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        if info:
            self._p.update(self._id, advance=n, info=info)
        else:
            self._p.update(self._id, advance=n)
        if not self._p.console.is_terminal and time.monotonic() - self._last_log >= self.LOG_EVERY_S:
            self._last_log = time.monotonic()
            self._p.console.print(self._status(), highlight=False, soft_wrap=True)

    def _status(self) -> str:
        t = self._p.tasks[self._p.task_ids.index(self._id)]
        rate = t.speed or 0.0
        eta = f"{t.time_remaining:.0f}s" if t.time_remaining is not None else "?"
        total = f"/{t.total:.0f}" if t.total else ""
        return f"{t.description} {t.completed:.0f}{total} ({rate:.2f} it/s, eta {eta}) {t.fields.get('info', '')}".rstrip()

    def close(self) -> None:
        self._p.stop_task(self._id)
        if not self._p.console.is_terminal:
            self._p.console.print(self._status() + " done", highlight=False, soft_wrap=True)


class RichProgress:
    """The library's :class:`pipelines.progress.Progress`, drawn as rich bars."""

    def __init__(self, progress: Progress):
        self._p = progress

    def task(self, description: str, total: int | None) -> _RichTask:
        return _RichTask(self._p, self._p.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        self._p.console.print(message)


@contextlib.contextmanager
def progress_bars() -> Iterator[RichProgress]:
    columns = [
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", style="dim"),
    ]
    with Progress(*columns, console=err_console, transient=False) as p:
        yield RichProgress(p)


def guarded(fn: Callable) -> Callable:
    """Turn MaskxError (and a few OS errors) into one ``error:`` line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MaskxError as exc:
            if STATE["verbose"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(_with_flag(exc, fn).line())}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            if STATE["verbose"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(f'{exc.filename}: {exc.strerror}')}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _with_flag(exc: MaskxError, command: Callable) -> MaskxError:
    """The error as ``command`` shows it: the setting it is about named by its flag, if the command has one."""
    flag = command_flags(command).get(exc.key) if exc.key else None
    if not flag or exc.key not in exc.message:
        return exc
    head, _, tail = exc.message.rpartition(exc.key)
    return MaskxError(head + flag + tail, exc.path)


def metrics_table(title: str, rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> Table:
    """A table with one row per entry of ``rows`` (name -> {column: value}); values shown x100."""
    columns = columns or sorted({k for r in rows.values() for k in r})
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold")
    for c in columns:
        table.add_column(c, justify="right")
    for name, vals in rows.items():
        table.add_row(name, *[_fmt(vals.get(c)) for c in columns])
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v < 0 else f"{100 * v:.1f}"
    return str(v)


def print_paths(**paths: Any) -> None:
    for k, v in paths.items():
        console.print(f"[dim]{k}:[/] {v}", highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """Exit with one error line (for checks the CLI itself makes)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def warn(*lines: str) -> None:
    """One ``warning:`` line each, on stderr."""
    for line in lines:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


def warn_missing_glove(missing: list[str]) -> None:
    if missing:
        warn(f"{len(missing)} class name(s) have no GloVe vector (zero rows): {', '.join(missing[:5])}")
