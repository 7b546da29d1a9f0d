"""Every maskx command on one device in one prepared run, then the four speed benchmarks.

    PYTHONPATH=. python3 benchmarks/gpu_acceptance.py --out bench_gpu      # on a GPU machine (cuda), <= 8 min
    PYTHONPATH=. python3 benchmarks/gpu_acceptance.py --smoke --device cpu --out DIR   # tiny sizes, CPU

``benchmarks/gpu_check.sh`` calls it. Steps, in order (``docs/benchmarks.md`` says what each covers):
a small synthetic world; ``detect-train`` (bf16, timed in it/s); ``export-embeddings``; ``cache build``;
``mask-train`` from that cache, streamed (``--ram-budget-gb 0``); ``train`` end to end; a seeded
torchvision ``fasterrcnn_resnet50_fpn`` state dict (no download) and ``detect-import`` of it at 800 px;
``eval`` of the mask run; ``predict --visualize``; ``eval --gt --results`` of its results file;
``detect-train`` under ``torchrun --nproc-per-node 1`` (NCCL on cuda, gloo on CPU); ``detect-train``
stopped by SIGTERM and continued with ``--resume``; then ``bench_stage2``, ``bench_inference``,
``bench_classes``, ``bench_cache``.

Each step runs with a time limit (and the whole run within ``--budget`` seconds; a step left without
time is recorded as not run); its exit status, seconds and last line go to ``OUT/summary.json``, its
output to ``OUT/logs/<step>.log``, the benchmarks' reports to ``OUT/<name>.json``. The summary names
the machine, the versions, the packages found missing and what was done without them. The runs
themselves (world, checkpoints, cache) go to ``--work`` (default: a temporary folder, removed at the
end). Only the standard library and torch are needed beyond the project's own dependencies, so it
runs with a machine's own ``python3`` (``PYTHONPATH=.``, no uv).

``--fork`` (the default with ``--smoke`` on CPU) runs the maskx commands in processes forked from
this one after it has imported them once, instead of starting ``python3 -m maskx_cli`` for each:
the same commands and arguments, without re-importing torch every time. Never with CUDA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS = ("commands", "benchmarks")
# packages the steps import beyond torch / torchvision, and the distribution names they are listed under
PACKAGES = {"pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval", "lvis": "lvis", "h5py": "h5py",
            "numpy": "numpy", "yaml": "pyyaml", "typer": "typer", "rich": "rich", "cv2": "opencv", "matplotlib": "matplotlib",
            "tensorboard": "tensorboard", "PIL": "pillow"}
NEEDED = ("pycocotools", "h5py", "numpy", "yaml", "typer", "rich", "cv2", "matplotlib", "PIL", "tensorboard")  # maskx commands

SIZES = {  # world, iterations and images per step of the two modes
    "smoke": {"train_images": 8, "val_images": 4, "image_size": 64, "batch": 2, "detect_iters": 4, "mask_iters": 4,
              "mask_batch": 8, "e2e_iters": 2, "ddp_iters": 2, "resume_iters": 8, "import_size": 800},
    "full": {"train_images": 256, "val_images": 64, "image_size": 128, "batch": 8, "detect_iters": 300, "mask_iters": 200,
             "mask_batch": 64, "e2e_iters": 20, "ddp_iters": 20, "resume_iters": 200, "import_size": 800},
}
BENCHMARKS = {  # name -> (script, smoke arguments, full arguments); as benchmarks/gpu_check.sh ran them
    "stage2": ("bench_stage2.py", "--settings quick --steps 1 --cache-rois 64 --images 1 --rois 8",
               "--settings quick,coco --size 800 --steps 20 --cache-rois 8192"),
    "inference": ("bench_inference.py", "--size 64 --rounds 1 --proposals 20 --detections 4", "--size 800 --rounds 7"),
    "classes": ("bench_classes.py", "--rois 4 --rounds 1 --skip-model --mlp-hidden 16", "--size 800 --rounds 7"),
    "cache": ("bench_cache.py", "--gb 0.01 --batch 8 --drop fadvise --build-images 2 --build-batch 2 --build-rounds 1 "
              "--size 64 --backbone resnet18 --workers 1", "--gb {cache_gb} --build-images 32 --size 800"),
    # the COCO cache's size table, and at full size its projected build and experiment on this machine's rates
    "coco_projection": ("coco_cache_sizes.py", "", "--measure"),
}
# bf16 autocast on cuda; full precision on CPU, where bf16 autocast is several times slower at the smoke sizes
AMP = {"cuda": "bf16", "cpu": "off"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Step:
    name: str
    group: str  # commands | benchmarks
    argv: list[str] = field(default_factory=list)  # a maskx command (without "maskx"), or a whole command line if `raw`
    raw: bool = False  # argv is a full command line (torchrun, a benchmark), not a maskx command
    needs: tuple[str, ...] = NEEDED
    limit: float = 300.0
    what: str = ""
    check: Callable[[Step, dict, Path], dict] | None = None  # extra fields from its output / run folder
    call: Callable[..., Any] | None = None  # a function of this file run as the step, argv its arguments
    action: Callable[..., dict] | None = None  # a step that is not one command (resume): (step, log, limit, fork, env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_gpu", help="folder of summary.json, versions.txt, the logs and the benchmarks' JSON")
    ap.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"], help="where every step runs (default cuda)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, gives no figures")
    ap.add_argument("--work", default="", help="folder for the runs (default: a temporary one, removed at the end)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run; a step left without time is not run")
    ap.add_argument("--limit", type=float, default=240, help="seconds per benchmark (commands: their own limits)")
    ap.add_argument("--skip", action="append", default=[], choices=GROUPS, help="leave out a group of steps (repeatable)")
    ap.add_argument("--cache-gb", type=float, default=4, help="size of bench_cache's cold-read cache")
    ap.add_argument("--cache-dir", default="", help="where bench_cache writes (default OUT; a real disk)")
    ap.add_argument("--amp", default="", help="solver.amp of the training steps (default: bf16 on cuda, off on CPU)")
    ap.add_argument("--fork", action=argparse.BooleanOptionalAction, default=None,
                    help="fork the maskx commands from this process (default: with --smoke on CPU)")
    return ap.parse_args(argv)


def packages() -> dict[str, str | None]:
    """Installed version (or "present") of every package in PACKAGES; None where it cannot be imported."""
    found: dict[str, str | None] = {}
    for module, dist in PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            found[dist] = None
            continue
        try:
            from importlib.metadata import version

            found[dist] = version(dist if dist != "opencv" else "opencv-python")
        except Exception:  # a build without metadata, or another distribution name (opencv-python-headless)
            found[dist] = str(getattr(importlib.import_module(module), "__version__", "present"))
    return found


def machine(device: str) -> dict:
    """Python, torch, torchvision, CUDA, cuDNN, the GPU (or the CPU), the date."""
    import torch
    import torchvision

    info: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
                            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                            "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
                            "cuda": torch.version.cuda}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def missing_notes(found: dict[str, str | None]) -> dict[str, str]:
    """What the run does without each missing package."""
    notes = {}
    for module in NEEDED:
        if found[PACKAGES[module]] is None:
            notes[PACKAGES[module]] = "every maskx command imports it: the command steps are skipped (install it to run them)"
    if found["faster-coco-eval"] is None:
        notes["faster-coco-eval"] = "eval steps run with --backend reference (pycocotools' COCOeval; the same numbers, slower)"
    if found["lvis"] is None:
        notes["lvis"] = "not needed here (LVIS ground truth only)"
    return notes


# --------------------------------------------------------------------------------------------
# The steps
def command_steps(s: dict, w: Path, device: str, found: dict, amp: str) -> list[Step]:
    """The maskx commands in order, on the world and runs under ``w``; the training steps under ``solver.amp=amp``."""
    data = ["--train-data", f"{w}/world/instances_train.json", "--train-images", f"{w}/world/train",
            "--val-data", f"{w}/world/instances_val.json", "--val-images", f"{w}/world/val"]
    size = [f"detector.min_size={s['image_size']}", f"detector.max_size={s['image_size']}"]
    det = _sets(*size, f"solver.batch_size={s['batch']}", f"solver.reference_batch_size={s['batch']}", f"solver.amp={amp}",
                "solver.workers=0")
    mask = _sets(f"solver.batch_size={s['mask_batch']}", f"solver.reference_batch_size={s['mask_batch']}", "solver.workers=0")
    backend = [] if found["faster-coco-eval"] else ["--backend", "reference"]
    dev = ["--device", device]
    steps = [
        Step("world", "commands", ["data", "synth", "--out", f"{w}/world", "--train-images", str(s["train_images"]),
                                   "--val-images", str(s["val_images"]), "--image-size", str(s["image_size"])],
             what="the synthetic world (80 classes)"),
        Step("detect-train", "commands", ["detect-train", "--config", "synthetic", *data, *det, "--iterations", str(s["detect_iters"]),
                                          *dev, "--out", f"{w}/det"], what=f"stage 1, solver.amp={amp}", check=_iterations_per_s),
        Step("export-embeddings", "commands", ["export-embeddings", f"{w}/det", "--out", f"{w}/det/emb.h5"]),
        Step("cache-build", "commands", ["cache", "build", "-d", f"{w}/det", *mask, *dev], what="the stage-2 feature cache"),
        Step("mask-train-streamed", "commands", ["mask-train", "-d", f"{w}/det", "-e", f"{w}/det/emb.h5", *mask, "--ram-budget-gb", "0",
                                                 "--iterations", str(s["mask_iters"]), *dev, "--out", f"{w}/transfer"],
             what="stage 2 from the cache, streamed from disk", check=_streamed),
        Step("train-e2e", "commands", ["train", "--config", "synthetic", *data, *det,
                                       "--iterations", str(s["e2e_iters"]), *dev, "--out", f"{w}/e2e"], what="end to end"),
        Step("seeded-checkpoint", "commands", [f"{w}/tv_r50.pth"], call=seeded_checkpoint, needs=(),
             what="torchvision fasterrcnn_resnet50_fpn, random weights of seed 0, state dict"),
        Step("detect-import", "commands", ["detect-import", "--weights", f"{w}/tv_r50.pth", "--data", f"{w}/world/instances_train.json",
                                           *_sets(f"detector.min_size={s['import_size']}", "detector.max_size=1333"),
                                           "--out", f"{w}/imported"], what=f"the seeded checkpoint at {s['import_size']} px"),
        Step("eval-run", "commands", ["eval", f"{w}/transfer", *backend, "--json", f"{w}/metrics_run.json"], what="run mode"),
        Step("predict-visualize", "commands", ["predict", f"{w}/world/val", "--mask", f"{w}/transfer", "--gt",
                                               f"{w}/world/instances_val.json", "--visualize", "--score-thresh", "0.05", *dev,
                                               "--out", f"{w}/pred"], check=_pictures),
        Step("eval-results", "commands", ["eval", "--gt", f"{w}/world/instances_val.json", "--results", f"{w}/pred/predictions.json",
                                          *backend, "--json", f"{w}/metrics_results.json"], what="results-file mode"),
        Step("torchrun", "commands", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                                      "-m", "maskx_cli", "detect-train", "--config", "synthetic", *data, *det,
                                      "--iterations", str(s["ddp_iters"]), *dev, "--out", f"{w}/det_ddp"], raw=True,
             what=f"detect-train in 1 torchrun process ({'nccl' if device == 'cuda' else 'gloo'})", check=_world_size),
        Step("resume-after-sigterm", "commands", ["detect-train", "--config", "synthetic", *data, *det, *_sets("solver.log_every=1"),
                                                  "--iterations", str(s["resume_iters"]), *dev, "--out", f"{w}/det_resume"],
             what="detect-train stopped by SIGTERM after its first logged iteration, then --resume", action=_resume_after_sigterm),
    ]
    return steps


def _sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def benchmark_steps(a: argparse.Namespace, out: Path, device: str) -> list[Step]:
    steps = []
    for name, (script, smoke, full) in BENCHMARKS.items():
        args = shlex.split((smoke if a.smoke else full).format(cache_gb=a.cache_gb))
        if name == "cache":
            args += ["--dir", a.cache_dir or str(out)]
        steps.append(Step(name, "benchmarks", [sys.executable, str(ROOT / "benchmarks" / script), *args, "--device", device,
                                               "--out", str(out / f"{name}.json")], raw=True, needs=("numpy", "h5py"),
                          limit=a.limit, what=script))
    return steps


def seeded_checkpoint(path: str) -> None:
    """torchvision's fasterrcnn_resnet50_fpn with random weights of seed 0 (no download), as a state dict."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(model.state_dict(), path)
    print(f"seeded fasterrcnn_resnet50_fpn state dict: {path}")


