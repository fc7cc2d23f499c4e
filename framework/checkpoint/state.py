"""The train state: a registry of named stateful objects, and how it goes to and from a checkpoint.

Everything a bitwise-exact resume needs is registered once, by name, in a :class:`TrainState`: the
model, every optimizer and scheduler, the GradScaler, the data position, the callbacks, the EMA
and the train :class:`Counters`. Each has ``state_dict()`` / ``load_state_dict()`` (torchtitan's
``states={...}``, Fabric's ``save(path, state)``); adding a stateful thing is one ``register`` call.

On disk (one checkpoint, written by :class:`framework.checkpoint.CheckpointWriter`):

- entries registered with a ``file`` (the model, the EMA) go to their own safetensors file with
  clean parameter names (what ``framework.load_weights`` reads), or, under FSDP, to the shards that
  torch.distributed.checkpoint writes beside them (``.metadata``, ``__R_0.distcp``:
  :mod:`framework.checkpoint.shards`);
- every other tensor goes to ``state.safetensors`` (a shard to the shards), and everything else to
  ``state.json``, which refers to the tensors by key;
- each rank's RNG states to ``rng-rank{R}.json`` / ``.safetensors``.

Loading reads and checks everything first (the manifest's hashes, each entry's structure, the
run's fingerprint), then applies: a bad checkpoint leaves the module, optimizers and engine as they
were. Nothing read can set an attribute by name or reach a path: counters are the fields of
:class:`Counters`, checked one by one.

The engine's fit registers its objects (``state.register("model", ModelWeights(strategy, module),
file="model.safetensors")``, ``state.register("optimizer", OptimizerState(strategy, module, optimizer))``,
``state.register("counters", counters)``, ...), then saves with ``save(state, writer, root, name,
strategy=..., rt=..., fingerprint=..., ...)`` (collective) and resumes with ``load(state,
CheckpointReader(path), strategy=..., rt=..., fingerprint=..., seed=...)``.

Example:

    >>> from framework.checkpoint.state import Counters, LoggedMetrics, TrainState
    >>> state = TrainState()
    >>> state.register("counters", Counters(step=120))
    >>> state.register("metrics", LoggedMetrics({"val/loss": 0.41}))
    >>> {name: state[name].state_dict() for name in state.names}  # what a checkpoint keeps of each
    {'counters': {'step': 120, 'epoch': 0, ...}, 'metrics': {'val/loss': 0.41}}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch import nn

from ..data.rng import seed_everything
from .fileformat import JSON, AnyOf, Bool, Float, Int, Keys, ListOf, MapOf, Maybe, Str, TupleOf, expect
from .files import CheckpointError, CorruptCheckpointError
from .io import previous_size
from .store import make_room, publish
from .weights import dedup_shared, with_aliases

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..optim import Optimizers
    from ..parallel.runtime import Runtime
    from ..parallel.strategy import Strategy

# ---------------------------------------------------------------- state: The train state: a registry of named stateful objects, and how it goes to and from a checkpoint.

STATE_FORMAT = 2
_CORRUPT = "the checkpoint is damaged or was edited; nothing was applied. Resume from another checkpoint"


class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict(state)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


# ---------------------------------------------------------------- the registry


@dataclass
class _Entry:
    obj: Any
    file: str | None  # its own safetensors file (tensor-only state: model weights, EMA), else state.json
    check: Callable[[Any], None] | None  # raises ValueError/TypeError/KeyError for a malformed state
    schema: Any  # a fileformat schema: what its JSON in state.json must look like (checked before anything else)


class TrainState:
    """The named stateful objects of a fit, in registration order.

    Example:

        >>> state = TrainState()
        >>> state.register("counters", Counters())
        >>> state.names, state["counters"].step
        (['counters'], 0)
        >>> state.register("counters", Counters())
        Traceback (most recent call last):
        ...
        ValueError: a stateful object named 'counters' is registered already
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(
        self, name: str, obj: Any, *, file: str | None = None, check: Callable[[Any], None] | None = None
    ) -> None:
        """Add ``obj`` under ``name``; ``file`` gives it a safetensors file of its own (flat name -> tensor
        state only); ``check(state)`` validates a loaded state before anything is applied (else the
        object's own ``check_state_dict`` if it has one)."""
        if name in self._entries:
            raise ValueError(f"a stateful object named {name!r} is registered already")
        check = check or getattr(obj, "check_state_dict", None)
        self._entries[name] = _Entry(obj, file, check, getattr(obj, "schema", None))

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> Any:
        return self._entries[name].obj


# ---------------------------------------------------------------- the counters


