"""Several maskx processes on one machine: a stage-2 step loop alone, then two copies side by side.

Each copy is a separate process running the synthetic recipe's mask side (1-conv FCN of 32
channels on 64-channel 14x14 RoI features, 2-layer MLP branch, transfer predictor, 64 RoIs a step)
forward + backward + SGD for ``--seconds`` after a warm-up, and reports its steps per second. Two
thread settings are compared:

  torch    torch's own: as many OpenMP threads as cores, OpenMP's default spin-then-sleep waiting
           (what maskx did before its thread rule);
  maskx    the rule of ``pipelines/threads.py`` (threads = cores / local processes, idle threads
           sleep: ``OMP_WAIT_POLICY=PASSIVE``), as the CLI applies it at start.

For each: the rate of one copy alone, of each of two side by side, and ``ratio`` = the slower of
the two over the one alone (a fair share of the cores gives 0.5 when the copy alone used them all).
The machine's load average is recorded before and after: other work on the machine skews every
number.

    uv run python benchmarks/bench_concurrent.py --out bench_concurrent.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("torch", "maskx")


def worker(seconds: float, warmup: int) -> None:
    """One copy: steps per second of the stage-2 step loop, as one JSON line on stdout."""
    sys.path.insert(0, str(ROOT))
    import torch

    from pipelines.config import HeadConfig
    from pipelines.modeling.maskx_rcnn import build_mask_side, mask_loss

    torch.manual_seed(0)
    head = HeadConfig(mask_dim=32, num_convs=1, mlp_layers=2, mlp_hidden=256, mlp_input_size=14, transfer_hidden=256,
                      roi_size=14, normalize_input=True, input_dropout=0.7)
    k, rois = 80, 64
    side = build_mask_side(head, k, 64, torch.randn(k, 256))
    opt = torch.optim.SGD(side.parameters(), lr=0.01, momentum=0.9)
    x, labels = torch.randn(rois, 64, 14, 14), torch.randint(1, k + 1, (rois,))
    targets = (torch.rand(rois, 28, 28) > 0.5).float()

    def step() -> None:
        loss = mask_loss(side(x, labels), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    print(json.dumps({"it_per_s": n / (time.perf_counter() - t0), "threads": torch.get_num_threads(),
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}), flush=True)


def mode_env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                             "MASKX_THREADS", "LOCAL_WORLD_SIZE")}
    if mode == "maskx":
        sys.path.insert(0, str(ROOT))
        from pipelines.threads import configure_threads

        configure_threads(env)
    return env


def run_copies(mode: str, copies: int, seconds: float, warmup: int) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seconds", str(seconds), "--warmup", str(warmup)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=mode_env(mode)) for _ in range(copies)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"error: a copy failed (exit status {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per copy (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--modes", default=",".join(MODES), help="thread settings to compare: torch,maskx")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.seconds, args.warmup)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"error: --modes: unknown setting '{unknown[0]}' (known: {', '.join(MODES)})")
    report = {"machine": {"cpu_count": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
                          "load_average_1m_before": round(os.getloadavg()[0], 2)},
              "seconds": args.seconds, "modes": {}}
    for mode in modes:
        alone = run_copies(mode, 1, args.seconds, args.warmup)[0]
        pair = run_copies(mode, 2, args.seconds, args.warmup)
        slower = min(p["it_per_s"] for p in pair)
        report["modes"][mode] = {"threads": alone["threads"], "omp_wait_policy": alone["omp_wait_policy"] or "(OpenMP default)",
                                 "alone_it_per_s": round(alone["it_per_s"], 2),
                                 "side_by_side_it_per_s": [round(p["it_per_s"], 2) for p in pair],
                                 "ratio": round(slower / alone["it_per_s"], 3)}
        r = report["modes"][mode]
        print(f"{mode:6s} threads {r['threads']}, wait {r['omp_wait_policy']}: alone {r['alone_it_per_s']} it/s, "
              f"side by side {r['side_by_side_it_per_s']} it/s, ratio {r['ratio']}", flush=True)
    report["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
