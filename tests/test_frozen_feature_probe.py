"""benchmarks/frozen_feature_probe.py: the oracle predictor trained on a finished head's frozen FCN and MLP branch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint import load_checkpoint
from pipelines.errors import MaskxError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "frozen_feature_probe.py"
TINY = ["solver.iterations=3", "solver.warmup_iters=1", "solver.batch_size=16"]


@pytest.fixture(scope="module")
def probe_module():
    spec = importlib.util.spec_from_file_location("frozen_feature_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_keeps_the_source_features_and_learns_every_class(probe_module, tiny_pipeline, tmp_path):
    import pipelines.stages.mask_train as mask_train_stage

    library_build = mask_train_stage.build_mask_side
    source = tiny_pipeline["runs"]["transfer"]
    run = probe_module.train_probe(source, tiny_pipeline["detector"], tiny_pipeline["embeddings"], tmp_path, extra=TINY)
    assert mask_train_stage.build_mask_side is library_build  # the library is left as it was (given a built side, not patched)

    before = load_checkpoint(source / "mask_final.pth", "mask")["model"]
    after = load_checkpoint(run / "mask_final.pth", "mask")
    frozen = [k for k in before if k.startswith(probe_module.FROZEN)]
    assert frozen and any(k.startswith("predictor.mlp.") for k in frozen)
    for k in frozen:
        assert torch.equal(after["model"][k], before[k]), k
    assert after["head"]["head"] == "oracle" and after["model"]["predictor.weight"].shape[0] == 80
    assert len(after["set_a"]) == 20  # trained on every class's masks, set A still recorded as voc


def test_probe_refuses_a_head_of_another_shape(probe_module, tiny_pipeline, tmp_path):
    source = tiny_pipeline["runs"]["transfer"]
    with pytest.raises(MaskxError, match="does not fit this head"):
        probe_module.train_probe(source, tiny_pipeline["detector"], tiny_pipeline["embeddings"], tmp_path,
                                 extra=TINY + ["head.mask_dim=8"])
    assert not (tmp_path / f"probe_{source.name}_s0" / "mask_final.pth").exists()
