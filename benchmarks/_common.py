"""Shared helpers of the benchmarks: timing, machine description, tables, JSON out, peak tensor memory."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def add_device_arg(ap) -> None:
    """``--device auto|cpu|cuda`` (auto: the GPU when there is one)."""
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto: cuda if available)")


def pick_device(name: str) -> torch.device:
    """The torch device of ``--device``; exits with one line when cuda is asked for and missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def machine(device: torch.device | None = None) -> dict:
    """Where the numbers come from: CPU / GPU, threads, load, versions, date, the device used."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    if device is not None:
        info["device"] = str(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], steps: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> float:
    """Median seconds of ``fn()`` over ``steps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median seconds of each ``fn`` with the runs interleaved round by round, so a change of machine
    load during the benchmark hits every route alike (ratios stay meaningful on a shared machine)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensors produced by aten ops inside the block (a CPU stand-in for
    ``torch.cuda.max_memory_allocated``; inputs and parameters made before the block not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.current -= self.live.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr == 0 or (ptr in inputs and ptr not in self.live):  # a view of a tensor made before the block
                    continue
                if ptr not in self.live:
                    self.live[ptr] = st.nbytes()
                    self.refs[ptr] = 0
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                self.refs[ptr] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def write_report(out: Path | None, report: dict) -> None:
    if out is not None:
        tmp = Path(out).with_suffix(Path(out).suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
        print(f"\nwrote {out}")


def add_world_options(ap) -> None:
    """The synthetic world's realism options (``SynthConfig`` fields; defaults: the world's)."""
    from pipelines.data.synthetic import APPEARANCES, CLASS_FREQS, SHAPES, SynthConfig

    ap.add_argument("--class-freq", choices=CLASS_FREQS, default=SynthConfig.class_freq, help="class frequencies of the world")
    ap.add_argument("--class-freq-power", type=float, default=SynthConfig.class_freq_power,
                    help="exponent on COCO's instance counts (with --class-freq coco)")
    ap.add_argument("--shapes", choices=SHAPES, default=SynthConfig.shapes, help="random blobs or per-class shape priors")
    ap.add_argument("--appearance", choices=APPEARANCES, default=SynthConfig.appearance, help="flat looks or photo-like scenes")


def world_options(args) -> dict:
    """The ``SynthConfig`` keywords of :func:`add_world_options`'s flags."""
    return {"class_freq": args.class_freq, "class_freq_power": args.class_freq_power, "shapes": args.shapes,
            "appearance": args.appearance}