@dataclass
class Counters:
    """The train position and tallies (checkpointed; ``Engine.step`` etc. read and write these).

    Example:

        >>> c = Counters()
        >>> c.step += 1
        >>> c.state_dict()["step"]
        1
        >>> c.load_state_dict({**c.state_dict(), "run_dir": "/etc"})  # a counter that is no counter: refused
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: counters: run_dir: unknown key (expected only 'step', ...)
    """

    step: int = 0  # optimizer steps taken (windows done), skipped ones included
    epoch: int = 0
    batch_in_epoch: int = 0  # windows done in the current epoch
    items_read: int = 0  # stream items read in the current epoch (IterableDataset only)
    micro_steps: int = 0  # micro-batches consumed on this rank
    skipped_steps: int = 0
    consecutive_skips: int = 0
    should_stop: bool = False  # callbacks may set it; checked between steps

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Exactly these fields: a counter that is no counter (run_dir, say) is refused, never set.
    schema = Keys({f: (Bool() if f == "should_stop" else Int(0)) for f in (
        "step", "epoch", "batch_in_epoch", "items_read", "micro_steps", "skipped_steps", "consecutive_skips",
        "should_stop",
    )})  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expect(state, self.schema, where="counters")
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


# ---------------------------------------------------------------- adapters around the strategy


class ModelWeights:
    """The module's weights, as the strategy saves and loads them (full tensors; DTensor shards under FSDP).
    Registered with a file of its own: ``state.register("model", ModelWeights(strategy, module),
    file="model.safetensors")``.
    """

    def __init__(self, strategy: Strategy, module: nn.Module) -> None:
        self.strategy, self.module = strategy, module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.strategy.model_state(self.module))

    def check_state_dict(self, state: Any) -> None:
        _check_same_tensors(state, self.state_dict(), "weights")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.strategy.load_model_state(self.module, state)


