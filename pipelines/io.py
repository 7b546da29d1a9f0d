"""File helpers: atomic writes, content hashes, JSON/YAML loading with clear errors."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipelines.errors import MaskxError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TMP_SUFFIX = ".tmp"
# What atomic_path's temporaries are called: ".<name>.<8 random characters>.tmp" beside <name>.
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")
# Below this much free space, a writer's own error (not an OSError) is taken for a full disk.
_NEARLY_FULL = 1 << 20


def leaves_folder(name: str) -> bool:
    """Whether the relative path ``name`` (a data set's ``file_name``) points outside the folder it is
    read from: an absolute path (``/data/x.jpg``, which joining to the folder keeps as it is) or one
    that climbs out with ``..`` (``../x.jpg``; ``a/../x.jpg`` stays inside)."""
    name = str(name).replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:/", name):
        return True
    parts: list[str] = []
    for part in name.split("/"):
        if part == "..":
            if not parts:
                return True
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return False


def format_size(n: float) -> str:
    """A size in bytes as a person reads it: ``1.5 GiB``, ``640.0 MiB``, ``12.0 KiB``, ``512 bytes``
    (never ``0.0 GiB`` for a size that is not zero)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def os_error_reason(exc: OSError) -> str:
    """An OSError in a few words: the system's text for its errno ("No space left on device").

    h5py raises OSErrors with an errno whose text is HDF5's multi-line internals; the errno's own
    text is what a user needs.
    """
    if exc.errno:
        return os.strerror(exc.errno)
    lines = [s.strip() for s in str(exc.strerror or exc).splitlines() if s.strip()]
    return lines[0] if lines else exc.__class__.__name__


def make_parent(path: str | Path) -> Path:
    """Create the folder of ``path`` (and its parents) or raise one MaskxError naming the culprit."""
    path = Path(path)
    for ancestor in [path.parent, *path.parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise MaskxError(f"is a file, not a folder: cannot write {path} inside it", ancestor)
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MaskxError(f"cannot write here: {os_error_reason(exc)}", path.parent) from exc
    return path.parent


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file: on any exception the temporary file is removed, and a
    failed write (a full disk, a quota, an I/O error: an OSError, or a writer's own error such as
    ``torch.save``'s RuntimeError when the disk is full) is one MaskxError naming ``path``.
    """
    path = Path(path)
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise MaskxError(f"cannot write here: {os_error_reason(exc)}", path.parent) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes owner-only files; give the result a normal file's mode
            tmp_path.chmod(0o666 & ~_umask())
        os.replace(tmp_path, path)
    except MaskxError:
        discard(tmp_path)
        raise
    except OSError as exc:
        discard(tmp_path)
        raise MaskxError(f"could not be written: {os_error_reason(exc)}", path) from exc
    except Exception as exc:
        full = _nearly_full(path.parent)  # measured before the temporary file frees its space
        discard(tmp_path)
        if full:
            raise MaskxError(f"could not be written: {os.strerror(errno.ENOSPC)}", path) from exc
        raise
    except BaseException:
        discard(tmp_path)
        raise


@contextlib.contextmanager
def all_or_nothing(out: str | Path) -> Iterator[Path]:
    """Yield a hidden staging folder inside the existing folder ``out`` for a command's several output
    files; when the block succeeds, move each of them into ``out`` (replacing files of the same name)
    and remove the staging folder; when it fails, remove the staging folder and what it holds.

    So a command that writes several files (``predict``'s pictures, ``predictions.json`` and
    ``images.json``; ``prepare-vg``'s six) leaves all of them or none: a full disk met on the third
    file leaves neither the first two nor a temporary. The moves are renames within one folder,
    which need no space. A failed write is one MaskxError naming the file (see :func:`atomic_path`,
    which writes inside the staging folder as anywhere).
    """
    out = Path(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=TMP_SUFFIX, dir=out))
    except OSError as exc:
        raise MaskxError(f"cannot write here: {os_error_reason(exc)}", out) from exc
    try:
        try:
            yield staging
        except MaskxError as exc:  # name the file where it was to go, not its staging place
            inside = exc.path is not None and Path(exc.path).is_relative_to(staging)
            if not inside:
                raise
            raise MaskxError(exc.message, staged_path(staging, out, Path(exc.path)), exc.key) from None
        for item in sorted(staging.iterdir()):
            try:
                os.replace(item, out / item.name)
            except OSError as exc:
                raise MaskxError(f"could not be written: {os_error_reason(exc)}", out / item.name) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staged_path(staging: Path, out: Path, path: Path) -> Path:
    """Where ``path``, written in ``staging`` (:func:`all_or_nothing`), lies once moved into ``out``."""
    return out / Path(path).relative_to(staging)


def discard(path: str | Path) -> None:
    """Remove ``path`` if it is there, cleaning up after a failure: a disk that has turned read-only
    cannot remove it, and then the failure's own error is the one to report, not this one."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def write_problem(folder: str | Path) -> str | None:
    """Why no file can be created in the existing folder ``folder`` ("Read-only file system",
    "Permission denied"), or None. Tried with a temporary file, not read from the mode bits, which
    root ignores and which do not show a read-only mount."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as exc:
        return os_error_reason(exc)
    os.close(fd)
    discard(tmp)
    return None


@contextlib.contextmanager
def hdf5_file(path: str | Path) -> Iterator[Any]:
    """An ``h5py.File`` opened for writing that lands on ``path`` atomically (see :func:`atomic_path`).

    HDF5 cannot be let meet a failed write itself: when a write or its flush hits a full disk,
    HDF5 (1.8 to 2.0) leaves its objects half-closed and the process dies of a segmentation fault
    on exit (h5py issue 914). So HDF5 writes through a Python file that keeps the first OSError and
    from then on drops what it is given; once HDF5 has closed the file, that OSError is raised and
    becomes the one ``could not be written: No space left on device`` line, with the temporary
    file removed.
    """
    import h5py

    with atomic_path(path) as tmp, open(tmp, "w+b", buffering=0) as raw:
        sink = KeepWriteError(raw, drop_after_error=True)
        try:
            with h5py.File(sink, "w") as f:
                yield f
        except Exception:
            if sink.error is not None:  # what HDF5 made of the dropped writes: the disk's error is the cause
                raise sink.error from None
            raise
        if sink.error is not None:
            raise sink.error


class KeepWriteError(io.RawIOBase):
    """A seekable binary file that keeps the OSError of its first failed write in ``error``.

    ``drop_after_error=False``: the error is raised as well (``torch.save`` then stops, with a
    RuntimeError that hides it). ``True``: writes never fail; after the first error they are dropped
    (for HDF5, which must not see a write fail, see :func:`hdf5_file`).
    """

    def __init__(self, f, drop_after_error: bool):
        super().__init__()
        self._f, self.error, self._drop = f, None, drop_after_error

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def write(self, b) -> int:
        n = len(memoryview(b))
        if self.error is None:
            try:
                return self._f.write(b)
            except OSError as exc:
                self.error = exc
                if not self._drop:
                    raise
        end = self._f.seek(n, os.SEEK_CUR)
        if end > os.fstat(self._f.fileno()).st_size:
            with contextlib.suppress(OSError):  # a sparse extension: HDF5 sees the end of file it expects
                self._f.truncate(end)
        return n

    def truncate(self, size: int | None = None) -> int:
        try:
            return self._f.truncate(size)
        except OSError as exc:
            self.error = self.error or exc
            if not self._drop:
                raise
            return self.tell() if size is None else size

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = self.error or exc
            if not self._drop:
                raise


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL
    except OSError:
        return False


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries :func:`atomic_path` left in ``folder`` when a process was killed mid-write.

    Only call this where no other process is writing (a run folder being opened by its one writer).
    Returns the files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if _TMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MaskxError(f"{what} not found", path)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"  # "Unterminated string starting at" ends in "at" itself
        problem = f"{exc.msg} {where}" if exc.msg.endswith(" at") else f"{exc.msg} at {where}"
        raise MaskxError(f"not valid JSON (truncated or corrupt?): {problem}", path) from exc
    except UnicodeDecodeError as exc:
        raise MaskxError("not valid JSON: not UTF-8 text", path) from exc


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true / false. (YAML 1.1 also reads on, off,
    yes, no, y, n as booleans, so ``amp: off`` or ``--set solver.amp=off`` would give False.)"""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse YAML text (a recipe, a spec, an override's value) with YAML 1.2's booleans only."""
    return yaml.load(text, Loader=_ConfigLoader)


def read_yaml(path: str | Path, what: str = "YAML file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MaskxError(f"{what} not found", path)
    try:
        return load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise MaskxError(f"not valid YAML: {str(exc).splitlines()[0]}", path) from exc


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of an object's canonical JSON form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def file_lock(path: str | Path, on_wait=None, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, and removed when released) for the block.

    Another process (or thread) asking for the same lock waits until it is released; ``on_wait()``
    is called once if it has to wait (``wait=False``: it raises ``BlockingIOError`` instead). The
    lock file is removed on release; a waiter that then finds its file gone or replaced takes the
    lock anew, so removal never lets two holders in. The lock is the kernel's (``flock``): a process
    that dies releases it, so a lock file left by a killed process blocks no one.
    """
    import fcntl

    path = Path(path)
    waited = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666 & ~_umask())  # flock needs no write access
        except OSError as exc:
            raise MaskxError(f"cannot create a lock file: {exc.strerror or exc}", path) from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed (or replaced) the file while we waited: lock the current one
    try:
        yield
    finally:
        try:
            discard(path)  # not raised where the disk has turned read-only: the lock is released all the same
        finally:
            os.close(fd)  # closing releases the lock


def file_name_from_url(url: str) -> str:
    """The image's folder and name in its URL, as a data set's ``file_name``:
    ``http://images.cocodataset.org/val2017/000000397133.jpg`` -> ``val2017/000000397133.jpg`` (COCO, LVIS),
    ``https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg`` -> ``VG_100K_2/1.jpg`` (Visual Genome)."""
    parts = [p for p in str(url).split("/") if p]
    return "/".join(parts[-2:])
