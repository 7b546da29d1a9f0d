"""Config loading: recipes, overrides, type and key checks, sections."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from pipelines.config import (DetectTrainConfig, EvalConfig, MaskTrainConfig, SolverConfig, TrainE2EConfig, load_config,
                              resolve_config_path, to_dict)
from pipelines.errors import MaskxError
from pipelines.io import atomic_path, write_json


def test_shipped_recipe_sections():
    det = load_config(DetectTrainConfig, "synthetic", section="detect_train")
    assert det.detector.backbone == "resnet18" and det.detector.fpn_channels == 64
    assert det.data.mask_classes == "voc"  # the shared data section
    mask = load_config(MaskTrainConfig, "synthetic", ["data.mask_classes=random:40:0"], section="mask_train")
    assert mask.data.mask_classes == "random:40:0" and mask.head.input == "cls"  # the recipe's documented choice
    # the settings that let transfer beat the class-agnostic head (docs/results_history.md, "What made transfer win")
    assert det.solver.iterations == 1000 and det.solver.amp == "bf16-native"  # the quick start in 10 minutes (docs/benchmarks.md)
    assert (det.detector.rpn_batch_size_per_image, det.detector.box_batch_size_per_image) == (64, 32)
    assert (mask.head.num_convs, mask.head.input_dropout, mask.head.normalize_output) == (1, 0.7, False)
    assert load_config(EvalConfig, "synthetic", section="eval").split == ""  # the run's own set B


@pytest.mark.parametrize("name", ["coco_voc_r50", "coco_nonvoc_r50", "coco_voc_r101", "vg3k_r101", "lvis_r50"])
def test_paper_recipes_load(name):
    det = load_config(DetectTrainConfig, name, section="detect_train")
    assert det.solver.lr == 0.02 and det.solver.batch_size == 16 and det.solver.iterations == 90000
    assert det.detector.backbone in ("resnet50", "resnet101")
    mask = load_config(MaskTrainConfig, name, section="mask_train")
    # as the original code: flipped training images, the 1-FC MLP branch, T by fan-out, T unregularised
    assert det.data.hflip and mask.data.hflip
    h = mask.head
    assert (h.mlp_layers, h.transfer_init, h.normalize_input, h.input_dropout) == (1, "fan_out", False, 0.0)


E2E_TARGETS = {"coco_voc_r50_e2e": ("resnet50", "voc", "nonvoc", "23.7"), "coco_nonvoc_r50_e2e": ("resnet50", "nonvoc", "voc", "28.9"),
               "coco_voc_r101_e2e": ("resnet101", "voc", "nonvoc", "23.8"), "coco_nonvoc_r101_e2e": ("resnet101", "nonvoc", "voc", "29.5")}


@pytest.mark.parametrize("name", sorted(E2E_TARGETS))
def test_end_to_end_recipes_quote_table_3_5(name):
    from pipelines.config import resolve_config_path

    backbone, set_a, set_b, target = E2E_TARGETS[name]
    cfg = load_config(TrainE2EConfig, name)
    assert (cfg.detector.backbone, cfg.data.mask_classes, cfg.data.hflip) == (backbone, set_a, True)
    assert (cfg.head.head, cfg.head.mlp, cfg.head.input, cfg.head.stop_gradient, cfg.head.mlp_layers) == ("transfer", True, "cls+box", True, 1)
    assert (cfg.solver.batch_size, cfg.solver.lr, cfg.solver.iterations) == (16, 0.02, 90000)
    assert load_config(EvalConfig, name, section="eval").split == ""  # B = what the run had no masks for ...
    from pipelines.data.splits import COCO_CATEGORIES, complement, resolve_split

    coco = [{"id": i, "name": n} for i, n in COCO_CATEGORIES]
    assert complement(resolve_split(set_a, coco), coco) == resolve_split(set_b, coco)  # ... the paper's B
    header = resolve_config_path(name).read_text().split("\ndata:")[0]
    assert "Table 3.5" in header and f"{target} mask AP" in header and f"maskx train --config {name}" in header


@pytest.mark.parametrize("name, target", [("coco_voc_r50", "21.3"), ("coco_nonvoc_r50", "26.6")])
def test_stage_wise_recipes_quote_table_3_3(name, target):
    from pipelines.config import resolve_config_path

    header = resolve_config_path(name).read_text().split("\ndata:")[0]
    assert "stage-wise" in header and "Table 3.3" in header and f"{target} mask AP" in header
    assert "maskx mask-train" in header and "maskx train " not in header


def test_overrides_are_typed():
    cfg = load_config(MaskTrainConfig, None, ["solver.lr=0.5", "head.mlp=false", "head.transfer_layers=3", "cache.dtype=float32"])
    assert cfg.solver.lr == 0.5 and cfg.head.mlp is False and cfg.head.transfer_layers == 3
    assert cfg.cache.dtype == "float32"
    assert to_dict(cfg)["head"]["mlp"] is False


def test_unknown_key_and_bad_type():
    with pytest.raises(MaskxError, match="unknown config key 'head.inptu'"):
        load_config(MaskTrainConfig, None, ["head.inptu=cls"])
    with pytest.raises(MaskxError, match="'solver.iterations' must be int"):
        load_config(MaskTrainConfig, None, ["solver.iterations=many"])
    with pytest.raises(MaskxError, match="not of the form key=value"):
        load_config(MaskTrainConfig, None, ["solver.lr"])
    with pytest.raises(MaskxError, match="config file not found"):
        load_config(MaskTrainConfig, "no_such_recipe")


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("detect_train: [unclosed\n")
    with pytest.raises(MaskxError) as err:
        load_config(DetectTrainConfig, bad, section="detect_train")
    assert str(bad) in err.value.line() and "YAML" in err.value.line()


def test_linear_lr_scaling():
    s = SolverConfig(lr=0.02, batch_size=8, reference_batch_size=16)
    assert s.effective_lr() == pytest.approx(0.01)
    s.scale_lr = False
    assert s.effective_lr() == 0.02


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{") and len(list(tmp_path.iterdir())) == 1


def test_atomic_write_gives_a_normal_file_mode(tmp_path):
    """Outputs are readable as any file the user writes (umask), not owner-only like a temp file."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def _recipe(tmp_path, edit) -> Path:
    data = yaml.safe_load(resolve_config_path("synthetic").read_text())
    edit(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit,key", [
    (lambda d: d.update(foo=1), "foo"),
    (lambda d: d.update(mask_trian={"head": {"mlp": True}}), "mask_trian"),
    (lambda d: d["mask_train"]["head"].update(inptu="cls"), "mask_train.head.inptu"),
    (lambda d: d["detect_train"]["solver"].update(iterationz=5), "detect_train.solver.iterationz"),
    (lambda d: d.update(eval={"splt": "voc"}), "eval.splt"),
    (lambda d: d["data"].update(train_jsn="x.json"), "data.train_jsn"),
    (lambda d: d["mask_train"]["cache"].update(proposals_per_instance="many"), "mask_train.cache.proposals_per_instance"),
])
def test_unknown_recipe_key_at_any_depth_is_an_error_naming_file_and_key(tmp_path, edit, key):
    """Whatever section is read, a bad key anywhere in the recipe is refused, naming the file and the key."""
    path = _recipe(tmp_path, edit)
    for cls in (DetectTrainConfig, MaskTrainConfig, TrainE2EConfig, EvalConfig):
        with pytest.raises(MaskxError) as err:
            load_config(cls, path)
        assert err.value.path == str(path), cls
        assert f"'{key}'" in err.value.message, (cls, err.value.message)


