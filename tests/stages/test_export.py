"""maskx export: the baked torchvision Mask R-CNN, TorchScript and ONNX against maskx's own prediction.

Tolerance (docs/deploy.md): the same detections in the same order, boxes within 1e-3 px, scores within
1e-4, at most 0.01% of mask pixels on the other side of the threshold. On these runs the torchvision
model and TorchScript give maskx's numbers exactly; ONNX Runtime's boxes differ by ~1e-5 px.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from typer.testing import CliRunner

from maskx_cli.export import FORMAT_NAMES
from maskx_cli.main import app
from pipelines.config import DetectorConfig, HeadConfig, MaskTrainConfig, load_config
from pipelines.data.coco import read_image
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import load_predictor
from pipelines.modeling.baked import baked_state_dict, check_bakeable, torchvision_builder
from pipelines.modeling.detector import detector_from_state
from pipelines.modeling.maskx_rcnn import build_mask_roi_pool, build_mask_side, detect_and_segment
from pipelines.stages.export import FORMATS, TOLERANCE, export
from pipelines.stages.mask_train import mask_train

pytestmark = pytest.mark.slow
SCORE = 0.0  # the tiny detector's scores are all about 1/81: keep every detection, so there is something to compare


def val_images(world, n: int = 3) -> list[Path]:
    return sorted(Path(world.val_dir).glob("*.png"))[:n]


def maskx_predictions(run: Path, images: list[torch.Tensor]) -> list[dict]:
    return load_predictor(run, device="cpu", score_thresh=SCORE).run(images)


def assert_same(ours: dict, boxes, labels, scores, masks) -> None:
    """Within the stated tolerance: same detections, boxes, scores, labels; masks [N, 1, H, W] probabilities."""
    assert len(ours["boxes"]) == len(boxes) > 0
    assert np.abs(ours["boxes"].numpy() - np.asarray(boxes)).max() <= TOLERANCE.box_px
    assert np.abs(ours["scores"].numpy() - np.asarray(scores)).max() <= TOLERANCE.score
    assert np.array_equal(ours["labels"].numpy(), np.asarray(labels))
    binary = np.asarray(masks)[:, 0] >= 0.5
    assert binary.shape == tuple(ours["masks"].shape)
    assert (binary != ours["masks"].numpy().astype(bool)).mean() <= TOLERANCE.mask_pixels


@pytest.fixture(scope="module")
def no_mlp_run(tiny_pipeline):
    """A transfer head without the MLP branch (3 iterations, on the shared tiny detector)."""
    root = tiny_pipeline["root"]
    over = [o for o in tiny_pipeline["overrides"] if not o.startswith("detector.")]
    cfg = load_config(MaskTrainConfig, "synthetic", over + ["solver.iterations=3", "solver.warmup_iters=1", "solver.batch_size=16",
                                                             "head.mask_dim=16", "head.head=transfer", "head.mlp=false"],
                      section="mask_train")
    mask_train(cfg, root / "det", root / "emb.h5", root / "transfer_nomlp")
    return root / "transfer_nomlp"


@pytest.fixture(scope="module")
def exported_mlp(tiny_pipeline, tiny_world, tmp_path_factory):
    """transfer+MLP exported in all three formats, checked on a validation image."""
    out = tmp_path_factory.mktemp("export") / "transfer"
    result = export(tiny_pipeline["runs"]["transfer"], out, score_thresh=SCORE, check=val_images(tiny_world, 1))
    return result


def torchvision_from_parts(det: dict, num_classes: int, mask_dim: int) -> MaskRCNN:
    """The synthetic recipe's model built from torchvision's parts alone (no maskx code), from the
    detector run's config.yaml: ResNet-18 + FPN, the 2-FC box head, a 1-conv mask FCN of ``mask_dim``."""
    c = det["fpn_channels"]
    body = resnet.resnet18(weights=None)
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [64, 128, 256, 512], c,
                               extra_blocks=LastLevelMaxPool())
    anchors = AnchorGenerator(tuple((s,) for s in det["anchor_sizes"]), ((0.5, 1.0, 2.0),) * 5)
    levels = ["0", "1", "2", "3"]
    return MaskRCNN(
        backbone, num_classes=None, min_size=det["min_size"], max_size=det["max_size"], rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, 3), rpn_pre_nms_top_n_test=det["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=det["rpn_post_nms_top_n_test"], box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(c * 49, det["box_representation"]), box_predictor=FastRCNNPredictor(det["box_representation"], num_classes),
        box_score_thresh=SCORE, box_nms_thresh=det["box_nms_thresh"], box_detections_per_img=det["box_detections_per_img"],
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2), mask_head=MaskRCNNHeads(c, [mask_dim], 1),
        mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, num_classes)).eval()


