"""Checkpoints are read weights-only and checked against their kind's schema.

A checkpoint carrying code (a pickled object whose ``__reduce__`` runs a shell command that
writes a marker file) is refused by every command that reads one, with one error line and the
marker never written; a checkpoint of any kind with a required key removed is one line naming the
file and the key.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import DetectorConfig, SolverConfig
from pipelines.checkpoint import FORMAT, SCHEMAS, load_checkpoint, save_checkpoint
from pipelines.engine.loop import Trainer, rng_state, set_rng_state
from pipelines.errors import MaskxError
from pipelines.modeling.detector import build_backbone

runner = CliRunner()


class Payload:
    """Unpickling this runs ``touch MARKER`` (what a malicious shared checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def carrying_code(path, marker, kind: str, **extra) -> None:
    """A file that still says ``format: maskx-checkpoint`` and ``kind``, with a code-running value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "kind": kind, "model": {}, "payload": Payload(marker), **extra}, path)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_the_payload_does_run_when_unpickled_unsafely(tmp_path):
    """The test payload is real: an unsafe load writes the marker (so its absence below means something)."""
    marker = tmp_path / "ran"
    carrying_code(tmp_path / "x.pth", marker, "mask")
    torch.load(tmp_path / "x.pth", weights_only=False)
    assert marker.exists()


def _mask_overrides(tiny_pipeline) -> list[str]:
    args = []
    for item in [o for o in tiny_pipeline["overrides"] if not o.startswith("detector.")] + [
            "solver.iterations=3", "solver.warmup_iters=1", "solver.batch_size=16", "head.mask_dim=16", "head.mlp_hidden=32"]:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("command", ["eval", "predict", "mask-train --resume", "export-embeddings"])
def test_a_checkpoint_carrying_code_is_refused_and_never_run(tiny_pipeline, tiny_world, tmp_path, command):
    marker = tmp_path / "MARKER"
    det = tiny_pipeline["detector"]
    if command == "eval":
        run = tmp_path / "mask"
        shutil.copytree(tiny_pipeline["runs"]["transfer"], run)
        bad = run / "mask_final.pth"
        carrying_code(bad, marker, "mask")
        args = ["eval", str(run), "--split", "nonvoc", "--detector", str(det)]
    elif command == "predict":
        run = tmp_path / "mask"
        shutil.copytree(tiny_pipeline["runs"]["transfer"], run)
        bad = run / "mask_final.pth"
        carrying_code(bad, marker, "mask")
        args = ["predict", str(tiny_world.val_dir), "--mask", str(run), "--detector", str(det), "--out", str(tmp_path / "p")]
    elif command == "mask-train --resume":
        run = tmp_path / "mask"
        bad = run / "last.pth"
        carrying_code(bad, marker, "mask-train", iteration=1)
        args = ["mask-train", "--detector", str(det), "--embeddings", str(tiny_pipeline["embeddings"]), "--out", str(run),
                "--config", "synthetic", "--resume", *_mask_overrides(tiny_pipeline)]
    else:
        bad_det = tmp_path / "det"
        shutil.copytree(det, bad_det, ignore=shutil.ignore_patterns("cache"))
        bad = bad_det / "model_final.pth"
        carrying_code(bad, marker, "detector")
        args = ["export-embeddings", str(bad_det), "--out", str(tmp_path / "e.h5")]
    line = one_error_line(runner.invoke(app, args))
    assert line == (f"error: {bad}: not a maskx checkpoint, or one that carries code (loading it would call "
                    f"posix.system); nothing of it was run")
    assert not marker.exists()
    assert not (tmp_path / "e.h5").exists() and not (tmp_path / "p").exists()


def test_a_bare_pickle_carrying_code_is_refused(tmp_path):
    marker, path = tmp_path / "MARKER", tmp_path / "x.pth"
    path.write_bytes(pickle.dumps({"format": FORMAT, "kind": "mask", "payload": Payload(marker)}))
    with pytest.raises(MaskxError, match=r"not a maskx checkpoint, or one that carries code \(the weights-only reader "
                                         r"refused it: Unsupported operand"):
        load_checkpoint(path)
    assert not marker.exists()


def test_third_party_backbone_weights_are_read_weights_only(tmp_path):
    marker, path = tmp_path / "MARKER", tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, path)
    with pytest.raises(MaskxError, match="not plain pretrained backbone weights, or one that carries code") as exc:
        build_backbone(DetectorConfig(backbone="resnet18", pretrained_backbone=str(path)))
    assert exc.value.path == str(path) and not marker.exists()


# -- schemas ------------------------------------------------------------------------------------
def _training_checkpoint(tmp_path, kind: str):
    """A ``last.pth`` of ``kind`` written by the engine's Trainer, with the stage's extra keys."""
    extra = {"config": {"detector": {}, "data": {}}, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    if kind == "mask-train":
        extra["set_a"] = [1]
    solver = SolverConfig(iterations=1, warmup_iters=0, batch_size=1, reference_batch_size=1, device="cpu")
    Trainer(torch.nn.Linear(2, 1), solver, tmp_path, kind, extra=extra).save(1)
    return tmp_path / "last.pth"


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_required_key_of_every_kind_is_checked(tiny_pipeline, tmp_path, kind):
    if kind == "detector":
        source = tiny_pipeline["detector"] / "model_final.pth"
    elif kind == "mask":
        source = tiny_pipeline["runs"]["transfer"] / "mask_final.pth"
    else:
        source = _training_checkpoint(tmp_path / "run", kind)
    good = load_checkpoint(source, kind)  # the real file passes its schema
    required = [key for key, field in SCHEMAS[kind].items() if field.required]
    assert {"model", "iteration"} <= set(required)
    path = tmp_path / "broken.pth"
    for key in required:
        broken = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        node, *rest = key.split(".")
        if rest:
            del broken[node][rest[0]]
        else:
            del broken[key]
        torch.save(broken, path)
        with pytest.raises(MaskxError) as exc:
            load_checkpoint(path, kind)
        assert exc.value.path == str(path)
        assert exc.value.message == f"this {kind} checkpoint has no '{key}' (cut short, or not written by maskx?)"


def test_a_mistyped_key_names_the_key_and_the_type(tiny_pipeline, tmp_path):
    ckpt = load_checkpoint(tiny_pipeline["runs"]["transfer"] / "mask_final.pth")
    ckpt["iteration"] = "3"
    torch.save(ckpt, tmp_path / "m.pth")
    with pytest.raises(MaskxError, match=r"this mask checkpoint's 'iteration' must be an integer, got str"):
        load_checkpoint(tmp_path / "m.pth")
    ckpt["iteration"], ckpt["model"] = 3, {"w": [1.0]}
    torch.save(ckpt, tmp_path / "m.pth")
    with pytest.raises(MaskxError, match=r"'model' must be a dict of tensors, got dict"):
        load_checkpoint(tmp_path / "m.pth")


def test_eval_of_a_mask_checkpoint_without_its_detector_hash_is_one_line(tiny_pipeline, tmp_path):
    """The issue's case: was a KeyError: 'detector_sha256' traceback."""
    run = tmp_path / "mask"
    shutil.copytree(tiny_pipeline["runs"]["transfer"], run)
    ckpt = load_checkpoint(run / "mask_final.pth")
    del ckpt["detector_sha256"]
    torch.save(ckpt, run / "mask_final.pth")
    line = one_error_line(runner.invoke(app, ["eval", str(run), "--detector", str(tiny_pipeline["detector"])]))
    assert line == f"error: {run / 'mask_final.pth'}: this mask checkpoint has no 'detector_sha256' (cut short, or not written by maskx?)"


def test_weights_that_do_not_fit_the_described_model_are_one_line(tiny_pipeline, tmp_path):
    det = tmp_path / "det"
    shutil.copytree(tiny_pipeline["detector"], det, ignore=shutil.ignore_patterns("cache"))
    ckpt = load_checkpoint(det / "model_final.pth")
    ckpt["config"]["detector"]["box_representation"] *= 2
    save_checkpoint(det / "model_final.pth", "detector", **{k: v for k, v in ckpt.items() if k not in ("format", "kind")})
    line = one_error_line(runner.invoke(app, ["export-embeddings", str(det), "--out", str(tmp_path / "e.h5")]))
    assert line.startswith(f"error: {det / 'model_final.pth'}: the weights do not fit the model this checkpoint describes "
                           f"(size mismatch for")


# -- random-generator states --------------------------------------------------------------------
def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), [random.random() for _ in range(3)]


