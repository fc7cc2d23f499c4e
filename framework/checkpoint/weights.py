"""Model weights out of checkpoints: ``framework.load_weights``, the one function that reads them
(:func:`read_weights`, whole tensors also from a sharded checkpoint), and export to deployable files.

- ``python -m framework export RUN_DIR -o model.safetensors [--prefix lm.]``: one consolidated
  safetensors file with the module's state dict (or, with ``--prefix``, one submodule's keys with
  the prefix stripped), loadable anywhere with ``safetensors.torch.load_file``.
- ``python -m framework export RUN_DIR --hf OUT_DIR``: a HuggingFace model directory
  (``config.json``, ``model.safetensors``, the tokenizer's files) that
  ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads with the trained weights. The
  recipe records which HF class and config the weights belong to, once, with :func:`save_hf_artifacts`
  (``RUN_DIR/hf/``); the checkpoint itself stays framework-agnostic.

Nothing is unpickled: tensors come from safetensors, everything else from JSON.

For the HuggingFace export, the recipe calls ``save_hf_artifacts(run_dir, module.lm, prefix="lm.",
tokenizer=tok)`` once, on the main process; then:

.. code-block:: bash

    python -m framework export runs/hf_causal_lm --hf exported/

Example:

    >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/digits", ema_decay=0.9, progress=False)
    >>> _ = engine.fit(Classifier(), train_data)
    >>> model = framework.load_weights(Classifier(), "runs/digits")  # the run's newest checkpoint
    >>> averaged = framework.load_weights(Classifier(), "runs/digits", ema=True)  # the EMA weights
    >>> framework.load_weights(nn.Linear(8, 3), "runs/digits", prefix="net.")  # a wrapper's net.* keys, stripped
    Linear(in_features=8, out_features=3, bias=True)
    >>> from framework.checkpoint.weights import main
    >>> main(["runs/digits", "-o", "model.safetensors"])  # python -m framework export runs/digits -o model.safetensors
    wrote model.safetensors (weights of runs/digits/checkpoints/step-00000001)
    0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import fileformat, files
from .fileformat import Bool, Int, Keys, Str, expect
from .files import CheckpointError, CorruptCheckpointError
from .io import CHECKPOINT_RE, STAGING_PREFIX, CheckpointReader
from .store import best_of_run, list_checkpoints, load_newest, read_latest

# ---------------------------------------------------------------- weights: Model weights out of checkpoints: ``framework.load_weights`` and the one function that reads them.

MODEL = "model.safetensors"
SHARD_INDEX = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint (framework.checkpoint.shards)
EMA = "ema.safetensors"
_WHAT = "pass a run dir, a checkpoint dir (e.g. runs/x/checkpoints/step-00000120) or a .safetensors file"
_NOT_WEIGHTS = ("state.safetensors", "rng-rank")  # (safetensors files of a checkpoint that are not the model)


def weights_source(path: str | os.PathLike[str]) -> CheckpointReader | Path:
    """Where ``path`` keeps weights: a verified checkpoint (a checkpoint dir; a run dir or its
    ``checkpoints/``: the newest; a ``latest`` pointer: what it names) or a bare ``.safetensors``
    file. Anything else is a :class:`CheckpointError` saying what to pass. A run dir gives the
    :class:`CheckpointReader` of its newest checkpoint (``runs/digits/checkpoints/step-...``).
    """
    p = Path(path)
    if p.is_dir():
        if (p / fileformat.MANIFEST).exists() or CHECKPOINT_RE.match(p.name) or p.name.startswith(STAGING_PREFIX):
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
    if (p.parent / fileformat.MANIFEST).exists():  # (a file of a checkpoint: verify it as part of it)
        reader = CheckpointReader(p.parent)
        if reader.has(p.name):
            return reader
    return p


_T = TypeVar("_T")
_RETRIES = 20


def read_newest(
    path: str | os.PathLike[str], read: Callable[[CheckpointReader | Path], _T]
) -> tuple[CheckpointReader | Path, _T]:
    """``read(weights_source(path))``, and the source; where the checkpoint picked disappears while it is read
    (a run training with ``keep_last`` pruned it after publishing a newer one), again from the newest
    complete one: a reader polling a run dir never loses to pruning. (``read_newest("runs/digits",
    read_weights)`` gives the source and its weights.)
    """
    for _ in range(_RETRIES):
        source = weights_source(path)
        try:
            return source, read(source)
        except CheckpointError:
            if not (isinstance(source, CheckpointReader) and not os.path.lexists(source.path)):
                raise
    raise CheckpointError(
        f"the checkpoints of {path} were pruned while being read, {_RETRIES} times in a row: the run saves faster "
        "than one checkpoint can be read. Pass one checkpoint dir, or raise the run's keep_last"
    )


def read_weights(source: CheckpointReader | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict from ``source`` (see :func:`weights_source`), tied weights shared again;
    with ``ema=True`` its parameters are the EMA weights (``ema.safetensors``), buffers as saved.

    The one place weights are read: a sharded format goes here.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import CheckpointReader, read_weights
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> reader = CheckpointReader(Path("runs/x/checkpoints/step-00000001"))
        >>> {name: list(t.shape) for name, t in sorted(read_weights(reader).items())}
        {'net.bias': [3], 'net.weight': [3, 8]}
        >>> read_weights(reader, ema=True)
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CheckpointError: runs/x/checkpoints/step-00000001 has no EMA weights
        (ema.safetensors); train with Engine(ema_decay=...) to keep them, or load with ema=False
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
        tensors, meta = fileformat.parse_tensors(data, source)
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
    meta = dcp.open_index(source.path, {n: e.size for n, e in source.files.items()})  # (checked against the files)
    weights = dcp.load_full(source.path, prefix=f"{name}/", meta=meta)
    if ema and not weights:
        raise CheckpointError(
            f"{source.path} has no EMA weights; train with Engine(ema_decay=...) to keep them, or load with ema=False"
        )
    averaged = set(weights)
    for key, tensor in source.tensors("state.safetensors").items():
        if key.startswith("model/") and key[6:] not in weights:
            weights[key[6:]] = tensor
    return weights, averaged if ema else set()


def dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (tied weights): keep one, record the aliases.

    Returns the tensors to store (CPU, contiguous) and the aliases (each other name -> the stored name).

    Example:

        >>> from framework.checkpoint import dedup_shared
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
        >>> model[1].weight = model[0].weight  # tied
        >>> unique, aliases = dedup_shared(model.state_dict())
        >>> sorted(unique), aliases
        (['0.weight'], {'1.weight': '0.weight'})
    """
    seen: dict[tuple[Any, ...], str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and sig in seen:
            aliases[name] = seen[sig]
            continue
        seen[sig] = name
        unique[name] = t.contiguous()
    return unique, aliases


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
    (:func:`load_weights` shows its messages.)
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


def _check_arguments(prefix: Any, strict: Any, ema: Any) -> None:
    """``load_weights``' own arguments, checked before anything is read (a string "False" is truthy: it
    would load strictly, or load the EMA weights, silently)."""
    if prefix is not None and not isinstance(prefix, str):
        hint = f"prefix={prefix.decode(errors='replace')!r}" if isinstance(prefix, bytes) else "prefix='lm.'"
        raise TypeError(
            f"load_weights: prefix={prefix!r} is a {type(prefix).__name__}; pass a str naming the submodule whose "
            f"keys to load (e.g. {hint}), or None for all keys"
        )
    for name, value in (("strict", strict), ("ema", ema)):
        if not isinstance(value, bool):
            raise TypeError(f"load_weights: {name}={value!r} is a {type(value).__name__}; pass True or False")


def load_weights(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    prefix: str | None = None,
    strict: bool = True,
    ema: bool = False,
    which: str = "latest",
) -> torch.nn.Module:
    """Load weights into ``module`` from a run dir (its newest checkpoint), a checkpoint dir, its
    ``latest`` pointer, or a ``.safetensors`` file; returns ``module``.

    ``which="best"`` (with a run dir) loads the run's best checkpoint instead, ranked by the ``monitor`` and
    ``mode`` it trained with, as ``keep_best`` kept it (``engine.best_checkpoint``); a run that kept none
    (``keep_best=0``) is a :class:`CheckpointError` naming ``keep_best``.

    A checkpoint is verified (every file's SHA-256) before anything is loaded; nothing is unpickled.
    ``prefix="lm."`` loads only the keys under ``lm.``, stripped (a wrapper's submodule into the bare
    model). ``strict=False`` loads the keys both have (none in common is an error). ``ema=True``
    loads the EMA parameters (``Engine(ema_decay=...)``) with the saved buffers. Any mismatch is a
    :class:`CheckpointError` raised before a single parameter changes.

    Example:

        >>> trained = Classifier()
        >>> engine = framework.Engine(max_epochs=1, batch_size=32, run_dir="runs/digits", keep_best=1, progress=False)
        >>> _ = engine.fit(trained, train_data, val_data)
        >>> model = framework.load_weights(Classifier(), "runs/digits")  # the newest checkpoint of the run
        >>> torch.equal(model.net.weight, trained.net.weight)
        True
        >>> best = framework.load_weights(Classifier(), "runs/digits", which="best")  # the best by val/loss
        >>> framework.load_weights(nn.Linear(8, 3), "runs/digits/checkpoints/step-00000003")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CheckpointError: runs/digits/checkpoints/step-00000003/model.safetensors does not
        match Linear: missing ['bias', 'weight'], unexpected ['net.bias', 'net.weight'] (the checkpoint's net.* keys
        match this module: pass prefix='net.'); pass prefix=... to load a submodule's keys, or strict=False to load
        only the keys both have
    """
    _check_arguments(prefix, strict, ema)
    if which not in ("latest", "best"):
        raise ValueError(f"which={which!r}; use 'latest' (the newest checkpoint) or 'best' (ranked by monitor)")
    target = path if which == "latest" else best_of_run(Path(path))
    source, (weights, ema_keys) = read_newest(target, lambda source: _read(source, ema))
    where = source.path / MODEL if isinstance(source, CheckpointReader) else source
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


# ---------------------------------------------------------------- export: Export: turn a run dir into deployable files.

HF_DIR = "hf"  # RUN_DIR/hf/: what save_hf_artifacts writes
EXPORT_JSON = "export.json"  # in it: the HF class, the prefix, whether a tokenizer is there
TOKENIZER_DIR = "tokenizer"  # RUN_DIR/hf/tokenizer/: the tokenizer's own save_pretrained files
FORMAT = 1


class ExportError(RuntimeError):
    """A run dir that cannot be exported, with what is wrong and what to do.

    Example:

        >>> export_safetensors("runs/typo", "model.safetensors")
        Traceback (most recent call last):
        ...
        framework.checkpoint.weights.ExportError: runs/typo does not exist; pass a run dir (the --run-dir of a
        training run) or a checkpoint
    """


# ---------------------------------------------------------------- what the recipe records


def save_hf_artifacts(
    run_dir: str | os.PathLike[str], hf_model: Any, prefix: str = "lm.", tokenizer: Any = None
) -> Path:
    """Record what ``export --hf`` needs in ``RUN_DIR/hf/``; call it once, on the main process.

    Writes the HF model's ``config.json`` (with its class in ``architectures``), its
    ``generation_config.json`` when it has one, the tokenizer's files (``tokenizer.save_pretrained``)
    under ``hf/tokenizer/``, and ``export.json``, which names ``prefix``: where the HF model's
    weights sit in the LoopModule's state dict (``"lm."`` for ``self.lm = LlamaForCausalLM(...)``;
    ``""`` if the LoopModule *is* the HF model's parent with no prefix). No weights are written
    here: they come from the checkpoints. Returns the ``hf/`` path. Replaces an earlier ``hf/``
    (a resumed run writes the same files again). For a LoopModule with ``self.lm = LlamaForCausalLM(config)``
    the recipe calls ``save_hf_artifacts(run_dir, module.lm, prefix="lm.", tokenizer=tokenizer)`` on the main
    process.
    """
    config = getattr(hf_model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ExportError(
            f"save_hf_artifacts got a {type(hf_model).__name__}, which has no HuggingFace .config; pass the "
            "transformers model itself (e.g. module.lm, a LlamaForCausalLM), not the LoopModule around it"
        )
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise ExportError(
            f"prefix={prefix!r}: pass the attribute path of the HF model in your LoopModule followed by a dot, "
            "e.g. prefix='lm.' for self.lm, or '' if the module's state dict is the HF model's own"
        )
    root = Path(run_dir) / HF_DIR
    tmp = Path(run_dir) / f".{HF_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A copy, so that recording the class does not change the user's live config object.
    config = copy.deepcopy(config)
    config.architectures = [type(hf_model).__name__]
    config.save_pretrained(tmp)
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    meta = {
        "format": FORMAT,
        "prefix": prefix,
        "architecture": type(hf_model).__name__,
        "tokenizer": tokenizer is not None,
    }
    (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    # Swap into place, so an export never sees half of the files.
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


# ---------------------------------------------------------------- reading a checkpoint's weights


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint ``path`` names: a run dir's newest complete one, or ``path`` itself if it is one
    (verified: sizes and SHA-256 of every file), e.g. ``runs/hf_causal_lm/checkpoints/step-00000300``.
    """
    return _open(path).path


def _open(path: str | os.PathLike[str] | CheckpointReader) -> CheckpointReader:
    """The verified checkpoint ``path`` names (an open reader passes through: one verification per export)."""
    if isinstance(path, CheckpointReader):
        return path
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist; pass a run dir (the --run-dir of a training run) or a checkpoint")
    if p.is_dir() and not CHECKPOINT_RE.match(p.name) and not list_checkpoints(p / "checkpoints"):
        raise ExportError(
            f"no complete checkpoint under {p / 'checkpoints'}: train with a run dir (a recipe's --run-dir, or "
            "Engine(run_dir=...)), which checkpoints at every epoch end and when fit ends, then export that dir"
        )
    source = weights_source(p)
    if not isinstance(source, CheckpointReader):
        raise ExportError(f"{p} is a weights file already; pass the run dir or the checkpoint dir it came from")
    return source


def full_weights(path: str | os.PathLike[str] | CheckpointReader) -> dict[str, torch.Tensor]:
    """Every weight of the module's state dict in one checkpoint, as CPU tensors by name.

    ``path`` is a run dir (its newest complete checkpoint) or a checkpoint directory; a sharded
    (FSDP) checkpoint is assembled into whole tensors. The reading is
    :func:`read_weights`, the one reader of weights that ``load_weights`` uses too;
    tied weights come back as the same tensor under each name, as ``module.state_dict()`` has them, so
    ``module.load_state_dict(full_weights("runs/hf_causal_lm"))`` works.
    """
    return read_weights(_open(path))


def select_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The weights whose names start with ``prefix``, with it stripped (``""`` keeps them all).

    Example:

        >>> select_prefix({"lm.model.norm.weight": torch.ones(2), "head.bias": torch.zeros(1)}, "lm.")
        {'model.norm.weight': tensor([1., 1.])}
    """
    if not prefix:
        return dict(weights)
    picked = {name[len(prefix) :]: t for name, t in weights.items() if name.startswith(prefix)}
    if not picked:
        tops = sorted({name.split(".", 1)[0] + "." for name in weights})
        raise ExportError(
            f"no weight name starts with {prefix!r}; the checkpoint's names start with {tops[:10]}. "
            "Pass one of those as the prefix (or none, for the whole module)"
        )
    return picked


# ---------------------------------------------------------------- writing


def export_safetensors(
    path: str | os.PathLike[str] | CheckpointReader, out: str | os.PathLike[str], prefix: str | None = None
) -> Path:
    """Write the newest checkpoint's weights (or one submodule's, by ``prefix``) to one safetensors file.

    Every name of the state dict is written, tied weights included (as copies: safetensors
    stores no shared memory), so ``module.load_state_dict(safetensors.torch.load_file(out))``
    works without this framework. The file's metadata names the checkpoint's step. With
    ``prefix="lm."``, the bare HF model loads the file (``model.load_state_dict(load_file("lm.safetensors"))``).

    Example:

        >>> from safetensors.torch import load_file
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> export_safetensors("runs/x", "net.safetensors", prefix="net.").name
        'net.safetensors'
        >>> nn.Linear(8, 3).load_state_dict(load_file("net.safetensors"))
        <All keys matched successfully>
    """
    from safetensors.torch import save_file

    reader = _open(path)
    checkpoint = reader.path
    weights = select_prefix(full_weights(reader), prefix or "")
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in seen and t.numel() else t.contiguous()
        seen.add(ptr)
    target = Path(out)
    if target.suffix != ".safetensors":
        raise ExportError(f"-o {target}: name the output file *.safetensors, e.g. -o model.safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    meta = {"format": "pt", "checkpoint": checkpoint.name, "prefix": prefix or ""}
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, usual_mode(target.parent))  # (safetensors writes 0600; an export is for others to read)
    os.replace(tmp, target)  # never a half-written file under the final name
    return target


def export_hf(path: str | os.PathLike[str] | CheckpointReader, out_dir: str | os.PathLike[str]) -> Path:
    """Write a HuggingFace model directory from a run dir that :func:`save_hf_artifacts` prepared.

    Builds the recorded class (e.g. ``LlamaForCausalLM``) from the recorded config, loads the
    newest checkpoint's weights under the recorded prefix (strictly: every HF weight must be there,
    and nothing else), and writes it with ``save_pretrained``, plus the tokenizer's files. ``OUT_DIR``
    must be new or empty: a stale file (say, a sharded index from an earlier export) would take
    precedence in ``from_pretrained``. The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``
    and ``AutoTokenizer.from_pretrained(out_dir)``.

    Everything under ``RUN_DIR/hf/`` is checked before anything is written: ``export.json`` and
    ``config.json`` must be what ``save_hf_artifacts`` writes (an :class:`ExportError` naming the file
    otherwise), and the tokenizer's files regular files of the run dir: a symbolic link there (or in
    ``hf/`` itself) is refused, never followed, so no file from outside the run dir lands in the export.
    """
    reader = _open(path)
    checkpoint = reader.path
    run_dir = checkpoint.parent.parent
    hf_dir = run_dir / HF_DIR
    meta_file = hf_dir / EXPORT_JSON
    if not meta_file.is_file():
        raise ExportError(
            f"{run_dir} has no {HF_DIR}/{EXPORT_JSON}, so there is no HF config to export with. The recipe writes it "
            "with framework.checkpoint.weights.save_hf_artifacts(run_dir, hf_model, prefix='lm.', tokenizer=tok) on the main "
            "process (recipes/hf_causal_lm.py does); add that call and train again, or export the plain weights "
            "with -o model.safetensors"
        )
    _no_link(hf_dir)
    meta = _read_hf_json(meta_file)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{meta_file} has format {meta.get('format')!r}; this framework reads format {FORMAT}")
    expect(meta, _EXPORT_META, where=meta_file, hint=_REDO, error=ExportError)
    _read_hf_json(hf_dir / "config.json")  # (a JSON object, a regular file: before transformers reads it)
    tokenizer = _tokenizer_files(hf_dir / TOKENIZER_DIR) if meta["tokenizer"] else []
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--hf {out}: the directory exists and is not empty; pass a new directory (or delete it)")

    model = _build_hf_model(hf_dir, meta)
    weights = select_prefix(full_weights(reader), meta["prefix"])
    # strict=False only to raise our own error, which names the prefix and the config as the suspects.
    missing, unexpected = (set(ks) for ks in model.load_state_dict(weights, strict=False))
    if missing or unexpected:
        raise ExportError(
            f"the weights under prefix {meta['prefix']!r} in {checkpoint} do not fit {meta['architecture']} built from "
            f"{hf_dir / 'config.json'}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Check "
            "the prefix passed to save_hf_artifacts (the attribute holding the HF model, plus a dot) and that the "
            "config was saved from the model that was trained"
        )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in tokenizer:
        _copy_regular(f, out / f.name)
    mode = usual_mode(out)  # (save_pretrained's safetensors are 0600; an export is for others to read)
    for f in out.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)
    return out


def usual_mode(directory: Path) -> int:
    """The mode a new file gets in ``directory`` (0644 under the usual umask 022), read from one created the
    ordinary way: what exported files get (safetensors writes its files 0600).
    """
    probe = directory / f".mode-{os.getpid()}.tmp"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


_REDO = "it is written by save_hf_artifacts(run_dir, hf_model, prefix=..., tokenizer=...): call it again, and export"
_EXPORT_META = Keys(
    {"format": Int(), "prefix": Str(max_len=1000), "architecture": Str(pattern=r"[A-Za-z_][A-Za-z0-9_]{0,199}"),
     "tokenizer": Bool()}
)  # fmt: skip


def _no_link(path: Path) -> None:
    if os.path.islink(path):
        raise ExportError(
            f"{path} is a symbolic link (to {os.readlink(path)!r}); export copies nothing from outside the run dir. "
            f"Fix: replace the link with the file or directory itself; {_REDO}"
        )


def _read_hf_json(path: Path) -> dict[str, Any]:
    """A JSON object from a regular file of ``RUN_DIR/hf`` (never through a link), or an ExportError naming it."""
    _no_link(path)
    try:
        obj = json.loads(files.read_regular(path, 64 << 20))
    except FileNotFoundError:
        raise ExportError(f"{path} is missing; {_REDO}") from None
    except OSError as e:
        raise ExportError(f"cannot read {path} ({e}); {_REDO}") from None
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); {_REDO}") from None
    if not isinstance(obj, dict):
        raise ExportError(f"{path} holds a JSON {type(obj).__name__}, not an object; {_REDO}")
    return obj


def _tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer's files, checked before anything is written: regular files only (a link would copy a
    file from outside the run dir into the export; save_pretrained writes no sub-directory)."""
    _no_link(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory} is missing, but {EXPORT_JSON} says a tokenizer was saved; {_REDO}")
    found = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_symlink():
            _no_link(path)
        if entry.is_dir(follow_symlinks=False):
            raise ExportError(
                f"{path} is a directory; a tokenizer's save_pretrained writes files only, so the export does not "
                f"guess what to do with it. Fix: remove it; {_REDO}"
            )
        if not entry.is_file(follow_symlinks=False):
            raise ExportError(f"{path} is not a regular file (a FIFO, socket or device); remove it; {_REDO}")
        found.append(path)
    return found


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy the regular file ``src`` (opened without following a link) to the new file ``dst``."""
    fd = files.open_regular(src)
    with os.fdopen(fd, "rb") as source, open(dst, "xb") as target:
        shutil.copyfileobj(source, target)


