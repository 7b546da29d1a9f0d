"""Settings whose original-code value is the real-data recipes' default, maskx's earlier one a setting away."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss

from torch import nn

from pipelines.config import DetectorConfig, DetectTrainConfig, HeadConfig, MaskTrainConfig, TrainE2EConfig, load_config
from pipelines.config import CacheConfig
from pipelines.rois.extract import extract_rois, rpn_keeping
from pipelines.rois.sampling import sampling_settings
from pipelines.engine.solver import build_optimizer, build_scheduler
from pipelines.modeling.embeddings import class_embedding_table
from pipelines.modeling.detector import BoxRoIHeads, box_losses, build_box_predictor, build_detector
from pipelines.modeling import maskx_rcnn
from pipelines.modeling.maskx_rcnn import MASK_TARGETS, build_mask_roi_pool, build_mask_side, build_maskx_rcnn
from tests.stages.test_variants import _toy_batch

DETECT_RECIPES = ["coco_voc_r50", "coco_nonvoc_r50", "coco_voc_r101", "vg3k_r101", "lvis_r50"]
E2E_RECIPES = ["coco_voc_r50_e2e", "coco_nonvoc_r50_e2e", "coco_voc_r101_e2e", "coco_nonvoc_r101_e2e"]
REAL_RECIPES = DETECT_RECIPES + E2E_RECIPES + ["coco_voc_tv_r50"]


def _detector_config(recipe: str) -> DetectorConfig:
    if recipe in DETECT_RECIPES:
        return load_config(DetectTrainConfig, recipe, section="detect_train").detector
    return load_config(TrainE2EConfig, recipe).detector


# ------------------------------------------------------------------ 1. the box predictor and its loss
@pytest.mark.parametrize("recipe", DETECT_RECIPES + E2E_RECIPES)
def test_real_data_recipes_init_the_box_predictor_as_detectron(recipe):
    cfg = _detector_config(recipe)
    assert (cfg.predictor_init, cfg.box_loss_beta) == ("detectron", 1.0)
    torch.manual_seed(0)
    pred = build_box_predictor(cfg, 80)
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert pred.cls_score.weight.mean().abs().item() < 0.001 and pred.bbox_pred.weight.mean().abs().item() < 0.0001
    assert torch.count_nonzero(pred.cls_score.bias) == 0 and torch.count_nonzero(pred.bbox_pred.bias) == 0


def test_a_whole_recipe_detector_has_detectron_predictor_and_box_loss():
    torch.manual_seed(0)
    model = build_detector(_detector_config("coco_voc_r50"), 80, pretrained=False)
    pred = model.roi_heads.box_predictor
    assert isinstance(model.roi_heads, BoxRoIHeads) and model.roi_heads.box_loss_beta == 1.0
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert torch.count_nonzero(pred.cls_score.bias) == 0 and torch.count_nonzero(pred.bbox_pred.bias) == 0


def test_torchvision_init_and_beta_are_one_setting_away_and_the_synthetic_recipe_has_detectrons():
    syn = load_config(DetectTrainConfig, "synthetic", section="detect_train").detector
    assert (syn.predictor_init, syn.box_loss_beta) == ("detectron", 1.0)  # measured on world seed 0 (docs/parity.md)
    old = load_config(DetectTrainConfig, "synthetic", ["detector.predictor_init=torchvision",
                                                       f"detector.box_loss_beta={1 / 9}"], section="detect_train").detector
    assert (old.predictor_init, old.box_loss_beta) == ("torchvision", pytest.approx(1 / 9))
    cfg = load_config(DetectTrainConfig, "coco_voc_r50", ["detector.predictor_init=torchvision"], section="detect_train").detector
    torch.manual_seed(0)
    pred = build_box_predictor(cfg, 80)
    bound = 1 / math.sqrt(1024)  # nn.Linear's default: uniform within 1/sqrt(fan_in)
    assert pred.cls_score.weight.abs().max().item() <= bound and pred.bbox_pred.bias.abs().max().item() <= bound
    assert pred.cls_score.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # ~0.018
    assert torch.count_nonzero(pred.cls_score.bias) > 0


def test_imported_detector_keeps_torchvision_predictor_with_detectron_box_loss():
    cfg = load_config(TrainE2EConfig, "coco_voc_tv_r50").detector
    assert (cfg.predictor_init, cfg.box_loss_beta) == ("torchvision", 1.0)


def _loss_case():
    # 3 RoIs, K + 1 = 3 classes; RoI 0 foreground of class 2, RoI 1 of class 1, RoI 2 background
    logits = torch.tensor([[0.1, 0.2, 2.0], [0.0, 1.0, -1.0], [3.0, 0.0, 0.0]])
    deltas = torch.zeros(3, 12)
    deltas[0, 8:12] = torch.tensor([0.05, -0.5, 2.0, 0.0])  # class 2's deltas of RoI 0
    deltas[1, 4:8] = torch.tensor([0.3, 0.0, -1.5, 0.1])  # class 1's deltas of RoI 1
    deltas[2] = 7.0  # background: no box loss
    labels = [torch.tensor([2, 1]), torch.tensor([0])]
    targets = [torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]]), torch.tensor([[9.0, 9.0, 9.0, 9.0]])]
    return logits, deltas, labels, targets


def test_box_loss_uses_the_configured_beta_by_hand():
    logits, deltas, labels, targets = _loss_case()
    # differences of the two foreground RoIs: 0.05, -0.5, 2.0, 0.0 and 0.3, -0.5, -1.5, 0.1
    diffs = [0.05, 0.5, 2.0, 0.0, 0.3, 0.5, 1.5, 0.1]
    beta1 = sum(0.5 * d * d if d < 1 else d - 0.5 for d in diffs) / 3  # summed, divided by the 3 RoIs
    beta9 = sum(0.5 * d * d * 9 if d < 1 / 9 else d - 0.5 / 9 for d in diffs) / 3
    assert box_losses(logits, deltas, labels, targets, 1.0)["loss_box_reg"].item() == pytest.approx(beta1, rel=1e-6)
    assert box_losses(logits, deltas, labels, targets, 1 / 9)["loss_box_reg"].item() == pytest.approx(beta9, rel=1e-6)
    # 0.00125 + 0.125 + 1.5 + 0 + 0.045 + 0.125 + 1.0 + 0.005 (quadratic below 1, linear above)
    assert beta1 == pytest.approx(2.80125 / 3, rel=1e-9)
    ce = F.cross_entropy(logits, torch.tensor([2, 1, 0])).item()
    assert box_losses(logits, deltas, labels, targets, 1.0)["loss_classifier"].item() == pytest.approx(ce)
    # at torchvision's beta it is torchvision's own loss
    tv_cls, tv_box = fastrcnn_loss(logits, deltas, labels, targets)
    ours = box_losses(logits, deltas, labels, targets, 1 / 9)
    assert torch.equal(ours["loss_classifier"], tv_cls) and torch.equal(ours["loss_box_reg"], tv_box)


def _toy_detector_config(beta: float) -> DetectorConfig:
    return DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, min_size=64, max_size=64,
                          rpn_post_nms_top_n_train=50, box_batch_size_per_image=16, box_loss_beta=beta,
                          predictor_init="detectron")


def _smooth_l1_betas(monkeypatch) -> list[float]:
    """Record the beta of every smooth-L1 loss computed (the RPN's 1/9 and the box head's)."""
    seen: list[float] = []
    real = F.smooth_l1_loss

    def recording(*args, beta=1.0, **kwargs):
        seen.append(beta)
        return real(*args, beta=beta, **kwargs)

    monkeypatch.setattr(F, "smooth_l1_loss", recording)
    return seen


@pytest.mark.parametrize("end_to_end", [False, True])
def test_detect_train_and_end_to_end_train_with_the_configured_beta(monkeypatch, end_to_end):
    torch.manual_seed(0)
    model = build_detector(_toy_detector_config(1.0), 5)
    if end_to_end:
        h = HeadConfig(head="transfer", mlp=False, mask_dim=8, num_convs=1, roi_size=7)
        model = build_maskx_rcnn(model, build_mask_side(h, 5, 16, None, embed_dim=5 * 32), 7, "cls+box")
        assert type(model.roi_heads).__name__ == "MaskXRoIHeads"
    assert model.roi_heads.box_loss_beta == 1.0
    seen = _smooth_l1_betas(monkeypatch)
    images, targets = _toy_batch()
    losses = model.train()(images, targets)
    assert sorted(seen) == [1 / 9, 1.0]  # the RPN's (torchvision's, as Detectron's FPN RPN) and the box head's
    assert float(losses["loss_box_reg"].detach()) > 0 and ("loss_mask" in losses) == end_to_end


# ------------------------------------------------------------------ 2. biases: 2x the LR, no weight decay
def _solvers(recipe: str):
    if recipe in E2E_RECIPES:
        return [load_config(TrainE2EConfig, recipe).solver]
    mask = load_config(MaskTrainConfig, recipe).solver
    return [mask] if recipe == "coco_voc_tv_r50" else [load_config(DetectTrainConfig, recipe, section="detect_train").solver, mask]


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 2))


@pytest.mark.parametrize("recipe", REAL_RECIPES)
def test_real_data_recipes_give_biases_twice_the_lr_and_no_weight_decay(recipe):
    for solver in _solvers(recipe):
        assert (solver.bias_lr_factor, solver.bias_weight_decay_factor) == (2.0, 0.0)
        model = _toy_model()
        weights, biases = build_optimizer(model, solver).param_groups
        lr = solver.effective_lr()
        assert (weights["lr"], weights["weight_decay"]) == (lr, 1e-4)
        assert (biases["lr"], biases["weight_decay"]) == (2 * lr, 0.0)
        conv, bn, _, fc = model
        assert {id(p) for p in biases["params"]} == {id(conv.bias), id(fc.bias)}
        assert {id(p) for p in weights["params"]} == {id(conv.weight), id(fc.weight), id(bn.weight), id(bn.bias)}


def test_bias_step_by_hand_and_through_the_schedule():
    solver = load_config(DetectTrainConfig, "coco_voc_r50", ["solver.warmup_iters=0", "solver.momentum=0"],
                         section="detect_train").solver
    model = _toy_model()
    conv, _, _, fc = model
    w0, b0 = fc.weight.detach().clone(), fc.bias.detach().clone()
    opt = build_optimizer(model, solver)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    fc.bias.grad = torch.full_like(fc.bias, 0.5)
    opt.step()
    # SGD: p <- p - lr * (g + wd * p); biases at 2 x 0.02 without decay, weights at 0.02 with 1e-4
    assert torch.allclose(fc.bias.detach(), b0 - 2 * 0.02 * 0.5)
    assert torch.allclose(fc.weight.detach(), w0 * (1 - 0.02 * 1e-4))
    recipe = load_config(DetectTrainConfig, "coco_voc_r50", section="detect_train").solver
    opt = build_optimizer(model, recipe)
    sched = build_scheduler(opt, recipe)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 / 3, 0.04 / 3])  # warm-up from 1/3
    opt.step()
    for _ in range(70000):  # past the first step (x0.1 at 60k)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.002, 0.004])


def test_synthetic_recipe_puts_biases_apart_one_group_one_setting_away_and_a_detector_puts_its_biases_apart():
    for solver in (load_config(DetectTrainConfig, "synthetic", section="detect_train").solver,
                   load_config(MaskTrainConfig, "synthetic").solver):
        assert (solver.bias_lr_factor, solver.bias_weight_decay_factor) == (2.0, 0.0)  # measured on world seed 0
        assert len(build_optimizer(_toy_model(), solver).param_groups) == 2
    one = load_config(MaskTrainConfig, "synthetic", ["solver.bias_lr_factor=1", "solver.bias_weight_decay_factor=1"]).solver
    assert len(build_optimizer(_toy_model(), one).param_groups) == 1
    cfg = load_config(DetectTrainConfig, "coco_voc_r50", section="detect_train")
    model = build_detector(_toy_detector_config(1.0), 5)
    weights, biases = build_optimizer(model, cfg.solver).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".bias") for p in biases["params"])
    assert {"roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.bbox_pred.bias", "rpn.head.cls_logits.bias"} <= {
        names[id(p)] for p in biases["params"]}
    assert all(not names[id(p)].endswith(".bias") for p in weights["params"])  # frozen BN: no trainable norm params


# ------------------------------------------------------------------ 3. Table 3.1's randn
def _randn_table(cfg, seed=3):
    names = [f"c{i}" for i in range(80)]
    return class_embedding_table(cfg.head, torch.zeros(80, 1024), torch.zeros(80, 4096), names, seed)[0]


@pytest.mark.parametrize("recipe", ["coco_voc_r50", "vg3k_r101", "lvis_r50", "coco_voc_tv_r50"])
def test_real_data_recipes_draw_randn_as_300_d_unit_rows(recipe):
    cfg = load_config(MaskTrainConfig, recipe, ["head.input=randn"])
    table = _randn_table(cfg)
    assert cfg.head.randn == "unit" and table.shape == (80, 300)
    assert torch.allclose(table.norm(dim=1), torch.ones(80), atol=1e-6)
    assert torch.equal(table, _randn_table(cfg)) and not torch.equal(table, _randn_table(cfg, seed=4))
    # near-orthogonal random directions, as the original file's (cosine sd 0.061 there)
    cos = table @ table.T
    assert cos[~torch.eye(80, dtype=torch.bool)].std().item() == pytest.approx(1 / math.sqrt(300), rel=0.15)
    side = build_mask_side(cfg.head, 80, 256, table)
    assert side.predictor.transfer.mlp[0].in_features == 300


@pytest.mark.parametrize("recipe, overrides", [("synthetic", []), ("coco_voc_r50", ["head.randn=gaussian"])])
def test_gaussian_randn_is_one_setting_away_and_the_synthetic_recipes(recipe, overrides):
    table = _randn_table(load_config(MaskTrainConfig, recipe, ["head.input=randn", *overrides]))
    assert table.shape == (80, 5 * 1024)  # as wide as cls+box
    assert table.std().item() == pytest.approx(1.0, rel=0.01) and table.norm(dim=1).mean().item() == pytest.approx(math.sqrt(5120), rel=0.01)


# ------------------------------------------------------------------ 4. end-to-end mask targets
@pytest.mark.parametrize("recipe", REAL_RECIPES)
def test_real_data_recipes_train_end_to_end_on_binary_targets(recipe):
    assert load_config(TrainE2EConfig, recipe).head.e2e_mask_targets == "binary"


def test_synthetic_recipe_keeps_soft_targets_and_the_thresholds():
    assert load_config(TrainE2EConfig, "synthetic").head.e2e_mask_targets == "soft"
    t = torch.tensor([[[0.0, 0.25, 0.4999], [0.5, 0.75, 1.0]]])
    assert torch.equal(MASK_TARGETS["binary"](t), torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]))
    assert torch.equal(MASK_TARGETS["soft"](t), t)


@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_end_to_end_mask_loss_sees_the_configured_targets(monkeypatch, kind):
    torch.manual_seed(0)
    h = HeadConfig(head="transfer", mlp=False, mask_dim=8, num_convs=1, roi_size=7)
    model = build_maskx_rcnn(build_detector(_toy_detector_config(1.0), 5), build_mask_side(h, 5, 16, None, embed_dim=5 * 32),
                             7, "cls+box", mask_targets=kind).train()
    seen = []
    real = maskx_rcnn.mask_loss

    def recording(logits, targets):
        seen.append(targets.detach().clone())
        return real(logits, targets)

    monkeypatch.setattr(maskx_rcnn, "mask_loss", recording)
    images, targets = _toy_batch()
    loss = model(images, targets)["loss_mask"]
    (t,) = seen
    assert t.shape[1:] == (14, 14) and len(t) > 0
    fractional = ((t > 0) & (t < 1)).sum().item()
    if kind == "binary":
        assert fractional == 0 and set(t.unique().tolist()) == {0.0, 1.0}
    else:
        assert fractional > 0  # RoIAlign of the mask's edges
    assert float(loss.detach()) > 0


# ------------------------------------------------------------------ 6. stage-2 proposals per image
@pytest.mark.parametrize("recipe", ["coco_voc_r50", "coco_nonvoc_r50", "coco_voc_r101", "vg3k_r101", "lvis_r50", "coco_voc_tv_r50"])
def test_real_data_recipes_draw_stage_2_rois_from_2000_proposals(recipe):
    assert load_config(MaskTrainConfig, recipe).cache.rpn_proposals == 2000


def test_the_detectors_own_proposals_are_one_setting_away_and_keep_the_cache_keys():
    assert load_config(MaskTrainConfig, "synthetic").cache.rpn_proposals == 0
    assert "rpn_proposals" not in sampling_settings(CacheConfig(sampling="detectron"))
    assert sampling_settings(CacheConfig(sampling="detectron", rpn_proposals=2000))["rpn_proposals"] == 2000


def test_the_cache_build_runs_the_rpn_with_the_configured_proposals(monkeypatch):
    torch.manual_seed(0)
    cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, min_size=64, max_size=64,
                         rpn_post_nms_top_n_test=5)
    model = build_detector(cfg, 5).eval()
    images, targets = _toy_batch()
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    with torch.no_grad(), rpn_keeping(model, 40):
        assert [len(p) for p in model.rpn(image_list, features)[0]] == [40, 40]
    assert [len(p) for p in model.rpn(image_list, features)[0]] == [5, 5]  # the detector's own again
    seen = []
    real = model.rpn.forward
    monkeypatch.setattr(model.rpn, "forward", lambda *a: seen.append(model.rpn.post_nms_top_n()) or real(*a))
    for n in (2000, 0):
        extract_rois(model, build_mask_roi_pool(7), images, targets, CacheConfig(sampling="detectron", rpn_proposals=n),
                     torch.Generator().manual_seed(0))
    assert seen == [2000, 5]