def test_rng_state_is_plain_data_and_round_trips_exactly(tmp_path):
    np.random.randn()  # a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = rng_state()
    torch.save(state, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)  # no allow-list needed
    expected = _draws()
    set_rng_state(loaded)
    assert _draws() == expected


def test_training_checkpoint_of_an_earlier_version_still_resumes_exactly(tmp_path):
    """``last.pth`` files that hold numpy's state as a uint32 array (and Python's as a tuple) still load."""
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    expected = _draws()
    path = _training_checkpoint(tmp_path, "detector-train")
    ckpt = torch.load(path, weights_only=True)
    ckpt["rng"], ckpt["rng_ranks"] = legacy, [legacy]
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # it does need numpy's globals
    loaded = load_checkpoint(path, "detector-train")
    set_rng_state(loaded["rng"])
    assert _draws() == expected


def test_numpy_arrays_other_than_uint32_are_not_allowed(tmp_path):
    """The allow-list for earlier files rebuilds uint32 arrays only: an object array cannot smuggle code."""
    marker, path = tmp_path / "MARKER", tmp_path / "last.pth"
    objects = np.empty(1, dtype=object)
    objects[0] = Payload(marker)
    torch.save({"format": FORMAT, "kind": "detector-train", "rng": {"numpy": ("MT19937", objects, 0, 0, 0.0)}}, path)
    with pytest.raises(MaskxError, match="not a maskx checkpoint, or one that carries code"):
        load_checkpoint(path)
    assert not marker.exists()


