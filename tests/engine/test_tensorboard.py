"""TensorBoard: the same scalars as metrics.jsonl, in RUN/tb/."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipelines.config import SolverConfig
from pipelines.engine.loop import Trainer


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    cfg = SolverConfig(iterations=4, warmup_iters=0, lr=0.05, batch_size=8, reference_batch_size=8, log_every=2,
                       checkpoint_every=0, device="cpu")
    Trainer(model, cfg, tmp_path, "test").run(lambda it: {"loss_l2": ((model(x) - y) ** 2).mean()})

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "loss_l2", "lr"}
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [2, 4]
    for key in ("loss", "loss_l2", "lr"):
        scalars = acc.Scalars(key)
        assert [s.step for s in scalars] == [2, 4]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in lines], rel=1e-6)
