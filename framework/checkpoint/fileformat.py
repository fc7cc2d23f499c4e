"""What a checkpoint's files hold, and the checks of what is read back.

- **The manifest** (``manifest.json``, format 2, written last) lists every other file with its size in
  bytes and the SHA-256 of its contents (lowercase hex), and the ``monitor_value`` that ranks the
  checkpoint for ``keep_best`` (``null`` when it has none). A file name is one path component of
  letters, digits, ``.``, ``_`` and ``-``. Unknown keys are errors (a newer format bumps ``format``).
  ``SHA256SUMS`` holds the same hashes and the manifest's own in coreutils' format, so any machine can
  check a checkpoint without this framework: ``cd step-00000120 && sha256sum -c SHA256SUMS``.
- **Tensor files** are safetensors, streamed from the tensors' own memory (no serialised copy) while
  another thread hashes the same buffers (``hashlib``, ``os.write`` and ``os.fsync`` release the GIL),
  so the hash costs little beyond the write. They are read back with the ``safetensors`` library.
- **JSON read from disk** may be truncated, edited or crafted: :func:`expect` checks a parsed value
  against a schema (types, known keys only, ranges, bounded nesting) before anything uses it and raises
  :class:`~framework.checkpoint.files.CorruptCheckpointError` naming the file and the key path
  (``state.json: counters.step: expected an int >= 0, got '12' (str)``).

Example:

    >>> from framework.checkpoint.fileformat import Entry, Int, Keys, Manifest, decode, encode, expect
    >>> COUNTERS = Keys({"step": Int(min=0), "should_stop": bool})
    >>> expect({"step": 12, "should_stop": False}, COUNTERS, where="state.json", path="counters")
    {'step': 12, 'should_stop': False}
    >>> expect({"step": "12", "should_stop": False}, COUNTERS, where="state.json", path="counters")
    Traceback (most recent call last):
    ...
    framework.checkpoint.files.CorruptCheckpointError: state.json: counters.step: expected an int >= 0, got '12' (str)
    >>> data = encode(Manifest({"state.json": Entry(size=2, sha256="0" * 64)}, monitor_value=0.41))
    >>> decode(data, where="manifest.json").files["state.json"].size
    2
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import files
from .files import CheckpointError, CorruptCheckpointError

# ---------------------------------------------------------------- schema: A small checker for JSON read from files: types, known keys only, ranges, bounded nesting.


class _Mismatch(Exception):
    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class Schema:
    """Base class: ``check(value, path)`` raises on a mismatch; ``describe()`` says what is expected.

    A new kind (an even int, say) defines ``describe()`` (``"an even int"``) and a ``check`` that calls
    ``self.fail(value, path)`` for a value that is not one.
    """

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        raise NotImplementedError

    def fail(self, value: Any, path: tuple[str | int, ...], why: str | None = None) -> None:
        raise _Mismatch(path, why or f"expected {self.describe()}, got {_show(value)}")


def _coerce(schema: Any) -> Schema:
    if isinstance(schema, Schema):
        return schema
    if schema is None:
        return Null()
    if schema is bool:
        return Bool()
    if schema is int:
        return Int()
    if schema is float:
        return Float()
    if schema is str:
        return Str()
    if isinstance(schema, dict):
        return Keys(schema)
    if isinstance(schema, list) and len(schema) == 1:
        return ListOf(schema[0])
    raise TypeError(f"not a schema: {schema!r}")


class Int(Schema):
    """An int (not a bool) in ``[min, max]``.

    Example:

        >>> Int(min=0).describe()  # a step count
        'an int >= 0'
    """

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min, self.max = min, max

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an int in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"an int >= {self.min}"
        return "an int" if self.max is None else f"an int <= {self.max}"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if type(value) is not int:  # (bool is an int subclass: true is not a step count)
            self.fail(value, path)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            self.fail(value, path)


class Float(Schema):
    """A number (int or float, not a bool) in ``[min, max]``; finite unless ``finite=False``.

    Example:

        >>> Float(finite=False).describe(), Float(min=0).describe()  # a logged loss (may be NaN); a learning rate
        ('a number', 'a finite number >= 0')
    """

    def __init__(self, min: float | None = None, max: float | None = None, finite: bool = True) -> None:
        self.min, self.max, self.finite = min, max, finite

    def describe(self) -> str:
        what = "a finite number" if self.finite else "a number"
        if self.min is not None:
            what += f" >= {self.min}"
        if self.max is not None:
            what += f" <= {self.max}"
        return what

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if type(value) not in (int, float):
            self.fail(value, path)
        if self.finite and not math.isfinite(value):
            self.fail(value, path)
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            self.fail(value, path)


class Str(Schema):
    """A string, optionally matching ``pattern`` (whole string), one of ``choices``, at most ``max_len``.

    Example:

        >>> Str(pattern=r"[0-9a-f]{64}").describe()  # a SHA-256
        "a string matching '[0-9a-f]{64}'"
    """

    def __init__(
        self, pattern: str | None = None, choices: tuple[str, ...] | None = None, max_len: int | None = None
    ) -> None:
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.choices, self.max_len = choices, max_len

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.pattern is not None:
            return f"a string matching {self.pattern.pattern!r}"
        return "a string" if self.max_len is None else f"a string of at most {self.max_len} characters"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, str):
            self.fail(value, path)
        if self.max_len is not None and len(value) > self.max_len:
            self.fail(value, path)
        if self.choices is not None and value not in self.choices:
            self.fail(value, path)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self.fail(value, path)


class Bool(Schema):
    """``true`` or ``false`` (``bool`` in a schema means this).

    Example:

        >>> expect(1, Bool(), where="state.json", path="should_stop")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: state.json: should_stop: expected true or false, got 1 (int)
    """

    def describe(self) -> str:
        return "true or false"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, bool):
            self.fail(value, path)


class Null(Schema):
    """``null`` (None; ``None`` in a schema means this).

    Example:

        >>> AnyOf(Null(), Float()).describe()
        'null or a finite number'
    """

    def describe(self) -> str:
        return "null"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if value is not None:
            self.fail(value, path)


class Maybe(Schema):
    """``null`` or ``inner``.

    Example:

        >>> Maybe(Float()).describe()  # a monitored value, or none
        'null or a finite number'
    """

    def __init__(self, inner: Any) -> None:
        self.inner = _coerce(inner)

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if value is None:
            return
        try:
            self.inner.check(value, path)
        except _Mismatch as e:
            if e.path != path:  # (deeper inside: that message is the precise one)
                raise
            self.fail(value, path)


class AnyOf(Schema):
    """The first of ``options`` that matches.

    Example:

        >>> expect("12", AnyOf(Int(), Str()), where="state.json")
        '12'
    """

    def __init__(self, *options: Any) -> None:
        self.options = [_coerce(o) for o in options]

    def describe(self) -> str:
        return " or ".join(o.describe() for o in self.options)

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        for option in self.options:
            try:
                option.check(value, path)
                return
            except _Mismatch:
                continue
        self.fail(value, path)


class ListOf(Schema):
    """A list of ``item``, with ``min_len`` to ``max_len`` entries.

    Example:

        >>> expect([1, 2], ListOf(Int(0, 2**32 - 1), min_len=625, max_len=625), where="rng.json")  # python's MT state
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: rng.json: (top level): expected a list of 625 entries,
        got 2
    """

    def __init__(self, item: Any, min_len: int = 0, max_len: int | None = None) -> None:
        self.item, self.min_len, self.max_len = _coerce(item), min_len, max_len

    def describe(self) -> str:
        n = self._length()
        return f"a list of {self.item.describe()}" + (f" ({n.strip()} entries)" if n else "")

    def _length(self) -> str:
        if self.max_len is not None and self.min_len == self.max_len:
            return f" of {self.min_len}"
        if self.max_len is not None:
            return f" of {self.min_len} to {self.max_len}"
        return f" of at least {self.min_len}" if self.min_len else ""

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, list):
            self.fail(value, path)
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            self.fail(value, path, f"expected a list{self._length()} entries, got {len(value)}")
        for i, v in enumerate(value):
            self.item.check(v, (*path, i))


class TupleOf(Schema):
    """A list with exactly one entry per schema in ``items``, position by position.

    Example:

        >>> TupleOf(Str(), Int(min=0)).describe()  # ["MT19937", 624]
        '[a string, an int >= 0]'
    """

    def __init__(self, *items: Any) -> None:
        self.items = [_coerce(i) for i in items]

    def describe(self) -> str:
        return "[" + ", ".join(i.describe() for i in self.items) + "]"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, list) or len(value) != len(self.items):
            self.fail(value, path, f"expected a list of {len(self.items)} entries, got {_show(value)}")
        for i, (schema, v) in enumerate(zip(self.items, value, strict=True)):
            schema.check(v, (*path, i))


class Keys(Schema):
    """An object with exactly the ``required`` keys, plus any of ``optional``; no other key.

    Unknown keys are errors, not ignored: a crafted file cannot smuggle values in.

    Example:

        >>> expect({"size": 2, "owner": "me"}, Keys({"size": Int(min=0)}, {"sha256": str}), where="manifest.json")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: manifest.json: owner: unknown key
        (expected only 'size', 'sha256')
    """

    def __init__(self, required: Mapping[str, Any], optional: Mapping[str, Any] | None = None) -> None:
        self.required = {k: _coerce(v) for k, v in required.items()}
        self.optional = {k: _coerce(v) for k, v in (optional or {}).items()}

    def describe(self) -> str:
        return "an object with keys " + ", ".join(map(repr, [*self.required, *self.optional]))

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, dict):
            self.fail(value, path, f"expected {self.describe()}, got {_show(value)}")
        for key in value:
            if key not in self.required and key not in self.optional:
                known = ", ".join(map(repr, [*self.required, *self.optional]))
                raise _Mismatch((*path, key), f"unknown key (expected only {known})")
        for key, schema in self.required.items():
            if key not in value:
                raise _Mismatch((*path, key), "missing")
            schema.check(value[key], (*path, key))
        for key, schema in self.optional.items():
            if key in value:
                schema.check(value[key], (*path, key))


class MapOf(Schema):
    """An object whose keys match ``key`` (a :class:`Str`) and whose values all match ``value``.

    Example:

        >>> expect({"val/loss": 0.41, "lr": 0.001}, MapOf(Float(finite=False)), where="state.json")
        {'val/loss': 0.41, 'lr': 0.001}
    """

    def __init__(self, value: Any, key: Str | None = None, max_len: int | None = None) -> None:
        self.value, self.key, self.max_len = _coerce(value), key or Str(), max_len

    def describe(self) -> str:
        return f"an object whose values are {self.value.describe()}"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, dict):
            self.fail(value, path)
        if self.max_len is not None and len(value) > self.max_len:
            self.fail(value, path, f"expected at most {self.max_len} entries, got {len(value)}")
        for k, v in value.items():
            try:
                self.key.check(k, (*path, k))
            except _Mismatch as e:
                raise _Mismatch(e.path, f"bad key: {e.message}") from None
            self.value.check(v, (*path, k))


class JSON(Schema):
    """Any JSON value (objects with string keys, lists, strings, numbers, booleans, null) nested at
    most ``max_depth`` levels: for opaque state that another layer checks, bounded so that nothing
    that walks it later can hit Python's recursion limit.

    Example:

        >>> expect({"optimizer": [[1]]}, JSON(max_depth=2), where="state.json")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: state.json: optimizer[0]: nested deeper than 2 levels
    """

    def __init__(self, max_depth: int = 64) -> None:
        self.max_depth = max_depth

    def describe(self) -> str:
        return f"JSON nested at most {self.max_depth} deep"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        stack: list[tuple[Any, tuple[str | int, ...], int]] = [(value, path, 0)]
        while stack:  # (iterative: the point is to survive absurd nesting)
            v, p, depth = stack.pop()
            if isinstance(v, (dict, list)):
                if depth >= self.max_depth:
                    raise _Mismatch(p, f"nested deeper than {self.max_depth} levels")
                items = v.items() if isinstance(v, dict) else enumerate(v)
                for k, child in items:
                    if not isinstance(k, (str, int)):
                        raise _Mismatch(p, f"a key of type {type(k).__name__}")
                    stack.append((child, (*p, k), depth + 1))
            elif not (v is None or isinstance(v, (bool, int, float, str))):
                raise _Mismatch(p, f"expected a JSON value, got {_show(v)}")


def key_path(path: tuple[str | int, ...]) -> str:
    """``("counters", "step")`` -> ``counters.step``; ``("files", "a/b")`` -> ``files['a/b']``.

    Example:

        >>> key_path(("optimizer", "state", 0, "exp_avg"))
        'optimizer.state[0].exp_avg'
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    out = out or "(top level)"
    return out if len(out) <= 120 else out[:60] + "..." + out[-50:]  # (absurd nesting: keep it readable)


