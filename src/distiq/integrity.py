"""File integrity: safetensors files that are truncated or damaged, and weight files whose bytes
changed after a run wrote them.

Two questions, two tools:

- *Can this file be read at all?* :func:`check_safetensors` validates a safetensors file's
  header against its size (without reading the tensor data) and :func:`load_safetensors` loads
  it; both turn a truncated or garbled file into a ``ValueError`` that names the file and says
  what to do, instead of the safetensors library's bare ``SafetensorError``.
- *Is it still the file the run wrote?* A file can be complete and well-formed and still hold
  different numbers (a flipped bit, a copy from another run). :func:`record_hashes` writes the
  SHA-256 of chosen files of a directory to ``checksums.json`` in it; :func:`verify_hashes`
  recomputes them later and raises :class:`IntegrityError` naming the file that changed.
  A directory without ``checksums.json`` (written before checksums existed) is not checked.

Names in ``checksums.json`` are plain file names inside its directory: anything with a path
separator, ``..`` or an absolute path is refused before a file is opened, so a manifest can
never make distiq read (or vouch for) a file elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distiq.config import atomic_write

logger = logging.getLogger(__name__)

CHECKSUMS_FILE = "checksums.json"
CHECKSUMS_FORMAT = "distiq.checksums/1"
_CHUNK = 1 << 20  # bytes read at a time while hashing: memory stays flat for any file size

# Bits per element of every dtype the safetensors format defines.
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


class IntegrityError(ValueError):
    """A file differs from the checksum its directory recorded, or ``checksums.json`` itself is
    unreadable. ``path`` is the file concerned."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _damaged(path: Path, what: str, reason: str) -> ValueError:
    return ValueError(
        f"cannot read {what} from {path}: {reason}. The file is truncated or damaged (an "
        "interrupted copy or write?): re-export it or re-run the step that wrote it"
    )