def _build_hf_model(hf_dir: Path, meta: dict[str, Any]) -> Any:
    """The recorded class built from ``hf/config.json`` (and its generation config): an ExportError naming the
    file for anything transformers cannot build."""
    import transformers

    cls = getattr(transformers, meta["architecture"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ExportError(
            f"{hf_dir / EXPORT_JSON} names the class {meta['architecture']!r}, which this transformers "
            f"({transformers.__version__}) does not have as a model; install the transformers version the run was "
            "trained with"
        )
    config_file = hf_dir / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(hf_dir)
        model = cls(config)
    except Exception as e:  # (whatever transformers raises for a config it cannot build: huggingface_hub's own too)
        raise ExportError(
            f"{config_file} does not build a {meta['architecture']} ({type(e).__name__}: {str(e)[:300]}); {_REDO}"
        ) from None
    generation = hf_dir / "generation_config.json"
    if os.path.lexists(generation):
        _read_hf_json(generation)
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(hf_dir)
        except Exception as e:  # (as above)
            raise ExportError(f"{generation} is not a generation config ({type(e).__name__}: {e}); {_REDO}") from None
    return model


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m framework export``; returns the exit status (0 on success, 2 for a run dir
    that cannot be exported).

    .. code-block:: bash

        python -m framework export runs/hf_causal_lm --hf exported
        python -m framework export runs/digits -o model.safetensors

    Example (the second command, in this process):

        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/digits", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> main(["runs/digits", "-o", "model.safetensors"])
        wrote model.safetensors (weights of runs/digits/checkpoints/step-00000001)
        0
        >>> main(["runs/digits", "-o", "net.safetensors", "--prefix", "net."])  # one submodule's weights
        wrote net.safetensors (weights of runs/digits/checkpoints/step-00000001)
        0
    """
    parser = argparse.ArgumentParser(
        prog="python -m framework export",
        description="Write deployable files from a run dir's newest complete checkpoint (or from a given checkpoint).",
    )
    parser.add_argument("path", metavar="RUN_DIR", help="a run dir, or one checkpoint dir in it (checkpoints/step-N)")
    parser.add_argument("-o", "--output", metavar="FILE.safetensors", help="one consolidated safetensors file")
    parser.add_argument(
        "--prefix", default=None, help="with -o: keep only the weights under this prefix and strip it, e.g. lm."
    )
    parser.add_argument(
        "--hf",
        metavar="OUT_DIR",
        help="a HuggingFace model dir (needs the recipe's save_hf_artifacts and transformers)",
    )
    parser.add_argument(
        "--best",
        action="store_true",
        help="export the run's best checkpoint (ranked by its monitor/mode, as keep_best kept it), not the newest",
    )
    args = parser.parse_args(argv)
    if args.output is None and args.hf is None:
        parser.print_usage(sys.stderr)
        print("export: say what to write: -o FILE.safetensors, --hf OUT_DIR, or both", file=sys.stderr)
        return 2
    if args.prefix is not None and args.output is None:
        print("export: --prefix applies to -o; --hf takes the prefix the recipe recorded", file=sys.stderr)
        return 2
    try:
        reader = _open(best_of_run(Path(args.path)) if args.best else args.path)  # (verified once)
        checkpoint = reader.path
        if args.output is not None:
            written = export_safetensors(reader, args.output, prefix=args.prefix)
            print(f"wrote {written} (weights of {checkpoint})")
        if args.hf is not None:
            written = export_hf(reader, args.hf)
            print(f"wrote {written}/ (HuggingFace model from {checkpoint}; load it with from_pretrained('{written}'))")
    except ImportError as e:
        print(f"export --hf needs transformers: pip install 'framework[hf]' ({e})", file=sys.stderr)
        return 1
    except (ExportError, CheckpointError) as e:  # CheckpointError: a corrupt or planted weights file
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0