def expect(
    obj: Any,
    schema: Any,
    *,
    where: object,
    path: tuple[str | int, ...] | str = (),
    hint: str | None = None,
    error: type[Exception] = CorruptCheckpointError,
) -> Any:
    """Return ``obj`` if it matches ``schema``, else raise ``error`` naming ``where`` (the file) and the
    key path, with ``hint`` (what to do) appended.

    ``path`` is where ``obj`` sits inside the file (``"counters"``, or a tuple of keys).

    Example:

        >>> expect({"format": 3}, {"format": Int(2, 2)}, where="manifest.json", hint="use another checkpoint")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: manifest.json: format: expected an int in [2, 2],
        got 3 (int); use another checkpoint
    """
    start: tuple[str | int, ...] = (path,) if isinstance(path, str) else tuple(path)
    try:
        _coerce(schema).check(obj, start)
    except _Mismatch as e:
        message = f"{where}: {key_path(e.path)}: {e.message}"
        raise error(message + (f"; {hint}" if hint else "")) from None
    except RecursionError:  # (a schema nested deeper than Python allows: say so, with the file)
        raise error(f"{where}: nested too deeply to check" + (f"; {hint}" if hint else "")) from None
    return obj


# ---------------------------------------------------------------- manifest: A checkpoint's ``manifest.json`` and ``SHA256SUMS``: what the checkpoint holds, and how to check it.

