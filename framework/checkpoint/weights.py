"""Model weights out of checkpoints: ``framework.load_weights`` and the one function that reads them.

Example::

    framework.load_weights(model, "runs/digits")                       # the run's newest checkpoint
    framework.load_weights(hf_model, "runs/lm", prefix="lm.")          # a wrapper's lm.* keys, stripped
    framework.load_weights(model, "runs/digits", ema=True)             # the EMA weights
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import files, manifest, tensorfile
from .errors import CheckpointError, CorruptCheckpointError
from .io import STAGING_PREFIX, CheckpointReader
from .store import CHECKPOINT_RE, list_checkpoints, load_newest, read_latest

MODEL = "model.safetensors"
SHARD_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint (framework.dcp)
EMA = "ema.safetensors"
_WHAT = "pass a run dir, a checkpoint dir (e.g. runs/x/checkpoints/step-00000120) or a .safetensors file"
_NOT_WEIGHTS = ("state.safetensors", "rng-rank")  # (safetensors files of a checkpoint that are not the model)


def weights_source(path: str | os.PathLike[str]) -> CheckpointReader | Path:
    """Where ``path`` keeps weights: a verified checkpoint (a checkpoint dir; a run dir or its
    ``checkpoints/``: the newest; a ``latest`` pointer: what it names) or a bare ``.safetensors``
    file. Anything else is a :class:`CheckpointError` saying what to pass.

    Example::

        weights_source("runs/digits")   # CheckpointReader of runs/digits/checkpoints/step-...
    """
    p = Path(path)
    if p.is_dir():
        if (p / manifest.MANIFEST).exists() or CHECKPOINT_RE.match(p.name) or p.name.startswith(STAGING_PREFIX):
            return CheckpointReader(p)  # (a step-* without manifest: the reader says it is incomplete)
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if root is not p or list_checkpoints(p):
            opened: list[CheckpointReader] = []  # (the reader that verified it: no second pass over the files)
            if load_newest(root, lambda path: opened.append(CheckpointReader(path))) is None:
                raise CheckpointError(f"no checkpoint under {root}; train with Engine(run_dir=...) first, or {_WHAT}")
            return opened[-1]
        raise CheckpointError(f"{p} is neither a run dir (no checkpoints/ in it) nor a checkpoint dir; {_WHAT}")
    if p.name == "latest" and p.is_file():
        name = read_latest(p.parent)
        assert name is not None
        return CheckpointReader(p.parent / name)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; {_WHAT}")
    if p.suffix != ".safetensors" or p.name.startswith(_NOT_WEIGHTS):
        kind = f"a {p.suffix[1:]} file" if p.suffix else "not a .safetensors file"
        if p.name.startswith(_NOT_WEIGHTS):
            kind = "a checkpoint's optimizer/RNG state, not the model's weights"
        raise CheckpointError(f"{p} is {kind}; {_WHAT}")
    if (p.parent / manifest.MANIFEST).exists():  # (a file of a checkpoint: verify it as part of it)
        reader = CheckpointReader(p.parent)
        if reader.has(p.name):
            return reader
    return p


def read_weights(source: CheckpointReader | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict from ``source`` (see :func:`weights_source`), tied weights shared again;
    with ``ema=True`` its parameters are the EMA weights (``ema.safetensors``), buffers as saved.

    The one place weights are read: a sharded format goes here.

    Example::

        state = read_weights(CheckpointReader(ckpt))
    """
    return _read(source, ema)[0]


def _read(source: CheckpointReader | Path, ema: bool) -> tuple[dict[str, torch.Tensor], set[str]]:
    if isinstance(source, Path):
        if ema:
            raise CheckpointError(
                f"ema=True needs a checkpoint (EMA weights live in its {EMA}); {source} is a bare file"
            )
        try:
            data = files.read_regular(source, 1 << 40)
        except OSError as e:
            raise CheckpointError(f"cannot read {source} ({e}); {_WHAT}") from None
        tensors, meta = tensorfile.parse_tensors(data, source)
        return with_aliases(tensors, meta, source), set()
    if source.has(SHARD_INDEX):
        return _read_sharded(source, ema)
    if not source.has(MODEL):
        raise CorruptCheckpointError(f"{source.path} has no {MODEL} (its manifest lists {sorted(source.files)})")
    tensors, meta = source.tensors_and_metadata(MODEL)
    weights = with_aliases(tensors, meta, source.path / MODEL)
    if not ema:
        return weights, set()
    if not source.has(EMA):
        raise CheckpointError(
            f"{source.path} has no EMA weights ({EMA}); train with Engine(ema_decay=...) to keep them, or load "
            "with ema=False"
        )
    ema_tensors, ema_meta = source.tensors_and_metadata(EMA)
    averaged = with_aliases(ema_tensors, ema_meta, source.path / EMA)
    extra = sorted(set(averaged) - set(weights))
    if extra:
        raise CorruptCheckpointError(f"{source.path / EMA} holds keys that {MODEL} does not: {extra[:5]}")
    for name, t in averaged.items():
        if t.shape != weights[name].shape:
            raise CorruptCheckpointError(f"{source.path / EMA}: {name} has shape {list(t.shape)}, the model's is "
                                         f"{list(weights[name].shape)}")  # fmt: skip
    return {**weights, **averaged}, set(averaged)


