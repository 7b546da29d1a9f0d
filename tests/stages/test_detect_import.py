"""maskx detect-import: torchvision's detectors as maskx detector runs, and ImageNet backbones by name.

Nothing is downloaded: the checkpoints are torchvision's own models built with ``weights=None``
and a fixed seed, saved as torchvision's files are (``torch.save(model.state_dict())``); "online"
and "offline" are torch.hub's download function replaced by one that copies a local file or raises
URLError. Small images (96 px) keep the real ResNet-50-FPN architectures fast on a CPU.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    maskrcnn_resnet50_fpn,
)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import DetectorConfig, DetectTrainConfig, TrainE2EConfig, load_config
from pipelines.data.coco import load_coco, read_image
from pipelines.checkpoint import load_checkpoint
from pipelines.engine.run_dir import load_detector_run
from pipelines.errors import MaskxError
from pipelines.io import sha256_file
from pipelines.modeling import zoo
from pipelines.modeling.detector import build_backbone
from pipelines.modeling.embeddings import read_embeddings
from pipelines.stages import detect_import as di

pytestmark = pytest.mark.slow
runner = CliRunner()

# torchvision's own inference settings, made small; given to both torchvision's model and the import
TV_KWARGS = dict(min_size=96, max_size=96, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30, box_detections_per_img=10)
SETTINGS = [f"detector.{k}={v}" for k, v in TV_KWARGS.items()] + [
    "detector.rpn_pre_nms_top_n_train=100", "detector.rpn_post_nms_top_n_train=30", "detector.box_batch_size_per_image=16"]
UNUSED_IDS = [i for i, n in enumerate(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]) if n == "N/A"]


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Give a freshly built torchvision model the statistics of a trained one, deterministically.

    Norm layers get running statistics with small variances (so their eps matters) and scales that
    keep activations near 1; the box classifier is sharpened so that detections clear torchvision's
    0.05 score threshold; the rows of the unused COCO ids never fire, as training leaves them (the
    import drops those rows, so both models then score the same 81 outputs).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_var.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) ** 2 * 0.02 + 1e-5)
                last = name.endswith(("bn3", "downsample.1"))
                m.weight.copy_((torch.rand(n, generator=g) * 0.5 + 0.5) * m.running_var.sqrt() * (0.3 if last else 1.0))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.mul_(40.0)
        cls.bias[UNUSED_IDS] = float("-inf")
    return model.eval()


def frozen_bn_release_model(seed: int) -> FasterRCNN:
    """``fasterrcnn_resnet50_fpn`` as torchvision builds its COCO_V1 release: FrozenBatchNorm2d, eps 0."""
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    model = FasterRCNN(backbone, num_classes=91, **TV_KWARGS)
    overwrite_eps(model, 0.0)
    return trained_like(model, seed)


def save_tv(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)  # how torchvision's released files hold their weights
    return path


def import_cli(out: Path, *args: str):
    settings = [a for s in SETTINGS for a in ("--set", s)]
    return runner.invoke(app, ["detect-import", "--out", str(out), *args, *settings])


def val_images(world) -> list[torch.Tensor]:
    return [read_image(p) for p in sorted(Path(world.val_dir).iterdir())]


def assert_same_detections(run: Path, reference: nn.Module | list[dict], images: list[torch.Tensor]) -> list[dict]:
    """The imported run's detections equal ``reference``'s (a model, or its outputs on ``images``):
    boxes, scores and COCO category ids, to 1e-4. Returns the run's."""
    det = load_detector_run(run)
    ids = torch.tensor([c["id"] for c in det.categories])
    with torch.no_grad():
        ours = det.model(images)
        theirs = reference if isinstance(reference, list) else reference.eval()(images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) == len(b["boxes"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
        assert torch.equal(ids[a["labels"] - 1], b["labels"])
    assert sum(len(a["boxes"]) for a in ours) > 0, "something to compare"
    return ours


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 6-train / 2-val image synthetic world (80 COCO categories, ids and names, 96 px)."""
    from pipelines.data.synthetic import SynthConfig, generate

    return generate(SynthConfig(train_images=6, val_images=2, image_size=96, seed=3), tmp_path_factory.mktemp("world") / "w")


@pytest.fixture(scope="module")
def v1(world, tmp_path_factory):
    """torchvision's fasterrcnn_resnet50_fpn (BatchNorm2d, as built without weights), its file and its import."""
    root = tmp_path_factory.mktemp("tv_v1")
    torch.manual_seed(0)
    model = trained_like(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **TV_KWARGS), 0)
    weights = save_tv(model, root / "fasterrcnn_resnet50_fpn.pth")
    res = import_cli(root / "run", "--weights", str(weights), "--data", str(world.train_json))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export-embeddings", str(root / "run"), "--out", str(root / "emb.h5")])
    assert res.exit_code == 0, res.output
    return {"root": root, "model": model, "weights": weights, "run": root / "run", "embeddings": root / "emb.h5"}


def test_v1_detections_equal_torchvision(v1, world, tiny_pipeline):
    assert_same_detections(v1["run"], v1["model"], val_images(world))
    run = v1["run"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["stage"] == "detect-import" and cfg["source"] == "torchvision:fasterrcnn_resnet50_fpn"
    assert cfg["detector"]["box_head"] == "2fc" and cfg["detector"]["min_size"] == 96
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["inputs"]["weights"]["sha256"] == sha256_file(v1["weights"])
    assert manifest["source"] == "torchvision:fasterrcnn_resnet50_fpn" and manifest["torchvision_release"] is None
    assert manifest["status"] == "finished"
    assert manifest["norm_eps"] == 1e-5  # not the release: the eps torchvision uses for a model it builds
    assert manifest["predictor_rows"] == [0] + [c["id"] for c in load_coco(world.train_json)[0]["categories"]]
    ckpt = load_checkpoint(run / "model_final.pth", "detector")
    trained = load_checkpoint(tiny_pipeline["detector"] / "model_final.pth", "detector")
    assert set(ckpt) == set(trained) and set(ckpt["config"]) == set(trained["config"])
    assert ckpt["model"]["roi_heads.box_predictor.cls_score.weight"].shape == (81, 1024)


def test_import_into_a_folder_another_run_holds_is_refused(v1, world, tmp_path):
    from pipelines.engine.run_dir import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        res = import_cli(out, "--weights", str(v1["weights"]), "--data", str(world.train_json))
    assert res.exit_code == 2, res.output
    assert [line for line in res.output.splitlines() if line.startswith("error:")] == [
        f"error: {out}: another run is writing this folder now: wait for it to end, or choose another output folder"]
    assert list(out.iterdir()) == []


def test_embeddings_are_torchvision_rows(v1):
    emb = read_embeddings(v1["embeddings"])
    pred = v1["model"].roi_heads.box_predictor
    ids = torch.tensor(emb.class_ids)
    assert emb.w_cls.shape == (80, 1024) and emb.w_box.shape == (80, 4096)
    assert torch.equal(emb.w_cls, pred.cls_score.weight[ids])
    assert torch.equal(emb.b_cls, pred.cls_score.bias[ids])
    assert torch.equal(emb.w_box, pred.bbox_pred.weight.view(91, 4096)[ids])
    assert torch.equal(emb.b_box, pred.bbox_pred.bias.view(91, 4)[ids])


def test_older_torchvision_names_import_the_same(v1, world, tmp_path):
    """A file from an older torchvision (``rpn.head.conv.weight``, ``fpn.inner_blocks.0.weight``): its renames apply."""
    old = {}
    for k, v in torch.load(v1["weights"], weights_only=True).items():
        if k.endswith("num_batches_tracked"):
            continue  # a FrozenBatchNorm file
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        old[k] = v
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.3.weight" in old
    torch.save(old, tmp_path / "old.pth")
    res = import_cli(tmp_path / "run", "--weights", str(tmp_path / "old.pth"), "--data", str(world.train_json))
    assert res.exit_code == 0, res.output
    ours = load_checkpoint(tmp_path / "run" / "model_final.pth")["model"]
    reference = load_checkpoint(v1["run"] / "model_final.pth")["model"]
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in reference)


def test_later_stages_accept_the_import(v1, world, tmp_path):
    """mask-train, eval, predict and train --init-detector read the run (export-embeddings did: the fixture) as a trained one."""
    run, emb = v1["run"], v1["embeddings"]
    head = ["--set", "head.mask_dim=16", "--set", "head.num_convs=1", "--set", "head.mlp_hidden=32", "--set", "head.roi_size=7",
            "--set", "head.mlp_input_size=7", "--set", "head.transfer_hidden=32", 
            "--set", "solver.batch_size=8", "--set", "solver.warmup_iters=1", "--set", "solver.workers=0"]
    data = ["--set", f"data.train_json={world.train_json}", "--set", f"data.train_images={world.train_dir}",
            "--set", f"data.val_json={world.val_json}",
            "--set", f"data.val_images={world.val_dir}"]
    steps = [
        ["mask-train", "--detector", str(run), "--embeddings", str(emb), "--out", str(tmp_path / "mask"), "--iterations", "2",
         "--device", "cpu", *head, *data],
        ["eval", str(tmp_path / "mask"), "--split", "nonvoc", "--max-images", "2"],
        ["predict", str(world.val_dir), "--mask", str(tmp_path / "mask"), "--out", str(tmp_path / "pred"), "--score-thresh", "0"],
    ]
    for args in steps:
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args[0], res.output)
    metrics = json.loads((tmp_path / "mask" / "metrics_nonvoc.json").read_text())
    assert metrics["inputs"]["detector"]["sha256"] == sha256_file(run / "model_final.pth")
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())

    det_cfg = yaml.safe_load((run / "config.yaml").read_text())["detector"]
    same_detector = [a for k, v in det_cfg.items() if k in ("min_size", "max_size", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                                                           "box_detections_per_img", "rpn_pre_nms_top_n_train",
                                                           "rpn_post_nms_top_n_train", "box_batch_size_per_image")
                     for a in ("--set", f"detector.{k}={v}")]
    res = runner.invoke(app, ["train", "--init-detector", str(run), "--out", str(tmp_path / "e2e"), "--iterations", "1",
                              "--device", "cpu", *data, *head,
                              "--set", "solver.batch_size=2", *same_detector])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e2e" / "mask_final.pth").is_file()
    manifest = json.loads((tmp_path / "e2e" / "manifest.json").read_text())
    assert manifest["inputs"]["init_detector"]["sha256"] == sha256_file(run / "model_final.pth")