FORMAT = 2
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
MAX_MANIFEST_BYTES = 64 << 20  # (a manifest of a million files is ~100 MB; ours are a few KB)
FILE_NAME = r"(?!\.\.?$)[A-Za-z0-9._-]{1,200}"  # one path component, never . or ..
SHA256 = r"[0-9a-f]{64}"
RECORD_PREFIX = ".writer-rank"  # (the writer's per-rank records: never part of a checkpoint)
RESERVED = (MANIFEST, SUMS)

_ENTRY = Keys({"size": Int(min=0), "sha256": Str(pattern=SHA256)})
_SCHEMA = Keys(
    {
        "format": Int(FORMAT, FORMAT),
        "files": MapOf(_ENTRY, key=Str(pattern=FILE_NAME)),
        "monitor_value": Maybe(Float()),  # (finite: NaN never ranks as best)
    }
)


@dataclass(frozen=True)
class Entry:
    """One file of a checkpoint: its size in bytes and SHA-256 (hex), e.g.
    ``Entry(size=4, sha256=hashlib.sha256(b"data").hexdigest())``."""

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``: each file's :class:`Entry` by name, and the ``monitor_value`` (or None)."""

    files: dict[str, Entry]
    monitor_value: float | None


def check_file_name(name: str) -> None:
    """Raise ValueError unless ``name`` may be a file of a checkpoint (one safe path component, not reserved).

    Example:

        >>> check_file_name("rng-rank0.json")  # fine; "../x", "a/b", "manifest.json" raise
        >>> check_file_name("../x")
        Traceback (most recent call last):
        ...
        ValueError: '../x' cannot be a checkpoint file name: use one path component of letters, digits, '.', '_' and
        '-' (no '/', not '.' or '..')
    """
    if not isinstance(name, str) or not re.fullmatch(FILE_NAME, name):
        raise ValueError(
            f"{name!r} cannot be a checkpoint file name: use one path component of letters, digits, '.', '_' "
            "and '-' (no '/', not '.' or '..')"
        )
    if name in RESERVED or name.startswith(RECORD_PREFIX):
        raise ValueError(f"{name!r} is reserved for the checkpoint writer itself; choose another file name")


