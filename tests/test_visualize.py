"""pipelines.visualize: the legend, the cap on drawn detections, labels that do not pile up."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

from pipelines.errors import MaskxError
from pipelines.stages.quickstart import choose_images
from pipelines.visualize import (GREEN, LEGEND, MAX_DRAWN, RED, add_legend, draw_predictions, grid, legend_entries,
                                 place_label, text_size)


def _colours(region: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in px) for px in region.reshape(-1, 3)}


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_legend_strip_below_the_picture_names_both_sets():
    image = np.zeros((64, 64, 3), np.uint8)
    boxes = np.array([[5, 20, 30, 50], [34, 20, 60, 50]], np.float32)
    d = draw_predictions(image, boxes, ["dog", "kite"], np.array([0.9, 0.8]), None, [True, False], scale=2)
    out = np.asarray(d.image)
    # the picture itself is 128 x 128 (scale 2); the strip is below it, as wide as its widest entry needs
    assert d.legend == (0, 128, out.shape[1], out.shape[0])
    assert out.shape[1] >= max(text_size(t)[0] for _, t in LEGEND) + text_size("Ag")[1]
    strip = out[128:]
    assert {GREEN, RED} <= _colours(strip)  # the two swatches
    assert (255, 255, 255) in _colours(strip) and strip.max(axis=2).min() < 40  # a white strip, dark text
    # without the legend: the same picture, nothing below
    bare = draw_predictions(image, boxes, ["dog", "kite"], np.array([0.9, 0.8]), None, [True, False], scale=2, legend=False)
    assert bare.legend is None and bare.image.size == (128, 128)
    assert np.array_equal(np.asarray(bare.image), out[:128, :128])
    assert [t for _, t in legend_entries()] == ["mask-trained (set A)", "no masks in training (set B)"]


def test_legend_wraps_on_a_wide_picture_it_fits_on_one_line():
    from PIL import Image

    narrow, strip = add_legend(Image.new("RGB", (40, 40)), left_out=3)
    wide, wide_strip = add_legend(Image.new("RGB", (800, 40)), left_out=3)
    line = text_size("Ag")[1]
    assert wide.width == 800 and wide_strip[3] - wide_strip[1] < 2 * line  # one line of three entries
    assert strip[3] - strip[1] > 3 * line  # three lines
    assert legend_entries(3)[-1] == (None, "3 more detections not drawn")
    assert legend_entries(1)[-1] == (None, "1 more detection not drawn")


def test_cap_draws_the_highest_scores_and_counts_the_rest():
    image = np.zeros((400, 400, 3), np.uint8)
    # 16 boxes on a 4 x 4 grid, 100 px apart (room for every label), scores shuffled; only the 10 best may appear
    boxes = np.array([[100 * (i % 4) + 10, 100 * (i // 4) + 30, 100 * (i % 4) + 50, 100 * (i // 4) + 70] for i in range(16)], np.float32)
    scores = np.random.default_rng(0).permutation(np.linspace(0.2, 0.95, 16))
    d = draw_predictions(image, boxes, [f"c{i}" for i in range(16)], scores, None, [i % 2 == 0 for i in range(16)],
                         max_drawn=10, legend=False)
    assert d.drawn == list(np.argsort(-scores)[:10]) and d.left_out == 6
    out = np.asarray(d.image)
    for i in range(16):
        x1, _, _, y2 = boxes[i].astype(int)
        edge = tuple(out[y2, x1 + 20])  # the middle of the box's bottom edge
        assert (edge != (0, 0, 0)) == (i in d.drawn), i
    everything = draw_predictions(image, boxes, [f"c{i}" for i in range(16)], scores, None, [True] * 16, max_drawn=None)
    assert len(everything.drawn) == 16 and everything.left_out == 0 and everything.unlabelled == 0
    assert MAX_DRAWN == 10


def test_labels_never_overlap_on_a_crowded_picture():
    rng = np.random.default_rng(1)
    image = np.zeros((96, 96, 3), np.uint8)
    x, y = rng.uniform(20, 30, 12), rng.uniform(20, 30, 12)  # twelve boxes piled on one spot
    boxes = np.stack([x, y, x + 40, y + 40], 1).astype(np.float32)
    scores = np.linspace(0.99, 0.5, 12)
    d = draw_predictions(image, boxes, ["traffic light"] * 12, scores, None, [True] * 12, scale=1, max_drawn=12)
    assert len(d.drawn) == 12 and d.unlabelled == 12 - len(d.labels) and 0 < d.unlabelled < 12
    for a, b in itertools.combinations(d.labels, 2):
        assert not _overlap(a, b), (a, b)
    assert all(0 <= r[0] and 0 <= r[1] and r[2] <= 96 and r[3] <= 96 for r in d.labels)


def test_label_goes_above_the_box_then_inside_then_below():
    w, h = 30, 12
    box = (20, 40, 80, 90)
    above = place_label(box, (w, h), [], 100, 100)
    assert above == (20, 28, 50, 40)
    inside = place_label(box, (w, h), [above], 100, 100)
    assert inside == (20, 40, 50, 52)
    below = place_label(box, (w, h), [above, inside], 100, 100)
    assert below == (20, 88, 50, 100)  # moved up into the picture
    assert place_label((0, 0, 10, 10), (w, h), [(0, 0, 100, 100)], 100, 100) is None


def test_masks_of_left_out_detections_are_not_drawn():
    image = np.zeros((80, 120, 3), np.uint8)
    masks = np.zeros((2, 80, 120), np.uint8)
    masks[0, 40:, :60] = 1
    masks[1, 40:, 60:] = 1
    d = draw_predictions(image, np.array([[0, 40, 59, 79], [60, 40, 119, 79]], np.float32), ["a", "b"], np.array([0.3, 0.9]),
                         masks, [True, False], max_drawn=1, legend=False)
    out = np.asarray(d.image)
    assert d.drawn == [1] and d.left_out == 1
    assert tuple(out[60, 30]) == (0, 0, 0) and tuple(out[60, 90]) == tuple(int(0.45 * c) for c in RED)


def test_bad_picture_settings_are_refused():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(MaskxError, match=r"max_drawn must be >= 1 \(detections drawn per picture\), got 0"):
        draw_predictions(image, np.zeros((0, 4)), [], np.zeros(0), None, [], max_drawn=0)
    with pytest.raises(MaskxError, match=r"scale must be >= 1 \(picture enlargement\), got 0"):
        draw_predictions(image, np.zeros((0, 4)), [], np.zeros(0), None, [], scale=0)


def test_cli_max_drawn_default_and_error(tmp_path):
    from typer.testing import CliRunner

    from maskx_cli import predict as predict_cli
    from maskx_cli.main import app

    for cmd in (predict_cli.predict_cmd, predict_cli.segment_cmd):
        assert inspect.signature(cmd).parameters["max_drawn"].default == MAX_DRAWN
    r = CliRunner().invoke(app, ["predict", str(tmp_path), "--mask", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                 "--max-drawn", "0"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "error: --max-drawn must be >= 1 (detections drawn per picture), got 0"
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["segment", str(tmp_path / "boxes.json"), "--images", str(tmp_path), "--mask", str(tmp_path),
                                 "--out", str(tmp_path / "o"), "--scale", "0"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "error: --scale must be >= 1 (picture enlargement), got 0"
    assert not (tmp_path / "o").exists()


def test_grid_titles_each_column_once():
    from PIL import Image

    tiles = [Image.new("RGB", (50, 30), (200, 0, 0)) for _ in range(6)]
    sheet = grid(tiles, columns=2, column_titles=["left", "right"], pad=4)
    title_h = text_size("Ag")[1] + 4
    assert sheet.size == (2 * 54 + 4, title_h + 3 * 34 + 4)
    px = np.asarray(sheet)
    assert px[:title_h].max(axis=2).min() < 40  # the titles' text
    assert tuple(px[title_h + 4 + 2 * 34, 4 + 54]) == (200, 0, 0)  # the last row's right tile


def test_quickstart_picture_prefers_images_with_both_sets():
    set_a = {1, 2}
    dets = {
        10: [{"category_id": 1}, {"category_id": 1}],                            # A only
        11: [{"category_id": 1}, {"category_id": 7}, {"category_id": 7}, {"category_id": 7}],  # A and B, cluttered
        12: [{"category_id": 7}],                                                # B only
        13: [{"category_id": 2}, {"category_id": 8}],                            # A and B
        14: [{"category_id": 2}, {"category_id": 8}, {"category_id": 9}],        # A and B, three classes
    }
    assert choose_images(dets, [10, 11, 12, 13, 14, 15], set_a, 5) == [14, 13, 11, 12, 10]  # then one class, fewer boxes
    assert choose_images(dets, [15, 12], set_a, 3) == [12, 15]
