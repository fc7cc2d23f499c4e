"""Checkpoint errors, and safe file writes for run dirs: never through a symbolic link, atomic where a
file is replaced, fsync'ed where a crash must not lose it.

:class:`CheckpointError` is public (``framework.CheckpointError``): a checkpoint that cannot be used,
with what is wrong and what to do. :class:`CorruptCheckpointError` is the kind that ``resume="auto"``
may skip for an older checkpoint: its own files are damaged, incomplete or malformed, and nothing of
it was applied. Everything else (a checkpoint of another configuration, say) stops ``"auto"`` too.

Everything the engine creates or replaces inside a run dir (checkpoint files and their staging dirs,
``latest``, ``config.json``, ``.lock``, ``metrics.jsonl`` and its rewrite) goes through here. A
symlink planted at one of those paths would otherwise make the engine overwrite, truncate or delete a
file outside the run, so each write refuses a link (``O_NOFOLLOW``, or a check followed by an atomic
``rename``) and raises :class:`SymlinkError` naming the path and the fix. The run dir itself, and the
directories above it, may be links. Files are opened with ``O_NONBLOCK`` and must be regular files:
a planted FIFO cannot hang the engine.

Example:

    >>> from pathlib import Path
    >>> from framework.checkpoint import files
    >>> files.ensure_dir(Path("runs/x"))
    >>> files.write_atomic(Path("runs/x/config.json"), b"{}")  # temp file, fsync, rename
    >>> Path("runs/x/config.json").read_text()
    '{}'
    >>> Path("runs/x/metrics.jsonl").symlink_to("/tmp/elsewhere.jsonl")
    >>> files.write_atomic(Path("runs/x/metrics.jsonl"), b"")
    Traceback (most recent call last):
    ...
    framework.checkpoint.files.SymlinkError: [Errno ...] runs/x/metrics.jsonl is a symbolic link
    (pointing to '/tmp/elsewhere.jsonl'); the framework never follows a link inside a run dir (...). Fix: ...
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO

# ---------------------------------------------------------------- errors: The errors of checkpoint files, shared by the modules that write, read and check them.


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do.

    Example:

        >>> framework.load_weights(Classifier(), "runs/nowhere")
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CheckpointError: runs/nowhere does not exist; pass a run dir, a checkpoint dir
        (e.g. runs/x/checkpoints/step-00000120) or a .safetensors file
        >>> framework.CheckpointError is framework.checkpoint.CheckpointError
        True
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged, incomplete or malformed; the message names the file
    (and the key). Nothing of it was applied, so ``resume="auto"`` may fall back to an older one.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import CorruptCheckpointError, verify
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False).fit(
        ...     Classifier(), train_data)
        >>> ckpt = Path("runs/x/checkpoints/step-00000001")
        >>> _ = (ckpt / "state.json").write_text("{}")  # damaged after it was written
        >>> try:
        ...     verify(ckpt)
        ... except CorruptCheckpointError as e:
        ...     print(f"skipping: {e}")
        skipping: runs/x/checkpoints/step-00000001/state.json has 2 bytes, the manifest says ...; the checkpoint
        is damaged or was replaced; resume from another checkpoint
        >>> issubclass(CorruptCheckpointError, framework.CheckpointError)
        True
    """


class DiskFullError(OSError, CheckpointError):
    """No space left for a checkpoint (errno ``ENOSPC``), after the checkpoints beyond ``keep_last`` were
    removed to make room: the message names the space the checkpoint needs and the space free. The
    previous checkpoints are intact. An ``OSError`` and a :class:`CheckpointError`.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import DiskFullError
        >>> from framework.checkpoint.files import disk_full
        >>> error = disk_full(Path("runs/x/checkpoints"), "step-00000120", need=1_600_000)  # what a save raises
        >>> isinstance(error, DiskFullError), isinstance(error, OSError), isinstance(error, framework.CheckpointError)
        (True, True, True)
        >>> print(error)
        [Errno ...] no space left for checkpoint step-00000120: it needs about 1.6 MB, 0 bytes are free on the disk
        holding runs/x/checkpoints (the checkpoints beyond keep_last were removed to make room first). The previous
        checkpoints are intact. Fix: free space on that disk, lower keep_last or keep_best, or use a run_dir on a
        larger disk
    """


def disk_full(root: Path, name: str, need: int) -> DiskFullError:
    """The :class:`DiskFullError` of checkpoint ``name`` under ``root``: ``need`` bytes, against what is free
    (the caller raises it, ``from`` the ``OSError`` of the failed write)."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = 0
    return DiskFullError(
        errno.ENOSPC,
        f"no space left for checkpoint {name}: it needs about {_size(need)}, {_size(free)} are free on the disk "
        f"holding {root} (the checkpoints beyond keep_last were removed to make room first). The previous "
        "checkpoints are intact. Fix: free space on that disk, lower keep_last or keep_best, or use a run_dir "
        "on a larger disk",
    )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk (``ENOSPC``; ``EDQUOT``, a quota, too).

    Example:

        >>> import errno
        >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device")), is_disk_full(ValueError("full"))
        (True, False)
    """
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# ---------------------------------------------------------------- files: Safe file writes for run dirs: never through a symbolic link, atomic where a file is replaced,

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 30  # (one write() call moves at most this much: some kernels cap a single write near 2 GiB)


class SymlinkError(OSError):
    """A path the framework would write is a symbolic link (or not a regular file), so it refuses.

    An ``OSError`` (errno ``ELOOP``; ``EINVAL`` for a directory, FIFO, socket or device where a file goes),
    so code that handles a failed write handles this too. Its message names the link, where it points, and the
    fix (the module's example shows one).
    """


