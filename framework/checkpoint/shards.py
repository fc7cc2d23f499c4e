"""Sharded tensors on disk with ``torch.distributed.checkpoint`` (DCP), read without running a pickle.

Under FSDP every rank writes its own shards (``__R_0.distcp``) and rank 0 the index (``.metadata``);
no rank gathers the full model or optimizer. Loading reshards: a checkpoint of N processes loads on M.

What is read and how:

- ``.distcp`` files hold the tensors, each item a ``torch.save`` that DCP reads with
  ``torch.load(weights_only=True)`` (no code can run). Only tensors are written through DCP (the
  engine puts everything else in JSON), so no "bytes" item, which DCP would read with
  ``torch.load(weights_only=False)``, is ever requested.
- ``.metadata`` is a *pickle* (DCP's ``FileSystemReader.read_metadata`` calls ``pickle.load``). Here
  it is read by :class:`SafeReader` with a restricted unpickler that resolves only the handful of
  plain classes DCP's metadata is made of (``torch.distributed.checkpoint.metadata``'s dataclasses,
  ``torch.Size``, dtypes, a layout helper, a path) and refuses every other global, so a planted
  pickle cannot call anything. The checkpoint's manifest also hashes both kinds of file.
- A hash proves only that the files are the ones the manifest lists, not that the manifest's writer was
  honest: before DCP reads anything, the index is checked against the files (every storage item a
  ``.distcp`` file of this checkpoint, inside it, holding a ``torch.save`` record; every tensor's bytes
  within what its files hold), so a crafted index cannot point outside the checkpoint or make a reader
  allocate more than the files contain. Whatever fails is a
  :class:`~framework.checkpoint.files.CorruptCheckpointError` naming the file (``resume="auto"`` then
  tries the older checkpoint).

Example (one process, so whole tensors; under FSDP every rank calls :func:`save` and :func:`load` with
its own DTensor shards):

    >>> import warnings
    >>> from pathlib import Path
    >>> from framework.checkpoint import shards
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # (DCP says that it runs without a process group)
    ...     written = shards.save({"model/w": torch.ones(2, 3), "model/b": torch.zeros(2)}, Path("ckpt"))
    ...     template = {"model/w": torch.empty(2, 3)}
    ...     shards.load(template, Path("ckpt"))  # fills the template's tensors (shards) in place
    ...     full = shards.load_full(Path("ckpt"), prefix="model/")  # no process group: whole tensors
    >>> written, template["model/w"].sum().item(), sorted(full)
    (['__0_0.distcp', '.metadata'], 6.0, ['b', 'w'])
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import files
from .files import CorruptCheckpointError

METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"
MAX_METADATA_BYTES = 1 << 30  # (an index of this size would describe millions of tensors)
_ZIP_MAGIC = b"PK\x03\x04"  # (each item DCP writes is a torch.save archive, a zip file)
_HINT = "the checkpoint is damaged or was crafted; nothing was loaded. Resume from another checkpoint"

_METADATA_CLASSES = {
    "Metadata",
    "MetadataIndex",
    "TensorStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
}
_ALLOWED = {
    *{("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class UnsafeMetadata(CorruptCheckpointError, pickle.UnpicklingError):
    """A ``.metadata`` file that names something other than DCP's plain metadata classes, or points
    outside its checkpoint: a :class:`~framework.checkpoint.files.CorruptCheckpointError` (so
    ``resume="auto"`` skips the checkpoint), and an ``UnpicklingError``.

    Example:

        >>> import os, pickle
        >>> from pathlib import Path
        >>> Path("ckpt").mkdir()
        >>> _ = Path("ckpt/.metadata").write_bytes(pickle.dumps(os.system))  # a planted pickle
        >>> read_metadata(Path("ckpt/.metadata"))
        Traceback (most recent call last):
        ...
        framework.checkpoint.shards.UnsafeMetadata: ckpt/.metadata: refusing ...system: a torch.distributed.checkpoint
        .metadata file holds only DCP's metadata classes; this one was crafted or is not DCP's; the checkpoint is
        damaged or was crafted; nothing was loaded. Resume from another checkpoint
    """


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeMetadata(
            f"refusing {module}.{name}: a torch.distributed.checkpoint .metadata file holds only DCP's metadata "
            "classes; this one was crafted or is not DCP's"
        )


def read_metadata(path: Path, sizes: Mapping[str, int] | None = None) -> Any:
    """Unpickle a DCP ``.metadata`` file with the allow-list above, then check it against the files beside
    it (``sizes``: the checkpoint's verified files and their sizes; default: what is in the directory):
    see :func:`check_metadata`. Raises :class:`~framework.checkpoint.files.CorruptCheckpointError` (an
    :class:`UnsafeMetadata` for a refused class) naming the file (:class:`UnsafeMetadata` shows one). The
    index's ``state_dict_metadata`` maps each tensor's key to its global shape, dtype and chunks.
    """
    try:
        data = files.read_regular(path, MAX_METADATA_BYTES)  # (never through a link, never a FIFO)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path} ({e}); {_HINT}") from None
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeMetadata as e:
        raise UnsafeMetadata(f"{path}: {e}; {_HINT}") from None
    except Exception as e:  # (a truncated or crafted pickle: any of pickle's errors, or a bad constructor call)
        raise CorruptCheckpointError(
            f"{path} is not a torch.distributed.checkpoint index ({type(e).__name__}: {str(e)[:200]}); {_HINT}"
        ) from None
    check_metadata(meta, path, _sizes_beside(path.parent) if sizes is None else sizes)
    return meta


def _sizes_beside(directory: Path) -> dict[str, int]:
    return {
        e.name: e.stat(follow_symlinks=False).st_size for e in os.scandir(directory) if e.is_file(follow_symlinks=False)
    }


def check_metadata(meta: Any, path: Path, sizes: Mapping[str, int]) -> None:
    """Raise :class:`UnsafeMetadata` naming ``path`` unless DCP index ``meta`` describes only tensors stored in
    the ``.distcp`` files of ``sizes`` (name -> bytes), within them: each storage item inside its file, each
    chunk inside its tensor and no larger than its item, each tensor no larger than all the shard files
    together (``sizes`` e.g. ``{"__0_0.distcp": 4096, "__1_0.distcp": 4096}``). Nothing is allocated or read
    from the shards before this passes.
    """
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    try:
        if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
            raise ValueError("it does not hold a DCP Metadata object")
        if not (meta.storage_meta is None or isinstance(meta.storage_meta, StorageMeta)):
            raise ValueError("its storage_meta is not DCP's")
        items = _check_storage(meta.storage_data, sizes)
        shard_bytes = sum(size for name, size in sizes.items() if name.endswith(SHARD_SUFFIX))
        for key, item in meta.state_dict_metadata.items():
            _check_tensor(key, item, shard_bytes, items)
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise UnsafeMetadata(f"{path}: {e}; {_HINT}") from None


def _check_storage(storage: Any, sizes: Mapping[str, int]) -> dict[tuple[str, tuple[int, ...]], int]:
    """Every storage item is (offset, length) inside a ``.distcp`` file listed in ``sizes``; returns each
    item's length by (tensor key, chunk offsets)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    if not isinstance(storage, dict):
        raise ValueError("its storage_data is not a mapping of storage items")
    lengths: dict[tuple[str, tuple[int, ...]], int] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise ValueError("its storage_data holds something other than DCP's storage items")
        name = info.relative_path
        if not isinstance(name, str) or not name.endswith(SHARD_SUFFIX) or name not in sizes or "/" in name:
            raise ValueError(
                f"a storage item points at {name!r}, which is not a {SHARD_SUFFIX} file of this checkpoint"
            )
        if info.transform_descriptors:  # (compression and the like: the engine never writes them)
            raise ValueError(f"a storage item in {name} asks for transforms {info.transform_descriptors!r}")
        offset, length = info.offset, info.length
        if not (_count(offset) and _count(length) and offset + length <= sizes[name]):
            raise ValueError(f"a storage item claims bytes {offset!r}+{length!r} of {name}, which has {sizes[name]}")
        lengths[(str(index.fqn), _ints(index.offset or ()))] = length
    return lengths


def _check_tensor(key: Any, item: Any, shard_bytes: int, lengths: dict[tuple[str, tuple[int, ...]], int]) -> None:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata

    if not isinstance(key, str) or not isinstance(item, TensorStorageMetadata):
        raise ValueError(f"entry {key!r} is not a tensor; the engine writes only tensors through DCP")
    dtype = getattr(item.properties, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"entry {key!r} has no dtype")
    size = _ints(item.size)
    element = torch.empty((), dtype=dtype).element_size()
    if math.prod(size) * element > shard_bytes:  # (a 4 TB tensor in a few KB of shards: never allocated)
        raise ValueError(f"entry {key!r} claims shape {list(size)} ({dtype}), more than all shard files hold")
    if not isinstance(item.chunks, list):
        raise ValueError(f"entry {key!r} has no list of chunks")
    for chunk in item.chunks:
        if not isinstance(chunk, ChunkStorageMetadata):
            raise ValueError(f"entry {key!r} has a chunk that is not DCP's")
        offsets, sizes = _ints(chunk.offsets), _ints(chunk.sizes)
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise ValueError(f"entry {key!r}: a chunk of {len(sizes)} dims in a tensor of {len(size)}")
        if any(o + n > d for o, n, d in zip(offsets, sizes, size, strict=True)):
            raise ValueError(f"entry {key!r}: chunk at {list(offsets)} of {list(sizes)} is outside its {list(size)}")
        stored = lengths.get((key, offsets))
        if stored is not None and math.prod(sizes) * element > stored:
            raise ValueError(f"entry {key!r}: chunk at {list(offsets)} needs more bytes than its storage item has")


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _ints(value: Any) -> tuple[int, ...]:
    """A shape or offsets: non-negative ints (torch.Size or a tuple)."""
    if not isinstance(value, (tuple, list)) or not all(_count(v) for v in value):
        raise ValueError(f"{value!r:.80} is not a list of non-negative ints")
    return tuple(value)


def check_items(directory: Path, meta: Any) -> None:
    """Raise :class:`~framework.checkpoint.files.CorruptCheckpointError` naming the file unless every storage
    item of checked ``meta`` starts as a ``torch.save`` archive does (a planted pickle does not): read 4
    bytes per item, without following a link. ``meta`` comes from :func:`read_metadata`.
    """
    by_file: dict[str, list[int]] = {}
    for info in meta.storage_data.values():
        if info.length:
            by_file.setdefault(info.relative_path, []).append(info.offset)
    for name, offsets in sorted(by_file.items()):
        where = directory / name
        try:
            fd = files.open_regular(where)
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {where} ({e}); {_HINT}") from None
        try:
            for offset in offsets:
                if os.pread(fd, len(_ZIP_MAGIC), offset) != _ZIP_MAGIC:
                    raise CorruptCheckpointError(
                        f"{where}: the item at byte {offset} is not a tensor record (a torch.save archive); {_HINT}"
                    )
        finally:
            os.close(fd)


def _reader(directory: Path, meta: Any) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader, given the index :func:`read_metadata` read and checked (never ``pickle.load``)."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            if kwargs.get("rank") is not None:  # (a per-rank index: the engine never writes one)
                raise UnsafeMetadata(f"{directory}: a per-rank DCP index was asked for; the engine writes one index")
            if meta.storage_meta is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(str(directory))


def _read(directory: Path, load: Callable[[], None]) -> None:
    """Run DCP's load, its failures (a short read, a record that is no tensor, sizes that do not match) as a
    :class:`~framework.checkpoint.files.CorruptCheckpointError` naming the checkpoint (collective loads
    raise on every rank alike: DCP gathers the failures)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        load()
    except CheckpointException as e:  # (a BaseException: never caught as an Exception)
        why = "; ".join(f"rank {r}: {type(f[0]).__name__}: {str(f[0])[:200]}" for r, f in sorted(e.failures.items()))
        raise CorruptCheckpointError(
            f"{directory}: its sharded tensors ({METADATA}, *{SHARD_SUFFIX}) cannot be read ({why}); {_HINT}"
        ) from None


def save(tensors: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """Write this rank's shards of ``tensors`` (collective: every rank calls it with its own shards) into
    ``directory``; returns the names of the files this rank wrote (rank 0 also the index, ``.metadata``).
    The module's example shows it.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from .io import STAGING_PREFIX, previous_size

    directory.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, sync_files=True)
    try:
        dcp_save(tensors, storage_writer=writer)
    except CheckpointException as e:  # (raised on every rank alike: DCP gathers the failures)
        if not any(files.is_disk_full(f[0]) for f in e.failures.values()):
            raise
        name = directory.name.removeprefix(STAGING_PREFIX)
        raise files.disk_full(directory.parent, name, previous_size(directory.parent)) from None
    mine = sorted(p.name for p in directory.glob(f"__{rank}_*{SHARD_SUFFIX}"))
    return mine + ([METADATA] if rank == 0 else [])