def test_state_dict_without_mlp_loads_into_torchvision_built_from_parts(tiny_pipeline, tiny_world, no_mlp_run, tmp_path):
    result = export(no_mlp_run, tmp_path / "exp", formats=["torchvision"], score_thresh=SCORE)
    assert list(result.files) == ["torchvision"] and not result.mlp and result.builder is None
    spec = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert spec["mask_predictor"] == "MaskRCNNPredictor" and spec["num_classes"] == 81 and spec["score_thresh"] == SCORE
    assert [c["label"] for c in spec["categories"]] == list(range(1, 81))
    assert {c["id"] for c in spec["categories"] if c["set"] == "A"} == set(spec["set_a"]) and len(spec["set_a"]) == 20
    assert spec["files"]["torchvision"]["bytes"] == (tmp_path / "exp" / "model_torchvision.pth").stat().st_size

    import yaml
    det = yaml.safe_load((tiny_pipeline["detector"] / "config.yaml").read_text())["detector"]
    model = torchvision_from_parts(det, 81, 16)
    state = torch.load(tmp_path / "exp" / "model_torchvision.pth", weights_only=True)
    model.load_state_dict(state)  # strict: every tensor name and shape torchvision's
    assert state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape == (81, 16, 1, 1)
    assert not state["roi_heads.mask_predictor.mask_fcn_logits.weight"][0].any()  # background row
    assert not state["roi_heads.mask_predictor.mask_fcn_logits.bias"].any()  # T gives no bias

    images = [read_image(p) for p in val_images(tiny_world)]
    with torch.no_grad():
        theirs = model(images)
    for ours, d in zip(maskx_predictions(no_mlp_run, images), theirs):
        assert_same(ours, d["boxes"], d["labels"], d["scores"], d["masks"])
        assert torch.equal(ours["boxes"], d["boxes"]) and torch.equal(ours["masks"], (d["masks"][:, 0] >= 0.5).to(torch.uint8))


