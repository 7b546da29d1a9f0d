"""``maskx``: the typer application. One module per command group; each command is thin."""

from __future__ import annotations

from typing import Annotated

import typer

from maskx_cli import console as _console

app = typer.Typer(
    name="maskx",
    help="Partially supervised instance segmentation (Mask^X R-CNN): detect and segment every class "
    "when only some classes have mask labels.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.", envvar="MASKX_VERBOSE")] = False,
) -> None:
    _console.STATE["verbose"] = verbose


def _register() -> None:
    # Each module adds its commands to `app` (or a sub-app) when imported.
    from maskx_cli import cache, data, data_real, predict, quickstart, stages, sweep, train  # noqa: F401


_register()

if __name__ == "__main__":
    app()