class OptimizerState:
    """One optimizer's state, keyed by parameter name (so it resumes under another strategy or world size).
    Registered as ``state.register("optimizer", OptimizerState(strategy, module, optimizer))``.
    """

    def __init__(self, strategy: Strategy, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.strategy, self.module, self.optimizer = strategy, module, optimizer

    def state_dict(self) -> dict[str, Any]:
        return dict(self.strategy.optimizer_state(self.module, self.optimizer))

    def check_state_dict(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
            raise KeyError("an optimizer state has exactly the keys 'state' and 'param_groups'")
        groups, mine = state["param_groups"], self.optimizer.param_groups
        if not isinstance(groups, list) or len(groups) != len(mine):
            raise ValueError(
                f"{len(groups) if isinstance(groups, list) else '?'} param groups, this optimizer has {len(mine)}"
            )
        names = {id(p): n for n, p in self.module.named_parameters()}
        for i, (group, current) in enumerate(zip(groups, mine, strict=True)):
            if not isinstance(group, dict) or not isinstance(group.get("params"), list):
                raise TypeError(f"param group {i} must be an object with a 'params' list")
            expected = [names.get(id(p)) for p in current["params"]]
            if group["params"] != expected:
                raise ValueError(
                    f"param group {i} holds {group['params'][:4]}..., this optimizer's holds {expected[:4]}..."
                )
        if not isinstance(state["state"], dict):
            raise TypeError("'state' must be an object keyed by parameter name")
        known = {n for g in groups for n in g["params"]}
        stray = sorted(set(state["state"]) - known)
        if stray:
            raise KeyError(f"state for parameters in no param group: {stray[:4]}")
        params = dict(self.module.named_parameters())
        for name, param_state in state["state"].items():
            if not isinstance(param_state, dict):
                raise TypeError(f"the state of parameter {name!r} must be an object")
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    check_state_tensor(self.optimizer, params[name], value, f"state/{name}/{key}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_optimizer_state(self.module, self.optimizer, state)


class BadTensor(ValueError):
    """A state tensor that cannot be applied: ``key`` is where it sits in its entry's state (e.g.
    ``state/net.0.weight/exp_avg``), ``why`` what is wrong.

    Example:

        >>> error = BadTensor("state/net.0.weight/exp_avg", "holds NaN or inf")
        >>> print(error)
        state/net.0.weight/exp_avg: holds NaN or inf
    """

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def check_state_tensor(optimizer: torch.optim.Optimizer, param: torch.Tensor, t: torch.Tensor, key: str) -> None:
    """Raise :class:`BadTensor` unless ``t``, the optimizer state ``key`` of ``param``, can be applied: finite
    (NaN or inf there turns every later step non-finite, and the NaN guard would then blame a batch), and,
    for torch's own optimizers, a scalar or of the parameter's shape (Adafactor's factored statistics: a 1
    where the parameter has a dimension). A wrong shape is otherwise accepted by ``load_state_dict`` and
    fails at the next step, after the weights were applied. Under FSDP, ``t`` and ``param`` are DTensors
    (global shapes); the values checked are this rank's shard.

    Example:

        >>> model = nn.Linear(8, 3)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> check_state_tensor(opt, model.weight, torch.zeros(3, 8), "state/weight/exp_avg")  # fits
        >>> check_state_tensor(opt, model.weight, torch.zeros(32, 8), "state/weight/exp_avg")
        Traceback (most recent call last):
        ...
        framework.checkpoint.state.BadTensor: state/weight/exp_avg: has shape [32, 8], its parameter's is [3, 8]
    """
    local = t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]
    if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
        raise BadTensor(key, "holds NaN or inf; an optimizer state with them makes every later step non-finite")
    kind = type(optimizer)
    if not kind.__module__.startswith("torch.optim") or kind.__name__ == "LBFGS" or t.dim() == 0:
        return  # (another optimizer's state may have any shape; LBFGS keeps flat vectors)
    shape, want = tuple(t.shape), tuple(param.shape)
    factored = kind.__name__ == "Adafactor" and len(shape) == len(want)
    if shape != want and not (factored and all(a in (b, 1) for a, b in zip(shape, want, strict=True))):
        raise BadTensor(key, f"has shape {list(shape)}, its parameter's is {list(want)}")


class CallbackStates:
    """The callbacks' ``state_dict()`` s (tensors allowed), matched back by class, in order. Registered as
    ``state.register("callbacks", CallbackStates(engine.callbacks))``.
    """

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = callbacks

    def state_dict(self) -> dict[str, Any]:
        return {"items": [[type(cb).__name__, st] for cb in self.callbacks if (st := cb.state_dict())]}

    def check_state_dict(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("items"), list):
            raise TypeError("expected {'items': [[class name, state], ...]}")
        remaining = [type(cb).__name__ for cb in self.callbacks]
        for item in state["items"]:
            if not (
                isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)
            ):
                raise TypeError("each callback item must be [class name, state object]")
            if item[0] not in remaining:
                raise KeyError(
                    f"it holds state for a {item[0]} callback, but this run has none; pass the same callbacks as "
                    f"the run that saved it (now: {[type(cb).__name__ for cb in self.callbacks]})"
                )
            remaining.remove(item[0])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        remaining = list(self.callbacks)
        for name, cb_state in state["items"]:
            match = next(cb for cb in remaining if type(cb).__name__ == name)
            remaining.remove(match)
            match.load_state_dict(cb_state)


class LoggedMetrics:
    """The last logged values (``engine.metrics``; NaN allowed): a resumed run shows them until it logs
    again. Loaded in place, so whoever holds the dict keeps it (``LoggedMetrics(engine.metrics)``).

    Example:

        >>> metrics = {"train/loss": 2.3}
        >>> LoggedMetrics(metrics).load_state_dict({"val/loss": 0.41})
        >>> metrics
        {'val/loss': 0.41}
    """

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    def state_dict(self) -> dict[str, Any]:
        return dict(self.metrics)

    schema = MapOf(AnyOf(Float(finite=False), Keys({"__float__": Str(choices=("inf", "-inf", "nan"))})))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metrics.clear()
        self.metrics.update({k: float(v) for k, v in state.items()})


def _check_same_tensors(state: Any, current: dict[str, torch.Tensor], what: str) -> None:
    """``state`` has exactly ``current``'s keys, with the same shapes and dtypes (so copying cannot fail half way)."""
    if not isinstance(state, dict):
        raise TypeError(f"expected {what} as name -> tensor")
    missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
    if missing or unexpected:
        raise KeyError(f"{what} do not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        want = current[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(want.shape):
            got = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{what} {name!r}: checkpoint {got} vs module {list(want.shape)}")
        if tensor.dtype != want.dtype:
            raise ValueError(f"{what} {name!r}: checkpoint dtype {tensor.dtype} vs module {want.dtype}")


# ---------------------------------------------------------------- nested state <-> JSON + tensors


def _is_dtensor(t: Any) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def flatten(
    obj: Any, tensors: dict[str, torch.Tensor], prefix: str, shards: dict[str, torch.Tensor] | None = None
) -> Any:
    """Replace every tensor in ``obj`` by a reference, collecting tensors under ``prefix`` (DTensor shards
    in ``shards``, for torch.distributed.checkpoint).

    Handles what state dicts hold: dicts (any key type), lists, tuples, numbers, strings, None, tensors.

    Example:

        >>> tensors = {}
        >>> flatten({"w": torch.ones(2), "lr": 0.1, "betas": (0.9, 0.99)}, tensors, "opt")
        {'w': {'__tensor__': 'opt/w'}, 'lr': 0.1, 'betas': {'__tuple__': [0.9, 0.99]}}
        >>> tensors
        {'opt/w': tensor([1., 1.])}
    """
    if isinstance(obj, torch.Tensor):
        if shards is not None and _is_dtensor(obj):
            shards[prefix] = obj
            return {"__shard__": prefix}
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (
            {"__tensor__", "__shard__", "__items__", "__tuple__"} & set(obj)
        ):
            return {k: flatten(v, tensors, f"{prefix}/{k}", shards) for k, v in obj.items()}
        return {
            "__items__": [
                [_key(k), flatten(v, tensors, f"{prefix}/{i}", shards)] for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}/{i}", shards) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}/{i}", shards) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}  # (JSON has no inf/nan)
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at {prefix!r} in a checkpoint; state dicts may hold tensors, "
        "numbers, strings, lists, tuples and dicts only"
    )


