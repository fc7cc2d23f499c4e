"""Small typed configs for recipes: a dataclass, an optional YAML file, ``--key value`` overrides.

A recipe declares its hyperparameters once, as a dataclass with defaults. The
command line then accepts ``--config FILE.yaml`` and one ``--key value`` flag
per field; every value is converted to the field's declared type. Precedence:
dataclass defaults < YAML file < command-line flags. Nothing is executed:
YAML is read with ``yaml.safe_load`` and flags are parsed by type, never with
``eval``. Config builds objects in the recipe; it is not threaded through the
framework (the Engine only sees plain keyword arguments).

``parse_config(Config)`` reads ``sys.argv``, e.g. ``python recipe.py --config my.yaml --lr 3e-4 --smoke``;
the example gives the arguments as a list.

Example:

    >>> from dataclasses import dataclass
    >>> from pathlib import Path
    >>> from typing import Literal
    >>> from framework.cli.recipe import parse_config
    >>> @dataclass
    ... class Config:
    ...     lr: float = 1e-3
    ...     batch_size: int = 64
    ...     micro_batch_size: int | None = None   # "none" on the command line
    ...     model: Literal["mlp", "cnn"] = "mlp"  # choices are checked
    ...     smoke: bool = False                    # "--smoke" alone means True
    >>> _ = Path("my.yaml").write_text("lr: 0.0003\\nbatch-size: 128\\n")   # keys: field names, - or _
    >>> parse_config(Config, ["--config", "my.yaml", "--model", "cnn", "--smoke"])
    Config(lr=0.0003, batch_size=128, micro_batch_size=None, model='cnn', smoke=True)

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]``,
and ``X | None`` of those. Unknown keys (in the file or on the command line)
are errors that list the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config value or key that does not fit the recipe's dataclass."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported config field type {tp!r}: only X | None unions are allowed")
    return tp, False


def convert(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (a string from the command line or a YAML scalar) to the field type ``tp``.

    Example:

        >>> from framework.cli.recipe import convert
        >>> convert("3e-4", float, "lr"), convert("none", int | None, "micro_batch_size"), convert("1e5", int, "steps")
        (0.0003, None, 100000)
        >>> convert("2.5", int, "batch_size")
        Traceback (most recent call last):
        ...
        framework.cli.recipe.ConfigError: batch_size='2.5': expected an integer
    """
    base, optional = _unwrap_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if value is None:
        raise ConfigError(f"{name}: None is not allowed for a field of type {_type_name(tp)}")
    if typing.get_origin(base) is Literal:
        return _to_choice(value, typing.get_args(base), name)
    to = _CONVERTERS.get(base)
    if to is None:
        raise TypeError(
            f"unsupported config field type {tp!r} for {name}; use int, float, str, bool, Literal or X | None"
        )
    converted = to(value)
    if converted is _NO:
        raise ConfigError(f"{name}={value!r}: expected {_EXPECTED[base]}")
    return converted


_NO = object()  # (what a converter returns for a value it cannot take)


def _to_choice(value: Any, choices: tuple[Any, ...], name: str) -> Any:
    for c in choices:
        if value == c or (isinstance(value, str) and value == str(c)):
            return c
    raise ConfigError(f"{name}={value!r}: choose one of {list(choices)}")


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return _NO


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):  # bool is an int subclass; True as a batch size is a mistake
        return _NO
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else _NO
    if not isinstance(value, str):
        return _NO
    text = value.strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        pass
    try:  # allow "1e5" for integers when it is whole
        f = float(text)
    except ValueError:
        return _NO
    return int(f) if math.isfinite(f) and f.is_integer() else _NO


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _NO
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value.strip()) if isinstance(value, str) else _NO
    except ValueError:
        return _NO


def _to_str(value: Any) -> Any:
    return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _NO


_CONVERTERS: dict[Any, Any] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_EXPECTED = {bool: "a boolean (true/false, yes/no, 1/0)", int: "an integer", float: "a number", str: "a string"}


def _type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is Literal:
        name = "{" + ",".join(str(c) for c in typing.get_args(base)) + "}"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} | None" if optional else name