def test_set_errors_name_the_override_not_the_recipe():
    with pytest.raises(MaskxError) as err:
        load_config(MaskTrainConfig, "synthetic", ["solver.iterations=many"], source="--set")
    assert err.value.line() == "--set solver.iterations=many: config key 'solver.iterations' must be int, got 'many'"
    with pytest.raises(MaskxError) as err:
        load_config(MaskTrainConfig, "synthetic", ["head.inptu=cls"], source="--set")
    assert err.value.path == "--set head.inptu=cls" and "unknown config key 'head.inptu'" in err.value.message
    with pytest.raises(MaskxError) as err:  # a typed value from the library: no file, no override to blame
        load_config(MaskTrainConfig, "synthetic", [{"solver": {"iterations": "many"}}])
    assert err.value.path is None and "'solver.iterations' must be int" in err.value.message


def test_cli_set_error_names_set(tmp_path):
    from typer.testing import CliRunner

    from maskx_cli.main import app

    r = CliRunner().invoke(app, ["detect-train", "--config", "synthetic", "--out", str(tmp_path / "d"), "--set",
                                 "solver.iterations=many"])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines == ["error: --set solver.iterations=many: config key 'solver.iterations' must be int, got 'many'"]
    assert not (tmp_path / "d").exists()


def test_overrides_apply_in_order_typed_mappings_and_strings():
    cfg = load_config(MaskTrainConfig, "synthetic", ["solver.iterations=7", {"solver": {"iterations": 9, "seed": 3}}, "solver.seed=4"])
    assert (cfg.solver.iterations, cfg.solver.seed) == (9, 4)
    assert cfg.head.num_convs == 1  # the recipe's mask_train section below them
    e2e = load_config(TrainE2EConfig, "synthetic")  # no train_e2e section: detector and solver of detect_train, head of mask_train
    assert e2e.detector.backbone == "resnet18" and e2e.solver.iterations == 1000 and e2e.head.input == "cls"


