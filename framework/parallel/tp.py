"""Tensor parallelism: a module's plan, checked, then applied with torch's ``parallelize_module``.

A plan (``LoopModule.tp_plan()``) maps module-path patterns to styles: ``"colwise"`` (the layer's output
features split across the TP ranks: ``ColwiseParallel``), ``"rowwise"`` (its input features:
``RowwiseParallel``, whose output is summed over the ranks), a few more of HuggingFace's names
(:data:`STYLES`), or any torch ``ParallelStyle``. A ``*`` stands for one path component, as in HF
transformers' ``base_model_tp_plan``: ``"blocks.*.up"`` matches ``blocks.0.up``, ``blocks.1.up``, ...

Everything that cannot work is refused before anything runs, with the fix: a pattern that matches no
module, a style name torch has no equivalent for, and a planned dimension that ``tp_size`` does not
divide (torch would shard it unevenly or fail inside the first forward).

Example:

    >>> from framework.parallel.tp import expand
    >>> class MLP(framework.LoopModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         block = lambda: nn.ModuleDict({"up": nn.Linear(8, 32), "down": nn.Linear(32, 8)})
    ...         self.blocks = nn.ModuleList([block(), block()])
    ...     def tp_plan(self):                  # or hf_tp_plan(self.lm, prefix="lm.") for a HuggingFace model
    ...         return {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
    >>> model = MLP()
    >>> expand(model, model.tp_plan())
    {'blocks.0.up': 'colwise', 'blocks.1.up': 'colwise', 'blocks.0.down': 'rowwise', 'blocks.1.down': 'rowwise'}

The plan is applied in a launched run with ``tp_size > 1``, e.g. ``Engine(tp_size=2)`` or a launch config's
``parallelism_config``:

.. code-block:: bash

    accelerate launch --config_file launch/cpu_2d.yaml recipes/hf_causal_lm.py   # 4 CPU processes: dp_shard 2 x tp 2
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from torch import nn

# HuggingFace's style names (transformers' ALL_PARALLEL_STYLES) that torch's styles express exactly.
_STYLE_NAMES = (
    "colwise", "rowwise", "colwise_gather_output", "colwise_rep", "rowwise_split_input", "rowwise_rep",
    "embedding_rowwise", "embedding_colwise", "sequence_parallel",
)  # fmt: skip
STYLES = _STYLE_NAMES


def torch_style(style: Any, where: str) -> Any:
    """The torch ``ParallelStyle`` for a plan's ``style`` (a name of :data:`STYLES`, or a ParallelStyle itself):
    ``"colwise"`` is ``ColwiseParallel()``; a name torch has no equivalent for is a ValueError listing the names.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        ParallelStyle,
        RowwiseParallel,
        SequenceParallel,
    )

    if isinstance(style, ParallelStyle):
        return style
    table: dict[str, Any] = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
        "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
        "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "embedding_colwise": lambda: ColwiseParallel(output_layouts=Replicate()),
        "sequence_parallel": SequenceParallel,
    }
    if not isinstance(style, str) or style not in table:
        raise ValueError(
            f"tp_plan()[{where!r}] = {style!r} is not a style this engine can apply; use one of "
            f"{', '.join(repr(s) for s in table)} or a torch ParallelStyle (torch.distributed.tensor.parallel)"
        )
    return table[style]()


def expand(module: nn.Module, plan: Mapping[str, Any]) -> dict[str, Any]:
    """``{module path: style}`` for every module a pattern of ``plan`` matches (``*`` = one path component);
    a pattern that matches nothing is a ValueError naming the close paths.

    Example:

        >>> block = lambda: nn.ModuleDict({"up": nn.Linear(8, 32), "down": nn.Linear(32, 8)})
        >>> model = nn.ModuleDict({"blocks": nn.ModuleList([block(), block()])})
        >>> expand(model, {"blocks.*.up": "colwise"})
        {'blocks.0.up': 'colwise', 'blocks.1.up': 'colwise'}
        >>> expand(model, {"block.*.up": "colwise"})
        Traceback (most recent call last):
        ...
        ValueError: tp_plan() pattern 'block.*.up' matches no module of ModuleDict ('*' stands for one path
        component); module paths look like ['blocks.0.up', 'blocks.1.up']
    """
    names = [n for n, _ in module.named_modules() if n]
    out: dict[str, Any] = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"tp_plan() keys are module-path patterns (str), got {pattern!r}")
        parts = pattern.split(".")
        hits = [
            n
            for n in names
            if len(n.split(".")) == len(parts)
            and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts, strict=True))
        ]
        if not hits:
            near = [n for n in names if n.split(".")[-1] == parts[-1]][:3] or names[:3]
            raise ValueError(
                f"tp_plan() pattern {pattern!r} matches no module of {type(module).__name__} ('*' stands for one "
                f"path component); module paths look like {near}"
            )
        out.update(dict.fromkeys(hits, style))
    return out


