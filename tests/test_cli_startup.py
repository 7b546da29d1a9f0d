"""The command line starts without torch: --help (of maskx and of every command), --version and
argument errors answer before any library module that needs torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import contextlib, io, json, sys
import typer
from maskx_cli.main import app

def commands(group, prefix):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + [name]
        if hasattr(cmd, "commands"):
            yield from commands(cmd, prefix + [name])

calls = [["--help"], ["--version"], ["predict", "--no-such-flag"], ["segment"], ["eval", "--max-images", "many"]]
calls += [c + ["--help"] for c in commands(typer.main.get_command(app), [])]
answers = []
for args in calls:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            app(args, prog_name="maskx")
            code = 0
        except SystemExit as exc:
            code = exc.code
    answers.append({"args": args, "code": code, "out": out.getvalue()})
heavy = sorted(m for m in ("torch", "torchvision", "numpy", "cv2", "h5py", "pycocotools") if m in sys.modules)
print(json.dumps({"answers": answers, "heavy": heavy}))
"""


def _probe() -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                       env={"MASKX_CONSOLE_WIDTH": "200", "COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_help_version_and_argument_errors_import_no_torch():
    probe = _probe()
    assert probe["heavy"] == []
    answers = {" ".join(a["args"]): a for a in probe["answers"]}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert answers["--version"]["code"] == 0 and answers["--version"]["out"] == f"maskx {version}\n"
    assert answers["--help"]["code"] == 0 and "segment" in answers["--help"]["out"] and "--version" in answers["--help"]["out"]
    assert answers["predict --no-such-flag"]["code"] == 2 and "No such option: --no-such-flag" in answers["predict --no-such-flag"]["out"]
    assert answers["segment"]["code"] == 2 and "Missing argument 'boxes'" in answers["segment"]["out"]
    assert answers["eval --max-images many"]["code"] == 2 and "Invalid value for '--max-images'" in answers["eval --max-images many"]["out"]
    helps = {k: a for k, a in answers.items() if k.endswith("--help")}
    for name in ("predict --help", "segment --help", "detect-train --help", "data synth --help", "cache build --help"):
        assert helps[name]["code"] == 0 and "Usage: maskx" in helps[name]["out"], name
    assert len(helps) >= 20 and all(a["code"] == 0 for a in helps.values())
