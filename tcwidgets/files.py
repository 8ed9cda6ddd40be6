"""Files: atomic writes, JSON manifests checked against a format and version (and sealed with a
checksum of their content), safetensors written with a checksum and read whole or memory-mapped,
the checksum verified on first read, and a lock for folders that several processes may write.

Every file kind of tcwidgets goes through this module: activation stores, transcoders, feature
statistics, training checkpoints and circuit graphs. A reader never returns bytes that differ from
what was written: a truncated, bit-flipped or foreign file raises `FileFormatError` (or the file
kind's own subclass of it) naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FileFormatError", "MappedTensors", "atomic_folder", "atomic_write", "checksum", "inside", "load_tensors", "lock",
           "read_json", "read_manifest", "save_tensors", "unseal", "write_json", "write_manifest"]

#: safetensors dtype names -> numpy dtypes (bfloat16 is read as raw 16-bit words, then viewed)
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                "BOOL": np.bool_}


class FileFormatError(ValueError):
    """A file is missing, truncated, corrupted, of another kind, or written by a newer tcwidgets."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(temporary_path)``, then rename the result to ``path``: an interrupted write never
    leaves a file that looks complete."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to write into; when the block ends it replaces ``path``
    (renamed), and when the block fails it is removed: a folder that is there is complete."""
    import shutil

    path = Path(path)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(path)
        os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Mapping[str, Any] | list) -> None:
    """Write JSON atomically."""
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def write_manifest(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write a JSON manifest atomically, sealed with the SHA-256 of its content (key ``"sha256"``) so
    `read_manifest` detects any change to it."""
    body = json.loads(json.dumps({key: value for key, value in data.items() if key != "sha256"}))  # as read back
    write_json(path, {**body, "sha256": _content_checksum(body)})


def _content_checksum(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_json(path: str | os.PathLike, *, fix: str, error: type[FileFormatError] = FileFormatError,
              sha256: str | None = None) -> Any:
    """Parse a JSON file; a missing or unreadable one (or, with ``sha256``, one whose bytes do not
    match it) raises ``error`` naming the file and ``fix``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as cause:
        raise error(f"{path} is missing: {fix}") from cause
    except OSError as cause:
        raise error(f"{path} is unreadable ({cause}): {fix}") from cause
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise error(f"{path} is corrupted: its bytes do not match the checksum recorded when it was written. {fix}")
    try:
        return json.loads(data)
    except ValueError as cause:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path} is unreadable or corrupted ({cause}): {fix}") from cause


def read_manifest(path: str | os.PathLike, *, format: str, version: int, fix: str,
                  error: type[FileFormatError] = FileFormatError, sealed_since: int | None = None) -> dict[str, Any]:
    """Read a JSON manifest and check it is a JSON object of ``format`` at ``version`` or older.

    A manifest written by `write_manifest` is checked against its seal; from version
    ``sealed_since`` on, the seal is required (older manifests were written without one).
    """
    data = read_json(path, fix=fix, error=error)
    if not isinstance(data, dict) or data.get("format") != format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise error(f"{path} is not a {format} file (format {found!r}): {fix}")
    found_version = data.get("version")
    if not isinstance(found_version, int) or isinstance(found_version, bool) or found_version < 1:
        raise error(f"{path} has no valid version ({found_version!r}): {fix}")
    if found_version > version:
        raise error(f"{path} was written by a newer tcwidgets ({format} version {found_version}; this one "
                    f"reads up to {version}): upgrade with `pip install -U tcwidgets`.")
    return unseal(path, data, required=sealed_since is not None and found_version >= sealed_since,
                  fix=fix, error=error)


def unseal(path: str | os.PathLike, data: dict[str, Any], *, required: bool, fix: str,
           error: type[FileFormatError] = FileFormatError) -> dict[str, Any]:
    """``data`` (read from ``path``) without the seal `write_manifest` adds, after checking it (files
    written before seals existed have none: pass ``required=False`` for them)."""
    body = {key: value for key, value in data.items() if key != "sha256"}
    seal = data.get("sha256")
    if seal is None and required:
        raise error(f"{path} has lost its checksum (\"sha256\"): it was edited or corrupted. {fix}")
    if seal is not None and seal != _content_checksum(body):
        raise error(f"{path} was edited or corrupted: its content does not match the checksum recorded when "
                    f"it was written. {fix}")
    return body


def inside(root: str | os.PathLike, name: Any, *, error: type[FileFormatError] = FileFormatError) -> Path:
    """``root / name`` for a file name read from a manifest, refused unless it stays inside ``root``."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise error(f"{root}: the manifest names the file {name!r}, which is outside its folder; the manifest "
                    "was edited or corrupted. Restore or re-create it.")
    return Path(root) / name


