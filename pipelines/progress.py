"""Progress reporting without printing: the library calls a reporter, the CLI draws rich bars."""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...
    def close(self) -> None: ...


class Progress(Protocol):
    """Factory of progress tasks. ``task(description, total)`` starts one bar."""

    def task(self, description: str, total: int | None) -> Task: ...
    def log(self, message: str) -> None: ...


class _NullTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    """Reports nothing; the default for library calls and tests."""

    def task(self, description: str, total: int | None) -> Task:
        return _NullTask()

    def log(self, message: str) -> None:
        pass


NULL_PROGRESS = NullProgress()
