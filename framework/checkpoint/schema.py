"""A small checker for JSON read from files: types, known keys only, ranges, bounded nesting.

Whatever a checkpoint's JSON holds comes from disk, so it may be truncated, edited or crafted.
:func:`expect` checks a parsed value against a schema before anything uses it and raises
:class:`~framework.errors.CorruptCheckpointError` naming the file and the key path
(``state.json: counters.step: expected an int >= 0, got '12' (str)``), instead of a raw
KeyError/TypeError far from the cause, or worse, a value applied unchecked.

Schemas are built from the classes below; plain ``int``, ``float``, ``str``, ``bool``,
``None``, a dict (``Keys`` with those required keys) and a one-item list (``ListOf``) may stand
in for the obvious ones.

Example::

    from framework.schema import Int, Keys, Maybe, expect
    COUNTERS = Keys({"step": Int(min=0), "should_stop": bool})
    counters = expect(state["counters"], COUNTERS, where="step-00000010/state.json", path="counters")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import CorruptCheckpointError


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

    Example::

        class Even(Schema):
            def describe(self): return "an even int"
            def check(self, value, path):
                if not (isinstance(value, int) and value % 2 == 0): self.fail(value, path)
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

    Example::

        Int(min=0)   # a step count
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

    Example::

        Float(finite=False)   # a logged loss, which may be NaN
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

    Example::

        Str(pattern=r"[0-9a-f]{64}")   # a SHA-256
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
    """``true`` or ``false``.

    Example::

        Keys({"should_stop": Bool()})
    """

    def describe(self) -> str:
        return "true or false"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if not isinstance(value, bool):
            self.fail(value, path)


class Null(Schema):
    """``null`` (None).

    Example::

        AnyOf(Null(), Float())
    """

    def describe(self) -> str:
        return "null"

    def check(self, value: Any, path: tuple[str | int, ...]) -> None:
        if value is not None:
            self.fail(value, path)


class Maybe(Schema):
    """``null`` or ``inner``.

    Example::

        Maybe(Float())   # a monitored value, or none
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

    Example::

        AnyOf(Int(), Str())
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

    Example::

        ListOf(Int(0, 2**32 - 1), min_len=625, max_len=625)   # python's MT state
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

    Example::

        TupleOf(Str(), Int(min=0))   # ["MT19937", 624]
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

    Example::

        Keys({"size": Int(min=0), "sha256": Str(pattern="[0-9a-f]{64}")})
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

    Example::

        MapOf(Float(finite=False))   # {"val/loss": 0.41, "lr": 0.001}
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

    Example::

        Keys({"optimizer": JSON(max_depth=32)})
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

    Example::

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

    Example::

        expect(json.loads(data), {"format": Int(2, 2), "files": MapOf(ENTRY)}, where=ckpt / "manifest.json")
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