def _key(k: Any) -> Any:
    if isinstance(k, (bool, int, float, str)) or k is None:
        return k
    raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """Inverse of :func:`flatten`; a reference to a missing tensor, or a malformed node, is a KeyError/TypeError
    (the caller names the file).

    Example:

        >>> unflatten({"w": {"__tensor__": "opt/w"}, "betas": {"__tuple__": [0.9, 0.99]}}, {"opt/w": torch.ones(2)})
        {'w': tensor([1., 1.]), 'betas': (0.9, 0.99)}
    """
    if depth > 64:
        raise ValueError("nested deeper than any state dict (64 levels)")
    if isinstance(obj, dict):
        for tag in ("__tensor__", "__shard__"):
            if tag in obj:
                if set(obj) != {tag} or not isinstance(obj[tag], str):
                    raise TypeError(f"malformed tensor reference {obj!r:.80}")
                if obj[tag] not in tensors:
                    raise KeyError(f"tensor {obj[tag]!r} is referenced but not stored")
                return tensors[obj[tag]]
        if "__float__" in obj:
            if obj["__float__"] not in ("inf", "-inf", "nan"):
                raise TypeError(f"malformed float {obj['__float__']!r}")
            return float(obj["__float__"])
        if "__items__" in obj:
            items = obj["__items__"]
            if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise TypeError("malformed '__items__'")
            return {k: unflatten(v, tensors, depth + 1) for k, v in items}
        if "__tuple__" in obj:
            if not isinstance(obj["__tuple__"], list):
                raise TypeError("malformed '__tuple__'")
            return tuple(unflatten(v, tensors, depth + 1) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors, depth + 1) for v in obj]
    return obj


# ---------------------------------------------------------------- saving


