"""Shared rich console, progress bars with rate and ETA, error guard and result tables.

User text (paths, names, values, library messages) is never read as rich markup or emoji codes:
the consoles have emoji codes off, and such text is printed as a rich ``Text`` (:func:`labelled`)
or escaped (:func:`rich.markup.escape`) into a markup string, so ``runs/a[/]b`` or
``no:x:such.json`` prints as it is.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import time
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
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

# Under torchrun only rank 0 prints results, progress and warnings (every rank runs the same
# command); every rank prints its own error line, the other ranks' as "error: rank N: ...".
_RANK = int(os.environ.get("RANK", "0"))
_QUIET = _RANK != 0
_WIDTH = int(os.environ["MASKX_CONSOLE_WIDTH"]) if "MASKX_CONSOLE_WIDTH" in os.environ else None
console = Console(width=_WIDTH, quiet=_QUIET, emoji=False)
err_console = Console(stderr=True, width=_WIDTH, quiet=_QUIET, emoji=False)
error_console = Console(stderr=True, width=_WIDTH, emoji=False)

STATE = {"verbose": False}


def format_rate(speed: float | None) -> str:
    """Items per second, or seconds per item when slower than one a second (``"   2.4 it/s"``,
    ``"  40.0 s/it"``; ``"  -  it/s"`` before the first rate is known)."""
    if not speed:
        return "  -  it/s"
    if speed >= 1:
        return f"{speed:6.1f} it/s"
    return f"{1 / speed:6.1f} s/it"


def task_speed(task) -> float | None:
    """Items per second of a rich task: rich's estimate over its last 30 s, or, when no two
    updates fall in that window (items slower than 30 s each), the mean since the task started."""
    speed = task.finished_speed or task.speed
    if speed:
        return speed
    elapsed = task.elapsed
    return task.completed / elapsed if task.completed and elapsed else None


class RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second)."""

    def render(self, task) -> Text:
        return Text(format_rate(task_speed(task)), style="progress.data.speed")


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
            self._p.console.print(self._status(), highlight=False, soft_wrap=True, markup=False, emoji=False)

    def _status(self) -> str:
        t = self._p.tasks[self._p.task_ids.index(self._id)]
        speed = task_speed(t)
        eta = f"{(t.total - t.completed) / speed:.0f}s" if speed and t.total else "?"
        total = f"/{t.total:.0f}" if t.total else ""
        rate = format_rate(speed).strip()
        return f"{t.description} {t.completed:.0f}{total} ({rate}, eta {eta}) {t.fields.get('info', '')}".rstrip()

    def close(self) -> None:
        self._p.stop_task(self._id)
        if not self._p.console.is_terminal:
            self._p.console.print(self._status() + " done", highlight=False, soft_wrap=True, markup=False, emoji=False)


class RichProgress:
    """The library's :class:`pipelines.progress.Progress`, drawn as rich bars."""

    def __init__(self, progress: Progress):
        self._p = progress

    def task(self, description: str, total: int | None) -> _RichTask:
        return _RichTask(self._p, self._p.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        self._p.console.print(Text(message), highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bars(console: Console | None = None, get_time: Callable[[], float] | None = None) -> Iterator[RichProgress]:
    """Progress bars on ``console`` (default: stderr); ``get_time`` replaces the clock (tests)."""
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}", style="progress.description", markup=False),  # descriptions are plain text
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", style="dim", markup=False),
    ]
    with Progress(*columns, console=console or err_console, transient=False, get_time=get_time) as p:
        yield RichProgress(p)


_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_DISK_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)  # a read-only or full disk met where no check named the file


def guarded(fn: Callable) -> Callable:
    """Turn MaskxError (and a few OS errors) into one ``error:`` line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MaskxError as exc:
            if STATE["verbose"]:
                raise
            _print_error(_with_flag(exc, fn).line())
            raise typer.Exit(2) from None
        except OSError as exc:
            if STATE["verbose"] or not (isinstance(exc, _FILE_ERRORS) or exc.errno in _DISK_ERRNOS):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _print_error(f"{where}{exc.strerror}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _print_error(line: str) -> None:
    """``error: line`` on stderr, by every process (under torchrun ranks other than 0 say which they are)."""
    error_console.print(labelled("error:", "bold red", f"rank {_RANK}: {line}" if _RANK else line), highlight=False,
                        soft_wrap=True)


def _with_flag(exc: MaskxError, command: Callable) -> MaskxError:
    """The error as ``command`` shows it: the setting it is about named by its flag, if the command has one."""
    flag = command_flags(command).get(exc.key) if exc.key else None
    if not flag or exc.key not in exc.message:
        return exc
    head, _, tail = exc.message.rpartition(exc.key)
    return MaskxError(head + flag + tail, exc.path)


def start_threads() -> None:
    """Apply maskx's thread rule (``pipelines/threads.py``) before a command imports torch; a bad
    ``MASKX_THREADS`` is one error line."""
    from pipelines.threads import configure_threads

    try:
        configure_threads()
    except MaskxError as exc:
        fail(exc.line())


def metrics_table(title: str, rows: dict[str, dict[str, float]], columns: list[str] | None = None) -> Table:
    """A table with one row per entry of ``rows`` (name -> {column: value}); values shown x100."""
    columns = columns or sorted({k for r in rows.values() for k in r})
    table = Table(title=Text(title), title_justify="left")
    table.add_column("", style="bold")
    for c in columns:
        table.add_column(Text(c), justify="right")
    for name, vals in rows.items():
        table.add_row(Text(name), *[_fmt(vals.get(c)) for c in columns])
    return table


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v < 0 else f"{100 * v:.1f}"
    return str(v)


def labelled(label: str, style: str, text: str) -> Text:
    """``label text``, the label in ``style`` and ``text`` as it is (no markup, no emoji codes)."""
    return Text.assemble((label, style), " ", text)


def training_summary(stats: Any) -> str:
    """``N iterations in S s, mean loss of the last W iterations L`` of a :class:`pipelines.engine.loop.TrainStats`:
    the loss is the mean total loss over the last ``log_every`` iterations (the progress bar's), not
    ``metrics.jsonl``'s last line (the last iteration's losses alone)."""
    return (f"{stats.iterations} iterations in {stats.seconds:.0f} s, mean loss of the last {stats.loss_window} "
            f"iterations {stats.mean_loss_last_window:.3f}")


def print_paths(**paths: Any) -> None:
    """One ``name: value`` line each, the value (a path, a setting) as it is (None: left out)."""
    for k, v in paths.items():
        if v is None:
            continue
        console.print(labelled(f"{k}:", "dim", str(v)), highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """Exit with one error line (for checks the CLI itself makes)."""
    _print_error(message)
    raise typer.Exit(2)


def warn(*lines: str) -> None:
    """One ``warning:`` line each, on stderr."""
    for line in lines:
        err_console.print(labelled("warning:", "yellow", line), highlight=False, soft_wrap=True)


def warn_missing_glove(missing: list[str]) -> None:
    if missing:
        warn(f"{len(missing)} class name(s) have no GloVe vector (zero rows): {', '.join(missing[:5])}")
