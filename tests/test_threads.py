"""The thread rule: compute threads per process from MASKX_THREADS, OMP_NUM_THREADS or the cores over
torchrun's local processes, idle threads sleeping; applied by the CLI before torch starts its pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.errors import MaskxError
from pipelines.threads import configure_threads, thread_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env, threads, source", [
    ({}, 8, "cores"),
    ({"LOCAL_WORLD_SIZE": "4"}, 2, "cores"),  # torchrun: 4 processes on this machine share its 8 cores
    ({"LOCAL_WORLD_SIZE": "16"}, 1, "cores"),
    ({"OMP_NUM_THREADS": "3"}, 3, "OMP_NUM_THREADS"),
    ({"OMP_NUM_THREADS": "1", "MASKX_THREADS": "5", "LOCAL_WORLD_SIZE": "2"}, 5, "MASKX_THREADS"),  # torchrun's 1, overridden
])
def test_thread_plan(env, threads, source):
    plan = thread_plan(env, cores=8)
    assert (plan.threads, plan.source, plan.cores) == (threads, source, 8)
    assert plan.wait_policy == "PASSIVE"


def test_configure_threads_sets_the_environment_torch_reads_and_keeps_a_wait_policy_given():
    env = {"LOCAL_WORLD_SIZE": "1", "OMP_WAIT_POLICY": "ACTIVE", "MASKX_THREADS": "3"}
    plan = configure_threads(env)
    assert plan.threads == 3
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == ("3", "3", "ACTIVE")


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_thread_count_names_the_variable(value):
    with pytest.raises(MaskxError) as exc:
        thread_plan({"MASKX_THREADS": value}, cores=4)
    assert exc.value.message == f"environment variable MASKX_THREADS must be a whole number >= 1, got '{value}'"


PROBE = r"""
import json, os, sys
from maskx_cli.main import app
code = 0
try:
    app(["data", "check", "--help"], prog_name="maskx")
except SystemExit as exc:
    code = exc.code
import torch
print(json.dumps({"code": code, "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
                  "wait": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _cli(env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                              "MASKX_THREADS", "LOCAL_WORLD_SIZE")}
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})


def test_the_cli_applies_the_rule_before_torch_starts():
    proc = _cli({"MASKX_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"code": 0, "threads": 1, "omp": "1", "wait": "PASSIVE"}


def test_the_cli_refuses_a_bad_thread_count_in_one_line():
    proc = _cli({"MASKX_THREADS": "0"})
    assert json.loads(proc.stdout.splitlines()[-1])["code"] == 2
    assert [s for s in proc.stdout.splitlines() + proc.stderr.splitlines() if s.startswith("error:")] == [
        "error: environment variable MASKX_THREADS must be a whole number >= 1, got '0'"]