def save(
    state: TrainState,
    writer: Any,  # framework.checkpoint.CheckpointWriter (or the async one's DeferredWriter)
    root: Path,
    name: str,
    *,
    strategy: Strategy,
    rt: Runtime,
    fingerprint: dict[str, Any],
    monitor_value: float | None,
    keep_last: int | None,
    keep_best: int,
    mode: str,
) -> Path:
    """Write every registered object into a new checkpoint. Collective: every rank calls it, with its own
    ``writer`` for ``root/name`` (a :class:`~framework.checkpoint.io.CheckpointWriter`, or an
    :class:`~framework.checkpoint.store.AsyncCheckpointer`'s); the main process then publishes it (``latest``,
    pruning by ``keep_last``, ``keep_best`` and ``mode``).
    """
    if rt.is_main:
        writer.prepare()
        # A full disk: the checkpoints this save's prune would remove once it is complete go first, before it
        # (where less is free than the last checkpoint took), then again on a write that fails for lack of space.
        writer.room = functools.partial(make_room, root, keep_last, keep_best, mode)
        make_room(root, keep_last, keep_best, mode, need=previous_size(root) * 21 // 20)
    rt.barrier()
    # Shards (DTensors: FSDP's parameters, their EMA and optimizer state) go to torch.distributed.checkpoint,
    # whole tensors to safetensors: decided by what each tensor is, whatever the strategy.
    shards: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    tree: dict[str, Any] = {}
    own_files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    for name, entry in state._entries.items():
        value = entry.obj.state_dict()
        if entry.file is not None and not any(_is_dtensor(t) for t in value.values()):
            unique, aliases = dedup_shared(value)
            own_files[entry.file] = (unique, {"aliases": json.dumps(aliases)})
            tree[name] = {"__file__": entry.file}
        elif entry.file is not None:
            for key, t in value.items():
                if _is_dtensor(t):
                    shards[f"{name}/{key}"] = t
                else:  # (a buffer: not sharded by FSDP)
                    tensors[f"{name}/{key}"] = t.detach().cpu().contiguous()
            tree[name] = {"__file__": entry.file, "sharded": sorted(value)}
        else:
            tree[name] = flatten(value, tensors, name, shards)
    if shards:  # (collective: every rank holds shards of the same tensors)
        from . import shards as dcp

        for file in dcp.save(shards, writer.staging):  # (beside the other files: one flat, hashed checkpoint)
            writer.external(file)
    if rt.is_main:
        for file, (unique, meta) in own_files.items():
            writer.tensors(file, unique, meta)
        writer.tensors("state.safetensors", tensors)
        writer.json(
            "state.json",
            {
                "format": STATE_FORMAT,
                "world_size": rt.world_size,
                "strategy": strategy.name,
                "fingerprint": fingerprint,
                "monitor_value": monitor_value if monitor_value is None or math.isfinite(monitor_value) else None,
                "state": tree,
            },
        )
    meta, rng_tensors = rng_state()
    writer.json(f"rng-rank{rt.rank}.json", meta)
    writer.tensors(f"rng-rank{rt.rank}.safetensors", rng_tensors)
    writer.commit()  # (the main process's finalize waits for every rank's record: no barrier needed here)
    path = root / name
    if rt.is_main:
        path = publish(writer, keep_last=keep_last, keep_best=keep_best, mode=mode, monitor_value=monitor_value)
    rt.barrier()
    return path


# ---------------------------------------------------------------- loading

_TOP = Keys(
    {
        "format": Int(STATE_FORMAT, STATE_FORMAT),
        "world_size": Int(1),
        "strategy": Str(max_len=16),
        "fingerprint": JSON(),
        "monitor_value": Maybe(Float()),
        "state": MapOf(JSON()),
    }
)


def load(
    state: TrainState,
    reader: Any,  # framework.checkpoint.CheckpointReader, or the checkpoint's path (verified here)
    *,
    strategy: Strategy,
    rt: Runtime,
    fingerprint: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    """Restore every registered object from a checkpoint: read and check all of it, then apply.
    Returns ``{"world_size": ..., "strategy": ...}`` of the run that saved it.

    With several processes the ranks agree twice, one small all-reduce each, before anything is applied:
    after what each rank reads and checks on its own (the verification, ``state.json``, its own RNG state,
    the shards' index), so that a checkpoint one rank refuses never starts the collective read of the
    shards on the others; and after that read and the checks of what it gave (each rank its own shards).
    A failure on any rank is raised on every rank (the rank's own error, a
    :class:`CorruptCheckpointError` naming that rank on the others), so ``resume="auto"`` moves on to
    the same older checkpoint everywhere. ``seed`` re-seeds the per-rank RNG streams of an elastic resume.
    """
    where = Path(reader.path if hasattr(reader, "path") else reader)
    reader, meta, tensors, index, rng = _agreed(rt, where, lambda: _read_local(state, reader, fingerprint, rt))
    values = _agreed(rt, where, lambda: _read_values(state, reader, meta["state"], tensors, index))
    # Then apply (every state was checked: nothing below can fail half way on a well-formed checkpoint).
    for name, entry in state._entries.items():
        entry.obj.load_state_dict(values[name])
    if rng is not None:
        set_rng_state(*rng)
    else:
        # Elastic resume: the data order and global batch carry over exactly, but
        # per-rank random streams (dropout, augmentation) cannot be re-split.
        if rt.is_main:
            warnings.warn(
                f"resuming a {meta['world_size']}-process checkpoint on {rt.world_size} process(es): data order, "
                "global batch and optimizer state carry over exactly, but per-rank RNG streams (dropout, random "
                "augmentation) cannot; they are re-seeded from (seed, step, rank)",
                stacklevel=3,
            )
        step = state["counters"].step if "counters" in state.names else 0
        seed_everything((seed * 1_000_003 + step * 101 + rt.rank) % 2**63)
    return {"world_size": meta["world_size"], "strategy": meta["strategy"]}


_T = TypeVar("_T")


def _agreed(rt: Runtime, path: Path, read: Callable[[], _T]) -> _T:
    """``read()`` on every rank, then one all-reduce: every rank read the same checkpoint, and without error.
    Otherwise every rank raises (see :func:`load`): its own error, or one naming the rank(s) that failed."""
    error: Exception | None = None
    try:
        result = read()
    except Exception as e:  # (anything: a rank that stopped here alone would leave the others in a collective)
        error = e
    if rt.world_size > 1:
        code = 0 if error is None else 1 if isinstance(error, CorruptCheckpointError) else 2
        name = zlib.crc32(path.name.encode())  # (per-node disks could list other checkpoints: same one?)
        flags = torch.zeros(rt.world_size + 2, dtype=torch.int64, device=rt.device)
        flags[rt.rank], flags[-2], flags[-1] = code, name, -name
        codes = rt.all_reduce_max(flags).tolist()
        if codes[-2] != -codes[-1]:
            raise CheckpointError(
                f"the processes are loading different checkpoints (this one: {path}); each process must see the "
                "same run dir. Pass resume= the path of one checkpoint that every process can read"
            ) from error
        failed = [r for r, c in enumerate(codes[:-2]) if c]
        stop = max(codes[:-2]) == 2  # (a failure that is no damage, on some rank: every rank stops)
        if error is None and failed:
            kind = CheckpointError if stop else CorruptCheckpointError
            raise kind(
                f"{path}: rank(s) {failed} could not use this checkpoint (their own message says why); every rank "
                + ("stops" if stop else "skips it")
            )
        if stop and isinstance(error, CorruptCheckpointError):
            raise CheckpointError(f"{error} (and rank(s) {failed} could not load it either: every rank stops)")
    if error is not None:
        raise error
    return result


def _read_local(
    state: TrainState, reader: Any, fingerprint: dict[str, Any], rt: Runtime
) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor], Any, tuple[Any, dict[str, torch.Tensor]] | None]:
    """What this rank reads and checks on its own, no collective: the checkpoint verified, ``state.json``,
    ``state.safetensors``, this rank's RNG state (None for an elastic resume), the shards' checked index."""
    from . import shards as dcp
    from .io import CheckpointReader

    if not isinstance(reader, CheckpointReader):
        reader = CheckpointReader(Path(reader))
    meta = _read_meta(state, reader, fingerprint)
    rng = _read_rng(reader, meta["world_size"], rt)
    tensors = reader.tensors("state.safetensors")
    index = None
    if reader.has(dcp.METADATA):  # (the index checked against the verified files: nothing allocated yet)
        index = dcp.open_index(reader.path, {n: e.size for n, e in reader.files.items()})
    return reader, meta, tensors, index, rng


