"""Validated config objects: dataclasses <-> plain dicts <-> YAML, with every error reported at once.

``from_dict(Cls, data)`` builds a (frozen) dataclass from a dict read from YAML. It checks unknown
keys (with "did you mean"), missing required keys, types (int, float, str, bool, Literal, tuples,
lists, dicts, nested dataclasses, ``X | None``) and collects *every* problem into one
``ConfigError`` whose message lists them with their dotted location. A class can take part in
(de)serialisation with a ``_from_config(value)`` classmethod and a ``_to_config()`` method.
A dataclass may also define ``_validate(self) -> list[str]`` for cross-field checks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from distiq.util import suggest

T = TypeVar("T")

# The range of integer settings: 64-bit signed, what torch and numpy take.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """One or more problems in a configuration. ``errors`` holds each message."""

    def __init__(self, errors: list[str] | str, source: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        if len(self.errors) == 1:
            super().__init__(f"{head}: {self.errors[0]}")
        else:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            super().__init__(f"{head} ({len(self.errors)} problems):\n{lines}")


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _show_int(value: int) -> str:
    # str() of an int over 4300 digits raises ValueError (Python's int-to-str limit)
    return str(value) if value.bit_length() < 4000 else f"an integer of {value.bit_length()} bits"


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append problems to ``errors`` and return a best effort."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for arg in non_none:  # first conversion without errors wins
            trial: list[str] = []
            out = _convert(value, arg, where, trial)
            if not trial:
                return out
        if len(non_none) == 1:
            return _convert(value, non_none[0], where, errors)
        errors.append(f"{where}: {value!r} is not one of {', '.join(map(_type_name, args))}")
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
            errors.append(
                f"{where}: {value!r} is not allowed{hint}; choose one of "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                errors.append(f"{where}: expected {len(args)} items, got {len(value)}")
                return tuple(value)
            items = [
                _convert(v, a, _join(where, i), errors) for i, (v, a) in enumerate(zip(value, args))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, _join(where, i), errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return value
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            _convert(k, key_tp, where, errors): _convert(v, val_tp, _join(where, str(k)), errors)
            for k, v in value.items()
        }
    if isinstance(tp, type) and hasattr(tp, "_from_config"):
        if isinstance(value, tp):
            return value
        try:
            return tp._from_config(value)
        except ConfigError as exc:  # a nested from_dict: its errors carry their locations
            errors.extend(exc.errors)
            return value
        except (ValueError, TypeError) as exc:
            errors.append(f"{where}: {exc}")
            return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
            return value
        return _build(tp, value, where, errors)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range (about 1.8e308)
            errors.append(f"{where}: {_show_int(value)} is out of range for a number")
            return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        elif not INT_MIN <= value <= INT_MAX:
            # torch, numpy and the checkpoint files hold at most 64-bit integers; a bigger one
            # would fail much later (e.g. torch.manual_seed) without naming the setting
            errors.append(
                f"{where}: {_show_int(value)} is out of range; integer settings must lie between "
                f"{INT_MIN} and {INT_MAX} (64-bit)"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | os.PathLike):
            errors.append(f"{where}: expected a path, got {value!r}")
            return value
        return Path(value)
    return value


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, once per class (it evaluates every annotation string, a
    cost paid per layer when a config overrides every layer)."""
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: dict, where: str, errors: list[str]) -> T:
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    value_errors: list[str] = []  # problems with values (unknown keys do not stop construction)
    for key, value in data.items():
        if key not in fields:
            errors.append(
                f"{_join(where, str(key))}: unknown key{suggest(str(key), list(fields))}; "
                f"{cls.__name__} takes {', '.join(fields)}"
            )
            continue
        kwargs[key] = _convert(value, hints[key], _join(where, key), value_errors)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in data:
            value_errors.append(f"{_join(where, name)}: required key is missing")
    if value_errors:
        errors.extend(value_errors)
        return None  # type: ignore[return-value]
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        errors.append(f"{where or cls.__name__}: {exc}")
        return None  # type: ignore[return-value]
    validate = getattr(obj, "_validate", None)
    if validate is not None:
        errors.extend(f"{where or cls.__name__}: {msg}" for msg in validate())
    return obj


def from_dict(cls: type[T], data: dict, *, source: str | None = None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; raise one ``ConfigError`` listing every problem."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping for {cls.__name__}, got {type(data).__name__}", source
        )
    obj = _build(cls, data, where, errors)
    if errors:
        raise ConfigError(errors, source)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML/JSON-safe) view of a config object; inverse of ``from_dict``."""
    if hasattr(obj, "_to_config"):
        return obj._to_config()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``3E5`` as floats (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class NotUTF8Error(ValueError):
    """A text file that is not UTF-8. ``path`` and ``detail`` (the message without the path)."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The text of ``path`` decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        NotUTF8Error: (a ``ValueError``) the bytes are not UTF-8; the message names the file,
            the line and the byte, and says that ``what`` must be saved as UTF-8.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        detail = (
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}, offset {exc.start}); "
            f"a {what} must be UTF-8: save it with UTF-8 encoding"
        )
        raise NotUTF8Error(path, detail) from None


def load_yaml(path: str | os.PathLike, what: str = "recipe or config file") -> Any:
    """Read a UTF-8 YAML file; a syntax error or a non-UTF-8 byte becomes a ``ConfigError``
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}", str(path))
    try:
        text = read_utf8(path, what)
    except NotUTF8Error as exc:
        raise ConfigError(exc.detail, str(path)) from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", str(path)) from None


_ATOMIC_SUFFIX = ".tmp"


def is_atomic_temp(name: str) -> bool:
    """Whether file ``name`` is :func:`atomic_write`'s temporary file (``.<name>.<random>.tmp``),
    i.e. a write in progress (or one a killed process left behind)."""
    return name.startswith(".") and name.endswith(_ATOMIC_SUFFIX)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a
    crash never leaves a half-written file and an existing file is replaced only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_ATOMIC_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(directory: str | os.PathLike, what: str = "the output", hint: str = "") -> Path:
    """Create ``directory`` if needed and check that files can be written there, before any long
    work. Raises ``NotADirectoryError`` / ``PermissionError`` (``OSError``s) naming the path, with
    ``hint`` (how to fix it) appended."""
    out = Path(directory)
    suffix = f"; {hint}" if hint else ""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"cannot write {what} to {out}: it is a file, not a directory{suffix}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".distiq-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        error = NotADirectoryError if isinstance(exc, NotADirectoryError) else PermissionError
        raise error(f"cannot write {what} to {out}: {reason}{suffix}") from None
    return out


def dump_yaml(obj: Any, path: str | os.PathLike) -> Path:
    """Write a config object (or plain data) as YAML, atomically."""
    return atomic_write(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