def test_release_from_torch_cache_gets_eps_0(world, tmp_path, monkeypatch):
    """Weights omitted, online: torchvision's API "downloads" the release; FrozenBatchNorm eps 0 as torchvision builds it."""
    model = frozen_bn_release_model(1)
    planted = save_tv(model, tmp_path / "release.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        shutil.copyfile(planted, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(di, "release_sha256_prefix", lambda weights: sha256_file(planted)[:8])
    res = import_cli(tmp_path / "run", "--data", str(world.train_json))
    assert res.exit_code == 0, res.output
    assert fetched == [(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url, "258fb6c6")]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["torchvision_release"] == "FasterRCNN_ResNet50_FPN_Weights.COCO_V1" and manifest["norm_eps"] == 0.0
    images = val_images(world)
    ours = assert_same_detections(tmp_path / "run", model, images)
    # the eps matters: with eps 1e-5 torchvision's model finds other boxes or scores
    overwrite_eps(model, 1e-5)
    with torch.no_grad():
        other = model(images)
    def differ(a, b):
        return len(a["scores"]) != len(b["scores"]) or max((a[k] - b[k]).abs().max().item() for k in ("boxes", "scores")) > 1e-4

    assert any(differ(a, b) for a, b in zip(ours, other)), "the same check fails with torchvision's default eps"


def test_v2_detections_equal_torchvision(world, tmp_path):
    torch.manual_seed(2)
    model = trained_like(fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **TV_KWARGS), 2)
    weights = save_tv(model, tmp_path / "v2.pth")
    res = import_cli(tmp_path / "run", "--from", "torchvision:fasterrcnn_resnet50_fpn_v2", "--weights", str(weights),
                     "--data", str(world.train_json))
    assert res.exit_code == 0, res.output
    images = val_images(world)
    with torch.no_grad():
        theirs = model(images)
    assert_same_detections(tmp_path / "run", theirs, images)
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["detector"]
    assert (cfg["box_head"], cfg["box_head_norm"], cfg["fpn_norm"], cfg["rpn_head_convs"], cfg["box_representation"]) == \
        ("4conv1fc", "bn", "bn", 2, 1024)
    # FrozenBatchNorm for the FPN and box head too: the same tensors, the same detections
    res = import_cli(tmp_path / "frozen", "--from", "torchvision:fasterrcnn_resnet50_fpn_v2", "--weights", str(weights),
                     "--data", str(world.train_json), "--set", "detector.fpn_norm=frozen_bn", "--set", "detector.box_head_norm=frozen_bn")
    assert res.exit_code == 0, res.output
    assert not [k for k in load_checkpoint(tmp_path / "frozen" / "model_final.pth")["model"] if k.endswith("num_batches_tracked")]
    assert_same_detections(tmp_path / "frozen", theirs, images)
    # a v2 file given as the v1 model: one line that names the model it is
    res = import_cli(tmp_path / "wrong", "--weights", str(weights), "--data", str(world.train_json))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "does not fit torchvision's fasterrcnn_resnet50_fpn" in res.output
    assert "use --from torchvision:fasterrcnn_resnet50_fpn_v2" in res.output
    assert not (tmp_path / "wrong").exists()


