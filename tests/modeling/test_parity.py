"""The mask side as the original code builds it: MLP branch size, T's initialisation, HeadConfig defaults."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.config import HeadConfig, MaskTrainConfig, load_config
from pipelines.errors import MaskxError
from pipelines.modeling.mask_heads import MLPMaskBranch
from pipelines.modeling.maskx_rcnn import build_mask_side
from pipelines.modeling.transfer import WeightTransfer

# one FC layer 256 x 28 x 28 -> 28 x 28 (weights + biases)
OFFICIAL_MLP = 256 * 28 * 28 * 28 * 28 + 28 * 28
TWO_LAYER_MLP = (256 * 28 * 28 * 1024 + 1024) + (1024 * 28 * 28 + 28 * 28)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("recipe", ["coco_voc_r50", "coco_nonvoc_r50", "coco_voc_r101", "vg3k_r101", "lvis_r50", "coco_voc_tv_r50"])
def test_real_data_recipes_build_the_official_mlp_branch(recipe):
    head = load_config(MaskTrainConfig, recipe).head
    with torch.device("meta"):  # shapes only: 157 M parameters need no memory
        side = build_mask_side(head, 80, 256, torch.zeros(80, 5 * 1024))
    mlp = side.predictor.mlp
    assert mlp.layers == 1 and mlp.input_size == 28
    assert n_params(mlp) == OFFICIAL_MLP == 157_352_720  # "about 157.4 M"
    assert tuple(mlp.fc.weight.shape) == (28 * 28, 256 * 28 * 28)


@pytest.mark.parametrize("recipe", ["coco_voc_r50", "coco_nonvoc_r50", "coco_voc_r101", "vg3k_r101", "lvis_r50", "coco_voc_tv_r50"])
def test_real_data_recipes_train_stage_2_as_the_official_code(recipe):
    """Flipped copies and Detectron's RoI sampler (25% of 512 RoIs foreground, IoU >= 0.5) in every real-data recipe."""
    cfg = load_config(MaskTrainConfig, recipe)
    assert cfg.data.hflip is True
    assert (cfg.cache.sampling, cfg.cache.rois_per_image, cfg.cache.fg_fraction, cfg.cache.min_iou) == ("detectron", 512, 0.25, 0.5)
    assert cfg.head.transfer_init == "fan_out"


def test_two_layer_mlp_branch_is_an_option():
    head = load_config(MaskTrainConfig, "coco_voc_r50", ["head.mlp_layers=2"]).head
    with torch.device("meta"):
        side = build_mask_side(head, 80, 256, torch.zeros(80, 5 * 1024))
    assert n_params(side.predictor.mlp) == TWO_LAYER_MLP == 206_325_520


def test_mlp_branch_init_and_forward():
    torch.manual_seed(0)
    one = MLPMaskBranch(16, resolution=28, input_size=14, layers=1)
    assert one.fc.weight.std().item() == pytest.approx(0.001, rel=0.02)  # GaussianFill std 0.001
    assert torch.count_nonzero(one.fc.bias) == 0
    assert not hasattr(one, "fc1")
    two = MLPMaskBranch(16, resolution=28, hidden=64, input_size=14, layers=2)
    assert two.fc2.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert two.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / (16 * 14 * 14)), rel=0.02)
    x = torch.randn(3, 16, 28, 28)
    assert one(x).shape == two(x).shape == (3, 28, 28)
    with pytest.raises(MaskxError, match="mlp_layers must be 1 or 2"):
        MLPMaskBranch(16, layers=3)


def _stds(t: WeightTransfer) -> list[float]:
    return [m.weight.std().item() for m in t.mlp if isinstance(m, nn.Linear)]


