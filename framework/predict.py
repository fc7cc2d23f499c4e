"""Prediction: the outputs of every item, in data order, the same on every rank.

Each rank runs ``LoopModule.predict_step`` on its share of each global batch, in eval mode under
``torch.inference_mode()``; the rows are then gathered from every rank and put back in the data's
order (each micro-batch knows its place in the global order), so the result has one row per item,
no zero-weight filler, no duplicate and nothing missing, at any world size. Outputs are tensors,
or dicts/tuples/lists of tensors, concatenated leaf by leaf along dim 0.

Example::

    rows = predict(module, module, source, runtime)   # e.g. a tensor of shape [len(data), n_classes]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .data import Source
from .distributed import Runtime, rng_preserved
from .module import LoopModule


def _rows(leaves: list[Any], owner: str) -> int:
    sizes = set()
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            kind = "a 0-dim tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                f"{owner}.predict_step returned {kind} among its outputs; return tensors with one row per item "
                "(or dicts/tuples of them), e.g. return self(inputs).softmax(-1)"
            )
        sizes.add(leaf.shape[0])
    if len(sizes) > 1:
        raise ValueError(f"{owner}.predict_step returned tensors with different numbers of rows {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def predict(module: LoopModule, model: nn.Module, source: Source, rt: Runtime, *, forwards: Any = None) -> Any:
    """Run ``module.predict_step`` over ``source`` and return every item's output in data order.

    Example::

        probs = predict(module, module, source, runtime)
    """
    owner = type(module).__name__
    was_training = module.training
    module.eval()
    keys: list[int] = []  # each real micro-batch's place in the global order
    counts: list[int] = []
    parts: list[list[torch.Tensor]] = []
    spec: Any = None
    with rng_preserved(rt.device), torch.inference_mode():
        for window in source.windows(epoch=0):
            real = window.micro_batches
            batches = forwards(window) if forwards is not None else list(real) or [window.filler]
            for i, batch in enumerate(batches):
                out = module.predict_step(batch) if model is module else _through(module, model, batch)
                leaves, this_spec = tree_flatten(out)
                n = _rows(leaves, owner)
                if spec is None:
                    spec = this_spec
                elif this_spec != spec:
                    raise ValueError(f"{owner}.predict_step returned differently structured outputs for two batches")
                if i < len(real):
                    keys.append(window.order[i] if i < len(window.order) else len(keys))
                    counts.append(n)
                    parts.append(leaves)
                elif not parts:
                    parts_template = [leaf[:0] for leaf in leaves]  # (a rank with no real rows still gathers)
                    parts.append(parts_template)
                    counts.append(0)
                    keys.append(-1)
    module.train(was_training)
    if spec is None:
        raise ValueError("predict got no data; pass a non-empty dataset")
    n_leaves = len(parts[0])
    local = [torch.cat([p[j] for p in parts]) for j in range(n_leaves)]
    if rt.world_size == 1:
        return tree_unflatten(local, spec)
    return tree_unflatten(_gather_in_order(local, keys, counts, rt), spec)


def _through(module: LoopModule, model: nn.Module, batch: Any) -> Any:
    """predict_step with forwards routed through ``model`` (a compiled module) when the step is the default."""
    if type(module).predict_step is not LoopModule.predict_step:
        return module.predict_step(batch)
    return model(module.prediction_inputs(batch))


def _gather_in_order(local: list[torch.Tensor], keys: list[int], counts: list[int], rt: Runtime) -> list[torch.Tensor]:
    """Every rank's rows, sorted by their place in the global order (the same result on every rank)."""
    world, device = rt.world_size, rt.device
    meta = torch.tensor([[k, c] for k, c in zip(keys, counts, strict=True)], dtype=torch.int64, device=device)
    n_batches = torch.tensor([len(keys)], dtype=torch.int64, device=device)
    all_n = [torch.zeros_like(n_batches) for _ in range(world)]
    torch.distributed.all_gather(all_n, n_batches)
    most = max(int(t) for t in all_n)
    padded = torch.full((most, 2), -1, dtype=torch.int64, device=device)
    padded[: len(keys)] = meta
    all_meta = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(all_meta, padded)
    rows = [int(all_meta[r][: int(all_n[r]), 1].clamp(min=0).sum()) for r in range(world)]
    most_rows = max(rows)
    gathered: list[list[torch.Tensor]] = []
    for leaf in local:
        send = leaf.to(torch.uint8) if leaf.dtype == torch.bool else leaf  # (gloo has no bool collectives)
        buf = torch.zeros((most_rows, *send.shape[1:]), dtype=send.dtype, device=device)
        buf[: send.shape[0]] = send
        out = [torch.empty_like(buf) for _ in range(world)]
        torch.distributed.all_gather(out, buf.contiguous())
        gathered.append([o.to(leaf.dtype) for o in out])
    pieces: list[tuple[int, int, int, int]] = []  # (key, rank, offset, count)
    for r in range(world):
        offset = 0
        for key, c in all_meta[r][: int(all_n[r])].tolist():
            if key >= 0 and c > 0:
                pieces.append((key, r, offset, c))
            offset += max(c, 0)
    pieces.sort()
    return [torch.cat([g[r][o : o + c] for _, r, o, c in pieces]) for g in gathered]
