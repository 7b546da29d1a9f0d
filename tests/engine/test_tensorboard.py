"""TensorBoard: the same scalars as metrics.jsonl, in RUN/tb/."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipelines.config import SolverConfig
from pipelines.engine.loop import Trainer


def regression(log_every: int, checkpoint_every: int = 0):
    """A linear model, its 4-iteration solver settings and its step (the mean squared error on fixed data)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    cfg = SolverConfig(iterations=4, warmup_iters=0, lr=0.05, batch_size=8, reference_batch_size=8, log_every=log_every,
                       checkpoint_every=checkpoint_every, device="cpu")
    return model, cfg, lambda it: {"loss_l2": ((model(x) - y) ** 2).mean()}


def logged_steps(run) -> list[int]:
    """The steps of the TensorBoard scalars of ``run``, checked to be metrics.jsonl's iterations and values."""
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "loss_l2", "lr"}
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "loss_l2", "lr"):
        scalars = acc.Scalars(key)
        assert [s.step for s in scalars] == [r["iteration"] for r in lines], key
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in lines], rel=1e-6)
    return [r["iteration"] for r in lines]


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    model, cfg, step = regression(log_every=2)
    Trainer(model, cfg, tmp_path, "test").run(step)
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert logged_steps(tmp_path) == [2, 4]


def test_after_a_resume_every_logged_step_appears_once(tmp_path):
    """Was: the point logged at the checkpoint's own iteration was purged on resume (purge_step off by one)."""
    model, cfg, step = regression(log_every=1, checkpoint_every=2)

    def crash_in_iteration_3(it):
        if it == 2:  # after the checkpoint at iteration 2
            raise RuntimeError("crash")
        return step(it)

    with pytest.raises(RuntimeError, match="crash"):
        Trainer(model, cfg, tmp_path, "test").run(crash_in_iteration_3)
    resumed = Trainer(model, cfg, tmp_path, "test")
    assert resumed.resume() and resumed.start_iter == 2
    resumed.run(step)
    assert logged_steps(tmp_path) == [1, 2, 3, 4]


def test_the_summary_loss_is_the_mean_of_the_last_log_every_iterations(tmp_path):
    from maskx_cli.console import training_summary

    losses = iter([4.0, 3.0, 2.0, 1.0, 0.5])
    model = torch.nn.Linear(1, 1)
    cfg = SolverConfig(iterations=5, warmup_iters=0, lr=0.0, batch_size=1, reference_batch_size=1, log_every=2,
                       checkpoint_every=0, device="cpu")
    stats = Trainer(model, cfg, tmp_path, "test").run(lambda it: {"loss_x": model.weight.sum() * 0 + next(losses)})
    assert stats.loss_window == 2 and stats.mean_loss_last_window == pytest.approx(0.75)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == pytest.approx(0.5)
    stats.seconds = 12.0
    assert training_summary(stats) == "5 iterations in 12 s, mean loss of the last 2 iterations 0.750"