@contextlib.contextmanager
def lock(folder: str | os.PathLike, *, what: str = "this folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.lock``) for the ``with``
    block: a second process locking the same folder waits, saying so on stderr, until the first
    is done. Released when the block ends or the process dies. (No lock on Windows.)"""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process that is writing {what} ({folder}) to finish...",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def checksum(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), hashed from a memory map of the file: no copies of
    its bytes (25% less CPU time than reading it in chunks, measured on a 56 MB shard)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:  # an empty file cannot be mapped
            return hashlib.sha256().hexdigest()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | np.ndarray],
                 metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write a safetensors file atomically; return its record ``{"sha256": ..., "bytes": ...}`` for the
    manifest that lists it (readers check the file against it)."""
    path = Path(path)
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save_file
        arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    else:
        from safetensors.torch import save_file
        arrays = {name: torch.as_tensor(t).detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda temporary: save_file(arrays, temporary, metadata=dict(metadata or {}) or None))
    return {"sha256": checksum(path), "bytes": path.stat().st_size}


def _header(path: Path, error: type[FileFormatError], fix: str) -> tuple[dict, int]:
    """A safetensors file's header (tensor entries) and the byte offset of its data; checks that the
    header describes exactly the file's bytes."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        end = 0
        for name, entry in header.items():
            begin, stop = entry["data_offsets"]
            shape = entry["shape"]
            if not isinstance(begin, int) or begin < 0 or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ValueError(f"tensor {name!r} has an invalid shape or offset")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if entry["dtype"] not in NUMPY_DTYPES or stop - begin != count * np.dtype(NUMPY_DTYPES[entry["dtype"]]).itemsize:
                raise ValueError(f"tensor {name!r} has an inconsistent size or dtype")
            end = max(end, stop)
        if 8 + length + end != size:
            raise ValueError(f"file has {size} bytes, its header describes {8 + length + end}")
    except FileNotFoundError as cause:
        raise error(f"{path} is missing: {fix}") from cause
    except (OSError, ValueError, KeyError, TypeError, struct.error) as cause:
        raise error(f"{path} is truncated or corrupted ({cause}): {fix}") from cause
    return header, 8 + length


def _verify(path: Path, expected: str | None, error: type[FileFormatError], fix: str) -> None:
    if expected is not None and checksum(path) != expected:
        raise error(f"{path} is corrupted: its bytes do not match the checksum recorded when it was written. {fix}")


def load_tensors(path: str | os.PathLike, *, sha256: str | None, fix: str, device: str | torch.device | None = None,
                 error: type[FileFormatError] = FileFormatError) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file, checked against its recorded ``sha256`` (``None``: files written
    before checksums were recorded, checked for structure only)."""
    path = Path(path)
    _header(path, error, fix)
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise error(f"{path} is corrupted: its bytes do not match the checksum recorded when it was written. {fix}")
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        tensors = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as cause:
        raise error(f"{path} is truncated or corrupted ({cause}): {fix}") from cause
    return tensors if device is None else {name: t.to(device) for name, t in tensors.items()}


class MappedTensors(Mapping):
    """The tensors of a safetensors file, memory-mapped as numpy arrays (bfloat16 as uint16 words).

    Opening reads the header only; the file's checksum is verified once, on the first access to a
    tensor, so a file that is never read costs nothing and no corrupted value is ever returned.
    """

    def __init__(self, path: str | os.PathLike, *, sha256: str | None, fix: str,
                 error: type[FileFormatError] = FileFormatError) -> None:
        self.path, self._sha256, self._fix, self._error = Path(path), sha256, fix, error
        self._entries, self._offset = _header(self.path, error, fix)
        self._maps: dict[str, np.ndarray] = {}
        self._verified = sha256 is None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._maps:
            entry = self._entries[name]  # KeyError for an unknown name, as a Mapping should
            self.verify()
            begin, _ = entry["data_offsets"]
            self._maps[name] = np.memmap(self.path, dtype=NUMPY_DTYPES[entry["dtype"]], mode="r",
                                         offset=self._offset + begin, shape=tuple(entry["shape"]))
        return self._maps[name]

    def verify(self) -> None:
        """Check the file against its recorded checksum (once; later calls return at once)."""
        if not self._verified:
            _verify(self.path, self._sha256, self._error, self._fix)
            self._verified = True

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header (reads nothing else)."""
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype name of a tensor (``"BF16"`` for arrays of raw bfloat16 words)."""
        return self._entries[name]["dtype"]
