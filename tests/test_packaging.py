"""The wheel: `uv build` makes one named maskx-rcnn that installs into a fresh environment and runs from
its own files (`maskx --help`, `--version`, a shipped recipe, a tiny prediction)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from pipelines import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
pytestmark = pytest.mark.slow

PROBE = r"""
import importlib.metadata as m, json, sys
from pathlib import Path
import maskx_cli, pipelines
configs = Path(pipelines.__file__).parent / "configs"
print(json.dumps({"pipelines": pipelines.__file__, "maskx_cli": maskx_cli.__file__, "configs": str(configs),
                  "recipes": sorted(p.relative_to(configs).as_posix() for p in configs.rglob("*.yaml")),
                  "version": pipelines.__version__, "metadata": m.version("maskx-rcnn"),
                  "dist": str(m.distribution("maskx-rcnn").locate_file("")), "path": sys.path,
                  "heavy": "torch" in sys.modules}))
"""

def test_distribution_name_is_ours():
    # the PyPI name "maskx" is another project's (a JAX library); ours is maskx-rcnn, the command stays maskx
    assert PYPROJECT["name"] == DISTRIBUTION == "maskx-rcnn"
    assert PYPROJECT["scripts"] == {"maskx": "maskx_cli.main:app"}


def _build_wheel(out: Path) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH: the wheel is built with `uv build`")
    r = subprocess.run([uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wheels = sorted(out.glob("*.whl"))
    assert [w.name for w in wheels] == [f"maskx_rcnn-{PYPROJECT['version']}-py3-none-any.whl"]
    return wheels[0]


def _fresh_env(root: Path, wheel: Path) -> tuple[Path, dict]:
    """A new venv with only the wheel installed (no dependencies); the running interpreter's
    site-packages reached through a .pth line for the dependencies (its .pth files, the editable
    install of this checkout among them, are not read from there). Returns its bin folder and an env."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    r = subprocess.run([shutil.which("uv"), "pip", "install", "--python", str(python), "--no-deps", "--offline", str(wheel)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", MASKX_CONSOLE_WIDTH="200", COLUMNS="200")
    return venv / "bin", env


def test_wheel_installs_and_runs_from_its_own_files(tmp_path, tiny_pipeline, tiny_world):
    wheel = _build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(f"maskx_rcnn-{PYPROJECT['version']}.dist-info/entry_points.txt").decode()
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pipelines" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names  # every recipe and sweep spec (read at run time)
    assert {"pipelines/configs/synthetic.yaml", "pipelines/configs/sweeps/quickstart.yaml", "maskx_cli/main.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names)
    assert "maskx = maskx_cli.main:app" in entry_points

    bin_dir, env = _fresh_env(tmp_path, wheel)
    venv = bin_dir.parent
    work = tmp_path / "work"  # not the checkout: nothing of it on the path
    work.mkdir()
    probe = subprocess.run([str(bin_dir / "python"), "-c", PROBE], cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    p = json.loads(probe.stdout)
    for key in ("pipelines", "maskx_cli", "configs", "dist"):
        assert Path(p[key]).resolve().is_relative_to(venv.resolve()), (key, p[key])
    assert all(Path(x or work).resolve() != ROOT for x in p["path"])  # ("" is the working folder)
    assert p["version"] == p["metadata"] == PYPROJECT["version"]
    assert p["recipes"] == sorted(Path(n).relative_to("pipelines/configs").as_posix() for n in shipped)  # found where config.py looks
    assert not p["heavy"]  # (the probe stays cheap: torch is imported once, by the prediction below)

    def maskx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "maskx"), *args], cwd=work, env=env, capture_output=True, text=True)

    help_ = maskx("--help")
    assert help_.returncode == 0 and "Usage: maskx" in help_.stdout and "predict" in help_.stdout, help_.stderr
    version = maskx("--version")
    assert (version.returncode, version.stdout) == (0, f"maskx {PYPROJECT['version']}\n")

    out = work / "pred"
    images = sorted(tiny_world.val_dir.glob("*.png"))[:3]
    r = maskx("predict", *map(str, images), "--mask", str(tiny_pipeline["runs"]["transfer"]), "--out", str(out),
              "--score-thresh", "0", "--visualize", "--max-drawn", "3", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((out / "predictions.json").read_text())
    assert f"predicted 3 images, {len(rows)} detections" in r.stdout and rows
    assert {d["file_name"] for d in rows} <= {str(p) for p in images}
    assert sorted(p.name for p in out.glob("*.png")) == [p.name for p in images]
    per_image: dict[str, int] = {}
    for d in rows:
        per_image[d["file_name"]] = per_image.get(d["file_name"], 0) + 1
    left_out = sum(max(0, n - 3) for n in per_image.values())
    assert (f"; {left_out} more left out (--max-drawn 3)" in r.stdout) == (left_out > 0)