def _read_rng(reader: Any, saved_world: int, rt: Runtime) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """This rank's RNG state, checked (None when the checkpoint comes from another world size: elastic).
    Every process that wrote the checkpoint wrote its RNG state: a checkpoint that lost some is damaged,
    not an elastic one (its state.json says how many processes wrote it)."""
    listed = {f for f in reader.files if f.startswith("rng-rank")}
    expected = {f"rng-rank{r}.{ext}" for r in range(saved_world) for ext in ("json", "safetensors")}
    if listed != expected:
        raise CorruptCheckpointError(
            f"{reader.path}: its state.json says {saved_world} process(es) wrote it, each with its RNG state "
            f"(rng-rank{{R}}.json and .safetensors), but its manifest lists missing {sorted(expected - listed)[:4]}, "
            f"unexpected {sorted(listed - expected)[:4]}; {_CORRUPT}"
        )
    if saved_world != rt.world_size:
        return None
    rng = (reader.json(f"rng-rank{rt.rank}.json"), reader.tensors(f"rng-rank{rt.rank}.safetensors"))
    check_rng_state(*rng, where=reader.path / f"rng-rank{rt.rank}.json")  # (a CorruptCheckpointError naming it)
    return rng


def _read_meta(state: TrainState, reader: Any, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """``state.json``, checked: its format, its schema, the run's fingerprint, one entry per registered object."""
    path = reader.path
    where = path / "state.json"
    meta = reader.json("state.json")
    # A malformed checkpoint is a CorruptCheckpointError (resume="auto" skips it, naming it); a well-formed one
    # of another version or setup is a CheckpointError (the run stops: resuming it would need a decision).
    if (
        isinstance(meta, dict)
        and meta.get("format") not in (STATE_FORMAT, None)
        and isinstance(meta.get("format"), int)
    ):
        raise CheckpointError(
            f"{where} is state format {meta['format']}, this framework reads format {STATE_FORMAT}; resume it with "
            "the version that wrote it, or start a new run_dir"
        )
    expect(meta, _TOP, where=where, hint=_CORRUPT)
    diffs = _differences(meta["fingerprint"], fingerprint)
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the run's configuration differs from the checkpoint's:\n  "
            + "\n  ".join(diffs)
            + "\nrestore these settings, or start a new run_dir"
        )
    tree = meta["state"]
    # The fingerprint matched: the same setup (optimizers, schedulers, EMA, precision) has the same names.
    for name in state.names:
        if name not in tree:
            raise CorruptCheckpointError(f"{where}: state.{name}: missing; {_CORRUPT}")
    for name in tree:
        if name not in state._entries:
            raise CorruptCheckpointError(f"{where}: state.{name}: unknown key (expected {state.names}); {_CORRUPT}")
    for name, entry in state._entries.items():
        if entry.schema is not None:
            expect(tree[name], entry.schema, where=where, path=("state", name), hint=_CORRUPT)
    return meta


