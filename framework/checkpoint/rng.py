"""The process's random number generators' state, for exact resume.

Example::

    meta, tensors = rng_state()           # a checkpoint keeps each rank's
    check_rng_state(meta, tensors, where=Path("rng-rank0.json"))   # a malformed one changes nothing
    set_rng_state(meta, tensors)
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError
from .schema import Float, Int, Keys, ListOf, Maybe, Str, TupleOf, expect

_CORRUPT = "the checkpoint is damaged or was edited; nothing was applied. Resume from another checkpoint"


def rng_state() -> tuple[Any, dict[str, torch.Tensor]]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) as (JSON part, tensors).

    Example::

        meta, tensors = rng_state()
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

    Example::

        check_rng_state(reader.json("rng-rank0.json"), reader.tensors("rng-rank0.safetensors"), where=ckpt)
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

    Example::

        set_rng_state(*rng_state())
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
