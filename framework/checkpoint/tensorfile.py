"""safetensors files written straight from tensor memory, hashed while they are written.

A checkpoint's manifest needs every file's SHA-256. Serialising with ``safetensors.torch.save``
first builds the whole file in memory (two copies of every tensor), and hashing afterwards reads
it all again: for a 100 MB model with AdamW that is about 3x the time of the write itself. Here
the file is streamed from the tensors' own memory (no copy), and another thread hashes the same
buffers while the file is written, fsync'ed, and the next file written (``hashlib``, ``os.write``
and ``os.fsync`` all release the GIL), so the hash costs little beyond the write.

The format is safetensors' own (8-byte little-endian header length, a JSON header of dtypes,
shapes and byte offsets, then the raw little-endian data, largest element size first so every
tensor is aligned); files are read back with the ``safetensors`` library itself, which checks
the offsets, so a file written here that it did not accept would fail the tests.

Example::

    size, digest = write_tensors(fd, {"weight": torch.zeros(3)}, {"aliases": "{}"})
    sha256 = digest.result()
    tensors, metadata = parse_tensors(data, where="step-00000010/model.safetensors")
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch

from . import files
from .errors import CorruptCheckpointError

# safetensors' dtype names (the library's own table, spelled out so writing needs no import of it).
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip
MAX_HEADER = 100_000_000  # (the safetensors library's own limit)
_PARALLEL_HASH_FROM = 4 << 20  # below this, a thread costs more than it saves


def _raw_bytes(name: str, t: torch.Tensor) -> memoryview:
    if t.dtype not in DTYPES:
        raise TypeError(f"cannot store tensor {name!r} of dtype {t.dtype} in a safetensors file")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    # (a uint8 view of the same memory; numpy keeps the tensor alive while the view lives)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list[memoryview | bytes]:
    """The buffers of a safetensors file for ``tensors``, in file order: header, then each tensor's
    raw bytes (views of the tensors' memory, no copies).

    Example::

        size = sum(len(b) for b in layout({"w": torch.ones(2)}))
    """
    if sys.byteorder != "little":  # (safetensors is little-endian; raw memory would be wrong here)
        raise RuntimeError("writing safetensors files from raw tensor memory needs a little-endian machine")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    views: list[memoryview | bytes] = []
    offset = 0
    for name, t in items:
        if not isinstance(name, str) or name == "__metadata__":
            raise TypeError(f"a tensor name must be a string other than '__metadata__', got {name!r}")
        raw = _raw_bytes(name, t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        views.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # (pad so the data starts 8-byte aligned, as the library does)
    return [len(text).to_bytes(8, "little") + text, *views]


class Digest:
    """The SHA-256 of a list of buffers, computed in a thread for large data (hashlib releases the GIL),
    so that the caller can write, fsync, and even write the next file meanwhile; :meth:`result` waits.
    The buffers must not change until then.

    Example::

        digest = Digest(buffers)
        files.write_all(fd, buffers)
        os.fsync(fd)
        sha256 = digest.result()
    """

    def __init__(self, buffers: Sequence[bytes | memoryview]) -> None:
        self._buffers: Sequence[bytes | memoryview] | None = buffers
        self._hex = ""
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if sum(memoryview(b).nbytes for b in buffers) < _PARALLEL_HASH_FROM:
            self._run()  # (a thread costs more than it saves)
        else:
            self._thread = threading.Thread(target=self._run, name="checkpoint-hash", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            h = hashlib.sha256()
            for b in self._buffers or ():
                h.update(b)
            self._hex = h.hexdigest()
        except BaseException as e:  # (raised by result(), in the caller's thread)
            self._error = e
        finally:
            self._buffers = None

    def result(self) -> str:
        """The hex digest (waits for the thread)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self._hex


def write_tensors(
    fd: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[int, Digest]:
    """Write ``tensors`` as a safetensors file to ``fd`` (not fsync'ed) while they are hashed; returns
    (size, :class:`Digest` of the file, which may still be computing: the tensors must not change
    until its ``result()``).

    Example::

        fd = files.open_new(staging / "model.safetensors")
        size, digest = write_tensors(fd, model.state_dict())
        os.fsync(fd)                  # (the hash runs on meanwhile)
        sha256 = digest.result()
    """
    buffers = layout(tensors, metadata)
    digest = Digest(buffers)
    return files.write_all(fd, buffers), digest


def _corrupt(where: object, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where} is not a valid safetensors file ({why}); the checkpoint is corrupt or was replaced. "
        "Nothing was loaded and nothing was executed; resume from another checkpoint"
    )


def parse_tensors(data: bytes, where: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the safetensors file ``data``; anything else (a truncated file, a
    planted pickle) is a :class:`CorruptCheckpointError` naming ``where``, never executed.

    Example::

        tensors, metadata = parse_tensors(path.read_bytes(), where=path)
    """
    if len(data) < 8:
        raise _corrupt(where, f"{len(data)} bytes, too short for a header")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER, len(data) - 8):
        raise _corrupt(where, f"its header claims {n} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:
        raise _corrupt(where, f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(where, "its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(where, "its __metadata__ is not an object of strings")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError, RuntimeError) as e:
        raise _corrupt(where, str(e)) from None
    return tensors, metadata