def _fields(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass; declare the recipe's config with @dataclass")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def load_yaml(path: str | os.PathLike[str], cls: type) -> dict[str, Any]:
    """Read a YAML mapping of field values (``yaml.safe_load``: data only, no code), typed from ``cls``.

    Example:

        >>> from dataclasses import dataclass
        >>> from pathlib import Path
        >>> from framework.cli.recipe import load_yaml
        >>> @dataclass
        ... class Config:
        ...     lr: float = 1e-3
        ...     batch_size: int = 64
        >>> _ = Path("fast.yaml").write_text("lr: 3e-3\\nbatch-size: 128\\n")
        >>> load_yaml("fast.yaml", Config)
        {'lr': 0.003, 'batch_size': 128}
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        out[name] = convert(value, fields[name], f"{path}:{key}")
    return out


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build ``cls`` (a dataclass) from defaults, ``--config FILE.yaml`` and ``--key value`` flags.

    Each field ``foo_bar`` gets a flag ``--foo-bar`` (``--foo_bar`` works too). A
    ``bool`` field also takes the bare flag (``--smoke`` means ``--smoke true``).
    ``X | None`` fields take ``none``. ``--help`` lists every field with its type
    and default.

    A wrong flag or value exits (status 2) with the message and the flags, as ``argparse`` does; the
    Engine arguments among the fields (see :func:`engine_options`) are checked by the Engine's own rules.

    Example:

        >>> from dataclasses import dataclass
        >>> from framework.cli.recipe import parse_config
        >>> @dataclass
        ... class Config:
        ...     lr: float = 1e-3
        ...     batch_size: int = 64
        ...     smoke: bool = False
        >>> parse_config(Config, ["--lr", "3e-4", "--batch-size", "32", "--smoke"])
        Config(lr=0.0003, batch_size=32, smoke=True)
        >>> parse_config(Config, ["--batch_size", "none"])   # stderr: ... --batch-size='none': expected an integer
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """
    fields = _fields(cls)
    dc: Any = cls  # a dataclass (checked by _fields)
    defaults = {f.name: f.default for f in dataclasses.fields(dc) if f.default is not dataclasses.MISSING}
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo must not silently match another flag
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of field: value (overridden by flags)")
    for name, tp in fields.items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        default = defaults.get(name, "required")
        help_text = f"{_type_name(tp)} (default: {default})"
        if name in _engine_docs():  # an Engine argument: its one documentation, from framework.config
            help_text += f": {_engine_docs()[name]} (an Engine argument)"
        base, _ = _unwrap_optional(tp)
        if base is bool:
            parser.add_argument(
                *flags, dest=name, nargs="?", const="true", default=None, metavar="BOOL", help=help_text
            )
        else:
            parser.add_argument(
                *flags, dest=name, default=None, metavar=_type_name(tp).upper().replace(" ", ""), help=help_text
            )
    args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if unknown:
        flag = unknown[0].split("=", 1)[0]
        known = [f"--{n.replace('_', '-')}" for n in fields] + ["--config"]
        close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; --help lists the flags"
        parser.error(f"unrecognized argument {unknown[0]!r}{hint}")

    values: dict[str, Any] = dict(defaults)
    if args.config:
        values.update(load_yaml(args.config, cls))
    for name, tp in fields.items():
        raw = getattr(args, name)
        if raw is not None:
            try:
                values[name] = convert(raw, tp, f"--{name.replace('_', '-')}")
            except ConfigError as e:
                parser.error(str(e))
    missing = [n for n in fields if n not in values]
    if missing:
        parser.error(f"missing required value(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    cfg = cls(**values)
    try:  # the Engine arguments among the fields are checked by the Engine's own rules, before anything runs
        from ..config import EngineConfig

        EngineConfig.from_options(**engine_options(cfg))
    except ValueError as e:
        parser.error(f"{e} (a recipe flag --{str(e).split('=')[0].replace('_', '-')})")
    return cfg


def engine_options(cfg: Any, **overrides: Any) -> dict[str, Any]:
    """The fields of a recipe's config that are Engine arguments (same names), for ``Engine(**...)``: a recipe
    declares which Engine arguments it exposes and their defaults, and the Engine's config
    (:class:`framework.config.EngineConfig`) checks and documents them; ``overrides`` wins.

    Example:

        >>> from dataclasses import dataclass
        >>> from framework import Engine
        >>> from framework.cli.recipe import engine_options
        >>> @dataclass
        ... class Config:
        ...     lr: float = 1e-3   # the recipe's own (not an Engine argument)
        ...     batch_size: int = 32
        ...     max_epochs: int = 1
        >>> engine_options(Config(), progress=False)
        {'batch_size': 32, 'max_epochs': 1, 'progress': False}
        >>> engine = Engine(**engine_options(Config(), progress=False))
    """
    from ..config import describe

    names = {row[0] for row in describe()}
    picked = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names}
    return {**picked, **overrides}


def _engine_docs() -> dict[str, str]:
    from ..config import describe

    return {name: doc for name, _group, _default, doc in describe()}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain dict (for logging, or saving next to the run's metrics).

    Example:

        >>> from dataclasses import dataclass
        >>> from framework.cli.recipe import to_dict
        >>> @dataclass
        ... class Config:
        ...     lr: float = 1e-3
        ...     model: str = "mlp"
        >>> to_dict(Config(model="cnn"))
        {'lr': 0.001, 'model': 'cnn'}
    """
    return dataclasses.asdict(cfg)


def save_recipe_config(cfg: Any, run_dir: str) -> str:
    """Write ``RUN_DIR/recipe_config.yaml``: ``cfg`` with its ``run_dir`` set to the dir the run actually uses
    (``engine.run_dir``: a fresh ``runs/x-2`` where ``runs/x`` held an earlier run); returns the file's path.
    Call it on the main process.

    Example:

        >>> from dataclasses import dataclass
        >>> from pathlib import Path
        >>> from framework.cli.recipe import parse_config, save_recipe_config
        >>> @dataclass
        ... class Config:
        ...     lr: float = 1e-3
        ...     run_dir: str | None = None
        >>> path = save_recipe_config(Config(lr=3e-4), "runs/adder-2")   # e.g. engine.run_dir, on the main process
        >>> print(Path(path).read_text(), end="")
        lr: 0.0003
        run_dir: runs/adder-2
        >>> parse_config(Config, ["--config", path])   # the rerun: --config runs/adder-2/recipe_config.yaml
        Config(lr=0.0003, run_dir='runs/adder-2')
    """
    names = {f.name for f in dataclasses.fields(cfg)}
    used = dataclasses.replace(cfg, run_dir=run_dir) if "run_dir" in names else cfg
    path = os.path.join(run_dir, "recipe_config.yaml")
    save_yaml(used, path)
    return path


def target_line(engine: Any, reached: bool, target: str) -> str:
    """A recipe's verdict on its target, for its final line: reached, or not and why. Where ``max_time`` cut
    the run short (a slower or busier machine than the target assumes), it says so and how much time to give
    (``--max-time``, scaled from the steps done to the steps planned).

    Where ``max_time`` ran out, the line reads e.g. ``target val/acc >= 0.99: NOT reached, because time ran
    out (...); ... Give it more time: --max-time 1500 (or --max-time none)``.

    Example:

        >>> from framework import Engine
        >>> from framework.cli.recipe import target_line
        >>> engine = Engine(max_steps=2, batch_size=32, progress=False).fit(Classifier(), train_data)
        >>> print(target_line(engine, True, "val/acc >= 0.5"))
        target val/acc >= 0.5: reached
        >>> print(target_line(engine, False, "val/acc >= 0.99"))
        target val/acc >= 0.99: not reached (max_steps=2 reached)
    """
    if reached:
        return f"target {target}: reached"
    stop = engine.stop_reason
    if stop is None or stop.cause != "max_time":
        return f"target {target}: not reached ({stop or 'the fit did not end'})"
    max_time, planned = engine.config.stop.max_time, engine.max_steps
    scale = planned / stop.step if planned and stop.step else 2.0
    more = 60 * math.ceil(max_time * scale * 1.2 / 60)  # (a 20% margin, in whole minutes)
    return (
        f"target {target}: NOT reached, because time ran out ({stop}); the machine was slower than the target "
        f"assumes (other load?). Give it more time: --max-time {more} (or --max-time none)"
    )


def save_yaml(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML that ``--config`` reads back to the same values.

    Example:

        >>> from dataclasses import dataclass
        >>> from pathlib import Path
        >>> from framework.cli.recipe import save_yaml
        >>> @dataclass
        ... class Config:
        ...     lr: float = 1e-3
        ...     model: str = "mlp"
        >>> save_yaml(Config(), "runs/digits/recipe_config.yaml")   # rerun: --config runs/digits/recipe_config.yaml
        >>> print(Path("runs/digits/recipe_config.yaml").read_text(), end="")
        lr: 0.001
        model: mlp
    """
    import yaml

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
