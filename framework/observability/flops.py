"""Model FLOPs of one optimizer step, counted by PyTorch's ``FlopCounterMode``: :class:`StepFlops`.

``FlopCounterMode`` (``torch.utils.flop_counter``) counts the FLOPs of the matrix products, convolutions
and attention that run under it, by op, from their shapes; everything else (activations, norms, the
loss, the optimizer) counts nothing, as in every MFU figure. :class:`StepFlops` runs it over the loop's
own forward, loss and backward work of one step (the throughput subscriber starts and stops it around
each), adding:

- the formulas of the CPU kernels of ``scaled_dot_product_attention`` (PyTorch's own SDPA formulas:
  it registers them for the CUDA kernels only);
- each rank's own share under tensor parallelism: an op on ``DTensor`` s is counted on their local
  shards (the work this process does), not on the global shapes;
- a refusal to guess: an op that multiplies matrices, convolves or attends (by its name) without a
  formula, or a custom op from outside PyTorch (a fused kernel of some library), makes the count
  :attr:`StepFlops.unknown`, so no wrong number is logged. Register a formula for such an op with
  ``torch.utils.flop_counter.register_flop_formula`` (one returning 0 for an op without matrix work).

Counting changes no result: the mode only reads shapes, and draws on no RNG.

Example:

    >>> from framework.observability.flops import StepFlops
    >>> model, x = nn.Linear(8, 3), torch.randn(4, 8)
    >>> flops = StepFlops()
    >>> flops.start()
    >>> model(x).square().mean().backward()
    >>> flops.stop()
    >>> flops.total, 2 * 4 * 8 * 3    # forward 2 * batch * in * out, backward as much again (x needs no gradient)
    (384, 192)
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._pytree import tree_map

# Namespaces of PyTorch's own ops: their matrix work has formulas; the rest there moves or reduces data
# (collectives, FSDP's copies, the profiler's ranges).
TORCH_NAMESPACES = frozenset(
    {"aten", "prims", "prim", "c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "fsdp",
     "profiler", "rngprims", "debugprims"}
)  # fmt: skip
# aten ops that do matrix work, by name: mm, bmm, addmv, dot, linear, conv..., ...attention...
_MATRIX_WORK = re.compile(r"(^|_)(\w*mm|mv|addmv|dot|vdot|addr|matmul|linear|einsum|conv\w*|\w*attention\w*)(_|$)")


def _extra_formulas() -> dict[Any, Any]:
    """PyTorch's SDPA formulas for the CPU kernels it has none registered for (same leading arguments)."""
    aten = torch.ops.aten
    registry = flop_counter.flop_registry
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: registry[aten._scaled_dot_product_flash_attention],
        aten._scaled_dot_product_flash_attention_for_cpu_backward: registry[
            aten._scaled_dot_product_flash_attention_backward
        ],
    }


def _local(formula: Any) -> Any:
    """``formula`` on each DTensor's local shard: the FLOPs this process computes."""

    def local(*args: Any, out_val: Any = None, **kwargs: Any) -> Any:
        args, kwargs, out_val = tree_map(_local_tensor, (args, kwargs, out_val))
        return formula(*args, out_val=out_val, **kwargs)

    local._get_raw = True  # type: ignore[attr-defined]  # (it takes the tensors: FlopCounterMode does not wrap it)
    return local


def _local_tensor(x: Any) -> Any:
    # (a DTensor's ``_local_tensor`` is an attribute: ``to_local()`` would dispatch an op inside the mode)
    return x._local_tensor if type(x).__name__ == "DTensor" and hasattr(x, "_local_tensor") else x


def has_unknown_work(op: Any, registry: dict[Any, Any]) -> bool:
    """Whether ``op`` (an ``OpOverloadPacket``) may compute FLOPs that no formula counts.

    Example:

        >>> registry = flop_counter.flop_registry
        >>> has_unknown_work(torch.ops.aten.mv, registry)     # a matrix-vector product without a formula
        True
        >>> has_unknown_work(torch.ops.aten.mm, registry), has_unknown_work(torch.ops.aten.relu, registry)
        (False, False)
    """
    if op in registry:
        return False
    namespace, _, name = str(op).partition(".")
    if namespace not in TORCH_NAMESPACES:
        return True  # a library's own kernel: what it computes is unknown
    return namespace == "aten" and _MATRIX_WORK.search(name) is not None


class _Total:
    """Stands in for FlopCounterMode's ``ModuleTracker``: the total is all that is needed, and the tracker's
    gradient hooks on every module's inputs break ``torch.autograd.grad`` of a leaf inside the counted step
    (a gradient penalty's: "A leaf node was passed to _will_engine_execute_node")."""

    parents = ("Global",)  # (the one name FlopCounterMode adds every count under)

    def __enter__(self) -> _Total:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


class _Counter(flop_counter.FlopCounterMode):
    """FlopCounterMode with the formulas above, without per-module hooks, noting the ops whose work it cannot count."""

    def __init__(self, unknown: set[str]) -> None:
        formulas = {**flop_counter.flop_registry, **_extra_formulas()}
        super().__init__(display=False, custom_mapping={op: _local(f) for op, f in formulas.items()})
        self.mod_tracker = _Total()  # type: ignore[assignment]
        self.unknown = unknown

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        # (FlopCounterMode calls this for every op it runs: the one place that sees the ops without a formula)
        if has_unknown_work(func_packet, self.flop_registry):
            self.unknown.add(str(func_packet))
        return super()._count_flops(func_packet, out, args, kwargs)  # type: ignore[no-untyped-call]


class StepFlops:
    """FLOPs of the work between :meth:`start` and :meth:`stop` calls, summed over them (a step's forwards,
    losses and backwards); :attr:`unknown` names the ops that make the sum unreliable.

    Example:

        >>> model = nn.Linear(8, 3)
        >>> flops = StepFlops()
        >>> for micro_batch in torch.randn(2, 4, 8, requires_grad=True):   # two micro-batches of 4
        ...     flops.start()
        ...     model(micro_batch).sum().backward()
        ...     flops.stop()
        >>> flops.total, flops.unknown                # 3 * 2 * 4 * 8 * 3 per micro-batch: x needs a gradient
        (1152, set())
    """

    def __init__(self) -> None:
        self.total = 0
        self.unknown: set[str] = set()
        self._mode: _Counter | None = None

    @property
    def running(self) -> bool:
        """Counting now (between :meth:`start` and :meth:`stop`).

        Example:

            >>> flops = StepFlops()
            >>> flops.start()
            >>> flops.running
            True
            >>> flops.stop()
            >>> flops.running
            False
        """
        return self._mode is not None

    def start(self) -> None:
        """Count what runs from now (nothing if already counting).

        Example:

            >>> flops = StepFlops()
            >>> flops.start()
            >>> _ = torch.ones(2, 3) @ torch.ones(3, 4)
            >>> flops.stop()
            >>> flops.total                           # 2 * 2 * 3 * 4
            48
        """
        if self._mode is None:
            self._mode = _Counter(self.unknown)
            self._mode.__enter__()  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        """Stop counting; :attr:`total` includes what ran since :meth:`start`.

        Example:

            >>> flops = StepFlops()
            >>> flops.start()
            >>> _ = torch.ones(2, 3) @ torch.ones(3, 4)
            >>> flops.stop()
            >>> _ = torch.ones(2, 3) @ torch.ones(3, 4)   # not counted
            >>> flops.total
            48
        """
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self.total += mode.get_total_flops()