def _read_values(
    state: TrainState, reader: Any, tree: dict[str, Any], tensors: dict[str, torch.Tensor], index: Any
) -> dict[str, Any]:
    """Every registered object's state, read (tensors, shards: the collective read, JSON) and checked by its
    own check."""
    where = reader.path / "state.json"
    sharded = _read_shards(state, reader, index) if index is not None else {}
    values: dict[str, Any] = {}
    for name, entry in state._entries.items():
        try:
            if entry.file is not None:
                values[name] = _read_own_file(name, entry, tree[name], reader, tensors, sharded)
            else:
                values[name] = unflatten(tree[name], {**tensors, **sharded})
            if entry.check is not None:
                entry.check(values[name])
        except BadTensor as e:  # (its values: named by the file that holds the tensor, and its key)
            held = _holding(f"{name}/{e.key}", tensors, index)
            raise CorruptCheckpointError(f"{reader.path / held}: {name}/{e.key}: {e.why}; {_CORRUPT}") from None
        except (KeyError, TypeError, ValueError, RecursionError, IndexError) as e:
            raise CorruptCheckpointError(f"{where}: state.{name}: a malformed entry ({e}); {_CORRUPT}") from None
    return values


def _holding(key: str, tensors: dict[str, torch.Tensor], index: Any) -> str:
    """The file(s) of a checkpoint that hold tensor ``key``: ``state.safetensors``, or its shards' files."""
    if key in tensors or index is None:
        return "state.safetensors"
    shards = sorted({info.relative_path for i, info in index.storage_data.items() if i.fqn == key})
    return ", ".join(shards) or "the shards"


