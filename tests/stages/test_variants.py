"""Wiring of the paper's variants: stop-gradient, fixed randn inputs, end-to-end runs, early errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import DetectorConfig, HeadConfig, TrainE2EConfig, load_config
from pipelines.modeling.detector import build_detector
from pipelines.modeling.embeddings import class_embedding_table, randn_embedding, read_embeddings
from pipelines.modeling.mask_heads import HourglassMaskHead, MaskFCNHead, build_fcn
from pipelines.modeling.maskx_rcnn import build_mask_side, build_maskx_rcnn
from pipelines.stages.train_e2e import train_e2e

runner = CliRunner()
K = 5  # object classes of the toy model


def _toy_maskx(stop_gradient: bool, head: str = "transfer"):
    torch.manual_seed(0)
    det_cfg = DetectorConfig(backbone="resnet18", fpn_channels=16, box_representation=32, min_size=64, max_size=64,
                             rpn_post_nms_top_n_train=50, box_batch_size_per_image=16)
    detector = build_detector(det_cfg, K)
    h = HeadConfig(head=head, mlp=False, input="cls+box", mask_dim=8, num_convs=1, roi_size=7, input_dropout=0.0)
    side = build_mask_side(h, K, 16, None, embed_dim=5 * 32)
    return build_maskx_rcnn(detector, side, 7, "cls+box" if head == "transfer" else None, stop_gradient).train()


def _toy_batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 60.0]])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:26, 8:26] = 1
    masks[1, 25:55, 35:58] = 1
    # class 1 has a mask (set A), class 3 is box-only (set B)
    t = {"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks, "has_mask": torch.tensor([True, False])}
    return images, [t, {k: v.clone() for k, v in t.items()}]


def _grads_from_mask_loss(model):
    images, targets = _toy_batch()
    losses = model(images, targets)
    assert float(losses["loss_mask"].detach()) > 0
    model.zero_grad(set_to_none=True)
    losses["loss_mask"].backward()
    pred = model.roi_heads.box_predictor
    return pred.cls_score.weight.grad, pred.bbox_pred.weight.grad, model.roi_heads.mask_predictor.transfer.mlp[0].weight.grad


def test_stop_gradient_keeps_mask_loss_out_of_detector_class_weights():
    g_cls, g_box, g_t = _grads_from_mask_loss(_toy_maskx(stop_gradient=True))
    assert g_cls is None or float(g_cls.abs().sum()) == 0.0
    assert g_box is None or float(g_box.abs().sum()) == 0.0
    assert g_t is not None and float(g_t.abs().sum()) > 0  # T itself still learns from set A


def test_without_stop_gradient_mask_loss_reaches_set_a_class_weights_only():
    g_cls, g_box, _ = _grads_from_mask_loss(_toy_maskx(stop_gradient=False))
    assert g_cls is not None and g_box is not None
    per_class = g_cls.abs().sum(1) + g_box.view(K + 1, -1).abs().sum(1)  # row 0 = background
    assert float(per_class[1]) > 0  # class 1 has masks: its w_det gets the mask loss's gradient
    assert float(per_class[3]) == 0.0  # class 3 is box-only: untouched -- the A/B discrepancy of §2.2
    assert float(per_class[0]) == 0.0


def test_agnostic_head_has_no_w_det_path():
    model = _toy_maskx(stop_gradient=False, head="agnostic")
    images, targets = _toy_batch()
    model(images, targets)["loss_mask"].backward()
    grad = model.roi_heads.box_predictor.cls_score.weight.grad
    assert grad is None or float(grad.abs().sum()) == 0.0


def test_randn_embedding_is_fixed_per_seed():
    cats = [{"id": i, "name": f"c{i}"} for i in range(1, 11)]
    tables = []
    for seed in (3, 3, 4):
        # end to end: the box predictor's width D = 16 gives a 5D-wide table
        table, missing = class_embedding_table(HeadConfig(input="randn"), torch.zeros(10, 16), torch.zeros(10, 64),
                                               [c["name"] for c in cats], seed)
        assert table.shape == (10, 80) and missing == []
        tables.append(table)
    assert torch.equal(tables[0], tables[1])
    assert not torch.allclose(tables[0], tables[2])
    assert torch.equal(tables[0], randn_embedding(10, 80, 3))


def test_randn_table_of_mask_train_is_a_fixed_buffer(tiny_pipeline):
    emb = read_embeddings(tiny_pipeline["embeddings"])
    head = HeadConfig(input="randn")
    a, _ = class_embedding_table(head, emb.w_cls, emb.w_box, emb.class_names, 7)
    b, _ = class_embedding_table(head, emb.w_cls, emb.w_box, emb.class_names, 7)
    assert torch.equal(a, b) and a.shape == (80, 5 * emb.w_cls.shape[1])
    assert not torch.allclose(a, class_embedding_table(head, emb.w_cls, emb.w_box, emb.class_names, 8)[0])
    side = build_mask_side(HeadConfig(input="randn", mask_dim=8), 80, 16, a)
    assert "predictor.w_det" in dict(side.named_buffers())
    assert all("w_det" not in n for n, _ in side.named_parameters())  # never trained


def test_hourglass_head_shapes_and_choice():
    x = torch.randn(3, 16, 14, 14)
    hg = build_fcn("hourglass", 16, 8, 4)
    assert isinstance(hg, HourglassMaskHead) and len(hg.down) == 2
    assert hg(x).shape == (3, 8, 28, 28)
    assert isinstance(build_fcn("convs", 16, 8, 4), MaskFCNHead)
    with pytest.raises(Exception, match="hourglass"):
        build_fcn("unet", 16, 8, 4)
    side = build_mask_side(HeadConfig(head="agnostic", fcn="hourglass", mask_dim=8, mlp=False), 80, 16, None)
    assert side(x, torch.tensor([1, 2, 3])).shape == (3, 28, 28)


def _one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


@pytest.mark.parametrize("extra,expected", [
    (["--input", "glove"], "--glove"),
    (["--transfer-layers", "0"], "--transfer-layers must be 1, 2 or 3"),
    (["--transfer-activation", "tanh"], "--transfer-activation"),
    (["--set", "head.fcn=unet"], "unknown head.fcn 'unet'"),
    (["--set", "head.mlp_layers=3"], "head.mlp_layers must be 1 or 2, got 3"),
    (["--set", "head.transfer_init=xavier"], "unknown head.transfer_init 'xavier' (expected fan_out | fan_in)"),
])
def test_wrong_combinations_fail_before_anything_runs(tmp_path, extra, expected):
    # mask-train: rejected before the detector or embeddings are even opened
    r = runner.invoke(app, ["mask-train", "--detector", str(tmp_path / "no-det"), "--embeddings", str(tmp_path / "no.h5"),
                            "--out", str(tmp_path / "m"), "--config", "synthetic", *extra])
    assert expected in _one_error_line(r) and not (tmp_path / "m").exists()
    # train (end to end): the same checks
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "e"), "--config", "synthetic", *extra])
    assert expected in _one_error_line(r) and not (tmp_path / "e").exists()


def test_glove_file_missing_most_names_fails_before_training(tiny_world, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("person 0.1 0.2 0.3\ncar 0.3 0.2 0.1\n")
    data = [f"data.train_json={tiny_world.train_json}", f"data.train_images={tiny_world.train_dir}"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "e"), "--config", "synthetic", "--input", "glove", "--glove", str(glove),
                            *sum((["--set", d] for d in data), [])])
    line = _one_error_line(r)
    assert "78 of 80 class names have no GloVe vector" in line and "glove.txt" in line
    assert not (tmp_path / "e").exists()
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "e"), "--config", "synthetic", "--input", "glove", "--glove",
                            str(tmp_path / "absent.txt"), *sum((["--set", d] for d in data), [])])
    assert "GloVe file not found" in _one_error_line(r)


def test_end_to_end_run_is_read_by_eval_and_export(tiny_pipeline, tmp_path):
    over = tiny_pipeline["overrides"] + ["solver.iterations=2", "solver.warmup_iters=1", "solver.batch_size=2",
                                         "head.mask_dim=8", "head.mlp_hidden=16", f"init_detector={tiny_pipeline['detector']}"]
    cfg = load_config(TrainE2EConfig, "synthetic", over)
    r = train_e2e(cfg, tmp_path / "e2e")
    ckpt = torch.load(r.mask_checkpoint, map_location="cpu", weights_only=True)
    from pipelines.engine.run_dir import load_detector_run
    from pipelines.io import sha256_file

    det = load_detector_run(tmp_path / "e2e")  # a detector-format checkpoint
    assert ckpt["detector_sha256"] == det.sha256 == sha256_file(r.detector_checkpoint)
    w_cls = det.model.roi_heads.box_predictor.cls_score.weight[1:]
    assert torch.equal(ckpt["model"]["predictor.w_det"][:, : w_cls.shape[1]], w_cls)  # final w_det frozen into the head
    manifest = json.loads((tmp_path / "e2e" / "manifest.json").read_text())
    assert manifest["inputs"]["detector"]["sha256"] == det.sha256
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["eval", str(tmp_path / "e2e"), "--split", "nonvoc", "--json", str(out), "--max-images", "3"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())["heads"]["e2e"]["segm"]) == {"B", "A", "all"}
    res = runner.invoke(app, ["export-embeddings", str(tmp_path / "e2e"), "--out", str(tmp_path / "emb.h5")])
    assert res.exit_code == 0, res.output