def test_stage_overrides_route_each_section_to_its_stages():
    from pipelines.config import check_stage_overrides, parse_overrides, stage_overrides

    every = parse_overrides(["detector.min_size=96", "head.mask_dim=8", "solver.seed=2", "eval.split=voc", "cache.dtype=float32"])
    keys = {cls.__name__: [o.key for o in stage_overrides(cls, every)] for cls in (DetectTrainConfig, MaskTrainConfig, TrainE2EConfig, EvalConfig)}
    assert keys == {"DetectTrainConfig": ["detector.min_size", "solver.seed"],
                    "MaskTrainConfig": ["head.mask_dim", "solver.seed", "cache.dtype"],
                    "TrainE2EConfig": ["detector.min_size", "head.mask_dim", "solver.seed"],
                    "EvalConfig": ["split"]}
    with pytest.raises(MaskxError, match="'haed' is not a section of any stage config") as err:
        check_stage_overrides(parse_overrides(["haed.head=oracle"], "--set"))
    assert err.value.path == "--set haed.head=oracle"


def test_off_on_yes_no_are_strings_only_true_false_are_booleans(tmp_path):
    """YAML 1.2's booleans: `--set solver.amp=off` is the setting 'off', not False (YAML 1.1's reading)."""
    cfg = load_config(DetectTrainConfig, "synthetic", ["solver.amp=off"], section="detect_train")
    assert cfg.solver.amp == "off"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("detect_train:\n  solver:\n    amp: off\n  data:\n    hflip: true\n")
    cfg = load_config(DetectTrainConfig, str(recipe), section="detect_train")
    assert cfg.solver.amp == "off" and cfg.data.hflip is True
    # a bool key still takes yes / no / on / off
    assert load_config(DetectTrainConfig, "synthetic", ["data.hflip=yes"], section="detect_train").data.hflip is True
    assert load_config(DetectTrainConfig, "synthetic", ["data.hflip=off"], section="detect_train").data.hflip is False


def test_a_detector_setting_on_stage_two_says_where_it_belongs():
    with pytest.raises(MaskxError, match=r"unknown config key 'detector' .*come from the detector run: set them on detect-train"):
        load_config(MaskTrainConfig, None, ["detector.min_size=96"], source="--set")