def _split_dim(style: Any, layer: nn.Module) -> tuple[str, int] | None:
    """(what is split, its size) for the dimension ``style`` splits on ``layer``, where it can be told."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    weight = getattr(layer, "weight", None)
    if weight is None or weight.ndim != 2:
        return None
    embedding = isinstance(layer, nn.Embedding)
    if isinstance(style, ColwiseParallel):  # (Linear: out_features, dim 0; Embedding: embedding_dim, dim 1)
        return ("embedding_dim", weight.shape[1]) if embedding else ("out_features", weight.shape[0])
    if isinstance(style, RowwiseParallel):  # (Linear: in_features, dim 1; Embedding: num_embeddings, dim 0)
        return ("num_embeddings", weight.shape[0]) if embedding else ("in_features", weight.shape[1])
    return None


def resolve(module: nn.Module, plan: Mapping[str, Any], tp: int) -> dict[str, Any]:
    """The plan as ``{module path: torch ParallelStyle}``, checked against ``module`` and ``tp`` (see the module
    docstring). Works on a module built on the meta device (only shapes are read). For example
    ``{"blocks.*.up": "colwise"}`` resolves to ``{"blocks.0.up": ColwiseParallel(), "blocks.1.up": ...}``, and
    with ``tp=3`` a 32-feature ``up`` layer is refused ("tp_size=3 does not divide ... out_features (32)").
    """
    if not isinstance(plan, Mapping) or not plan:
        raise TypeError(f"tp_plan() must return a non-empty dict of pattern -> style, got {plan!r}")
    owner = type(module).__name__
    out: dict[str, Any] = {}
    for path, style in expand(module, plan).items():
        layer = module.get_submodule(path)
        resolved = torch_style(style, path)
        split = _split_dim(resolved, layer)
        if split is not None and split[1] % tp:
            raise ValueError(
                f"tp_size={tp} does not divide {owner}.{path}'s {split[0]} ({split[1]}), which {style!r} splits "
                f"across the TP ranks; use a tp_size that divides {split[1]}, or change the layer's size"
            )
        out[path] = resolved
    return out


def apply(module: nn.Module, tp_mesh: Any, plan: Mapping[str, Any]) -> None:
    """Split the planned layers over ``tp_mesh`` (after :func:`resolve` checked the plan): in a launched run,
    ``apply(model, mesh["tp"], resolve(model, model.tp_plan(), tp=2))``.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(module, tp_mesh, dict(plan))