# --------------------------------------------------------------------------------------------
# Checks of a finished step: extra fields for the summary
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _run_dir(step: Step) -> Path:
    return Path(step.argv[step.argv.index("--out") + 1])


def _iterations_per_s(step: Step, rec: dict, log: Path) -> dict:
    """Iterations over the training seconds the run's manifest records (start-up and data loading excluded)."""
    manifest = _read_json(_run_dir(step) / "manifest.json")
    iters = int(step.argv[step.argv.index("--iterations") + 1])
    seconds = manifest.get("seconds")
    return {"iterations": iters, "train_seconds": seconds, "it_per_s": round(iters / seconds, 2) if seconds else None}


def _streamed(step: Step, rec: dict, log: Path) -> dict:
    return {"streamed": "streaming from" in _clean(log.read_text(errors="replace"))}


def _pictures(step: Step, rec: dict, log: Path) -> dict:
    out = _run_dir(step)
    return {"pictures": len(list(out.rglob("*.png"))), "detections": len(_read_json(out / "predictions.json") or [])}


def _world_size(step: Step, rec: dict, log: Path) -> dict:
    manifest = _read_json(_run_dir(step) / "manifest.json")
    return {"world_size": manifest.get("world_size"), "backend": "nccl" if "cuda" in step.argv else "gloo"}


