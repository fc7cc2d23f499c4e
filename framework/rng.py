"""The process's random number generators: seeding them, and their state for exact resume.

Example::

    import framework
    framework.seed_everything(0)          # before building the model: the same initial weights every run
    meta, tensors = rng_state()           # a checkpoint keeps each rank's
    set_rng_state(meta, tensors)          # checked first: a malformed state changes nothing
"""

from __future__ import annotations

import random
from typing import Any

import torch


class RngStateError(ValueError):
    """A saved RNG state that does not have the shape of one (the checkpoint code names the file)."""


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy and Python's ``random`` with ``seed``.

    Call it before building the model, so that two runs (and every DDP rank) start from the same
    weights; ``Engine(seed=...)`` seeds again at fit start (per rank, for dropout and augmentation),
    after the weights exist.

    Example::

        import framework
        framework.seed_everything(0)
        model = Classifier()
    """
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed_everything(seed={seed!r}); use a non-negative int, e.g. seed_everything(0)")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def check_rng_state(meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`RngStateError` unless ``(meta, tensors)`` has the shape :func:`rng_state` gives.

    Example::

        check_rng_state(*rng_state())   # passes
    """
    torch_state = tensors.get("torch")
    reference = torch.get_rng_state()
    if (
        not isinstance(torch_state, torch.Tensor)
        or torch_state.dtype != torch.uint8
        or torch_state.shape != reference.shape
    ):
        raise RngStateError(f"'torch' must be a uint8 tensor of shape {list(reference.shape)}")
    numpy_keys = tensors.get("numpy")
    if not isinstance(numpy_keys, torch.Tensor) or numpy_keys.dtype != torch.int32 or numpy_keys.shape != (624,):
        raise RngStateError("'numpy' must be an int32 tensor of 624 words (MT19937)")
    if not isinstance(meta, dict) or set(meta) != {"numpy", "python"}:
        raise RngStateError("the JSON part must have exactly the keys 'numpy' and 'python'")
    np_meta, py_meta = meta["numpy"], meta["python"]
    if not (isinstance(np_meta, list) and len(np_meta) == 4 and np_meta[0] == "MT19937"):
        raise RngStateError("'numpy' must be ['MT19937', pos, has_gauss, gauss]")
    if not (isinstance(np_meta[1], int) and 0 <= np_meta[1] <= 624 and np_meta[2] in (0, 1)):
        raise RngStateError("'numpy' position must be in [0, 624] and has_gauss 0 or 1")
    if not isinstance(np_meta[3], (int, float)) or isinstance(np_meta[3], bool):
        raise RngStateError("'numpy' gauss must be a number")
    if not (
        isinstance(py_meta, list) and len(py_meta) == 3 and isinstance(py_meta[1], list) and len(py_meta[1]) == 625
    ):
        raise RngStateError("'python' must be [version, 625 ints, gauss_next]")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in py_meta[1]):
        raise RngStateError("'python' state words must be ints in [0, 2**32)")
    if py_meta[2] is not None and not isinstance(py_meta[2], (int, float)):
        raise RngStateError("'python' gauss_next must be a number or null")
    for key, value in tensors.items():
        if key.startswith("cuda/") and (not isinstance(value, torch.Tensor) or value.dtype != torch.uint8):
            raise RngStateError(f"{key!r} must be a uint8 tensor")
        if key not in ("torch", "numpy") and not key.startswith("cuda/"):
            raise RngStateError(f"unknown RNG {key!r}")


def set_rng_state(meta: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned (after :func:`check_rng_state`).

    Example::

        set_rng_state(*rng_state())
    """
    import numpy as np

    check_rng_state(meta, tensors)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