def plan_of(module: nn.Module, tp: int) -> dict[str, Any]:
    """``module.tp_plan()``, checked against the layout's ``tp`` before anything runs: a plan needs ``tp_size > 1``
    (else it would silently train unsplit), and ``tp_size > 1`` needs a plan or ``parallelize(mesh)``.
    Returns the plan ({} where the module applies its own in ``parallelize``, or ``tp`` is 1 without a plan).

    Example:

        >>> class MLP(framework.LoopModule):
        ...     def tp_plan(self):
        ...         return {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
        >>> plan_of(MLP(), tp=2)
        {'blocks.*.up': 'colwise', 'blocks.*.down': 'rowwise'}
        >>> plan_of(MLP(), tp=1)
        Traceback (most recent call last):
        ...
        ValueError: MLP.tp_plan() returns a tensor-parallel plan, but the layout has tp_size=1, so the layers would
        train unsplit: pass Engine(tp_size=N) (N > 1, ...), or return None from tp_plan() to train without TP
        >>> plan_of(Classifier(), tp=2)
        Traceback (most recent call last):
        ...
        ValueError: tp_size=2 splits layers across 2 processes, but Classifier has no plan: define tp_plan() ...
    """
    owner = type(module).__name__
    hook = getattr(module, "tp_plan", None)
    plan = hook() if callable(hook) else None
    own = getattr(type(module), "parallelize", None)
    custom = own is not None and not getattr(own, "default_hook", False)
    if plan and tp == 1:
        raise ValueError(
            f"{owner}.tp_plan() returns a tensor-parallel plan, but the layout has tp_size=1, so the layers would "
            "train unsplit: pass Engine(tp_size=N) (N > 1, dividing the number of processes; launch them with "
            "launch/cpu_2d.yaml or launch/fsdp_tp.yaml), or return None from tp_plan() to train without TP"
        )
    if tp > 1 and not plan and not custom:
        raise ValueError(
            f"tp_size={tp} splits layers across {tp} processes, but {owner} has no plan: define tp_plan() returning "
            '{module-path pattern: "colwise" | "rowwise"}, e.g. {"blocks.*.up": "colwise", "blocks.*.down": '
            '"rowwise"} (a HuggingFace model: framework.parallel.tp.hf_tp_plan(self.lm, prefix="lm.")), or '
            "parallelize(mesh) to apply your own; or use tp_size=1"
        )
    return dict(plan or {})


def hf_tp_plan(model: nn.Module, prefix: str = "") -> dict[str, str]:
    """A HuggingFace transformers model's own tensor-parallel plan (its ``tp_plan``, else its config's
    ``base_model_tp_plan`` under the base model's prefix), with ``prefix`` in front of every path (the
    attribute the LoopModule keeps the HF model under). Styles HF has that torch cannot express are refused
    when the plan is applied. Tied input and output embeddings (one weight) stay whole.

    In a LoopModule that keeps the HF model as ``self.lm``: ``def tp_plan(self): return hf_tp_plan(self.lm,
    prefix="lm.")``. Below, a stand-in with the two attributes a transformers model has for this:

    Example:

        >>> from types import SimpleNamespace
        >>> from framework.parallel.tp import hf_tp_plan
        >>> class TinyCausalLM(nn.Module):                      # like transformers' LlamaForCausalLM
        ...     base_model_prefix = "model"
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.model = nn.Module()
        ...         self.config = SimpleNamespace(
        ...             base_model_tp_plan={"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise"})
        >>> hf_tp_plan(TinyCausalLM(), prefix="lm.")
        {'lm.model.layers.*.mlp.up_proj': 'colwise', 'lm.model.layers.*.mlp.down_proj': 'rowwise'}
        >>> hf_tp_plan(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: Linear has no tensor-parallel plan (neither model.tp_plan nor config.base_model_tp_plan); ...
    """
    plan = getattr(model, "tp_plan", None)
    if not isinstance(plan, Mapping) or not plan:
        config = getattr(model, "config", None)
        base = getattr(config, "base_model_tp_plan", None) or {}
        base_prefix = getattr(model, "base_model_prefix", "")
        inner = f"{base_prefix}." if base_prefix and hasattr(model, base_prefix) else ""
        plan = {f"{inner}{k}": v for k, v in base.items()}
    if not plan:
        raise ValueError(
            f"{type(model).__name__} has no tensor-parallel plan (neither model.tp_plan nor "
            "config.base_model_tp_plan); write tp_plan() yourself, e.g. {'layers.*.mlp.up_proj': 'colwise', ...}"
        )
    tied = _tied_embeddings(model, plan)
    return {f"{prefix}{k}": v for k, v in plan.items() if k not in tied}


def _tied_embeddings(model: nn.Module, plan: Mapping[str, Any]) -> set[str]:
    """The plan's entries for an input and an output embedding that share one weight (tied): they stay whole,
    since one parameter cannot be split two ways."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return set()
    inp, out = get_in(), get_out()
    if inp is None or out is None or getattr(inp, "weight", None) is not getattr(out, "weight", None):
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return {k for k in plan if k in (names.get(id(inp)), names.get(id(out)))}
