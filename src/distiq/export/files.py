"""The files of an export folder: safe member names, writing a folder whole, replacing only
what distiq exported.

Three rules every exporter and loader here follows:

- **Member names are checked before anything is opened.** A file name read from a manifest (or
  a fixed name looked up in a run directory) must be a plain name — no folder part, not ``..``,
  not absolute — that resolves inside its folder (a symbolic link that leads out of it is
  refused). :func:`member_file` says which name is wrong and where it came from.
- **An export replaces only an earlier distiq export.** :func:`check_destination` refuses a
  folder that holds anything else (a user's files, a run directory), and never writes over a
  folder that is, or contains, a protected one (the run being exported). An export folder is
  recognised by its ``manifest.json`` whose ``format`` starts with ``distiq.``
  (:func:`is_distiq_export`); every format's writer leaves one.
- **A folder is written whole or not at all.** The writer fills a temporary sibling
  (:func:`staging_dir`) and :func:`replace_directory` renames it into place, so a failed export
  leaves the previous one untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

EXPORT_MANIFEST = "manifest.json"
EXPORT_FORMAT_PREFIX = "distiq."
_MAX_MANIFEST_BYTES = 256 << 20  # a manifest bigger than this is not one of ours


class UnsafeFileError(ValueError):
    """A file name that is not a plain name inside its folder (see :func:`member_file`)."""


def member_file(folder: str | os.PathLike, name: object, source: str) -> Path:
    """``folder / name``, after checking that ``name`` is a plain file name inside ``folder``.

    Args:
        folder: the folder the name belongs to (an export, a run directory).
        name: the name as read (from a manifest's JSON: any type).
        source: where the name came from, for the message (``"manifest.json weights_file"``).

    Returns:
        The path (not resolved: links inside the folder stay links).

    Raises:
        UnsafeFileError: ``name`` is not a non-empty string, holds a folder separator, is ``.``
            / ``..`` or absolute, or resolves outside ``folder`` (a link pointing out) — before
            any file is opened.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise UnsafeFileError(f"{source} must be a file name (a non-empty string), got {name!r}")
    plain = (
        name not in (".", "..")
        and "\0" not in name
        and PurePosixPath(name).name == name
        and PureWindowsPath(name).name == name
    )
    if not plain:
        raise UnsafeFileError(
            f"{source} is {name!r}: a file name must be a plain name inside {folder} (no folder "
            "part, no '..', not absolute); the manifest is corrupt or was tampered with"
        )
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UnsafeFileError(
            f"{source} {name!r} is a link that leads outside {folder} (to {path.resolve()}); "
            "refusing to read it"
        )
    return path


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_format(path: str | os.PathLike) -> str | None:
    """The ``format`` of the distiq export in folder ``path`` (``distiq.packed``,
    ``distiq.onnx``, ``distiq.compressed-tensors``, ...), or None when it is not one."""
    path = Path(path)
    file = path / EXPORT_MANIFEST
    try:
        if not path.is_dir() or not file.is_file() or file.is_symlink():
            return None
        if file.stat().st_size > _MAX_MANIFEST_BYTES:
            return None
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) and fmt.startswith(EXPORT_FORMAT_PREFIX) else None


def is_distiq_export(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds an export distiq wrote (see :func:`export_format`)."""
    return export_format(path) is not None


def check_destination(
    path: str | os.PathLike, *, overwrite: bool, protect: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """Check that an export may be written to folder ``path`` (nothing is changed).

    Args:
        path: the export's folder.
        overwrite: whether an earlier export there may be replaced.
        protect: folders that must survive (the run being exported): ``path`` may be neither
            one of them nor a folder containing one.

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: ``path`` is a protected folder or contains one.
        FileExistsError: ``path`` is a file; a non-empty folder without ``overwrite``; or a
            non-empty folder that is not a distiq export (never replaced, whatever
            ``overwrite`` says).
    """
    path = Path(path)
    target = path.resolve()
    for kept in protect:
        kept_path = Path(kept).resolve()
        if target == kept_path or kept_path.is_relative_to(target):
            what = "the run directory itself" if target == kept_path else "a parent of the run"
            raise ValueError(
                f"refusing to export to {path}: it is {what} ({kept}), which the export would "
                "replace; choose another output folder (the default is RUN_DIR/export/<format>)"
            )
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a folder; choose another output folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} is not empty; pass overwrite=True to replace it")
        if not is_distiq_export(path):
            raise FileExistsError(
                f"{path} holds files that are not a distiq export (no {EXPORT_MANIFEST} with a "
                "distiq format), so it is not replaced: choose another output folder, or empty "
                "it yourself"
            )
    return path


def staging_dir(path: Path) -> Path:
    """A new empty temporary folder beside ``path`` (same file system, so the final rename is
    atomic), named ``.<name>.tmp-XXXX``; the caller removes it if the export fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))


def replace_directory(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``; an old ``path`` is renamed aside first and
    deleted only once the new one is in place."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
