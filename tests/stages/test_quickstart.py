"""`maskx quickstart` end to end on a tiny world: report files, their keys, reuse on rerun."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from maskx_cli.main import app
from tests.test_api import README, readme_block
from pipelines.stages.sweep import TIMED, timing_text
from pipelines.visualize import MAX_DRAWN, add_legend

runner = CliRunner()

TINY = ["--train-images", "32", "--val-images", "6", "--detector-iterations", "2", "--mask-iterations", "2",
        "--seed", "0", "--split", "voc", "--max-objects", "4", "--min-radius", "12", "--max-radius", "30",
        "--set", "detector.min_size=96", "--set", "detector.max_size=96", "--set", "detector.fpn_channels=32",
        "--set", "detector.box_representation=64", "--set", "head.mask_dim=16", "--set", "head.mlp_hidden=32",
        "--set", "solver.warmup_iters=1"]


def test_quickstart_tiny(tmp_path, monkeypatch, capsys):
    out = tmp_path / "qs"
    r = runner.invoke(app, ["quickstart", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    voc = report["splits"]["voc"]
    assert len(voc["set_a"]) == 20 and len(voc["set_b"]) == 60
    world = json.loads((out / "world" / "world.json").read_text())["config"]
    assert (world["max_objects"], world["min_radius"], world["max_radius"]) == (4, 12.0, 30.0)
    assert set(voc["heads"]) == {"class-agnostic+MLP", "transfer+MLP", "oracle"}
    for head in voc["heads"].values():
        assert set(head["mean"]["segm"]) == {"B", "A"}
        assert len(head["segm_B_AP_per_seed"]) == 1
    # one detector for every head: identical box AP
    boxes = {json.dumps(h["mean"]["bbox"]) for h in voc["heads"].values()}
    assert len(boxes) == 1
    md = (out / "report.md").read_text()
    assert "| transfer+MLP |" in md and "voc→nonvoc B" in md
    t = report["timings"]  # the stage split of this call, also on the report's last line and on screen
    assert list(t) == [*TIMED, "report and picture"] and t["world"] > 0 and t["evaluation"] > 0
    assert sum(t.values()) <= report["seconds"] + 0.5
    assert md.splitlines()[-1] == f"Total time: {report['seconds']:.0f} s ({timing_text(t)})."
    picture = report["picture"]  # the images drawn: voc split, seed 0, those showing both sets first
    assert (picture["split"], picture["seed"], picture["score_thresh"]) == ("voc", 0, 0.5)
    assert len(picture["images"]) == 3 and picture["searched"] == 6
    assert all((out / "world" / "val" / name).is_file() for name in picture["images"])
    tile = 3 * world["image_size"] + 4  # 3x scale, 4 px apart
    with Image.open(out / "predictions.png") as im:  # two columns (agnostic, transfer), three rows, a legend below
        assert im.width == 2 * tile + 4 and im.height > 3 * tile
    assert "Left class-agnostic+MLP, right transfer+MLP: the same 3 validation images (voc→nonvoc, stage-2 seed 0)" in md
    assert "transfer+MLP" in r.output

    # the README's first Python example, on this quick start's folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(out)
    code = readme_block(README, "quickstart-api")
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    scope: dict = {}
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" ", 2)[0] for line in printed] == [f"{n} {s:.2f}" for n, s in zip(scope["out"]["names"], scope["out"]["scores"].tolist())]
    assert all(line.endswith("set A" if n in scope["model"].set_a else "set B") for line, n in zip(printed, scope["out"]["names"]))
    left_out = max(0, len(scope["out"]["names"]) - MAX_DRAWN)
    with Image.open(tmp_path / "predicted.png") as im:  # the world's 128-px images at scale 3, the legend strip below
        assert im.size == add_legend(Image.new("RGB", (128 * 3, 128 * 3)), left_out)[0].size and im.height > 128 * 3

    # a rerun reuses every finished piece
    r2 = runner.invoke(app, ["quickstart", "--out", str(out), *TINY])
    assert r2.exit_code == 0, r2.output
    assert "detect-train" not in r2.output and "mask-train" not in r2.output

    # the same folder with other settings is refused, not silently mixed
    r3 = runner.invoke(app, ["quickstart", "--out", str(out), *TINY[:-2], "--set", "solver.warmup_iters=2"])
    assert r3.exit_code == 2 and "other settings" in r3.output