def test_mlp_branch_exports_to_torchvision_torchscript_and_onnx(tiny_pipeline, tiny_world, exported_mlp):
    r = exported_mlp
    assert set(r.files) == set(FORMATS) == set(FORMAT_NAMES) and r.mlp
    spec = json.loads(r.spec.read_text())
    assert spec["mask_predictor"] == "MLPMaskRCNNPredictor" and spec["onnx"]["opset"] == 17
    for name, path in r.files.items():
        assert spec["files"][name]["bytes"] == path.stat().st_size == r.sizes[name] > 1_000_000
    assert len(spec["checks"]) == 3 and all(row["within_tolerance"] and row["detections"] == 30 for row in spec["checks"])

    state = torch.load(r.files["torchvision"], weights_only=True)
    mlp = {k.rsplit(".mlp.", 1)[1]: v.shape for k, v in state.items() if ".mlp." in k}
    assert mlp == {"fc1.weight": (32, 16 * 14 * 14), "fc1.bias": (32,), "fc2.weight": (784, 32), "fc2.bias": (784,)}

    paths = val_images(tiny_world, 2)
    images = [read_image(p) for p in paths] + [read_image(paths[0])[:, :80, :70].contiguous()]  # another size too
    ours = [maskx_predictions(tiny_pipeline["runs"]["transfer"], [im])[0] for im in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(r.files["torchscript"]))
        with torch.no_grad():
            _, scripted_out = scripted(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(r.files["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores", "masks"]
    for o, s, image in zip(ours, scripted_out, images):
        assert_same(o, s["boxes"], s["labels"], s["scores"], s["masks"])
        boxes, labels, scores, masks = session.run(None, {"image": image.numpy()})
        assert masks.shape == (len(o["boxes"]), 1, *image.shape[1:]) and labels.dtype == np.int64
        assert_same(o, boxes, labels, scores, masks)


def test_resnet50_layout_loads_into_maskrcnn_resnet50_fpn():
    """A COCO-layout detector (ResNet-50-FPN, frozen BN) + a 4-conv, 256-channel mask side without the MLP
    branch: its state dict loads into torchvision's own builder and predicts maskx's masks (random weights)."""
    torch.manual_seed(0)
    det_cfg = DetectorConfig(min_size=96, max_size=96, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                             box_detections_per_img=10)  # few RoIs: seconds on a CPU
    head = HeadConfig(mlp=False, input="cls")
    builder = torchvision_builder(det_cfg, head, 3, 0.05)
    assert builder["name"] == "maskrcnn_resnet50_fpn" and builder["norm_eps"] == 1e-5
    assert builder["kwargs"] == {"num_classes": 4, "min_size": 96, "max_size": 96, "rpn_pre_nms_top_n_test": 100,
                                 "rpn_post_nms_top_n_test": 50, "box_score_thresh": 0.05, "box_nms_thresh": 0.5,
                                 "box_detections_per_img": 10}
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **builder["kwargs"]).eval()  # random weights
    # maskx's detector (frozen BN) holding the same detector weights, and a random mask side of its own
    detector = detector_from_state(det_cfg, 3, {k: v for k, v in model.state_dict().items() if ".mask_" not in k}).eval()
    side = build_mask_side(head, 3, det_cfg.fpn_channels, torch.randn(3, 1024)).eval()
    model.load_state_dict(baked_state_dict(detector, side, 3))  # strict
    image = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = detect_and_segment(detector, build_mask_roi_pool(14), {"m": side}, [image], torch.device("cpu"))["m"][0]
        theirs = model([image])[0]
    assert_same(ours, theirs["boxes"], theirs["labels"], theirs["scores"], theirs["masks"])
    assert torchvision_builder(det_cfg, HeadConfig(mlp=True), 3, 0.05) is None
    assert torchvision_builder(DetectorConfig(backbone="resnet18"), head, 3, 0.05) is None


def test_heads_without_a_torchvision_form_are_refused():
    side = build_mask_side(HeadConfig(fcn="hourglass", mask_dim=16), 5, 8, torch.zeros(5, 4))
    with pytest.raises(MaskxError) as exc:
        check_bakeable(side, "runs/hg/mask_final.pth")
    assert exc.value.line() == ("runs/hg/mask_final.pth: its mask head body (HourglassMaskHead, head.fcn hourglass) has no "
                                "torchvision Mask R-CNN form: only head.fcn convs exports")
    side = build_mask_side(HeadConfig(mask_dim=16, mlp_input_size=10), 5, 8, torch.zeros(5, 4))
    with pytest.raises(MaskxError, match=r"pools the 28x28 mask features to 10x10 \(head.mlp_input_size\), which does not divide"):
        check_bakeable(side, "m.pth")


def test_cli_export_prints_files_and_checks_and_bakes_the_agnostic_row(tiny_pipeline, tiny_world, tmp_path):
    image = val_images(tiny_world, 1)[0]
    result = CliRunner().invoke(app, ["export", str(tiny_pipeline["runs"]["agnostic"]), "--out", str(tmp_path / "e"),
                                      "--format", "torchvision", "--score-thresh", "0", "--check", str(image)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("exported a torchvision Mask R-CNN (MLPMaskRCNNPredictor: T baked in + the MLP branch; "
                               "torchvision's parts (pipelines.stages.export.load_torchvision)) in ")
    assert lines[1].startswith(f"torchvision: {tmp_path / 'e' / 'model_torchvision.pth'} (") and lines[1].endswith(" MiB)")
    assert lines[2] == ("checked torchvision: 30 detections on 1 image(s) as maskx's: boxes within 0 px, scores within 0, "
                        "0% of mask pixels differ")
    assert lines[3:] == [f"description: {tmp_path / 'e' / 'model.json'}"]
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["model.json", "model_torchvision.pth"]
    # the baseline's one shared 1x1 conv (and bias), repeated for every class
    state = torch.load(tmp_path / "e" / "model_torchvision.pth", weights_only=True)
    w, b = state["roi_heads.mask_predictor.mask_fcn_logits.weight"], state["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    assert torch.equal(w[1:], w[1:2].expand_as(w[1:])) and torch.equal(b[1:], b[1:2].expand(80)) and b[1] != 0


def test_cli_export_errors_are_one_line_and_leave_nothing(tiny_pipeline, tmp_path, monkeypatch):
    run = str(tiny_pipeline["runs"]["transfer"])
    result = CliRunner().invoke(app, ["export", run, "--out", str(tmp_path / "e"), "--detector", str(tmp_path / "nodet")])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'nodet'}: detector run not found"
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.output.strip().startswith(f"error: {tmp_path / 'manifest.json'}: ")
    result = CliRunner().invoke(app, ["export", run, "--out", str(tmp_path / "e"), "--format", "tflite"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: unknown export format 'tflite' (expected torchvision | torchscript | onnx)"

    def broken(self, model, path, example):
        raise MaskxError("could not be written: No space left on device", path)

    monkeypatch.setattr(FORMATS["torchscript"].__class__, "write", broken)
    result = CliRunner().invoke(app, ["export", run, "--out", str(tmp_path / "e"), "--format", "torchvision", "--format",
                                      "torchscript"])
    assert result.exit_code == 2 and [line for line in result.output.splitlines() if "error" in line] == [
        f"error: {tmp_path / 'e' / 'model.ts'}: could not be written: No space left on device"]
    assert not (tmp_path / "e").exists()  # the torchvision file written before it is gone too, and the folder made for them
