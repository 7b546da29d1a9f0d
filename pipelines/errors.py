"""The one error type that the command line turns into a single clear line."""

from __future__ import annotations

from pathlib import Path


class MaskxError(Exception):
    """A problem with the user's input or environment, reported as one line.

    ``path`` names the file the problem is in (if any); the CLI prints ``error: <path>: <message>``
    and exits with status 2, without a traceback unless ``--verbose`` is given. ``key`` (optional)
    is the setting the problem is about, as the library names it -- a config key such as
    ``head.transfer_layers`` or a parameter such as ``resume`` -- written in the message; library
    messages never name command-line flags, and a command that has a flag for ``key`` shows its flag
    instead.
    """

    def __init__(self, message: str, path: str | Path | None = None, key: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.key = key
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message