def _link_error(path: Path) -> SymlinkError:
    try:
        target = f" (pointing to {os.readlink(path)!r})"
    except OSError:
        target = ""
    return SymlinkError(
        errno.ELOOP,
        f"{path} is a symbolic link{target}; the framework never follows a link inside a run dir (it could "
        f"overwrite, delete or load another run's files). Fix: remove the link (rm {path}), or use a fresh run_dir",
    )


def _not_regular(path: Path, mode: int) -> SymlinkError:
    kind = "directory" if stat.S_ISDIR(mode) else "special file (FIFO, socket or device)"
    return SymlinkError(
        errno.EINVAL,
        f"{path} is a {kind}, not a regular file; the framework only writes regular files in a run dir. "
        f"Fix: remove it (rm -r {path}), or use a fresh run_dir",
    )


def refuse_symlink(path: Path) -> None:
    """Raise :class:`SymlinkError` if ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise _link_error(path)


def _open(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that never follows a final symlink and accepts regular files only."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):  # (FreeBSD says EMLINK)
            raise _link_error(path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if _NONBLOCK:  # (only wanted while opening: a FIFO would have blocked there)
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    if not _NOFOLLOW and os.path.islink(path):  # (no O_NOFOLLOW on this OS: check after the fact)
        os.close(fd)
        raise _link_error(path)
    return fd


def open_new(path: Path) -> int:
    """Create ``path`` (which must not exist, not even as a link) for writing; returns the fd, which the
    caller writes (:func:`write_all`), fsyncs and closes."""
    try:
        return _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        if os.path.islink(path):
            raise _link_error(path) from None
        raise FileExistsError(
            errno.EEXIST, f"{path} already exists; the framework writes each checkpoint file once, into a fresh dir"
        ) from None


def write_all(fd: int, buffers: Iterable[bytes | memoryview]) -> int:
    """Write every buffer to ``fd`` completely (os.write may write less than asked); returns the bytes written.
    Buffers may be bytes or memoryviews (of a tensor's memory, say: nothing is copied)."""
    total = 0
    for buf in buffers:
        view = memoryview(buf).cast("B")
        while view:
            n = os.write(fd, view[:_CHUNK])
            view = view[n:]
            total += n
    return total


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync."""
    fd = open_new(path)
    try:
        write_all(fd, [data])
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear_leftover(path: Path) -> None:
    """Remove a leftover regular file (a killed write's temp file); refuse a link or anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    os.unlink(path)


def temp_name(path: Path) -> Path:
    """The temporary file that :func:`write_atomic` and friends write before renaming onto ``path``.

    Example:

        >>> from pathlib import Path
        >>> temp_name(Path("runs/x/checkpoints/latest")).as_posix()
        'runs/x/checkpoints/.latest.tmp'
    """
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, data: bytes, *, tmp: Path | None = None, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically: a reader sees the old file or the new one, never half.

    The data goes to ``tmp`` (default :func:`temp_name`), is fsync'ed, then renamed onto ``path``
    and the directory fsync'ed. Neither ``path`` nor the temp file may be a symlink (the module's example
    shows both).
    """
    tmp = temp_name(path) if tmp is None else tmp
    refuse_symlink(path)
    _clear_leftover(tmp)
    fd = open_new(tmp)
    try:
        write_all(fd, [data])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def replace(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``, refusing a ``dst`` that is a symlink (rename would swap the link away
    silently; a link there means something is wrong): how a staging dir becomes ``root/step-00000120``.
    """
    refuse_symlink(dst)
    os.replace(src, dst)


def open_append(path: Path) -> IO[str]:
    """Open ``path`` to append text (created if missing), never through a link (``metrics.jsonl``)."""
    fd = _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a")


def open_rewrite(path: Path) -> IO[str]:
    """Create the temporary file ``path`` for a rewrite (a leftover regular file is replaced; a link is
    refused); text mode. ``path`` is the :func:`temp_name` of the file being rewritten.
    """
    _clear_leftover(path)
    return os.fdopen(open_new(path), "w")


def open_lock(path: Path) -> int:
    """Open (or create) the lock file ``path`` (``RUN_DIR/.lock``) read-write, never through a link; returns
    the fd."""
    return _open(path, os.O_RDWR | os.O_CREAT)


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The contents of the regular file ``path`` (not a link, at most ``max_bytes``).

    Raises ``OSError`` (:class:`SymlinkError` for a link or a non-regular file, ``EFBIG`` for a
    larger file).
    """
    fd = _open(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        total = 0
        while True:  # (bounded even if the file grows while it is read)
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise OSError(errno.EFBIG, f"{path} has more than the {max_bytes} bytes such a file may have")
    finally:
        os.close(fd)


def open_regular(path: Path) -> int:
    """Open the regular file ``path`` for reading, never through a link; returns the fd."""
    return _open(path, os.O_RDONLY)


def ensure_dir(path: Path) -> None:
    """Create directory ``path`` (and its parents) if missing; refuse it if it is a link or not a directory."""
    refuse_symlink(path)
    path.mkdir(parents=True, exist_ok=True)
    refuse_symlink(path)  # (a link planted between the check and mkdir: mkdir(exist_ok) accepts it)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path} is not a directory; remove it or use a fresh run_dir")


def fresh_dir(path: Path) -> None:
    """Make ``path`` an empty new directory: a leftover one (a killed save's ``.tmp-step-*``) is removed first."""
    if os.path.lexists(path):
        remove_tree(path)
    os.mkdir(path)  # (mkdir never follows a link: a link planted since would make it fail)


def remove_tree(path: Path) -> None:
    """Delete the directory ``path`` and everything in it, without following any link (a link
    inside is removed, never what it points to); refuse ``path`` itself being a link.
    """
    refuse_symlink(path)
    shutil.rmtree(path)  # (on Linux rmtree walks by fd and never follows links)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
