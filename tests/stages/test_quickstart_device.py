"""The quick start's stage 1 by device: the stronger detector on CUDA, the recipe's on CPU, explicit flags win.

The device resolution is replaced, so the GPU rule is checked on a machine without one.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.config import DetectTrainConfig, load_config, parse_overrides, stage_overrides, to_dict
from pipelines.stages.sweep_spec import load_spec
from pipelines.evaluation.report import stage1_text
from pipelines.stages import quickstart as qs


def on(monkeypatch, device: str) -> None:
    """``auto`` resolves to ``device``; an explicit device stays itself."""
    monkeypatch.setattr(qs, "resolve_device", lambda name: torch.device(device if name == "auto" else name))


def stage1(spec, overrides) -> DetectTrainConfig:
    """Stage 1's config as the sweep resolves it (the spec's count last, as ``run_sweep`` layers it)."""
    layers = [*stage_overrides(DetectTrainConfig, parse_overrides(overrides))]
    if spec.detector_iterations:
        layers.append({"solver": {"iterations": spec.detector_iterations}})
    return load_config(DetectTrainConfig, spec.recipe, layers)


def sampling(cfg: DetectTrainConfig) -> tuple:
    d = cfg.detector
    return d.rpn_pre_nms_top_n_train, d.rpn_post_nms_top_n_train, d.rpn_batch_size_per_image, d.box_batch_size_per_image


def test_cpu_keeps_the_recipe_stage1_unchanged(monkeypatch):
    on(monkeypatch, "cpu")
    spec = load_spec("quickstart")
    given = ["head.mask_dim=16"]
    new, overrides, applied = qs.stage1_by_device(spec, given)
    assert applied == {} and to_dict(new) == to_dict(spec) and [o.text for o in overrides] == given
    cfg = stage1(new, overrides)
    assert cfg.solver.iterations == 1000 and sampling(cfg) == (300, 150, 64, 32) and cfg.solver.amp == "bf16-native"


def test_cuda_takes_the_stronger_1500_iteration_detector(monkeypatch):
    on(monkeypatch, "cuda")
    spec = load_spec("quickstart")
    new, overrides, applied = qs.stage1_by_device(spec, [])
    assert new.detector_iterations == 1500 and spec.detector_iterations == 0  # the caller's spec is left as it was
    cfg = stage1(new, overrides)
    assert cfg.solver.iterations == 1500 and sampling(cfg) == (600, 300, 128, 64)
    assert applied == {"device": "cuda", "detector_iterations": 1500, "set": list(qs.GPU_STAGE1)}
    assert stage1_text(applied) == "1500 iterations, " + ", ".join(qs.GPU_STAGE1)


def test_on_cuda_explicit_flags_still_win(monkeypatch):
    on(monkeypatch, "cuda")
    spec = load_spec("quickstart")
    spec.detector_iterations = 700
    new, overrides, applied = qs.stage1_by_device(spec, ["detector.box_batch_size_per_image=32"])
    cfg = stage1(new, overrides)
    assert cfg.solver.iterations == 700 and sampling(cfg) == (600, 300, 128, 32)
    assert applied["detector_iterations"] is None and "detector.box_batch_size_per_image=64" not in applied["set"]
    spec.detector_iterations = 0
    new, overrides, applied = qs.stage1_by_device(spec, ["solver.iterations=900"])
    assert new.detector_iterations == 0 and stage1(new, overrides).solver.iterations == 900
    assert sampling(stage1(new, overrides)) == (600, 300, 128, 64)


def test_a_cuda_machine_told_to_train_on_cpu_keeps_the_recipe(monkeypatch):
    on(monkeypatch, "cuda")
    spec = load_spec("quickstart")
    new, overrides, applied = qs.stage1_by_device(spec, ["solver.device=cpu"])
    assert applied == {} and new.detector_iterations == 0 and sampling(stage1(new, overrides)) == (300, 150, 64, 32)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_quickstart_runs_its_sweep_with_the_device_rule(monkeypatch, tmp_path, device):
    on(monkeypatch, device)
    seen = {}

    def fake_sweep(spec, out, progress=None, overrides=(), keep_images=0):
        seen.update(iterations=spec.detector_iterations, overrides=[o.text for o in parse_overrides(overrides)])
        raise _Stop

    monkeypatch.setattr(qs, "run_sweep", fake_sweep)
    with pytest.raises(_Stop):
        qs.quickstart(load_spec("quickstart"), tmp_path, overrides=["head.mask_dim=16"])
    if device == "cpu":
        assert seen == {"iterations": 0, "overrides": ["head.mask_dim=16"]}
    else:
        assert seen == {"iterations": 1500, "overrides": [*qs.GPU_STAGE1, "head.mask_dim=16"]}
