"""The embeddings file is checked against its schema (docs/embeddings.md) and its detector when read."""

from __future__ import annotations

import errno
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.errors import MaskxError
from pipelines.engine.run_dir import check_embeddings_fit, load_detector_run
from pipelines.modeling.embeddings import DATASETS, read_embeddings
from pipelines.stages.export_embeddings import export_embeddings

runner = CliRunner()


def edited(tiny_pipeline, tmp_path, edit) -> str:
    """A copy of the tiny pipeline's embeddings with ``edit(h5py.File)`` applied."""
    path = tmp_path / "emb.h5"
    shutil.copy(tiny_pipeline["embeddings"], path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return str(path)


def replace(name, data):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def test_the_exported_file_passes_its_schema(tiny_pipeline):
    emb = read_embeddings(tiny_pipeline["embeddings"])
    k, d = emb.w_cls.shape
    assert (k, d) == (80, 64) and emb.w_box.shape == (80, 256)
    check_embeddings_fit(emb, load_detector_run(tiny_pipeline["detector"]))


@pytest.mark.parametrize("name,data,message", [
    ("w_box", np.zeros((80, 1000), np.float32),
     "embeddings dataset 'w_box' has shape [80, 1000], expected [K=80 × 4D=256] (K from class_ids, D from w_cls; docs/embeddings.md)"),
    ("w_box", np.zeros((79, 256), np.float32),
     "embeddings dataset 'w_box' has shape [79, 256], expected [K=80 × 4D=256] (K from class_ids, D from w_cls; docs/embeddings.md)"),
    ("w_cls", np.zeros((80,), np.float32),
     "embeddings dataset 'w_cls' has shape [80], expected [K=80 × D] (K from class_ids, D from w_cls; docs/embeddings.md)"),
    ("b_box", np.zeros((80, 3), np.float32),
     "embeddings dataset 'b_box' has shape [80, 3], expected [K=80 × 4] (K from class_ids, D from w_cls; docs/embeddings.md)"),
    ("set_a", np.zeros((81,), bool),
     "embeddings dataset 'set_a' has shape [81], expected [K=80] (K from class_ids, D from w_cls; docs/embeddings.md)"),
    ("class_ids", np.arange(80, dtype=np.float64), "embeddings dataset 'class_ids' is float64, expected integer (docs/embeddings.md)"),
    ("class_names", np.arange(80), "embeddings dataset 'class_names' is int64, expected string (docs/embeddings.md)"),
])
def test_a_dataset_that_breaks_the_schema_is_named(tiny_pipeline, tmp_path, name, data, message):
    path = edited(tiny_pipeline, tmp_path, replace(name, data))
    with pytest.raises(MaskxError) as exc:
        read_embeddings(path)
    assert exc.value.path == path and exc.value.message == message


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_a_missing_dataset_is_named(tiny_pipeline, tmp_path, name):
    path = edited(tiny_pipeline, tmp_path, lambda f: f.__delitem__(name))
    with pytest.raises(MaskxError) as exc:
        read_embeddings(path)
    assert exc.value.path == path and exc.value.message == f"embeddings file has no '{name}' dataset"


def test_embeddings_of_another_box_head_width_do_not_fit_the_detector(tiny_pipeline, tmp_path):
    """A self-consistent file (w_cls [K, 32], w_box [K, 128]) that claims this detector's hash."""
    def edit(f):
        replace("w_cls", np.zeros((80, 32), np.float32))(f)
        replace("w_box", np.zeros((80, 128), np.float32))(f)

    path = edited(tiny_pipeline, tmp_path, edit)
    emb = read_embeddings(path)  # consistent with itself
    with pytest.raises(MaskxError, match="embeddings dataset 'w_cls' is 32 wide but the detector's box head is 64 wide"):
        check_embeddings_fit(emb, load_detector_run(tiny_pipeline["detector"]))


def test_mask_train_refuses_a_broken_file_with_one_line(tiny_pipeline, tmp_path):
    """Was a 47-line traceback (Sizes of tensors must match) for w_box with 79 rows."""
    path = edited(tiny_pipeline, tmp_path, replace("w_box", np.zeros((79, 256), np.float32)))
    r = runner.invoke(app, ["mask-train", "--detector", str(tiny_pipeline["detector"]), "--embeddings", path,
                            "--out", str(tmp_path / "m")])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines == [f"error: {path}: embeddings dataset 'w_box' has shape [79, 256], expected [K=80 × 4D=256] "
                     f"(K from class_ids, D from w_cls; docs/embeddings.md)"]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name, value, row", [("w_cls", float("nan"), 5), ("w_box", float("inf"), 0), ("b_cls", -float("inf"), 79)])
def test_non_finite_weights_are_refused_when_read_naming_the_file(tiny_pipeline, tmp_path, name, value, row):
    """Was: read as they were; mask-train then stopped with 'loss became non-finite ... lower the learning rate'."""
    def edit(f):
        data = f[name][()]
        data[row, ...] = value
        replace(name, data)(f)

    path = edited(tiny_pipeline, tmp_path, edit)
    class_id = int(read_embeddings(tiny_pipeline["embeddings"]).class_ids[row])
    n = int(np.prod(h5py.File(path, "r")[name].shape[1:]))
    message = (f"embeddings dataset '{name}' holds {n} non-finite value(s) (NaN or infinity; first in row {row}, class id "
               f"{class_id}): the file is damaged, or exported from a detector whose training diverged")
    with pytest.raises(MaskxError) as exc:
        read_embeddings(path)
    assert (exc.value.path, exc.value.message) == (path, message)
    r = runner.invoke(app, ["mask-train", "--detector", str(tiny_pipeline["detector"]), "--embeddings", path,
                            "--out", str(tmp_path / "m"), "--iterations", "1"])
    assert r.exit_code == 2, r.output
    assert [line for line in r.output.splitlines() if line.strip()] == [f"error: {path}: {message}"]
    assert not (tmp_path / "m").exists()


def test_out_inside_a_file_names_the_file(tiny_pipeline, tmp_path):
    blocker = tmp_path / "FILE"
    blocker.write_text("a file")
    r = runner.invoke(app, ["export-embeddings", str(tiny_pipeline["detector"]), "--out", str(blocker / "emb.h5")])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {blocker}: is a file, not a folder: cannot write {blocker / 'emb.h5'} inside it"


def test_hdf5_write_failure_is_one_line_without_hdf5_internals(tiny_pipeline, tmp_path, monkeypatch):
    """h5py reports a full disk as errno 28 with HDF5's two-line description of the failed write."""
    def full(self, name, *args, **kwargs):
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Tue Dec  1 22:22:03 2026\n"
                                    ", filename = 'emb.h5', file descriptor = 3, errno = 28, error message = 'No space "
                                    "left on device', buf = 0x7f76, total write size = 1294848, offset = 307200)")

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    out = tmp_path / "emb.h5"
    with pytest.raises(MaskxError) as exc:
        export_embeddings(tiny_pipeline["detector"], out)
    assert exc.value.line() == f"{out}: could not be written: No space left on device"
    assert list(tmp_path.iterdir()) == []  # no temporary file left