def test_transfer_init_is_caffe2_msra_fill_by_fan_out():
    """Caffe2's MSRAFill: N(0, 2 / fan_out), fan_out = the FC layer's output size (the original code's T).

    The COCO recipe's T (cls+box: 5,120 -> 256 -> 256): both layers std sqrt(2/256); with fan-in the
    first layer would start sqrt(5120/256) = 4.5x smaller.
    """
    torch.manual_seed(0)
    head = load_config(MaskTrainConfig, "coco_voc_r50", ["head.mlp=false"]).head  # T alone
    t = build_mask_side(head, 80, 256, torch.randn(80, 5 * 1024)).predictor.transfer
    assert head.transfer_init == "fan_out"
    assert _stds(t) == pytest.approx([math.sqrt(2 / 256)] * 2, rel=0.02)
    assert all(torch.count_nonzero(m.bias) == 0 for m in t.mlp if isinstance(m, nn.Linear))
    fan_in = WeightTransfer(5 * 1024, 256, hidden=256, layers=2, init="fan_in")
    assert _stds(fan_in) == pytest.approx([math.sqrt(2 / 5120), math.sqrt(2 / 256)], rel=0.02)
    assert _stds(t)[0] / _stds(fan_in)[0] == pytest.approx(math.sqrt(20), rel=0.03)
    # a small head: 256 -> 64 -> 64 -> 32 (3 layers): by output size 64, 64, 32
    small = WeightTransfer(256, 32, hidden=64, layers=3)
    assert _stds(small) == pytest.approx([math.sqrt(2 / 64), math.sqrt(2 / 64), math.sqrt(2 / 32)], rel=0.05)
    with pytest.raises(MaskxError, match="unknown transfer init 'xavier'"):
        WeightTransfer(8, 4, init="xavier")


def test_head_config_defaults_are_the_papers():
    """Built without a recipe: the paper's T (no input normalisation, no dropout), the 1-FC MLP branch."""
    for head in (HeadConfig(), load_config(MaskTrainConfig).head):
        assert (head.normalize_input, head.input_dropout, head.normalize_output) == (False, 0.0, False)
        assert (head.mlp_layers, head.transfer_init, head.transfer_layers, head.transfer_activation) == (1, "fan_out", 2, "leaky_relu")
        assert (head.mask_dim, head.num_convs, head.roi_size, head.mlp_input_size) == (256, 4, 14, 28)
    t = build_mask_side(HeadConfig(mask_dim=8, num_convs=1), 5, 8, torch.randn(5, 12)).predictor.transfer
    assert t.normalize_input is False and isinstance(t.dropout, nn.Identity)
    # the synthetic recipe sets its own regularisation (docs/synthetic_world.md)
    syn = load_config(MaskTrainConfig, "synthetic").head
    assert (syn.normalize_input, syn.input_dropout) == (True, 0.7)


def test_mask_checkpoint_without_mlp_layers_loads_as_two_layer(tmp_path):
    """Heads saved before ``mlp_layers`` existed had the 2-layer branch: they still load."""
    from pipelines.config import to_dict
    from pipelines.checkpoint import save_checkpoint
    from pipelines.engine.run_dir import load_mask_run

    head = HeadConfig(mask_dim=8, num_convs=1, mlp_layers=2, mlp_hidden=16, mlp_input_size=7, roi_size=7)
    side = build_mask_side(head, 5, 8, torch.randn(5, 12))
    saved = to_dict(head)
    del saved["mlp_layers"], saved["transfer_init"]
    categories = [{"id": i + 1, "name": f"c{i}"} for i in range(5)]
    save_checkpoint(tmp_path / "mask_final.pth", "mask", model=side.state_dict(), config={"data": {}}, head=saved,
                    categories=categories, set_a=[1, 2], detector_sha256="0" * 64, embed_dim=12, in_channels=8, iteration=1)
    loaded = load_mask_run(tmp_path).side
    assert loaded.predictor.mlp.layers == 2 and torch.equal(loaded.predictor.mlp.fc1.weight, side.predictor.mlp.fc1.weight)