def finite_or_none(value: float | None) -> float | None:
    """A monitored value as the manifest keeps it: a finite float, or None (NaN/inf never rank as best).

    Example:

        >>> finite_or_none(float("nan")), finite_or_none(0.41)
        (None, 0.41)
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def encode(manifest: Manifest) -> bytes:
    """The bytes of ``manifest.json`` (keys sorted, one file per line: easy to read and to diff).

    Example:

        >>> print(encode(Manifest({"state.json": Entry(2, "0" * 64)}, 0.41)).decode())
        {
         "format": 2,
         "files": {
          "state.json": {
           "size": 2,
           "sha256": "000...000"
          }
         },
         "monitor_value": 0.41
        }
        <BLANKLINE>
    """
    files = {name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(manifest.files.items())}
    body = {"format": FORMAT, "files": files, "monitor_value": finite_or_none(manifest.monitor_value)}
    return (json.dumps(body, indent=1, allow_nan=False) + "\n").encode()


def decode(data: bytes, where: object) -> Manifest:
    """Parse and check ``manifest.json``; a :class:`CorruptCheckpointError` naming ``where`` and the key
    for anything malformed, a :class:`CheckpointError` for another format.

    Example:

        >>> decode(b'{"format": 2, "files": {}}', where="manifest.json")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: manifest.json: monitor_value: missing; the checkpoint is
        damaged or was edited; resume from another checkpoint
    """
    hint = "the checkpoint is damaged or was edited; resume from another checkpoint"
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise CorruptCheckpointError(f"{where} is not valid JSON ({type(e).__name__}: {e}); {hint}") from None
    if isinstance(obj, dict) and obj.get("format") != FORMAT and type(obj.get("format")) is int:
        old = obj["format"]
        what = "an earlier framework version (sizes only, no SHA-256)" if old == 1 else "a newer framework version"
        raise CheckpointError(
            f"{where} has format {old}, written by {what}; this version reads format {FORMAT} only. "
            "Load it with the framework version that wrote it, or start a new run"
        )
    expect(obj, _SCHEMA, where=where, hint=hint)
    files = {name: Entry(e["size"], e["sha256"]) for name, e in obj["files"].items()}
    for name in files:
        if name in RESERVED or name.startswith(RECORD_PREFIX):
            raise CorruptCheckpointError(f"{where}: files[{name!r}]: a reserved name cannot be listed; {hint}")
    value = obj["monitor_value"]
    return Manifest(files, None if value is None else float(value))


def encode_sums(files: dict[str, Entry], manifest_bytes: bytes) -> bytes:
    """``SHA256SUMS``: one ``<sha256>  <name>`` line per file and for ``manifest.json`` (``sha256sum -c`` reads it).

    Example:

        >>> print(encode_sums({"state.json": Entry(2, "0" * 64)}, b"{}").decode())
        000...000  state.json
        44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a  manifest.json
        <BLANKLINE>
    """
    lines = [f"{e.sha256}  {name}\n" for name, e in sorted(files.items())]
    lines.append(f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n")
    return "".join(lines).encode()


def check_sums(data: bytes, files: dict[str, Entry], manifest_bytes: bytes, where: object) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``where`` unless ``SHA256SUMS`` says exactly what the
    manifest says (and hashes the manifest as it is).
    """
    if data != encode_sums(files, manifest_bytes):
        hint = "the checkpoint is damaged or was edited; resume from another checkpoint"
        listed: dict[str, str] = {}
        try:
            for line in data.decode().splitlines():
                digest, name = line.split("  ", 1)
                listed[name] = digest
        except (UnicodeDecodeError, ValueError):
            raise CorruptCheckpointError(f"{where} is not a sha256sum list; {hint}") from None
        if listed.get(MANIFEST) != hashlib.sha256(manifest_bytes).hexdigest():
            raise CorruptCheckpointError(f"{where}: {MANIFEST} does not match its SHA-256 here; {hint}")
        raise CorruptCheckpointError(f"{where} does not list the same files and hashes as {MANIFEST}; {hint}")


