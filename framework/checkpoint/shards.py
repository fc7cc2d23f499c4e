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

Example::

    files = save({"model/w": shard}, Path("ckpt/model_shards"))   # collective
    load(template, Path("ckpt/model_shards"))                     # fills template's shards in place
    full = load_full(Path("ckpt/model_shards"), prefix="model/")  # one plain process: whole tensors
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

METADATA = ".metadata"

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


class UnsafeMetadata(pickle.UnpicklingError):
    """A ``.metadata`` file that names something other than DCP's plain metadata classes."""


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


def read_metadata(path: Path) -> Any:
    """Unpickle a DCP ``.metadata`` file with the allow-list above, then check it points only at files beside it.

    Example::

        meta = read_metadata(Path("ckpt/model_shards/.metadata"))
        list(meta.state_dict_metadata)[:3]
    """
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    data = path.read_bytes()
    meta = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(meta, Metadata):
        raise UnsafeMetadata(f"{path} does not hold a DCP Metadata object")
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise UnsafeMetadata(f"{path}: entry {key!r} is not a tensor; the engine writes only tensors through DCP")
    for info in (meta.storage_data or {}).values():
        name = getattr(info, "relative_path", "")
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UnsafeMetadata(f"{path} points at {name!r}, outside its directory")
    return meta


def _reader(directory: Path) -> Any:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader with :func:`read_metadata` in place of its ``pickle.load``."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            rank = kwargs.get("rank")
            name = METADATA if rank is None else f"__{rank}{METADATA}"
            meta = read_metadata(Path(self.path) / name)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(str(directory))


def save(tensors: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """Write this rank's shards of ``tensors`` (collective: every rank calls it with its own shards) into
    ``directory``; returns the names of the files this rank wrote.

    Example::

        save({"model/w": model.w}, staging / "shards")
    """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    directory.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    dcp_save(tensors, storage_writer=FileSystemWriter(str(directory), single_file_per_rank=True, sync_files=True))
    mine = sorted(p.name for p in directory.glob(f"__{rank}_*.distcp"))
    return mine + ([METADATA] if rank == 0 else [])


def load(template: dict[str, torch.Tensor], directory: Path) -> None:
    """Fill ``template`` (tensors or DTensor shards of the right global shapes) in place from ``directory``,
    resharding from whatever world size wrote it (collective under several processes).

    Example::

        load({"model/w": model.w}, ckpt / "shards")
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    dcp_load(template, storage_reader=_reader(directory))


def load_full(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` as one whole tensor, in this process, with no process group: what
    ``framework.load_weights`` and ``python -m framework export`` read from a sharded checkpoint.

    Example::

        weights = load_full(ckpt / "shards", prefix="model/")   # {"net.0.weight": tensor, ...}
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    meta = read_metadata(directory / METADATA)
    template = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in meta.state_dict_metadata.items()
        if key.startswith(prefix)
    }
    dcp_load(template, storage_reader=_reader(directory), no_dist=True)
    return {key[len(prefix) :]: t for key, t in template.items()}
