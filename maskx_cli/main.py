"""``maskx``: the typer application. Every command and sub-app is registered here, and only here.

Command modules define thin functions (parse, call one ``pipelines`` function, print); none of them
imports this module, so the imports run one way: ``main`` -> commands -> ``pipelines``. Building the
app imports no torch: a command imports the library functions it calls when it runs, so ``--help``,
``--version`` and argument errors answer at once (``tests/test_cli_startup.py``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from maskx_cli import cache, data, data_grabcut, data_real, export, predict, quickstart, stages, sweep, train
from maskx_cli import console as _console
from pipelines import __version__

app = typer.Typer(
    name="maskx",
    help="Partially supervised instance segmentation (Mask^X R-CNN): detect and segment every class "
    "when only some classes have mask labels.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        _console.console.print(f"maskx {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.", envvar="MASKX_VERBOSE")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print maskx's version and exit.", callback=_print_version,
                                          is_eager=True)] = False,
) -> None:
    _console.STATE["verbose"] = verbose
    _console.start_threads()


data_app = typer.Typer(help="Make or prepare data sets (COCO-format annotations + images).", no_args_is_help=True)
data_app.command("synth")(data.synth)
data_app.command("prepare-vg")(data_real.prepare_vg_cmd)
data_app.command("check")(data_real.check_cmd)
data_app.command("grabcut")(data_grabcut.grabcut_cmd)
app.add_typer(data_app, name="data")

app.command("detect-train")(stages.detect_train_cmd)
app.command("detect-import")(stages.detect_import_cmd)
app.command("export-embeddings")(stages.export_embeddings_cmd)

cache_app = typer.Typer(help="The stage-2 feature cache (frozen-detector RoI features + mask targets).", no_args_is_help=True)
cache_app.command("plan")(cache.plan_cmd)
cache_app.command("build")(cache.build_cmd)
cache_app.command("info")(cache.info_cmd)
app.add_typer(cache_app, name="cache")

app.command("mask-train")(stages.mask_train_cmd)
app.command("train")(train.train_cmd)
app.command("eval")(stages.eval_cmd)
app.command("eval-grabcut")(data_grabcut.eval_grabcut_cmd)
app.command("predict")(predict.predict_cmd)
app.command("segment")(predict.segment_cmd)
app.command("export")(export.export_cmd)
app.command("slim")(export.slim_cmd)
app.command("sweep")(sweep.sweep_cmd)
app.command("quickstart")(quickstart.quickstart_cmd)

if __name__ == "__main__":
    app()