def test_mask_rcnn_imports_its_box_part(world, tmp_path):
    torch.manual_seed(3)
    model = trained_like(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **TV_KWARGS), 3)
    weights = save_tv(model, tmp_path / "mask_rcnn.pth")
    res = import_cli(tmp_path / "wrong", "--weights", str(weights), "--data", str(world.train_json))
    assert res.exit_code == 2 and "use --from torchvision:maskrcnn_resnet50_fpn" in res.output
    assert not (tmp_path / "wrong").exists()
    res = import_cli(tmp_path / "run", "--from", "torchvision:maskrcnn_resnet50_fpn", "--weights", str(weights),
                     "--data", str(world.train_json))
    assert res.exit_code == 0, res.output
    assert_same_detections(tmp_path / "run", model, val_images(world))
    ckpt = load_checkpoint(tmp_path / "run" / "model_final.pth", "detector")
    assert not [k for k in ckpt["model"] if "mask" in k]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["mask_head_dropped"] is True


def _one_line_refusal(res, out: Path, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not out.exists(), "nothing written"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refusals(v1, world, tmp_path):
    data = json.loads(Path(world.train_json).read_text())
    extra = dict(data, categories=data["categories"] + [{"id": 91, "name": "unicorn", "supercategory": "x"}])
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    res = import_cli(tmp_path / "a", "--weights", str(v1["weights"]), "--data", str(tmp_path / "extra.json"))
    _one_line_refusal(res, tmp_path / "a", str(tmp_path / "extra.json"), "category 91 ('unicorn') is not one of the checkpoint's 80 COCO categories")

    plain = [{k: v for k, v in c.items() if k != "coco_id"} for c in data["categories"]]  # mapped by id, so names must be COCO's
    renamed = dict(data, categories=[dict(c, name="truck") if c["id"] == 3 else c for c in plain])
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    res = import_cli(tmp_path / "b", "--weights", str(v1["weights"]), "--data", str(tmp_path / "renamed.json"))
    _one_line_refusal(res, tmp_path / "b", "category 3 is 'truck' here but 'car' in the checkpoint")

    classifier = save_tv(resnet18(), tmp_path / "resnet18.pth")  # not a detector at all
    res = import_cli(tmp_path / "c", "--weights", str(classifier), "--data", str(world.train_json))
    _one_line_refusal(res, tmp_path / "c", "does not fit torchvision's fasterrcnn_resnet50_fpn")

    marker = tmp_path / "ran"
    (tmp_path / "evil.pth").write_bytes(_code_pickle(marker))
    res = import_cli(tmp_path / "d", "--weights", str(tmp_path / "evil.pth"), "--data", str(world.train_json))
    _one_line_refusal(res, tmp_path / "d", "not plain fasterrcnn_resnet50_fpn weights, or one that carries code", "nothing of it was run")
    assert not marker.exists(), "nothing in the file was executed"

    res = import_cli(tmp_path / "e", "--weights", str(v1["weights"]), "--data", str(world.train_json),
                     "--set", "detector.backbone=resnet101")
    _one_line_refusal(res, tmp_path / "e", "detector.backbone is fixed by torchvision's fasterrcnn_resnet50_fpn ('resnet50')")

    res = import_cli(tmp_path / "f", "--from", "torchvision:retinanet_resnet50_fpn", "--data", str(world.train_json))
    _one_line_refusal(res, tmp_path / "f", "unknown detector source", "torchvision:fasterrcnn_resnet50_fpn_v2")


def _code_pickle(marker: Path) -> bytes:
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"model": Payload()})