def check_safetensors(path: str | os.PathLike, what: str) -> dict[str, dict[str, Any]]:
    """Check that ``path`` is a complete safetensors file, reading only its header.

    Checks the 8-byte header length, that the JSON header parses, and that every tensor's dtype,
    shape and byte range agree with each other and with the file's size (the ranges tile the data
    section exactly, as the format requires). Flipped bits inside tensor data pass: that is what
    :func:`verify_hashes` catches.

    Args:
        path: the ``.safetensors`` file.
        what: what the file is, for messages (e.g. ``"the run's model weights"``).

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}`` from the header (without
        ``__metadata__``).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is truncated or its header is damaged (names the file and says to
            re-export it or re-run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: there is no file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _damaged(path, what, f"it is {size} bytes long, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise _damaged(
                path, what, f"its header claims {header_len} bytes but the file has {size}"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, what, f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _damaged(path, what, "its header is not a JSON object")
    data_size = size - 8 - header_len
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    spans = []
    for name, info in tensors.items():
        problem = _tensor_problem(info)
        if problem:
            raise _damaged(path, what, f"tensor {name!r}: {problem}")
        begin, end = info["data_offsets"]
        bits = _DTYPE_BITS.get(info["dtype"])
        if bits is not None and end - begin != math.ceil(math.prod(info["shape"]) * bits / 8):
            raise _damaged(
                path,
                what,
                f"tensor {name!r} ({info['dtype']}, shape {info['shape']}) spans "
                f"{end - begin} bytes",
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _damaged(path, what, f"tensor {name!r} starts at byte {begin}, not {position}")
        position = end
    if position != data_size:
        reason = "truncated" if position > data_size else "longer than its tensors"
        raise _damaged(
            path,
            what,
            f"{reason}: the header describes {position} bytes of tensor data, the file holds "
            f"{data_size}",
        )
    return tensors


def _tensor_problem(info: Any) -> str:
    if not isinstance(info, dict):
        return "its entry is not an object"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(info.get("dtype"), str):
        return "no dtype"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"bad shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"bad data_offsets {offsets!r}"
    return ""


def load_safetensors(path: str | os.PathLike, *, what: str, device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file into ``{name: torch.Tensor}``, with clear errors.

    The header is checked first (:func:`check_safetensors`); anything the safetensors library
    still refuses becomes the same kind of message.

    Args:
        path: the ``.safetensors`` file.
        what: what the file is, for messages (e.g. ``"the quantization state"``).
        device: where the tensors go.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is truncated or damaged (names it; says to re-export or re-run).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_safetensors(path, what)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise _damaged(path, what, str(exc)) from None


def _plain_name(directory: Path, name: Any) -> str:
    """``name`` if it names a file directly inside ``directory``; a ``ValueError`` otherwise."""
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(sep in name for sep in separators)
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise ValueError(
            f"{name!r} is not a plain file name inside {directory}: checksums cover files of "
            "the directory itself (no path separators, '..' or absolute paths)"
        )
    return name


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes as hex, read in chunks (memory does not grow with the file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_hashes(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Record the SHA-256 of files ``names`` of ``directory`` in ``directory/checksums.json``.

    Entries already in the manifest for other files are kept; those for ``names`` are replaced.
    The manifest is written atomically.

    Args:
        directory: the folder holding the files (a run directory).
        names: plain file names inside ``directory`` (e.g. ``["model.safetensors"]``).

    Returns:
        ``{name: sha256 hex}`` of the files just hashed.

    Raises:
        ValueError: a name is not a plain file name (checked for every name before any file is
            opened), or ``names`` is empty.
        FileNotFoundError: a named file does not exist.
    """
    directory = Path(directory)
    names = [_plain_name(directory, name) for name in names]
    if not names:
        raise ValueError(f"record_hashes({directory}): no file names given")
    if CHECKSUMS_FILE in names:
        raise ValueError(f"{CHECKSUMS_FILE} cannot list itself")
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot record checksums: {directory} has no {missing}")
    files = {}
    if (directory / CHECKSUMS_FILE).is_file():
        files = _read_manifest(directory)
    hashes = {}
    for name in names:
        path = directory / name
        hashes[name] = file_sha256(path)
        files[name] = {"sha256": hashes[name], "bytes": path.stat().st_size}
    body = {"format": CHECKSUMS_FORMAT, "algorithm": "sha256", "files": dict(sorted(files.items()))}
    atomic_write(directory / CHECKSUMS_FILE, json.dumps(body, indent=1) + "\n")
    return hashes


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` of ``directory/checksums.json``, every name and entry checked."""
    path = directory / CHECKSUMS_FILE
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(
            f"{path} is not readable JSON ({exc}); re-run to write it again, or delete it to "
            "skip the check",
            path=path,
        ) from None
    files = body.get("files") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or body.get("format") != CHECKSUMS_FORMAT
        or not isinstance(files, dict)
    ):
        raise IntegrityError(
            f"{path} is not a {CHECKSUMS_FORMAT} manifest; re-run to write it again",
            path=path,
        )
    for name, entry in files.items():
        try:
            _plain_name(directory, name)
        except ValueError as exc:
            raise IntegrityError(f"{path}: {exc}", path=path) from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise IntegrityError(f"{path}: the entry of {name!r} is malformed", path=path)
    return files


def verify_hashes(directory: str | os.PathLike, names: Iterable[str] | None = None) -> bool:
    """Check files of ``directory`` against the SHA-256 recorded in its ``checksums.json``.

    Args:
        directory: the folder (a run directory).
        names: check only these recorded files (``None``: every recorded file). A name the
            manifest does not list is not checked.

    Returns:
        ``True`` when every checked file matches; ``False`` when ``directory`` has no
        ``checksums.json`` (a run written before checksums existed: nothing is checked).

    Raises:
        IntegrityError: a file's bytes differ from what was recorded (names the file and both
            hashes: re-run or restore it), or the manifest is damaged.
        FileNotFoundError: a recorded file is missing.
    """
    directory = Path(directory)
    if not (directory / CHECKSUMS_FILE).is_file():
        logger.debug("%s has no %s: files not checked", directory, CHECKSUMS_FILE)
        return False
    files = _read_manifest(directory)
    wanted = list(files) if names is None else [_plain_name(directory, n) for n in names]
    for name in wanted:
        entry = files.get(name)
        if entry is None:
            continue
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing although the run recorded its checksum; restore it or re-run"
            )
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(
                f"{name} changed since the run wrote it ({entry['bytes']} bytes recorded in "
                f"{directory / CHECKSUMS_FILE}, {size} now); re-run or restore it",
                path=path,
            )
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise IntegrityError(
                f"{name} changed since the run wrote it (SHA-256 {entry['sha256']} recorded in "
                f"{directory / CHECKSUMS_FILE}, {actual} now); re-run or restore it",
                path=path,
            )
    return True