def _read_own_file(
    name: str,
    entry: _Entry,
    node: Any,
    reader: Any,
    tensors: dict[str, torch.Tensor],
    sharded: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """A tensor-only entry: from its safetensors file, or from the shards (plus unsharded buffers)."""
    if not isinstance(node, dict) or "__file__" not in node:
        raise TypeError(f"expected a file reference, got {node!r:.80}")
    if "sharded" in node:  # written sharded: in the shards (and unsharded buffers in state.safetensors)
        keys = node["sharded"]
        if not isinstance(keys, list):
            raise TypeError("malformed sharded entry")
        out = {}
        for key in keys:
            full = f"{name}/{key}"
            if full not in sharded and full not in tensors:
                raise KeyError(f"{full!r} is in neither the shards nor state.safetensors")
            out[key] = sharded[full] if full in sharded else tensors[full]
        return out
    assert entry.file is not None
    if node["__file__"] != entry.file or not reader.has(entry.file):
        raise KeyError(f"{entry.file} is missing")
    stored, metadata = reader.tensors_and_metadata(entry.file)
    return with_aliases(stored, metadata, reader.path / entry.file)


def _read_shards(state: TrainState, reader: Any, index: Any) -> dict[str, torch.Tensor]:
    """The tensors written through torch.distributed.checkpoint: into this run's shards where this run holds
    shards (resharding from any world size; collective), else as whole tensors (a plain or DDP run resuming
    a sharded checkpoint). ``index``: the checked index (:func:`framework.checkpoint.shards.open_index`)."""
    from . import shards as dcp

    directory = reader.path  # (DCP's .metadata and __R_0.distcp files, verified with the rest)
    template: dict[str, torch.Tensor] = {}  # this run's shards
    whole: dict[str, torch.Tensor] = {}  # this run's whole tensors (a layout may shard what another keeps whole)
    for name, entry in state._entries.items():
        current = entry.obj.state_dict()
        if entry.file is not None:
            template.update({f"{name}/{k}": torch.empty_like(v) for k, v in current.items() if _is_dtensor(v)})
            whole.update({f"{name}/{k}": v for k, v in current.items() if not _is_dtensor(v)})
        else:
            found: dict[str, torch.Tensor] = {}
            flatten(current, whole, name, found)
            template.update({k: torch.empty_like(v) for k, v in found.items()})
    if not template:
        return dcp.load_full(directory, meta=index)
    missing = sorted(set(template) - set(index.state_dict_metadata))
    if missing:
        raise CorruptCheckpointError(f"{directory / dcp.METADATA}: no shards for {missing[:4]}; {_CORRUPT}")
    # Tensors this run holds whole but the checkpoint's layout sharded (a LayerNorm under FSDP x TP, resumed on
    # TP alone) are read whole from the shards.
    template.update(
        {k: torch.empty(v.shape, dtype=v.dtype) for k, v in whole.items() if k in index.state_dict_metadata}
    )
    dcp.load(template, directory, index)
    return template


# ---------------------------------------------------------------- what a checkpoint depends on

_KERNEL_FLAGS = ("foreach", "fused", "capturable")


def fingerprint(
    config: EngineConfig, module: nn.Module, optimizers: Optimizers, batch_size: int | None, scaler: bool = False
) -> dict[str, Any]:
    """What a checkpoint depends on, from the validated config: resuming with any of it changed is an error.
    Kept in ``state.json`` (``fingerprint``): the batch size, seed, shuffle, drop_last, EMA decay, every
    parameter's shape, each optimizer's class, settings and scheduler, and whether a GradScaler runs.
    """
    tensors: dict[str, torch.Tensor] = {}
    opts = {}
    for o in optimizers:
        # (the kernel flags say how a step is computed, not what: a run may resume on other hardware)
        settings = {k: v for k, v in o.optimizer.defaults.items() if not callable(v) and k not in _KERNEL_FLAGS}
        opts[o.name] = {
            "class": type(o.optimizer).__name__,
            "groups": len(o.optimizer.param_groups),
            "defaults": flatten(settings, tensors, "defaults"),
            "scheduler": type(o.scheduler).__name__ if o.scheduler is not None else None,
        }
    return {
        "batch_size": batch_size,
        "seed": config.seed,
        "shuffle": config.data.shuffle,
        "drop_last": config.data.drop_last,
        "ema_decay": config.step.ema_decay,
        "model": {k: list(v.shape) for k, v in module.state_dict().items()},
        "optimizers": opts,
        "grad_scaler": scaler,
    }


def _differences(saved: Any, now: dict[str, Any]) -> list[str]:
    if not isinstance(saved, dict):
        return [f"fingerprint: checkpoint {type(saved).__name__} vs now an object"]
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append(f"model.{name}: checkpoint {a.get(name)} vs now {b.get(name)}")
        else:
            out.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    return out


# ---------------------------------------------------------------- rng: The process's random number generators' state, for exact resume.


def rng_state() -> tuple[Any, dict[str, torch.Tensor]]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) as (JSON part, tensors).

    Example:

        >>> meta, tensors = rng_state()
        >>> sorted(meta), tensors["torch"].dtype, tensors["numpy"].shape  # (and "cuda/0", ... where CUDA runs)
        (['numpy', 'python'], torch.uint8, torch.Size([624]))
    """
    import numpy as np

    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return meta, tensors


_RNG_META = Keys(
    {
        "numpy": TupleOf(Str(choices=("MT19937",)), Int(0, 624), Int(0, 1), Float(finite=False)),
        "python": TupleOf(Int(), ListOf(Int(0, 2**32 - 1), min_len=625, max_len=625), Maybe(Float(finite=False))),
    }
)


def check_rng_state(meta: Any, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``where`` (and the key) unless ``meta`` and ``tensors``
    (an ``rng-rank{R}`` pair) are RNG states that :func:`set_rng_state` can apply whole: types and
    shapes first, then each state applied to a scratch generator (a state of the right size can
    still be invalid), so that a bad one fails before anything of the run changes.

    Example:

        >>> from pathlib import Path
        >>> meta, tensors = rng_state()
        >>> check_rng_state(meta, tensors, where=Path("rng-rank0.json"))  # fine
        >>> meta["numpy"][0] = "PCG64"
        >>> check_rng_state(meta, tensors, where=Path("rng-rank0.json"))
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: rng-rank0.json: numpy[0]: expected one of 'MT19937', got
        'PCG64' (str); the checkpoint is damaged or was edited; nothing was applied. Resume from another checkpoint
    """
    import numpy as np

    expect(meta, _RNG_META, where=where, hint=_CORRUPT)
    tensor_file = where.with_suffix(".safetensors")
    expected = {"torch": (torch.uint8, [torch.get_rng_state().numel()]), "numpy": (torch.int32, [624])}
    for key, t in tensors.items():
        want = expected.get(key, (torch.uint8, [16]) if re.fullmatch(r"cuda/\d+", key) else None)
        if want is None:
            raise CorruptCheckpointError(f"{tensor_file}: {key}: not an RNG state this framework writes; {_CORRUPT}")
        if t.dtype != want[0] or list(t.shape) != want[1]:
            raise CorruptCheckpointError(
                f"{tensor_file}: {key}: expected {want[0]} of shape {want[1]}, got {t.dtype} of shape "
                f"{list(t.shape)}; {_CORRUPT}"
            )
    for key in expected:
        if key not in tensors:
            raise CorruptCheckpointError(f"{tensor_file}: {key}: missing; {_CORRUPT}")
    kind, pos, has_gauss, gauss = meta["numpy"]
    version, internal, gauss_next = meta["python"]
    try:
        torch.Generator().set_state(tensors["torch"])
        np.random.RandomState().set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    except (RuntimeError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(f"{tensor_file}: not a valid RNG state ({e}); {_CORRUPT}") from None
    try:
        random.Random().setstate((version, tuple(internal), gauss_next))
    except (ValueError, TypeError, OverflowError) as e:
        raise CorruptCheckpointError(f"{where}: python: not a valid RNG state ({e}); {_CORRUPT}") from None


def set_rng_state(meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned (check a saved one with :func:`check_rng_state` first).

    Example:

        >>> saved = rng_state()
        >>> first = torch.rand(2)
        >>> set_rng_state(*saved)
        >>> torch.equal(torch.rand(2), first)  # the same draw again
        True
    """
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
