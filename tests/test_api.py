"""pipelines.api: the README's example as written, and its outputs against the predictor's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import api
from pipelines.errors import MaskxError
from pipelines.evaluation.predictions import load_predictor
from pipelines.visualize import add_legend
from tests.engine.tiny_runs import train_detector_and_mask

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


README = ROOT / "README.md"


def readme_block(path: Path, marker: str) -> str:
    """The python block that follows ``<!-- marker -->`` in ``path``."""
    text = path.read_text()
    return text.split(f"<!-- {marker} -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def readme_example() -> str:
    return readme_block(README, "api-example")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    torch.set_num_threads(1)
    world = train_detector_and_mask(root)
    return root, world


def test_readme_example_runs_as_written(trained, tmp_path, monkeypatch, capsys):
    root, world = trained
    (tmp_path / "runs").mkdir()
    shutil.copytree(root / "mask", tmp_path / "runs" / "transfer")
    shutil.copytree(world.val_dir, tmp_path / "mine" / "val")
    monkeypatch.chdir(tmp_path)
    code = readme_example()
    assert 6 <= len([line for line in code.splitlines() if line.strip()]) <= 10
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out, model, mine = scope["out"], scope["model"], scope["mine"]

    image = tmp_path / "mine" / "val" / "000000000001.png"
    predictor = load_predictor(root / "mask", device="cpu", score_thresh=0.5)
    ref = predictor.run([api.as_image(image)])[0]
    assert torch.equal(out["boxes"], ref["boxes"]) and torch.equal(out["masks"], ref["masks"])
    assert out["names"] == [model.classes[i - 1] for i in ref["labels"].tolist()]
    assert out["category_ids"] == [predictor.categories[i - 1]["id"] for i in ref["labels"].tolist()]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(out["names"])
    assert all(line.startswith(f"{n} {s:.2f} ") for line, n, s in zip(printed, out["names"], out["scores"].tolist()))
    assert mine["names"] == [model.classes[0]] and mine["scores"].tolist() == [1.0]
    assert mine["masks"].shape == (1, 64, 64)
    assert mine["boxes"][0].tolist() == pytest.approx([10, 10, 50, 60])
    with Image.open(tmp_path / "predicted.png") as im:  # 2 x the 64-px image, the legend strip below
        assert im.size == add_legend(Image.new("RGB", (128, 128)), 0)[0].size and im.height > 128


def test_inputs_and_segment_agree(trained):
    root, world = trained
    model = api.load(root / "mask", device="cpu", score_thresh=0.0)
    path = world.val_dir / "000000000002.png"
    array = np.asarray(Image.open(path).convert("RGB"))
    by_path, by_array, by_pil = model.predict(path), model.predict(array), model.predict(Image.open(path))
    assert len(by_path["boxes"]) > 0
    for other in (by_array, by_pil):
        assert torch.equal(other["masks"], by_path["masks"]) and torch.equal(other["scores"], by_path["scores"])
    # the detector's own boxes given back (the image is at the model's size: no rescaling) give the same masks
    again = model.segment(array, by_path["boxes"], by_path["labels"], scores=by_path["scores"])
    assert torch.equal(again["masks"], by_path["masks"]) and torch.equal(again["scores"], by_path["scores"])
    by_name = model.segment(path, by_path["boxes"].numpy(), by_path["names"])
    assert torch.equal(by_name["masks"], by_path["masks"]) and by_name["scores"].tolist() == [1.0] * len(by_path["boxes"])
    drawn = np.asarray(model.draw(array, by_path))  # the image with detections drawn, a legend strip below
    h, w = array.shape[:2]
    assert drawn.shape[:2] == add_legend(Image.new("RGB", (w, h)), 0)[0].size[::-1] and not np.array_equal(drawn[:h, :w], array)
    with pytest.raises(MaskxError, match="unknown class 'unicorn'"):
        model.segment(array, [[0, 0, 5, 5]], ["unicorn"])
    with pytest.raises(MaskxError, match=r"a uint8 array \[H, W, 3\], got a float64 array of shape \(4, 4\)"):
        model.predict(np.zeros((4, 4)))