# --------------------------------------------------------------------------------------------
# Running a step
class Forked:
    """A maskx command in a child forked from this process (imports already done); Popen's interface."""

    def __init__(self, argv: list[str], log, call: Callable[..., Any] | None = None) -> None:
        sys.stdout.flush(), sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: output to the log, run the command, exit with its status
            code = 1
            try:
                os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
                if call is not None:
                    call(*argv)
                else:
                    from maskx_cli.main import app

                    app(args=argv, prog_name="maskx")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # noqa: BLE001 - report anything, then leave
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def launch(step: Step, argv: list[str], log, fork: bool, env: dict):
    if step.call is not None:  # a function of this file: forked, or this file run with --call NAME
        if fork:
            return Forked(argv, log, step.call)
        argv = [sys.executable, str(Path(__file__).resolve()), "--call", step.call.__name__, *argv]
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    if step.raw:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    if fork:
        return Forked(argv, log)
    return subprocess.Popen([sys.executable, "-m", "maskx_cli", *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def wait(proc, limit: float, until: Callable[[], bool] | None = None) -> int | None:
    """Exit status of ``proc`` (None: still running at ``limit`` seconds, or when ``until()`` became true)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            return proc.returncode
        if until is not None and until():
            return None
        time.sleep(0.05)
    return proc.poll()


def stop(proc) -> None:
    """End a step over its limit, with its children (its own process group, or the forked child)."""
    if isinstance(proc, Forked):
        proc.kill()
    else:
        with _quiet():
            os.killpg(proc.pid, signal.SIGKILL)
    wait(proc, 30)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)


def run_command(step: Step, argv: list[str], log_path: Path, limit: float, fork: bool, env: dict, mode: str = "w") -> dict:
    """One command: exit status (None: stopped at ``limit``), seconds, its log's last line."""
    t0 = time.perf_counter()
    with open(log_path, mode) as log:
        log.write(f"$ {'' if step.raw or step.call else 'maskx '}{shlex.join(argv)}\n")
        log.flush()
        proc = launch(step, argv, log, fork, env)
        code = wait(proc, limit)
        if code is None:
            stop(proc)
    return {"exit_status": code, "seconds": round(time.perf_counter() - t0, 2), "last_line": last_line(log_path)}


def _resume_after_sigterm(step: Step, log_path: Path, limit: float, fork: bool, env: dict) -> dict:
    """The run stopped by SIGTERM once it has logged an iteration (exit 2, checkpoint saved), then --resume to the end."""
    t0 = time.perf_counter()
    metrics = _run_dir(step) / "metrics.jsonl"
    with open(log_path, "w") as log:
        log.write(f"$ maskx {shlex.join(step.argv)}   # SIGTERM after the first logged iteration\n")
        log.flush()
        proc = launch(step, step.argv, log, fork, env)
        code = wait(proc, limit, until=lambda: metrics.is_file() and metrics.stat().st_size > 0)
        if code is None:
            proc.send_signal(signal.SIGTERM)
            code = wait(proc, max(1.0, limit - (time.perf_counter() - t0)))
            if code is None:
                stop(proc)
    stopped = {"exit_status": code, "last_line": last_line(log_path),
               "stopped_by_sigterm": "stopped by SIGTERM" in _clean(log_path.read_text(errors="replace"))}
    left = max(1.0, limit - (time.perf_counter() - t0))
    resumed = run_command(step, [*step.argv, "--resume"], log_path, left, fork, env, mode="a")
    done = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    ok = stopped["exit_status"] == 2 and stopped["stopped_by_sigterm"] and resumed["exit_status"] == 0
    return {"exit_status": resumed["exit_status"] if ok else (resumed["exit_status"] or 1), "last_line": resumed["last_line"],
            "seconds": round(time.perf_counter() - t0, 2), "stopped": stopped, "resumed": resumed,
            "last_logged_iteration": done[-1]["iteration"] if done else None}


def _clean(text: str) -> str:
    return ANSI.sub("", text)


def last_line(log_path: Path) -> str:
    lines = [x.strip() for x in _clean(log_path.read_text(errors="replace")).replace("\r", "\n").splitlines() if x.strip()]
    return lines[-1][-300:] if lines else ""


def run_step(step: Step, logs: Path, deadline: float, found: dict, fork: bool, env: dict) -> dict:
    """Run one step (or say why not): its record for the summary."""
    command = shlex.join(step.argv) if step.raw else (f"{step.call.__name__}(" + ", ".join(step.argv) + ")" if step.call
                                                        else "maskx " + shlex.join(step.argv))
    rec: dict[str, Any] = {"name": step.name, "group": step.group, "what": step.what, "command": command,
                           "log": f"logs/{step.name}.log"}
    missing = [PACKAGES[m] for m in step.needs if found[PACKAGES[m]] is None]
    left = deadline - time.monotonic()
    if missing:
        return {**rec, "status": "skipped", "exit_status": None, "seconds": 0.0, "last_line": "",
                "reason": f"needs {', '.join(missing)}, not installed"}
    if left < 5:
        return {**rec, "status": "not run", "exit_status": None, "seconds": 0.0, "last_line": "", "reason": "the time budget ran out"}
    limit = min(step.limit, left)
    log = logs / f"{step.name}.log"
    if step.action:
        rec.update(step.action(step, log, limit, fork, env))
    else:
        rec.update(run_command(step, step.argv, log, limit, fork, env))
    code = rec["exit_status"]
    rec["status"] = "ok" if code == 0 else ("timeout" if code is None else "failed")
    if code is None:
        rec["reason"] = f"stopped at its limit of {limit:.0f} s"
    if step.check and code == 0:
        rec.update(step.check(step, rec, log))
    return rec


# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible to torch")
    return name


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start, out = time.monotonic(), Path(a.out).resolve()
    deadline = t_start + a.budget
    device = resolve_device(a.device)
    fork = (a.smoke and device == "cpu") if a.fork is None else a.fork
    if fork and (device != "cpu" or not hasattr(os, "fork")):
        raise SystemExit("error: --fork: only on CPU, where the system can fork")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    found, info = packages(), machine(device)
    (out / "versions.txt").write_text(_versions_line(info) + "\n")
    print(_versions_line(info), flush=True)
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="maskx_acceptance_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if fork:
        import maskx_cli.main  # noqa: F401 - imported once here; every forked command reuses it
    steps = [] if "commands" in a.skip else command_steps(SIZES["smoke" if a.smoke else "full"], work, device, found, a.amp or AMP[device])
    steps += [] if "benchmarks" in a.skip else benchmark_steps(a, out, device)
    summary = {"mode": "smoke" if a.smoke else "full", "device": device, "amp": a.amp or AMP[device], "machine": info,
               "budget_s": a.budget, "sizes": SIZES["smoke" if a.smoke else "full"],
               "launch": "forked from the driver" if fork else "one process per command (python -m maskx_cli)",
               "packages": found, "missing": sorted(k for k, v in found.items() if v is None), "without": missing_notes(found),
               "skipped_groups": sorted(set(a.skip)), "steps": []}
    try:
        for step in steps:
            rec = run_step(step, logs, deadline, found, fork, env)
            summary["steps"].append(rec)
            print(f"== {rec['name']}: {rec['status']} in {rec['seconds']:.1f} s | {rec['last_line'][:120]}", flush=True)
            _write_summary(out, summary, t_start)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    summary = _write_summary(out, summary, t_start)
    print(f"== {'all steps ok' if summary['ok'] else 'some steps failed'} in {summary['seconds']:.0f} s -> {out / 'summary.json'}")
    return 0 if summary["ok"] else 1


def _versions_line(info: dict) -> str:
    where = info.get("gpu") or f"no GPU ({info['cpu']})"
    return (f"python {info['python']} | torch {info['torch']} | torchvision {info['torchvision']} | cuda {info['cuda']} | "
            f"{where} | device {info['device']}")


def _write_summary(out: Path, summary: dict, t_start: float) -> dict:
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    summary["ok"] = all(s["status"] in ("ok", "skipped") for s in summary["steps"])
    summary["counts"] = {k: sum(s["status"] == k for s in summary["steps"]) for k in ("ok", "failed", "timeout", "skipped", "not run")}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "summary.json")
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["--call"]:
        {"seeded_checkpoint": seeded_checkpoint}[sys.argv[2]](*sys.argv[3:])
        sys.exit(0)
    sys.exit(main())