# ---------------------------------------------------------------- tensorfile: safetensors files written straight from tensor memory, hashed while they are written.

# safetensors' dtype names (the library's own table, spelled out so writing needs no import of it).
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip
MAX_HEADER = 100_000_000  # (the safetensors library's own limit)
_PARALLEL_HASH_FROM = 4 << 20  # below this, a thread costs more than it saves


def _raw_bytes(name: str, t: torch.Tensor) -> memoryview:
    if t.dtype not in DTYPES:
        raise TypeError(f"cannot store tensor {name!r} of dtype {t.dtype} in a safetensors file")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # (a uint8 view of the same memory; numpy keeps the tensor alive while the view lives)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list[memoryview | bytes]:
    """The buffers of a safetensors file for ``tensors``, in file order: header, then each tensor's
    raw bytes (views of the tensors' memory, no copies).

    Example:

        >>> header, data = layout({"w": torch.ones(2)})
        >>> header[8:].decode()
        '{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}      '
        >>> data.nbytes
        8
    """
    if sys.byteorder != "little":  # (safetensors is little-endian; raw memory would be wrong here)
        raise RuntimeError("writing safetensors files from raw tensor memory needs a little-endian machine")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    views: list[memoryview | bytes] = []
    offset = 0
    for name, t in items:
        if not isinstance(name, str) or name == "__metadata__":
            raise TypeError(f"a tensor name must be a string other than '__metadata__', got {name!r}")
        raw = _raw_bytes(name, t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        views.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # (pad so the data starts 8-byte aligned, as the library does)
    return [len(text).to_bytes(8, "little") + text, *views]


class Digest:
    """The SHA-256 of a list of buffers, computed in a thread for large data (hashlib releases the GIL),
    so that the caller can write, fsync, and even write the next file meanwhile; :meth:`result` waits.
    The buffers must not change until then (the caller writes them and fsyncs meanwhile).

    Example:

        >>> Digest([b"da", b"ta"]).result() == hashlib.sha256(b"data").hexdigest()
        True
    """

    def __init__(self, buffers: Sequence[bytes | memoryview]) -> None:
        self._buffers: Sequence[bytes | memoryview] | None = buffers
        self._hex = ""
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if sum(memoryview(b).nbytes for b in buffers) < _PARALLEL_HASH_FROM:
            self._run()  # (a thread costs more than it saves)
        else:
            self._thread = threading.Thread(target=self._run, name="checkpoint-hash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            h = hashlib.sha256()
            for b in self._buffers or ():
                h.update(b)
            self._hex = h.hexdigest()
        except BaseException as e:  # (raised by result(), in the caller's thread)
            self._error = e
        finally:
            self._buffers = None

    def result(self) -> str:
        """The hex digest (waits for the thread)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self._hex


def write_tensors(
    fd: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[int, Digest]:
    """Write ``tensors`` as a safetensors file to ``fd`` (not fsync'ed) while they are hashed; returns
    (size, :class:`Digest` of the file, which may still be computing: the tensors must not change
    until its ``result()``).

    Example:

        >>> import os
        >>> from pathlib import Path
        >>> fd = files.open_new(Path("model.safetensors"))
        >>> size, digest = write_tensors(fd, {"w": torch.ones(2)})
        >>> os.fsync(fd); os.close(fd)  # (the hash runs on meanwhile)
        >>> size, digest.result() == hashlib.sha256(Path("model.safetensors").read_bytes()).hexdigest()
        (72, True)
    """
    buffers = layout(tensors, metadata)
    digest = Digest(buffers)
    return files.write_all(fd, buffers), digest


def _corrupt(where: object, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where} is not a valid safetensors file ({why}); the checkpoint is corrupt or was replaced. "
        "Nothing was loaded and nothing was executed; resume from another checkpoint"
    )


def parse_tensors(data: bytes, where: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the safetensors file ``data``; anything else (a truncated file, a
    planted pickle) is a :class:`CorruptCheckpointError` naming ``where``, never executed.

    Example:

        >>> parse_tensors(b"".join(layout({"w": torch.ones(2)}, {"step": "3"})), where="model.safetensors")
        ({'w': tensor([1., 1.])}, {'step': '3'})
        >>> parse_tensors(b"\\x80\\x04K\\x01.", where="model.safetensors")  # a pickle
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: model.safetensors is not a valid safetensors file (5 bytes,
        too short for a header); the checkpoint is corrupt or was replaced. Nothing was loaded and nothing was executed;
        resume from another checkpoint
    """
    if len(data) < 8:
        raise _corrupt(where, f"{len(data)} bytes, too short for a header")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER, len(data) - 8):
        raise _corrupt(where, f"its header claims {n} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise _corrupt(where, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(where, "its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(where, "its __metadata__ is not an object of strings")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError) as e:
        raise _corrupt(where, str(e)) from None
    return tensors, metadata