# -- checksums of final checkpoints ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mask", "detector"])
def test_a_final_checkpoint_with_100_kb_zeroed_inside_is_refused_by_its_recorded_sha256(tiny_pipeline, tmp_path, kind):
    """Was: a mask checkpoint with 100 KB zeroed inside loaded silently and changed predictions."""
    from pipelines.engine.run_dir import load_detector_run, load_mask_run
    from pipelines.io import sha256_file

    source, name = (tiny_pipeline["runs"]["transfer"], "mask_final.pth") if kind == "mask" else \
        (tiny_pipeline["detector"], "model_final.pth")
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("cache"))
    path = run / name
    assert json.loads((run / "manifest.json").read_text())["checkpoints"][name] == sha256_file(path)  # recorded when written
    load = (lambda: load_mask_run(run)) if kind == "mask" else (lambda: load_detector_run(run))
    load()  # the intact file loads
    data = bytearray(path.read_bytes())
    assert len(data) > 300_000
    middle = len(data) // 2 - 50_000
    data[middle:middle + 100_000] = bytes(100_000)
    path.write_bytes(bytes(data))
    load_checkpoint(path, kind)  # the damage itself still reads as a checkpoint of its kind: only the checksum sees it
    with pytest.raises(MaskxError) as exc:
        load()
    assert exc.value.path == str(path)
    assert re.fullmatch(r"damaged or replaced since it was written: its SHA-256 is [0-9a-f]{12}…, manifest.json recorded "
                        r"[0-9a-f]{12}… \(train or import it again, or restore the file\)", exc.value.message), exc.value.message
    if kind == "mask":  # what a command shows: one line naming the file
        line = one_error_line(runner.invoke(app, ["eval", str(run), "--detector", str(tiny_pipeline["detector"])]))
        assert line.startswith(f"error: {path}: damaged or replaced since it was written")
