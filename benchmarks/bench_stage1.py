"""Stage-1 (detector training) step time of the synthetic recipe against its earlier settings, in one run.

    uv run python benchmarks/bench_stage1.py --out bench_stage1.json

Each variant is the ``synthetic`` recipe's detector with some keys changed (``--variant
name:key=value,key=value``; default: the recipe until 2026-12-02, steps between it and today's recipe, and today's),
trained with SGD on the same batches of a small synthetic world (batch 8, 128 px). The steps of
all variants are interleaved round by round, so load from other jobs on a shared machine hits
each alike; the report gives the median seconds per step and each variant's speed relative to
the first. ``amp=bf16`` runs the step under CPU bf16 autocast (``solver.amp``); ``bf16-native``
(today's recipe) does so only on CPUs with bf16 instructions (``cpu_has_bf16`` in the report).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from _common import interleaved, machine, print_table, write_report  # noqa: E402  (puts the repo on sys.path)
from pipelines.config import DetectTrainConfig, load_config  # noqa: E402
from pipelines.data.coco import CocoDataset, collate, load_coco  # noqa: E402
from pipelines.data.synthetic import SynthConfig, generate  # noqa: E402
from pipelines.engine.device import autocast, cpu_has_bf16  # noqa: E402
from pipelines.engine.solver import build_optimizer  # noqa: E402
from pipelines.modeling.detector import build_detector  # noqa: E402

BEFORE_RPN = "detector.rpn_pre_nms_top_n_train=600,detector.rpn_post_nms_top_n_train=300,detector.rpn_batch_size_per_image=128"
BEFORE = BEFORE_RPN + ",detector.box_batch_size_per_image=64"  # the recipe's RPN / box-head settings until 2026-12-02
VARIANTS = [
    f"before:{BEFORE},solver.amp=off",  # the recipe until 2026-12-02 (1,500 iterations of this)
    f"before_bf16:{BEFORE},solver.amp=bf16",
    f"box32_only:{BEFORE_RPN},solver.amp=off",  # today's 32 box-head samples, the old RPN settings
    "light_fp32:solver.amp=off",  # today's RPN / box-head settings in full precision
    "recipe:",  # today's recipe: those settings and bf16-native (bf16 on CPUs with bf16 instructions)
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", help="name:key=value,... (repeatable; default: the candidates above)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--images", type=int, default=64, help="training images of the small world the batches come from")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        world = generate(SynthConfig(train_images=args.images, val_images=1), Path(tmp) / "w")
        data, _ = load_coco(world.train_json)
        dataset = CocoDataset(data, world.train_dir, with_masks=False, drop_empty=True)
        batches = [collate([dataset[(8 * b + i) % len(dataset)] for i in range(8)]) for b in range(args.images // 8)]
    steps, names, configs = {}, [], {}
    for spec in args.variant or VARIANTS:
        name, _, keys = spec.partition(":")
        cfg = load_config(DetectTrainConfig, "synthetic", [k for k in keys.split(",") if k], section="detect_train")
        torch.manual_seed(0)
        model = build_detector(cfg.detector, len(data["categories"])).train()
        opt = build_optimizer(model, cfg.solver)
        counter = {"i": 0}

        def step(model=model, opt=opt, amp=cfg.solver.amp, counter=counter) -> None:
            images, targets = batches[counter["i"] % len(batches)]
            counter["i"] += 1
            with autocast(torch.device("cpu"), amp):
                losses = model(list(images), [{k: t[k] for k in ("boxes", "labels")} for t in targets])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        steps[name], configs[name] = step, keys
        names.append(name)
    seconds = interleaved(steps, args.rounds, warmup=2)
    base = seconds[names[0]]
    rows = [[n, seconds[n], 1 / seconds[n], base / seconds[n], configs[n] or "(the recipe)"] for n in names]
    print_table("stage-1 training step, batch 8 at 128 px (median of interleaved rounds)",
                ["variant", "s/step", "it/s", f"speed vs {names[0]}", "changes"], rows)
    write_report(args.out, {"machine": machine(), "cpu_has_bf16": cpu_has_bf16(), "rounds": args.rounds, "baseline": names[0],
                            "variants": {n: {"seconds_per_step": seconds[n], "speed_vs_baseline": base / seconds[n],
                                             "changes": configs[n]} for n in names}})


if __name__ == "__main__":
    main()