def open_index(directory: Path, sizes: Mapping[str, int] | None = None) -> Any:
    """The checked index of the shards in ``directory`` (:func:`read_metadata`, then :func:`check_items`):
    what :func:`load` and :func:`load_full` read by. ``sizes``: the checkpoint's verified files and their
    sizes (``{name: e.size for name, e in reader.files.items()}`` of its
    :class:`~framework.checkpoint.io.CheckpointReader`).
    """
    meta = read_metadata(directory / METADATA, sizes)
    check_items(directory, meta)
    return meta


def load(template: dict[str, torch.Tensor], directory: Path, meta: Any = None) -> None:
    """Fill ``template`` (tensors or DTensor shards of the right global shapes) in place from ``directory``,
    resharding from whatever world size wrote it (collective under several processes). ``meta``: its
    index from :func:`open_index` (read here if None). The module's example shows it.
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    meta = open_index(directory) if meta is None else meta
    stored = meta.state_dict_metadata
    for key, t in template.items():  # (a mismatch found here names the tensor; DCP's own would not)
        if key in stored and tuple(stored[key].size) != tuple(t.shape):
            raise CorruptCheckpointError(
                f"{directory / METADATA}: {key} has shape {list(stored[key].size)}, this run's is {list(t.shape)}; "
                f"{_HINT}"
            )
    _read(directory, lambda: dcp_load(template, storage_reader=_reader(directory, meta)))


def load_full(directory: Path, prefix: str = "", meta: Any = None) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` as one whole tensor, in this process, with no process group: what
    ``framework.load_weights`` and ``python -m framework export`` read from a sharded checkpoint. The
    sizes come from the checked index (:func:`open_index`; ``meta``, or read here), so they are bounded by
    what the shard files hold. The keys come back with ``prefix`` stripped (``model/net.0.weight`` ->
    ``net.0.weight``); the module's example shows it.
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    meta = open_index(directory) if meta is None else meta
    template = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in meta.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    _read(directory, lambda: dcp_load(template, storage_reader=_reader(directory, meta), no_dist=True))
    return {key[len(prefix) :]: t for key, t in template.items()}
