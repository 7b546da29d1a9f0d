"""The mask side: shapes, per-RoI class selection, T, and the set-A-only mask loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from pipelines.config import DetectorConfig, HeadConfig
from pipelines.errors import MaskxError
from pipelines.modeling.detector import build_detector, detection_weights
from pipelines.modeling.embeddings import detector_embedding, randn_embedding
from pipelines.modeling.mask_heads import PREDICTORS, AgnosticPredictor, OraclePredictor, TransferPredictor
from pipelines.modeling.maskx_rcnn import build_mask_side, build_maskx_rcnn
from pipelines.modeling.transfer import WeightTransfer


def test_transfer_structure():
    t = WeightTransfer(40, 16, hidden=8, layers=2, activation="leaky_relu")
    assert [type(m).__name__ for m in t.mlp] == ["Linear", "LeakyReLU", "Linear"]
    assert t.mlp[1].negative_slope == 0.1
    assert torch.count_nonzero(t.mlp[0].bias) == 0
    assert t(torch.randn(7, 40)).shape == (7, 16)
    assert [type(m).__name__ for m in WeightTransfer(40, 16, layers=1).mlp] == ["Linear"]
    assert len(WeightTransfer(40, 16, layers=3, activation="relu").mlp) == 5
    with pytest.raises(MaskxError, match="1, 2 or 3"):
        WeightTransfer(40, 16, layers=0)


def test_transfer_normalised_input_is_scale_free():
    t = WeightTransfer(10, 4, normalize_input=True).eval()
    w = torch.randn(3, 10)
    assert torch.allclose(t(w), t(5 * w), atol=1e-6)


def test_transfer_normalised_output_has_one_learned_norm():
    """normalize_output: every class's w_seg has norm exp(log_scale), the direction is T's, and the
    scale is trained (it gets a gradient); without it the norms differ per class."""
    torch.manual_seed(0)
    w = torch.randn(5, 10)
    t = WeightTransfer(10, 4, hidden=6, normalize_output=True).eval()
    assert t.log_scale.item() == pytest.approx(math.log(2.0))
    with torch.no_grad():
        t.log_scale.fill_(math.log(3.0))
    out = t(w)
    assert torch.allclose(out.norm(dim=1), torch.full((5,), 3.0), atol=1e-5)
    raw = t.mlp(w)
    assert torch.allclose(out, 3.0 * raw / raw.norm(dim=1, keepdim=True), atol=1e-5)
    out.sum().backward()
    assert t.log_scale.grad is not None and t.log_scale.grad.abs() > 0
    plain = WeightTransfer(10, 4, hidden=6).eval()
    assert plain.log_scale is None
    assert plain(w).norm(dim=1).std() > 0.01
    side = build_mask_side(HeadConfig(head="transfer", normalize_output=True, mask_dim=4, transfer_hidden=6, num_convs=1,
                                      mlp_hidden=8, mlp_input_size=7), 5, 8, w)
    assert side.predictor.transfer.log_scale is not None


@pytest.mark.parametrize("head", ["transfer", "agnostic", "oracle"])
def test_per_roi_logits_equal_full_class_logits(head):
    """One map per RoI for its own class == the K x M x M computation followed by selection."""
    torch.manual_seed(0)
    k, d = 6, 8
    w_det = torch.randn(k, 12)
    t = WeightTransfer(12, d, hidden=5) if head == "transfer" else None
    mlp = dict(mlp=True, mlp_hidden=16, mlp_input_size=7)
    if head == "transfer":
        pred = TransferPredictor(t, w_det, d, 28, **mlp).eval()
    elif head == "agnostic":
        pred = AgnosticPredictor(d, 28, **mlp).eval()
    else:
        pred = OraclePredictor(k, d, 28, **mlp).eval()
    assert type(pred) is PREDICTORS[head]
    feats = torch.randn(5, d, 28, 28)
    labels = torch.tensor([1, 6, 3, 3, 2])
    out = pred(feats, labels)
    if head == "transfer":
        w, b = t(w_det), torch.zeros(k)
    elif head == "agnostic":
        w, b = pred.weight.expand(k, d), pred.bias.expand(k)
    else:
        w, b = pred.weight, pred.bias
    full = F.conv2d(feats, w[:, :, None, None], b)  # [R, K, M, M]
    full = full + pred.mlp(feats)[:, None]
    expected = full[torch.arange(5), labels - 1]
    assert out.shape == (5, 28, 28)
    assert torch.allclose(out, expected, atol=1e-5)


def test_eval_mode_caches_w_seg_table():
    calls = []
    t = WeightTransfer(12, 8, hidden=4)
    t.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pred = TransferPredictor(t, torch.randn(50, 12), 8, 28, mlp=False).eval()
    for _ in range(3):
        pred(torch.randn(4, 8, 28, 28), torch.tensor([1, 2, 3, 4]))
    assert calls == [50]  # once, for the whole table
    pred.train()
    pred(torch.randn(4, 8, 28, 28), torch.tensor([1, 2, 2, 9]))
    assert calls[-1] == 3  # training: only the classes in the batch


def test_mask_loss_only_on_set_a_and_stop_gradient():
    cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, norm="bn", trainable_backbone_layers=5,
                         min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128], box_batch_size_per_image=16)
    torch.manual_seed(0)
    det = build_detector(cfg, 5)
    w_cls, w_box, _, _ = detection_weights(det.roi_heads.box_predictor)
    side = build_mask_side(HeadConfig(mask_dim=8, mlp=False), 5, 16, None, embed_dim=5 * 32)
    model = build_maskx_rcnn(det, side, 14, embedding="cls+box", stop_gradient=True).train()
    img = [torch.rand(3, 64, 64)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    tgt = [{"boxes": torch.tensor([[10.0, 10, 40, 40]]), "labels": torch.tensor([2]), "masks": masks,
            "has_mask": torch.tensor([False])}]
    losses = model(img, tgt)
    assert losses["loss_mask"].item() == 0.0  # the only instance is in set B: no mask loss
    tgt[0]["has_mask"] = torch.tensor([True])
    losses = model(img, tgt)
    assert losses["loss_mask"].item() > 0
    losses["loss_mask"].backward()
    assert det.roi_heads.box_predictor.cls_score.weight.grad is None  # stop-gradient on w_det
    assert side.predictor.transfer.mlp[0].weight.grad is not None
    det.zero_grad()
    model.roi_heads.stop_gradient = False
    model(img, tgt)["loss_mask"].backward()
    g = det.roi_heads.box_predictor.cls_score.weight.grad
    # label 2 is row 2 of cls_score (row 0 is background): only that class's weights get mask gradient
    assert g is not None and g[2].abs().sum() > 0
    assert g[[0, 1, 3, 4, 5]].abs().sum() == 0


def test_a_batch_without_mask_loss_keeps_the_mask_side_in_the_graph_under_a_process_group(tmp_path):
    """Under torchrun every process must give every parameter a gradient (DistributedDataParallel); one process
    keeps a mask side without gradients in such a step, as before (SGD then skips it)."""
    import torch.distributed as tdist

    cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, norm="bn", trainable_backbone_layers=5,
                         min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128], box_batch_size_per_image=16)
    torch.manual_seed(0)
    det = build_detector(cfg, 5)
    side = build_mask_side(HeadConfig(mask_dim=8, mlp=True, mlp_hidden=16, mlp_input_size=7, roi_size=7), 5, 16, None,
                           embed_dim=5 * 32)
    model = build_maskx_rcnn(det, side, 7, embedding="cls+box", stop_gradient=True).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    tgt = [{"boxes": torch.tensor([[10.0, 10, 40, 40]]), "labels": torch.tensor([2]), "masks": masks,
            "has_mask": torch.tensor([False])}]  # the only instance is in set B: no RoI takes the mask loss
    trainable = [name for name, p in side.named_parameters() if p.requires_grad]
    assert any(name.startswith("predictor.mlp") for name in trainable) and any(name.startswith("fcn") for name in trainable)

    sum(model([torch.rand(3, 64, 64)], tgt).values()).backward()
    assert [n for n, p in side.named_parameters() if p.grad is not None] == []  # one process: untouched, as before

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        losses = model([torch.rand(3, 64, 64)], tgt)
    finally:
        tdist.destroy_process_group()
    assert losses["loss_mask"].item() == 0.0
    losses["loss_mask"].backward()
    grads = {n: p.grad for n, p in side.named_parameters() if p.requires_grad}
    assert list(grads) == trainable and all(g is not None and not g.any() for g in grads.values())  # all there, all zero


def test_randn_embedding_fixed_by_seed():
    assert torch.equal(randn_embedding(10, 4, 3), randn_embedding(10, 4, 3))
    assert not torch.equal(randn_embedding(10, 4, 3), randn_embedding(10, 4, 4))


def test_detector_embedding_kinds():
    w_cls, w_box = torch.randn(3, 4), torch.randn(3, 16)
    assert detector_embedding("cls+box", w_cls, w_box).shape == (3, 20)
    assert torch.equal(detector_embedding("box", w_cls, w_box), w_box)
    with pytest.raises(MaskxError):
        detector_embedding("glove", w_cls, w_box)


def test_set_a_rule():
    """A RoI takes the mask loss iff it is foreground, of a mask class, and its instance has a mask."""
    from pipelines.data.splits import label_table, mask_classes, takes_mask_loss

    cats = [{"id": i, "name": f"c{i}"} for i in (5, 7, 9)]
    assert mask_classes(False, [7], cats) == [7] and mask_classes(True, [7], cats) == [5, 7, 9]
    # whether a head trains on every class's masks is its predictor's attribute, not its name
    from pipelines.modeling.mask_heads import PREDICTORS, OraclePredictor, trains_every_class

    assert {h for h in PREDICTORS if trains_every_class(h)} == {"oracle"} and not trains_every_class("no-such-head")

    class PerClassPredictor(OraclePredictor):  # a new head with weights of its own per class
        pass

    PREDICTORS["per_class"] = PerClassPredictor
    try:
        assert trains_every_class("per_class")
    finally:
        del PREDICTORS["per_class"]
    table = label_table([7, 9], cats)
    assert table.tolist() == [False, False, True, True]  # background, 5, 7, 9
    labels = torch.tensor([0, 1, 2, 3, 3])
    assert takes_mask_loss(labels, table).tolist() == [False, False, True, True, True]
    has_mask = torch.tensor([True, True, True, False, True])
    assert takes_mask_loss(labels, table, has_mask).tolist() == [False, False, True, False, True]


def test_maskx_roi_heads_are_built_from_the_detectors_parts():
    """No copying of a base RoIHeads: the same box modules, the same settings, the mask side's modules."""
    torch.manual_seed(0)
    cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, min_size=64, max_size=64,
                         box_batch_size_per_image=16, box_score_thresh=0.2, box_nms_thresh=0.4, box_detections_per_img=7)
    det = build_detector(cfg, 5)
    box = det.roi_heads
    side = build_mask_side(HeadConfig(head="agnostic", mask_dim=8, mlp=False), 5, 16)
    heads = build_maskx_rcnn(det, side, 7).roi_heads
    assert heads.box_roi_pool is box.box_roi_pool and heads.box_head is box.box_head and heads.box_predictor is box.box_predictor
    assert heads.mask_head is side.fcn and heads.mask_predictor is side.predictor
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.2, 0.4, 7)
    assert heads.fg_bg_sampler.batch_size_per_image == 16 and heads.mask_roi_pool.output_size == (7, 7)
    assert heads.mask_labels.tolist() == [False] + [True] * 5  # default: every class's masks train
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(det) == count(det.backbone) + count(det.rpn) + count(box) + count(side)  # shared, not copied


