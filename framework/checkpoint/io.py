"""Writing and reading one checkpoint directory: complete or invisible, verified when read.

:class:`CheckpointWriter` writes into a staging dir (``ROOT/.tmp-NAME``), hashing every file as
it writes it; each rank records what it wrote (``.writer-rank{R}.json``, written atomically);
the main process then merges the records into ``manifest.json`` and ``SHA256SUMS``, fsyncs,
renames the dir into place in one step, points ``latest`` at it and prunes. Ranks never run a
collective inside the writer (the main process waits for the records on disk, bounded), so the
same code runs in a background thread (:class:`~framework.checkpoint.store.AsyncCheckpointer`).

:class:`CheckpointReader` verifies a checkpoint before anything reads it: the manifest's schema,
``SHA256SUMS``, and every file's size and SHA-256. Nothing is ever unpickled.

Example (one process; with several, every rank writes its files and commits, and the main process
prepares and finalizes):

    >>> from pathlib import Path
    >>> from framework.checkpoint import CheckpointReader, CheckpointWriter
    >>> root = Path("runs/x/checkpoints")
    >>> w = CheckpointWriter(root, "step-00000120", rank=0, world_size=1, is_main=True)
    >>> w.prepare()  # main process; then a barrier
    >>> w.tensors("model.safetensors", nn.Linear(8, 3).state_dict())
    >>> w.json("state.json", {"step": 120})
    >>> w.commit()  # every rank
    >>> path = w.finalize()  # main process (publish() also points latest at it and prunes)
    >>> r = CheckpointReader(path)  # raises CorruptCheckpointError if anything is off
    >>> sorted(r.tensors("model.safetensors")), r.json("state.json")
    (['bias', 'weight'], {'step': 120})
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import fileformat, files
from .fileformat import MANIFEST, RECORD_PREFIX, SUMS, Entry, Int, Keys, Manifest, MapOf, Str, expect
from .files import CheckpointError, CorruptCheckpointError

_T = TypeVar("_T")
CHECKPOINT_RE = re.compile(r"^step-(\d{8,})$")  # a run's checkpoint dirs (framework.checkpoint.store lists them)
STAGING_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
MAX_JSON_BYTES = 1 << 30  # (a JSON file of a checkpoint larger than this is not one we wrote)
_RECORD = Keys(
    {
        "rank": Int(min=0),
        "world_size": Int(min=1),
        "files": MapOf(Keys({"size": Int(min=0), "sha256": Str(pattern=fileformat.SHA256)})),
        "error": Str(),
    }
)


def staging_dir(root: Path, name: str) -> Path:
    """Where a checkpoint ``name`` under ``root`` is written before it is renamed into place.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import staging_dir
        >>> staging_dir(Path("runs/x/checkpoints"), "step-00000120").as_posix()
        'runs/x/checkpoints/.tmp-step-00000120'
    """
    return root / f"{STAGING_PREFIX}{name}"


def _check_dir_name(name: str) -> None:
    if not isinstance(name, str) or name.startswith(".") or not _is_component(name):
        raise ValueError(
            f"{name!r} cannot name a checkpoint: use one path component of letters, digits, '.', '_' and '-' "
            "that does not start with '.' (e.g. 'step-00000120' or 'final')"
        )


def _is_component(name: str) -> bool:
    try:
        fileformat.check_file_name(name)
    except ValueError:
        return False
    return True


class CheckpointWriter:
    """Writes one checkpoint ``root/name`` from every rank; the main process finalizes it.

    ``timeout`` bounds how long :meth:`finalize` waits for the other ranks' records.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import CheckpointWriter
        >>> w = CheckpointWriter(Path("runs/x/checkpoints"), "step-00000120", rank=0, world_size=1, is_main=True)
        >>> w.prepare()
        >>> w.json("state.json", {"step": 120})
        >>> w.commit()
        >>> path = w.finalize()
        >>> path.as_posix(), sorted(p.name for p in path.iterdir())
        ('runs/x/checkpoints/step-00000120', ['SHA256SUMS', 'manifest.json', 'state.json'])
    """

    def __init__(
        self, root: Path, name: str, *, rank: int = 0, world_size: int = 1, is_main: bool = True, timeout: float = 600.0
    ) -> None:
        _check_dir_name(name)
        if not (0 <= rank < world_size):
            raise ValueError(f"rank={rank} is not in range for world_size={world_size}")
        self.root, self.name = Path(root), name
        self.rank, self.world_size, self.is_main, self.timeout = rank, world_size, is_main, timeout
        # Main process, a full disk: frees space (store.make_room: the checkpoints beyond keep_last) and returns
        # what it removed; the write is then retried once. None: a full disk is a DiskFullError at once.
        self.room: Callable[[], list[Path]] | None = None
        self.staging = staging_dir(self.root, name)
        self._files: dict[str, Entry] = {}
        self._hashing: dict[str, tuple[int, fileformat.Digest]] = {}  # (files whose hash still runs)
        self._committed = False

    # ---------------------------------------------------------------- every rank

    def prepare(self) -> None:
        """Main process: make a fresh, empty staging dir; the leftovers of killed or failed saves and
        prunes under ``root`` (``.tmp-*``, ``.trash-*``) go first, so a failed save on a full disk does
        not keep the disk full. Other ranks: nothing. The caller runs a barrier after it.

        One writer at a time per ``root`` (the run dir's lock, and one async write in flight, see to it).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointWriter
            >>> Path("ckpt/.tmp-step-00000001").mkdir(parents=True)  # a killed save's leftover
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000002")
            >>> w.prepare()  # then, with several processes, a barrier
            >>> sorted(p.name for p in Path("ckpt").iterdir())
            ['.tmp-step-00000002']
        """
        if self.is_main:
            files.ensure_dir(self.root)
            for entry in os.scandir(self.root):
                if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and entry.is_dir(follow_symlinks=False):
                    files.remove_tree(Path(entry.path))
            files.fresh_dir(self.staging)

    def _path(self, filename: str) -> Path:
        try:
            fileformat.check_file_name(filename)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        if filename in self._files or filename in self._hashing:
            raise ValueError(f"{self.name}: {filename} was already written by this rank")
        if self._committed:
            raise RuntimeError(f"{self.name}: rank {self.rank} already committed; write every file before commit()")
        return self.staging / filename

    def json(self, filename: str, obj: Any) -> None:
        """Write ``obj`` as JSON to ``filename`` (NaN and inf as Python's json writes them), fsync'ed.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare()
            >>> w.json("state.json", {"step": 120, "metrics": {"val/loss": float("nan")}})
            >>> (w.staging / "state.json").read_text()
            '{"step": 120, "metrics": {"val/loss": NaN}}'
        """
        self.json_bytes(filename, json.dumps(obj).encode())

    def json_bytes(self, filename: str, data: bytes) -> None:
        """Write already serialized JSON ``data`` to ``filename`` (what :meth:`json` does after dumps).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare()
            >>> w.json_bytes("state.json", b'{"step": 120}')
            >>> w.json_bytes("state.json", b'{"step": 121}')  # each file is written once
            Traceback (most recent call last):
            ...
            ValueError: step-00000120: state.json was already written by this rank
        """
        self._write(self._path(filename), lambda fd: files.write_all(fd, [data]))
        self._files[filename] = Entry(len(data), hashlib.sha256(data).hexdigest())

    def tensors(self, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Write ``tensors`` (CPU; others are copied) as a safetensors file, fsync'ed. It is hashed in a
        thread meanwhile, which :meth:`commit` waits for: the tensors must not change before it.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader, CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare()
            >>> w.tensors("model.safetensors", nn.Linear(8, 3).state_dict(), {"aliases": "{}"})
            >>> w.commit()
            >>> weights, metadata = CheckpointReader(w.finalize()).tensors_and_metadata("model.safetensors")
            >>> {name: list(t.shape) for name, t in sorted(weights.items())}, metadata
            ({'bias': [3], 'weight': [3, 8]}, {'aliases': '{}'})
        """
        # (the hash runs on during the fsync, and on while the next file is written)
        size, digest = self._write(self._path(filename), lambda fd: fileformat.write_tensors(fd, tensors, metadata))
        self._hashing[filename] = (size, digest)

    def _write(self, path: Path, write: Callable[[int], _T]) -> _T:
        """Create ``path``, ``write(fd)``, fsync. On a full disk the partial file goes (it would keep the disk
        full), :attr:`room` frees space and the write runs once more; else a DiskFullError naming the space."""
        for attempt in (1, 2):
            fd = files.open_new(path)
            try:
                result = write(fd)
                os.fsync(fd)
            except BaseException as e:
                os.close(fd)  # (closed and unlinked: its space is free again)
                _discard(path)
                if not files.is_disk_full(e):
                    raise
                if attempt == 2 or self.room is None or not self.room():
                    raise files.disk_full(self.root, self.name, self.space_needed()) from e
                continue
            os.close(fd)
            return result
        raise AssertionError("unreachable")

    def space_needed(self) -> int:
        """About what this checkpoint needs on disk: the previous complete one's size (from its manifest), or
        what is written so far if that is more.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointWriter
            >>> first = CheckpointWriter(Path("ckpt"), "step-00000001")
            >>> first.prepare(); first.json_bytes("state.json", b'{"step": 1}'); first.commit()
            >>> _ = first.finalize()
            >>> CheckpointWriter(Path("ckpt"), "step-00000002").space_needed()  # bytes: about what step 1 took
            11
        """
        written = sum(os.lstat(p).st_size for p in self.staging.iterdir()) if self.staging.is_dir() else 0
        return max(written, previous_size(self.root))

    def external(self, filename: str) -> None:
        """Take ``filename``, written into :attr:`staging` by something else (``torch.distributed.checkpoint``
        shards, say), into the checkpoint: fsync and hash it. A file in the staging dir that no rank
        took in this way fails :meth:`finalize`.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader, CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare()
            >>> _ = (w.staging / "__0_0.distcp").write_bytes(b"shard")  # written by torch.distributed.checkpoint
            >>> w.external("__0_0.distcp")
            >>> w.commit()
            >>> CheckpointReader(w.finalize()).files["__0_0.distcp"].size
            5
        """
        path = self._path(filename)
        fd = files.open_regular(path)
        try:
            os.fsync(fd)
            h, size = hashlib.sha256(), 0
            while chunk := os.read(fd, 16 << 20):
                h.update(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        self._files[filename] = Entry(size, h.hexdigest())

    def commit(self) -> None:
        """This rank's files are written: record their names, sizes and SHA-256 in its record file
        (atomically), for :meth:`finalize` on the main process. Nothing can be written after it.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare()
            >>> w.json("state.json", {"step": 120})
            >>> w.commit()
            >>> w.json("late.json", {})
            Traceback (most recent call last):
            ...
            RuntimeError: step-00000120: rank 0 already committed; write every file before commit()
        """
        for name, (size, digest) in list(self._hashing.items()):
            self._files[name] = Entry(size, digest.result())
            del self._hashing[name]
        if not self.is_main:  # (the main process's own files stay in memory for its finalize)
            self._record(self._entries(), "")
        self._committed = True

    def _entries(self) -> dict[str, Any]:
        return {name: {"size": e.size, "sha256": e.sha256} for name, e in self._files.items()}

    def abort(self, reason: str) -> None:
        """This rank failed to write its part: record why, so the main process stops waiting and raises
        naming this rank (instead of waiting out the timeout). Best effort.

        Example (both ranks of a 2-process save, in one process):

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointWriter
            >>> main = CheckpointWriter(Path("ckpt"), "step-00000120", rank=0, world_size=2, is_main=True)
            >>> other = CheckpointWriter(Path("ckpt"), "step-00000120", rank=1, world_size=2, is_main=False)
            >>> main.prepare()
            >>> other.abort("OSError: [Errno 5] Input/output error")  # rank 1 failed to write its part
            >>> main.commit()
            >>> main.finalize()
            Traceback (most recent call last):
            ...
            framework.checkpoint.files.CheckpointError: rank 1 failed to write its part of checkpoint step-00000120:
            OSError: [Errno 5] Input/output error; the previous checkpoint is intact
        """
        try:
            self._record({}, reason or "unknown error")
        except OSError:
            pass

    def _record(self, entries: dict[str, Any], error: str) -> None:
        record = {"rank": self.rank, "world_size": self.world_size, "files": entries, "error": error}
        path = self.staging / f"{RECORD_PREFIX}{self.rank}.json"
        # (atomic, so the main process never reads half of one; not fsync'ed: the files it lists are, and
        # the record itself is bookkeeping that finalize deletes)
        files.write_atomic(path, json.dumps(record).encode(), tmp=path.with_name(path.name + ".tmp"), fsync=False)

    # ---------------------------------------------------------------- main process

    def finalize(self, *, monitor_value: float | None = None) -> Path:
        """Main process, after its own :meth:`commit`: wait for every rank's record (up to ``timeout``
        seconds), write ``manifest.json`` + ``SHA256SUMS``, fsync, rename into place atomically. Returns
        its path. (:func:`framework.checkpoint.store.publish` does this, then points ``latest`` at it and
        prunes.)

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader, CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare()
            >>> w.json("state.json", {"step": 120})
            >>> w.commit()
            >>> path = w.finalize(monitor_value=0.41)
            >>> path.name, CheckpointReader(path).monitor_value
            ('step-00000120', 0.41)
        """
        if not self.is_main:
            raise RuntimeError("CheckpointWriter.finalize runs on the main process only")
        if not self._committed:
            raise RuntimeError(
                "CheckpointWriter.finalize: call commit() first (the main process records its files too)"
            )
        merged = self._merge(self._wait_for_records())
        data = fileformat.encode(Manifest(merged, fileformat.finite_or_none(monitor_value)))
        sums = fileformat.encode_sums(merged, data)
        self._write(self.staging / MANIFEST, lambda fd: files.write_all(fd, [data]))
        self._write(self.staging / SUMS, lambda fd: files.write_all(fd, [sums]))
        files.fsync_dir(self.staging)
        final = self.root / self.name
        if os.path.lexists(final):  # re-saving a name (a manual save): swap, never a moment without one
            trash = self.root / f"{TRASH_PREFIX}{self.name}"
            if os.path.lexists(trash):
                files.remove_tree(trash)
            files.refuse_symlink(final)
            os.replace(final, trash)
            os.replace(self.staging, final)
            files.fsync_dir(self.root)
            files.remove_tree(trash)
        else:
            files.replace(self.staging, final)
            files.fsync_dir(self.root)
        return final

    def _wait_for_records(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout
        pause = 0.002
        while True:
            records: list[dict[str, Any]] = [{"files": self._entries()}]
            missing = []
            for rank in range(self.world_size):
                if rank == self.rank:
                    continue
                path = self.staging / f"{RECORD_PREFIX}{rank}.json"
                if not path.exists():
                    missing.append(rank)
                    continue
                record = _read_record(path, rank, self.world_size)
                if record["error"]:
                    raise CheckpointError(
                        f"rank {rank} failed to write its part of checkpoint {self.name}: {record['error']}; "
                        "the previous checkpoint is intact"
                    )
                records.append(record)
            if not missing:
                return records
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"checkpoint {self.name}: rank(s) {missing} did not finish writing within {self.timeout:g} s "
                    f"(no {RECORD_PREFIX}R.json in {self.staging}); a process died or is stuck mid-save. The previous "
                    "checkpoint is intact; resume='auto' uses it. If the filesystem is just slow, raise the timeout"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _merge(self, records: list[dict[str, Any]]) -> dict[str, Entry]:
        merged: dict[str, Entry] = {}
        for record in records:
            for name, e in record["files"].items():
                if name in merged:
                    raise CheckpointError(f"checkpoint {self.name}: {name} was written by two ranks")
                merged[name] = Entry(e["size"], e["sha256"])
        on_disk = {p.name for p in self.staging.iterdir() if not p.name.startswith(RECORD_PREFIX)}
        unrecorded = sorted(on_disk - set(merged))
        if unrecorded:
            raise CheckpointError(
                f"checkpoint {self.name}: {unrecorded} were written into {self.staging} but no rank recorded them; "
                "pass each file written by another library to CheckpointWriter.external()"
            )
        for name, e in merged.items():
            path = self.staging / name
            size = os.lstat(path).st_size if os.path.lexists(path) else None
            if size != e.size:
                raise CheckpointError(f"checkpoint {self.name}: {name} has {size} bytes, its rank recorded {e.size}")
        for path in self.staging.glob(f"{RECORD_PREFIX}*"):
            os.unlink(path)  # (the writer's bookkeeping is no part of the checkpoint)
        return merged


def previous_size(root: Path) -> int:
    """The bytes of the newest checkpoint under ``root`` whose manifest reads (0 without one): what the next
    save will need about as much of. Reads manifests only (:meth:`CheckpointWriter.space_needed` shows it).
    """
    if not root.is_dir():
        return 0
    steps = [(int(m.group(1)), e.path) for e in os.scandir(root)
             if (m := CHECKPOINT_RE.match(e.name)) and e.is_dir(follow_symlinks=False)]  # fmt: skip
    for _, path in sorted(steps, reverse=True):
        try:
            parsed, _ = read_manifest(Path(path))
        except CheckpointError:
            continue
        return sum(e.size for e in parsed.files.values())
    return 0


def _discard(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_record(path: Path, rank: int, world_size: int) -> dict[str, Any]:
    try:
        record = json.loads(files.read_regular(path, MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({e}); the save was interrupted, the previous one is intact"
        ) from None
    expect(record, _RECORD, where=path, error=CheckpointError)
    if record["rank"] != rank or record["world_size"] != world_size:
        raise CheckpointError(f"{path} belongs to another save (rank {record['rank']} of {record['world_size']})")
    return dict(record)


# ---------------------------------------------------------------- reading


class CheckpointReader:
    """A verified checkpoint: the manifest, ``SHA256SUMS`` and every file's size and SHA-256 are
    checked when it is opened (a :class:`~framework.checkpoint.files.CorruptCheckpointError` naming the file
    otherwise); reads then return exactly what was verified.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import CheckpointReader
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)  # writes runs/x/checkpoints/step-00000001
        >>> r = CheckpointReader(Path("runs/x/checkpoints/step-00000001"))
        >>> sorted(r.files)
        ['model.safetensors', 'rng-rank0.json', 'rng-rank0.safetensors', 'state.json', 'state.safetensors']
        >>> r.json("state.json")["state"]["counters"]["step"]
        1
        >>> {name: list(t.shape) for name, t in sorted(r.tensors("model.safetensors").items())}
        {'net.bias': [3], 'net.weight': [3, 8]}
        >>> r.has("ema.safetensors")  # written with Engine(ema_decay=...)
        False
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._manifest, self._seen = verify(self.path)

    @property
    def files(self) -> dict[str, Entry]:
        """Every file of the checkpoint, with its size and SHA-256 (``manifest.json`` and ``SHA256SUMS``
        themselves are not listed).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> CheckpointReader(Path("runs/x/checkpoints/step-00000001")).files["model.safetensors"]
            Entry(size=284, sha256='...')
        """
        return dict(self._manifest.files)

    @property
    def monitor_value(self) -> float | None:
        """The value that ranks this checkpoint for ``keep_best`` (None: unranked).

        The engine's checkpoints have the ``monitor`` value (``val/loss`` by default) of the validation
        before them, if any.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader, CheckpointWriter
            >>> w = CheckpointWriter(Path("ckpt"), "step-00000120")
            >>> w.prepare(); w.json("state.json", {"step": 120}); w.commit()
            >>> CheckpointReader(w.finalize(monitor_value=0.41)).monitor_value
            0.41
        """
        return self._manifest.monitor_value

    def has(self, filename: str) -> bool:
        """Whether the checkpoint holds ``filename``.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> reader = CheckpointReader(Path("runs/x/checkpoints/step-00000001"))
            >>> reader.has("model.safetensors"), reader.has("ema.safetensors")
            (True, False)
        """
        return filename in self._manifest.files

    def file(self, filename: str) -> Path:
        """The path of the verified file ``filename`` (for a library that reads files itself, e.g. DCP).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> reader = CheckpointReader(Path("runs/x/checkpoints/step-00000001"))
            >>> reader.file("state.json").as_posix()
            'runs/x/checkpoints/step-00000001/state.json'
            >>> reader.file(".metadata")  # a sharded checkpoint has one
            Traceback (most recent call last):
            ...
            framework.checkpoint.files.CorruptCheckpointError: runs/x/checkpoints/step-00000001 has no .metadata
            (its manifest lists ['model.safetensors', ...])
        """
        if not self.has(filename):
            raise CorruptCheckpointError(f"{self.path} has no {filename} (its manifest lists {sorted(self.files)})")
        return self.path / filename

    def read_bytes(self, filename: str) -> bytes:
        """The contents of ``filename``, as verified (hashed again if the file changed since).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> reader = CheckpointReader(Path("runs/x/checkpoints/step-00000001"))
            >>> reader.read_bytes("state.json")[:30]
            b'{"format": 2, "world_size": 1,'
            >>> _ = (reader.path / "state.json").write_text("{}")  # changed since it was verified
            >>> reader.read_bytes("state.json")
            Traceback (most recent call last):
            ...
            framework.checkpoint.files.CorruptCheckpointError: runs/x/checkpoints/step-00000001/state.json has 2 bytes,
            the manifest says ...; the checkpoint is damaged or was replaced; resume from another checkpoint
        """
        path, entry = self.file(filename), self._manifest.files[filename]
        try:
            fd = files.open_regular(path)
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {path} ({e}); resume from another checkpoint") from None
        try:
            st = os.fstat(fd)
            data = _read_all(fd, entry.size + 1)
        finally:
            os.close(fd)
        if _identity(st) != self._seen[filename] or len(data) != entry.size:  # (changed since it was verified)
            _check_entry(path, data, entry)
        return data

    def json(self, filename: str) -> Any:
        """The parsed JSON file ``filename`` (a :class:`CorruptCheckpointError` naming it if malformed).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> state = CheckpointReader(Path("runs/x/checkpoints/step-00000001")).json("state.json")
            >>> state["format"], state["strategy"], sorted(state["state"])
            (2, 'single', ['callbacks', 'counters', 'data', 'metrics', 'model', 'optimizer'])
        """
        return parse_json(self.read_bytes(filename), self.path / filename)

    def tensors(self, filename: str) -> dict[str, torch.Tensor]:
        """The tensors of the safetensors file ``filename``.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> weights = CheckpointReader(Path("runs/x/checkpoints/step-00000001")).tensors("model.safetensors")
            >>> {name: list(t.shape) for name, t in sorted(weights.items())}
            {'net.bias': [3], 'net.weight': [3, 8]}
        """
        return self.tensors_and_metadata(filename)[0]

    def tensors_and_metadata(self, filename: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and the metadata of the safetensors file ``filename``.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import CheckpointReader
            >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
            >>> _ = engine.fit(Classifier(), train_data)
            >>> reader = CheckpointReader(Path("runs/x/checkpoints/step-00000001"))
            >>> weights, meta = reader.tensors_and_metadata("model.safetensors")
            >>> sorted(weights), meta  # aliases: tied weights, stored once
            (['net.bias', 'net.weight'], {'aliases': '{}'})
        """
        return fileformat.parse_tensors(self.read_bytes(filename), self.path / filename)


def parse_json(data: bytes, where: object) -> Any:
    """``json.loads`` that names ``where`` in a :class:`CorruptCheckpointError` (bad UTF-8, a truncated
    file, nesting deeper than Python can parse).
    """
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{where} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); the checkpoint is corrupt. "
            "Nothing was loaded; resume from another checkpoint"
        ) from None


def _read_all(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total < limit and (chunk := os.read(fd, min(1 << 30, limit - total))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # (ctime cannot be set from user space: the same tuple means the same file, unchanged)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_entry(path: Path, data: bytes, entry: Entry) -> None:
    hint = "the checkpoint is damaged or was replaced; resume from another checkpoint"
    if len(data) != entry.size:
        raise CorruptCheckpointError(f"{path} has {len(data)} bytes, the manifest says {entry.size}; {hint}")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CorruptCheckpointError(f"{path}: its SHA-256 does not match the manifest's; {hint}")


def read_manifest(path: Path) -> tuple[Manifest, bytes]:
    """The parsed ``manifest.json`` of checkpoint ``path`` and its bytes (checked, not the files): cheap, for
    its ``monitor_value`` or its list of files."""
    where = path / MANIFEST
    try:
        data = files.read_regular(where, fileformat.MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{path} has no {MANIFEST}: the save (or a prune) did not finish, so it is not a complete checkpoint"
        ) from None
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {where} ({e})") from None
    return fileformat.decode(data, where), data


def verify(path: Path) -> tuple[Manifest, dict[str, tuple[int, ...]]]:
    """Check checkpoint ``path`` completely: manifest, ``SHA256SUMS``, and each file's size and SHA-256;
    returns the manifest and each file's identity as verified. Raises
    :class:`CorruptCheckpointError` naming the file.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import verify
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> manifest, _ = verify(Path("runs/x/checkpoints/step-00000001"))
        >>> sorted(manifest.files)
        ['model.safetensors', 'rng-rank0.json', 'rng-rank0.safetensors', 'state.json', 'state.safetensors']
        >>> _ = Path("runs/x/checkpoints/step-00000001/rng-rank0.json").write_text("{}")
        >>> verify(Path("runs/x/checkpoints/step-00000001"))
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: runs/x/checkpoints/step-00000001/rng-rank0.json has 2 bytes,
        the manifest says ...; the checkpoint is damaged or was replaced; resume from another checkpoint
    """
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (it does not exist or is a file)")
    parsed, data = read_manifest(path)
    try:
        sums = files.read_regular(path / SUMS, 64 << 20)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path / SUMS} ({e}); the checkpoint is incomplete") from None
    fileformat.check_sums(sums, parsed.files, data, path / SUMS)
    seen: dict[str, tuple[int, ...]] = {}
    for name, entry in parsed.files.items():
        where = path / name
        try:
            fd = files.open_regular(where)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{where} is missing (the manifest lists it); the checkpoint is incomplete"
            ) from None
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {where} ({e}); resume from another checkpoint") from None
        try:
            st = os.fstat(fd)
            if st.st_size != entry.size:
                raise CorruptCheckpointError(
                    f"{where} has {st.st_size} bytes, the manifest says {entry.size}; the checkpoint is damaged or "
                    "was replaced; resume from another checkpoint"
                )
            h, size = hashlib.sha256(), 0
            while size <= entry.size and (chunk := os.read(fd, 16 << 20)):
                h.update(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size != entry.size or h.hexdigest() != entry.sha256:
            raise CorruptCheckpointError(
                f"{where}: its SHA-256 does not match the manifest's (a flipped bit, or a file from another "
                "checkpoint); the checkpoint is damaged or was replaced; resume from another checkpoint"
            )
        seen[name] = _identity(st)
    return parsed, seen