@pytest.mark.parametrize("cls", [DetectTrainConfig, MaskTrainConfig, TrainE2EConfig])
@pytest.mark.parametrize("item, message", [
    ("solver.lr=-1", "solver.lr must be > 0, got -1"),
    ("solver.lr=.nan", "solver.lr must be > 0, got nan"),
    ("solver.lr=.inf", "solver.lr must be > 0, got inf"),
    ("solver.batch_size=0", "solver.batch_size must be >= 1, got 0"),
    ("solver.iterations=-5", "solver.iterations must be >= 1, got -5"),
    ("solver.log_every=0", "solver.log_every must be >= 1, got 0"),
    ("solver.workers=-1", "solver.workers must be >= 0, got -1"),
    ("solver.momentum=1", "solver.momentum must be >= 0 and < 1, got 1"),
    ("solver.lr_steps=[0.5,1.5]", "solver.lr_steps must be fractions of the iterations, each >= 0 and <= 1, got [0.5, 1.5]"),
    ("solver.optimizer=adam", "solver.optimizer must be one of sgd | adamw, got 'adam'"),
    ("solver.amp=fp8", "solver.amp must be one of auto | off | bf16 | bf16-native | fp16, got 'fp8'"),
])
def test_solver_values_out_of_range_are_one_error_naming_the_key(cls, item, message):
    with pytest.raises(MaskxError) as err:
        load_config(cls, "synthetic", [item], source="--set")
    assert err.value.line() == f"--set {item}: {message}"


def test_solver_value_out_of_range_in_a_recipe_names_the_file_and_the_key(tmp_path):
    path = _recipe(tmp_path, lambda d: d["detect_train"]["solver"].update(lr=-1))
    with pytest.raises(MaskxError) as err:
        load_config(DetectTrainConfig, path)
    assert err.value.line() == f"{path}: detect_train.solver.lr must be > 0, got -1"
    with pytest.raises(MaskxError) as err:  # a typed value from the library keeps its key, for a command to show its flag
        load_config(MaskTrainConfig, "synthetic", [{"solver": {"iterations": 0}}])
    assert (err.value.line(), err.value.key) == ("solver.iterations must be >= 1, got 0", "solver.iterations")


def test_check_solver_refuses_a_config_built_in_code():
    from pipelines.engine.solver import check_solver

    with pytest.raises(MaskxError) as err:
        check_solver(SolverConfig(log_every=0))
    assert (err.value.line(), err.value.key) == ("solver.log_every must be >= 1, got 0", "solver.log_every")
    check_solver(SolverConfig())


@pytest.mark.parametrize("command, args, line", [
    ("detect-train", ["--iterations", "0"], "error: --iterations must be >= 1, got 0"),
    ("detect-train", ["--iterations", "-5"], "error: --iterations must be >= 1, got -5"),
    ("detect-train", ["--set", "solver.batch_size=0"], "error: --set solver.batch_size=0: solver.batch_size must be >= 1, got 0"),
    ("train", ["--set", "solver.lr=-1"], "error: --set solver.lr=-1: solver.lr must be > 0, got -1"),
    ("mask-train", ["--detector", "det", "--embeddings", "emb.h5", "--iterations", "0"], "error: --iterations must be >= 1, got 0"),
    ("mask-train", ["--detector", "det", "--embeddings", "emb.h5", "--set", "solver.workers=-1"],
     "error: --set solver.workers=-1: solver.workers must be >= 0, got -1"),
])
def test_cli_refuses_solver_values_out_of_range_with_the_flag(tmp_path, command, args, line):
    from typer.testing import CliRunner

    from maskx_cli.main import app

    r = CliRunner().invoke(app, [command, "--config", "synthetic", "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 2
    assert [x for x in r.output.splitlines() if x.strip()] == [line]
    assert not (tmp_path / "run").exists()


def test_sizes_are_printed_in_the_unit_they_need():
    """Was '0.0 GiB' for a feature cache of a few MiB."""
    from pipelines.io import format_size

    assert [format_size(n) for n in (0, 1000, 2048, 5 * 2**20 + 2**19, 2**30 - 1, 3 * 2**30)] == [
        "0 bytes", "1000 bytes", "2.0 KiB", "5.5 MiB", "1024.0 MiB", "3.0 GiB"]
