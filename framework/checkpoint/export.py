"""Export: turn a run dir into deployable files.

Two outputs, both from the run dir's newest complete checkpoint:

- ``python -m framework export RUN_DIR -o model.safetensors [--prefix lm.]``: one consolidated
  safetensors file with the module's state dict (or, with ``--prefix``, one submodule's keys with
  the prefix stripped), loadable anywhere with ``safetensors.torch.load_file``.
- ``python -m framework export RUN_DIR --hf OUT_DIR``: a HuggingFace model directory
  (``config.json``, ``model.safetensors``, the tokenizer's files) that
  ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads with the trained weights.

The ``--hf`` export needs to know which HF class and config the weights belong to, which part of
the module's state dict is the HF model and which tokenizer goes with it. The recipe records
that once, at the start of training, with :func:`save_hf_artifacts` (``RUN_DIR/hf/``); the
checkpoint itself stays framework-agnostic.

Weights are read through :func:`full_weights` (over :func:`framework.weights.read_weights`, the one
reader of checkpoint weights): every other function here sees a plain ``{name: tensor}`` dict and
does not depend on how a checkpoint stores its tensors (whole, or sharded by FSDP).
Nothing is unpickled: tensors come from safetensors, everything else from JSON.

Example::

    framework.export.save_hf_artifacts(run_dir, module.lm, prefix="lm.", tokenizer=tok)  # in the recipe
    engine.fit(module, train, val)
    # later, from a shell:
    #   python -m framework export runs/hf_causal_lm --hf exported/
    #   python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('exported')"
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from . import CHECKPOINT_RE, CheckpointError
from .io import CheckpointReader
from .store import list_checkpoints
from .weights import read_weights, weights_source

HF_DIR = "hf"  # RUN_DIR/hf/: what save_hf_artifacts writes
EXPORT_JSON = "export.json"  # in it: the HF class, the prefix, whether a tokenizer is there
TOKENIZER_DIR = "tokenizer"  # RUN_DIR/hf/tokenizer/: the tokenizer's own save_pretrained files
FORMAT = 1


class ExportError(RuntimeError):
    """A run dir that cannot be exported, with what is wrong and what to do.

    Example::

        try:
            export_safetensors("runs/typo", "model.safetensors")
        except ExportError as e:
            print(e)   # names the missing dir and how to make one
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
    (a resumed run writes the same files again).

    Example::

        module = CausalLM(cfg)   # a LoopModule with self.lm = LlamaForCausalLM(config)
        if is_main:
            save_hf_artifacts(run_dir, module.lm, prefix="lm.", tokenizer=tokenizer)
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
    (verified: sizes and SHA-256 of every file).

    Example::

        find_checkpoint("runs/hf_causal_lm")   # Path("runs/hf_causal_lm/checkpoints/step-00000300")
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
    :func:`framework.weights.read_weights`, the one reader of weights that ``load_weights`` uses too;
    tied weights come back as the same tensor under each name, as ``module.state_dict()`` has them.

    Example::

        weights = full_weights("runs/hf_causal_lm")
        module.load_state_dict(weights)
    """
    return read_weights(_open(path))


def select_prefix(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The weights whose names start with ``prefix``, with it stripped (``""`` keeps them all).

    Example::

        select_prefix({"lm.model.norm.weight": w, "head.bias": b}, "lm.")   # {"model.norm.weight": w}
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
    works without this framework. The file's metadata names the checkpoint's step.

    Example::

        export_safetensors("runs/hf_causal_lm", "lm.safetensors", prefix="lm.")
        model.load_state_dict(safetensors.torch.load_file("lm.safetensors"))   # model: the bare HF model
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
    os.replace(tmp, target)  # never a half-written file under the final name
    return target


def export_hf(path: str | os.PathLike[str] | CheckpointReader, out_dir: str | os.PathLike[str]) -> Path:
    """Write a HuggingFace model directory from a run dir that :func:`save_hf_artifacts` prepared.

    Builds the recorded class (e.g. ``LlamaForCausalLM``) from the recorded config, loads the
    newest checkpoint's weights under the recorded prefix (strictly: every HF weight must be there,
    and nothing else), and writes it with ``save_pretrained``, plus the tokenizer's files. ``OUT_DIR``
    must be new or empty: a stale file (say, a sharded index from an earlier export) would take
    precedence in ``from_pretrained``.

    Example::

        export_hf("runs/hf_causal_lm", "exported")
        model = AutoModelForCausalLM.from_pretrained("exported")
        tokenizer = AutoTokenizer.from_pretrained("exported")
    """
    reader = _open(path)
    checkpoint = reader.path
    run_dir = checkpoint.parent.parent
    hf_dir = run_dir / HF_DIR
    meta_file = hf_dir / EXPORT_JSON
    if not meta_file.is_file():
        raise ExportError(
            f"{run_dir} has no {HF_DIR}/{EXPORT_JSON}, so there is no HF config to export with. The recipe writes it "
            "with framework.export.save_hf_artifacts(run_dir, hf_model, prefix='lm.', tokenizer=tok) on the main "
            "process (recipes/hf_causal_lm.py does); add that call and train again, or export the plain weights "
            "with -o model.safetensors"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ExportError(f"{meta_file} has format {meta.get('format')!r}; this framework reads format {FORMAT}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--hf {out}: the directory exists and is not empty; pass a new directory (or delete it)")

    import transformers

    cls = getattr(transformers, meta["architecture"], None)
    if cls is None:
        raise ExportError(
            f"{meta_file} names the class {meta['architecture']!r}, which this transformers "
            f"({transformers.__version__}) does not have; install the transformers version the run was trained with"
        )
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    weights = select_prefix(full_weights(reader), meta["prefix"])
    model = cls(config)
    # strict=False only to raise our own error, which names the prefix and the config as the suspects.
    missing, unexpected = (set(ks) for ks in model.load_state_dict(weights, strict=False))
    if missing or unexpected:
        raise ExportError(
            f"the weights under prefix {meta['prefix']!r} in {checkpoint} do not fit {meta['architecture']} built from "
            f"{hf_dir / 'config.json'}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}. Check "
            "the prefix passed to save_hf_artifacts (the attribute holding the HF model, plus a dot) and that the "
            "config was saved from the model that was trained"
        )
    if (hf_dir / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if meta.get("tokenizer"):
        for f in sorted((hf_dir / TOKENIZER_DIR).iterdir()):
            shutil.copy2(f, out / f.name)
    return out


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m framework export``; returns the exit status.

    Example::

        main(["runs/hf_causal_lm", "--hf", "exported"])            # 0 on success
        main(["runs/hf_causal_lm", "-o", "lm.safetensors", "--prefix", "lm."])
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
    args = parser.parse_args(argv)
    if args.output is None and args.hf is None:
        parser.print_usage(sys.stderr)
        print("export: say what to write: -o FILE.safetensors, --hf OUT_DIR, or both", file=sys.stderr)
        return 2
    if args.prefix is not None and args.output is None:
        print("export: --prefix applies to -o; --hf takes the prefix the recipe recorded", file=sys.stderr)
        return 2
    try:
        reader = _open(args.path)  # (verified once, whatever is written from it)
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