def test_a_new_head_is_one_predictor_class(monkeypatch):
    """The worked example of docs/architecture.md: a subclass registered in PREDICTORS is built, trained
    end to end with live w_det, and counted, with no other change."""
    from torch import nn

    from pipelines.modeling import mask_heads

    class TransferSharedPredictor(mask_heads.TransferPredictor):
        def __init__(self, transfer, w_det, dim, resolution=28, mlp=True, mlp_hidden=1024, mlp_input_size=28, mlp_layers=1):
            super().__init__(transfer, w_det, dim, resolution, mlp, mlp_hidden, mlp_input_size, mlp_layers)
            self.shared = nn.Parameter(torch.zeros(dim))

        def class_mask_weights(self, classes, w_det=None):
            weight, _ = super().class_mask_weights(classes, w_det)
            return weight + self.shared, None

    monkeypatch.setitem(mask_heads.PREDICTORS, "transfer_shared", TransferSharedPredictor)
    head = HeadConfig(head="transfer_shared", mask_dim=8, mlp=False, num_convs=1, transfer_hidden=6, input_dropout=0.0)
    plain = build_mask_side(HeadConfig(**{**head.__dict__, "head": "transfer"}), 5, 16, torch.randn(5, 12))
    side = build_mask_side(head, 5, 16, torch.randn(5, 12))
    assert isinstance(side.predictor, TransferSharedPredictor)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(side) == count(plain) + 8  # T, the body and one shared 8-vector
    with torch.no_grad():
        side.predictor.shared.fill_(1.0)
    x = torch.randn(3, 8, 14, 14)
    labels = torch.tensor([1, 2, 5])
    w = side.predictor.transfer(side.predictor.w_det)[labels - 1] + 1.0
    assert torch.allclose(side.predictor.eval()(x, labels), torch.einsum("rdhw,rd->rhw", x, w), atol=1e-5)
    # end to end, w_det read live from the box predictor, with the stop-gradient
    cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, norm="bn", min_size=64, max_size=64,
                         anchor_sizes=[8, 16, 32, 64, 128], box_batch_size_per_image=16)
    det = build_detector(cfg, 5)
    side = build_mask_side(head, 5, 16, embed_dim=5 * 32)
    model = build_maskx_rcnn(det, side, 7, embedding="cls+box", stop_gradient=True).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 10:40] = 1
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, 10, 40, 40]]), "labels": torch.tensor([2]),
                                                "masks": masks, "has_mask": torch.tensor([True])}])
    losses["loss_mask"].backward()
    assert side.predictor.shared.grad is not None and det.roi_heads.box_predictor.cls_score.weight.grad is None


def test_detector_initialises_as_torchvision_builds_it():
    """The same seed gives the same weights as a FasterRCNN that makes its own RPN head (after the box
    parts): seeded runs (the quick start's numbers) do not move when the builder is rearranged."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from pipelines.modeling.detector import build_backbone

    cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, min_size=64, max_size=64)
    torch.manual_seed(0)
    ours = build_detector(cfg, 5).state_dict()
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    head, predictor = TwoMLPHead(16 * 7 * 7, 32), FastRCNNPredictor(32, 6)
    theirs = FasterRCNN(backbone, None, rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=head,
                        box_predictor=predictor).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