def test_offline_detector_names_the_file(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    res = import_cli(tmp_path / "run", "--data", str(world.train_json))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    _one_line_refusal(res, tmp_path / "run", str(cached), FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url, "or pass --weights FILE")

    # a file in the cache under the release's name that is not the release
    cached.write_bytes(b"not the release")
    res = import_cli(tmp_path / "run", "--data", str(world.train_json))
    _one_line_refusal(res, tmp_path / "run", str(cached), "is not torchvision's FasterRCNN_ResNet50_FPN_Weights.COCO_V1")


def test_recipe_continues_from_the_import():
    """The shipped recipe's end-to-end detector is the imported one, so `train --init-detector` accepts the run."""
    imported = di.detector_config(di.SOURCES["fasterrcnn_resnet50_fpn"], load_config(
        di.DetectImportConfig, "coco_voc_tv_r50", section="detect_import").detector)
    imported.norm_eps = di.SOURCES["fasterrcnn_resnet50_fpn"].release_eps  # the release's
    assert load_config(TrainE2EConfig, "coco_voc_tv_r50").detector == imported
    assert imported.min_size == 800 and imported.max_size == 1333 and imported.box_representation == 1024


# ------------------------------------------------------------------ ImageNet backbones by name
@pytest.mark.parametrize("name", ["coco_voc_r50", "coco_nonvoc_r50", "coco_voc_r101", "vg3k_r101", "lvis_r50"])
def test_recipes_name_torchvision_backbones(name):
    det = load_config(DetectTrainConfig, name, section="detect_train").detector
    weights = zoo.named_weights(det.backbone, det.pretrained_backbone)
    assert weights is not None and weights.name == "IMAGENET1K_V1"



def _cache_resnet18(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(5)
    state = resnet18().state_dict()
    path = zoo.cached_file(ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_backbone_by_name_from_torch_cache(tmp_path, monkeypatch, name):
    state = _cache_resnet18(tmp_path, monkeypatch)
    body = build_backbone(DetectorConfig(backbone="resnet18", fpn_channels=16, pretrained_backbone=name)).body
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    # a detector that receives a whole checkpoint next does not read them
    assert not torch.equal(build_backbone(DetectorConfig(backbone="resnet18", fpn_channels=16, pretrained_backbone=name),
                                          pretrained=False).body.conv1.weight, state["conv1.weight"])


def test_backbone_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MaskxError, match="neither a file nor one of torchvision's ResNet50_Weights: IMAGENET1K_V1, IMAGENET1K_V2"):
        build_backbone(DetectorConfig(pretrained_backbone="IMAGENET1K_V9"))


def test_offline_backbone_names_the_file(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "det"
    res = runner.invoke(app, ["detect-train", "--config", "synthetic", "--out", str(out), "--iterations", "1",
                              "--set", f"data.train_json={world.train_json}", "--set", f"data.train_images={world.train_dir}",
                              "--set", "detector.pretrained_backbone=IMAGENET1K_V1"])
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    _one_line_refusal(res, out, str(cached), ResNet18_Weights.IMAGENET1K_V1.url, "detector.pretrained_backbone")