def _read_sharded(source: CheckpointReader, ema: bool) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A sharded (FSDP) checkpoint, assembled into whole tensors in this process (no process group): the
    ``model/`` (or ``ema/``) tensors of its shards (``.metadata``, ``__R_0.distcp``), plus the buffers FSDP does not shard (kept in
    ``state.safetensors`` under ``model/``)."""
    from . import shards as dcp

    name = "ema" if ema else "model"
    weights = dcp.load_full(source.path, prefix=f"{name}/")
    if ema and not weights:
        raise CheckpointError(
            f"{source.path} has no EMA weights; train with Engine(ema_decay=...) to keep them, or load with ema=False"
        )
    averaged = set(weights)
    for key, tensor in source.tensors("state.safetensors").items():
        if key.startswith("model/") and key[6:] not in weights:
            weights[key[6:]] = tensor
    return weights, averaged if ema else set()


def with_aliases(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: object) -> dict[str, torch.Tensor]:
    """Tied weights are stored once; the metadata maps each other name to the stored one."""
    if "aliases" not in meta:
        return tensors
    try:
        aliases = json.loads(meta["aliases"])
    except (ValueError, RecursionError):
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
        raise CorruptCheckpointError(f"{where}: its 'aliases' metadata does not map names to stored tensors")
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    return tensors


def _select(weights: dict[str, torch.Tensor], prefix: str, where: object) -> dict[str, torch.Tensor]:
    selected = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    if not selected:
        tops = sorted({k.split(".", 1)[0] + "." for k in weights if "." in k})
        raise CheckpointError(f"no key of {where} starts with prefix={prefix!r}; its keys start with {tops[:10]}")
    return selected


def _suggest_prefix(own: set[str], weights: dict[str, torch.Tensor]) -> str:
    for top in sorted({k.split(".", 1)[0] for k in weights if "." in k}):
        if own and all(f"{top}.{k}" in weights for k in own):
            return f" (the checkpoint's {top}.* keys match this module: pass prefix={top + '.'!r})"
    return ""


def check_fits(module: torch.nn.Module, weights: dict[str, torch.Tensor], strict: bool, where: object) -> None:
    """Raise a :class:`CheckpointError` naming ``where`` unless ``weights`` load into ``module`` completely
    (shapes match; with ``strict``, the same keys; without, at least one): checked before anything is
    copied, because ``load_state_dict`` copies what fits before it raises about what does not.

    Example::

        check_fits(model, weights, strict=True, where="runs/x/checkpoints/step-00000120/model.safetensors")
    """
    own = module.state_dict()
    wrong = [f"{k}: {list(weights[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in weights and weights[k].shape != v.shape]  # fmt: skip
    if wrong:
        raise CheckpointError(f"{where} does not fit {type(module).__name__}: shapes (checkpoint vs module) differ: "
                              f"{wrong[:10]}; load it into the model it was saved from")  # fmt: skip
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{where} does not match {type(module).__name__}: missing {missing[:10]}, unexpected {unexpected[:10]}"
            + _suggest_prefix(set(own), weights)
            + "; pass prefix=... to load a submodule's keys, or strict=False to load only the keys both have"
        )
    if not (own.keys() & weights.keys()):
        raise CheckpointError(
            f"{where}: none of its keys is in {type(module).__name__} (strict=False would load nothing: "
            f"checkpoint {sorted(weights)[:5]}, module {sorted(own)[:5]})" + _suggest_prefix(set(own), weights)
        )


def load_weights(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    prefix: str | None = None,
    strict: bool = True,
    ema: bool = False,
) -> torch.nn.Module:
    """Load weights into ``module`` from a run dir (its newest checkpoint), a checkpoint dir, its
    ``latest`` pointer, or a ``.safetensors`` file; returns ``module``.

    A checkpoint is verified (every file's SHA-256) before anything is loaded; nothing is unpickled.
    ``prefix="lm."`` loads only the keys under ``lm.``, stripped (a wrapper's submodule into the bare
    model). ``strict=False`` loads the keys both have (none in common is an error). ``ema=True``
    loads the EMA parameters (``Engine(ema_decay=...)``) with the saved buffers. Any mismatch is a
    :class:`CheckpointError` raised before a single parameter changes.

    Example::

        model = Classifier()
        framework.load_weights(model, "runs/digits")          # newest checkpoint of the run
        framework.load_weights(model, "runs/digits/checkpoints/step-00000120", ema=True)
        framework.load_weights(hf_model, "runs/lm", prefix="lm.")
    """
    source = weights_source(path)
    where = source.path / MODEL if isinstance(source, CheckpointReader) else source
    weights, ema_keys = _read(source, ema)
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."  # ("lm" must not also take "lm_head.*")
        weights = _select(weights, prefix, where)
        ema_keys = {k[len(prefix) :] for k in ema_keys if k.startswith(prefix)}
    check_fits(module, weights, strict, where)
    if ema:
        params = [n for n, _ in module.named_parameters(remove_duplicate=False) if n in weights]
        lacking = [n for n in params if n not in ema_keys]
        if lacking:
            raise CorruptCheckpointError(f"{source.path if isinstance(source, CheckpointReader) else source}/{EMA} "
                                         f"lacks EMA weights for parameters {lacking[:10]}")  # fmt: skip
    module.load_state_dict(weights, strict=strict)
    return module
