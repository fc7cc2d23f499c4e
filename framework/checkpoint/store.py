"""A run's directory of checkpoints: which one to resume, which to keep, and timelines.

``RUN_DIR/checkpoints/`` holds ``step-NNNNNNNN/`` checkpoints, the ``latest`` pointer, and
transient ``.tmp-*`` (a save in progress, or killed) and ``.trash-*`` (a prune in progress, or
killed) dirs; ``abandoned/`` keeps the checkpoints of a timeline left behind by a resume from
an older checkpoint.

- :func:`newest_complete` / :func:`load_newest`: the newest checkpoint that verifies (and loads);
  the ones skipped are named, with the one used instead, in one warning.
- :func:`prune`: keep the newest ``keep_last`` and the ``keep_best`` best (by the manifest's
  ``monitor_value``: no old ``state.json`` is parsed), remove leftovers of interrupted saves and
  prunes; never follows a link, never removes what it cannot prove incomplete.
- :func:`abandon_newer`: resuming from step 4 of a run that has 8 and 12 moves those aside, so
  ``resume="auto"`` continues the new branch and never returns to the old one.

Example:

    >>> from pathlib import Path
    >>> from framework.checkpoint import list_checkpoints, newest_complete, prune
    >>> engine = framework.Engine(max_steps=3, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/x",
    ...                           progress=False)
    >>> _ = engine.fit(Classifier(), train_data)  # step-00000001, -2, -3
    >>> root = Path("runs/x/checkpoints")
    >>> newest_complete(root).name
    'step-00000003'
    >>> [path.name for path in prune(root, keep_last=1)]
    ['step-00000001', 'step-00000002']
    >>> [found.step for found in list_checkpoints(root)]
    [3]

Background writes (:class:`AsyncCheckpointer`, ``checkpoint_async=True``): the training thread pays
only for a copy of the state into host buffers that are reused from one save to the next; serialising,
hashing, writing, fsync, the manifest, the rename, ``latest`` and pruning run in one background
thread, one write in flight at a time. A kill during a background write leaves the previous checkpoint
intact (the new one is still a staging dir, which the next save removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import fileformat, files
from .fileformat import MANIFEST, SUMS, Manifest
from .files import CheckpointError, CorruptCheckpointError
from .io import CHECKPOINT_RE, STAGING_PREFIX, TRASH_PREFIX, CheckpointWriter, read_manifest, verify

LATEST = "latest"
ABANDONED = "abandoned"
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")  # (what `latest` may name: CheckpointWriter's names)
_named: set[str] = set()  # what this process has already warned about (each once)


def _warn_once(key: str, message: str) -> None:
    if key not in _named:
        _named.add(key)
        warnings.warn(message, stacklevel=3)


@dataclass
class Found:
    """A ``step-*`` checkpoint directory (complete or not) and its step, as :func:`list_checkpoints` finds it.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import list_checkpoints
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> found = list_checkpoints(Path("runs/x/checkpoints"))[-1]
        >>> found.path.as_posix(), found.step
        ('runs/x/checkpoints/step-00000001', 1)
    """

    path: Path
    step: int


def list_checkpoints(root: Path) -> list[Found]:
    """Every ``step-*`` directory directly under ``root`` (complete or not; links are not
    checkpoints), oldest first.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import list_checkpoints
        >>> engine = framework.Engine(max_steps=3, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/x",
        ...                           progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> [found.step for found in list_checkpoints(Path("runs/x/checkpoints"))]
        [1, 2, 3]
        >>> list_checkpoints(Path("runs/none/checkpoints"))
        []
    """
    if not root.is_dir():
        return []
    found = [
        Found(Path(e.path), int(m.group(1)))
        for e in os.scandir(root)
        if (m := CHECKPOINT_RE.match(e.name)) and e.is_dir(follow_symlinks=False)
    ]
    return sorted(found, key=lambda f: f.step)


def validate(path: Path) -> str | None:
    """None if checkpoint ``path`` looks complete (a valid manifest, ``SHA256SUMS``, every listed file
    present with its size), else why not. Cheap: hashes nothing (:func:`verify` does).

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import validate
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> ckpt = Path("runs/x/checkpoints/step-00000001")
        >>> print(validate(ckpt))
        None
        >>> (ckpt / "model.safetensors").unlink()
        >>> print(validate(ckpt))
        runs/x/checkpoints/step-00000001/model.safetensors is missing
    """
    try:
        parsed, _ = read_manifest(path)
    except CheckpointError as e:
        return str(e)
    return _missing(path, parsed)


def _missing(path: Path, parsed: Manifest) -> str | None:
    for name in (*parsed.files, SUMS):
        try:
            st = os.lstat(path / name)
        except FileNotFoundError:
            return f"{path / name} is missing"
        if name != SUMS and st.st_size != parsed.files[name].size:
            return f"{path / name} has {st.st_size} bytes, the manifest says {parsed.files[name].size}"
    return None


_RESTARTS = 100  # (each restart means a newer checkpoint was published meanwhile: the run is progressing)


def load_newest(root: Path, load: Callable[[Path], None] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (``load(path)`` then applies it and may raise
    :class:`CorruptCheckpointError` for malformed content, leaving nothing applied); older ones are
    tried in turn. The ones skipped are named, with the one used, in ONE warning.

    Returns None where ``root`` holds no ``step-*`` dir at all; raises :class:`CheckpointError` where
    it holds some but none is usable (starting over on top of them would be a silent fresh start).
    ``load`` must verify what it reads (:class:`~framework.checkpoint.io.CheckpointReader` does); without
    it, each candidate is verified here.

    A reader never loses to pruning: a candidate that disappears while it is read (a run training with
    ``keep_last`` pruned it, after publishing a newer one) is not a damaged checkpoint; the listing is
    read again and the newest complete checkpoint tried first.

    Example:

        >>> import warnings
        >>> from pathlib import Path
        >>> from framework.checkpoint import load_newest
        >>> engine = framework.Engine(max_steps=3, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/x",
        ...                           progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> _ = Path("runs/x/checkpoints/step-00000003/model.safetensors").write_bytes(b"damaged")
        >>> model = Classifier()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     path = load_newest(Path("runs/x/checkpoints"), lambda p: framework.load_weights(model, p))
        >>> path.name
        'step-00000002'
        >>> print(caught[0].message)
        skipping checkpoint(s) under runs/x/checkpoints that fail verification: step-00000003
        (runs/x/checkpoints/step-00000003/model.safetensors has 7 bytes, the manifest says 284; the checkpoint is
        damaged or was replaced; resume from another checkpoint). Using the older step-00000002 instead
    """
    skipped: dict[str, str] = {}  # name -> why (each damaged one verified once, whatever the restarts)
    for _ in range(_RESTARTS):
        pruned = False
        for found in reversed(list_checkpoints(root)):
            if found.path.name in skipped:
                continue
            try:
                (load or verify)(found.path)
            except CheckpointError as e:
                if _vanished(found.path):  # (pruned or moved while read: a newer one is there now)
                    pruned = True
                    break
                if not isinstance(e, CorruptCheckpointError):
                    raise
                skipped[found.path.name] = str(e)
                continue
            if skipped:
                named = "; ".join(f"{name} ({why})" for name, why in skipped.items())
                warnings.warn(
                    f"skipping checkpoint(s) under {root} that fail verification: {named}. Using the older "
                    f"{found.path.name} instead",
                    stacklevel=2,
                )
            return found.path
        if not pruned:
            break
    else:
        raise CheckpointError(
            f"the checkpoints under {root} were pruned while being read, {_RESTARTS} times in a row: the run saves "
            "faster than one checkpoint can be verified. Read one checkpoint dir (it is kept while you read it "
            "only if keep_last allows), or raise keep_last"
        )
    if skipped:
        named = "; ".join(f"{name} ({why})" for name, why in skipped.items())
        raise CheckpointError(
            f"no checkpoint under {root} can be used: {named}. resume='auto' will not start over on "
            "top of them. Fix: restore one from a backup, or move them away (or use a new run_dir) to start fresh"
        )
    return None


def _vanished(path: Path) -> bool:
    """``path`` is gone (a prune renames a checkpoint to ``.trash-*`` in one step before deleting it)."""
    return not os.path.lexists(path)


def newest_complete(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (sizes and SHA-256); see :func:`load_newest`.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import newest_complete
        >>> engine = framework.Engine(max_steps=3, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/x",
        ...                           progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> newest_complete(Path("runs/x/checkpoints")).as_posix()
        'runs/x/checkpoints/step-00000003'
        >>> print(newest_complete(Path("runs/fresh/checkpoints")))  # no checkpoint yet
        None
    """
    return load_newest(root)


def read_latest(root: Path) -> str | None:
    """The checkpoint name in ``root/latest`` (None without one); a :class:`CorruptCheckpointError`
    naming the file if it holds anything but one checkpoint name.

    ``resume="auto"`` does not trust it (it checks the ``step-*`` dirs themselves); it is the pointer
    for people and tools, rewritten atomically by every save.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import read_latest
        >>> engine = framework.Engine(max_steps=1, batch_size=32, run_dir="runs/x", progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> read_latest(Path("runs/x/checkpoints"))
        'step-00000001'
        >>> _ = Path("runs/x/checkpoints/latest").write_text("../../elsewhere")
        >>> read_latest(Path("runs/x/checkpoints"))
        Traceback (most recent call last):
        ...
        framework.checkpoint.files.CorruptCheckpointError: runs/x/checkpoints/latest does not name a checkpoint
        ('../../elsewhere'); it should hold one line like 'step-00000120'; the next save rewrites it, or pass a
        checkpoint dir
    """
    path = root / LATEST
    if not os.path.lexists(path):
        return None
    fix = "it should hold one line like 'step-00000120'; the next save rewrites it, or pass a checkpoint dir"
    try:
        text = files.read_regular(path, 256).decode("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"cannot read {path} ({e}); {fix}") from None
    name = text[:-1] if text.endswith("\n") else text
    if not _NAME_RE.fullmatch(name):
        raise CorruptCheckpointError(f"{path} does not name a checkpoint ({text[:40]!r}); {fix}")
    return name


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at checkpoint ``name``, atomically (via ``.latest.tmp``).

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import read_latest, write_latest
        >>> Path("runs/x/checkpoints").mkdir(parents=True)
        >>> write_latest(Path("runs/x/checkpoints"), "step-00000120")
        >>> Path("runs/x/checkpoints/latest").read_text(), read_latest(Path("runs/x/checkpoints"))
        ('step-00000120\\n', 'step-00000120')
    """
    files.write_atomic(root / LATEST, f"{name}\n".encode())


def prune(
    root: Path, keep_last: int | None, keep_best: int = 0, mode: str = "min", keep: Iterable[Path] = ()
) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, the ``keep_best`` best ones (by the
    manifest's ``monitor_value``, lowest for ``mode="min"``), and ``keep`` (``keep_last=None``: keep
    every complete one); also the leftovers of interrupted saves (``.tmp-*``) and prunes
    (``.trash-*``, and ``step-*`` dirs that lost their manifest or files). Returns what it removed.

    A checkpoint goes by being renamed to ``.trash-*`` first, so a kill mid-delete leaves a name the
    next prune removes, never a half-deleted ``step-*``. A checkpoint with an unreadable manifest is
    never deleted (it may be another version's): it is skipped and named once. Links are never
    followed nor removed. Called after a new checkpoint is complete, so there is always one left.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import CheckpointWriter, list_checkpoints, prune
        >>> root = Path("runs/x/checkpoints")
        >>> for step, val_loss in [(1, 0.5), (2, 0.3), (3, 0.4), (4, 0.6)]:
        ...     w = CheckpointWriter(root, f"step-{step:08d}")
        ...     w.prepare(); w.json("state.json", {"step": step}); w.commit()
        ...     _ = w.finalize(monitor_value=val_loss)
        >>> [path.name for path in prune(root, keep_last=1, keep_best=1, mode="min")]
        ['step-00000001', 'step-00000003']
        >>> [found.step for found in list_checkpoints(root)]  # the newest, and the best (lowest val_loss)
        [2, 4]
    """
    if mode not in ("min", "max"):
        raise ValueError(f'mode={mode!r}; use "min" or "max"')
    kept = {Path(p) for p in keep}
    doomed: list[Path] = []
    for entry in os.scandir(root):
        if not (entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) or CHECKPOINT_RE.match(entry.name)):
            continue
        if entry.is_symlink():
            _warn_once(
                f"link:{entry.path}", f"{entry.path} is a symbolic link: pruning leaves it (and its target) alone"
            )
        elif entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and entry.is_dir(follow_symlinks=False):
            doomed.append(Path(entry.path))  # (no save is in progress here: the caller's is complete)
    complete: list[tuple[Found, Manifest]] = []
    incomplete: list[str] = []
    for found in list_checkpoints(root):
        if not os.path.lexists(found.path / MANIFEST):
            problem: str | None = f"no {MANIFEST}"
        else:
            try:
                parsed, _ = read_manifest(found.path)
            except CheckpointError as e:  # (damaged, or another version's: not provably incomplete)
                _warn_once(f"bad:{found.path}", f"skipping {found.path} when pruning; it is left as it is: {e}")
                continue
            problem = _missing(found.path, parsed)
        if problem is None:
            complete.append((found, parsed))
        elif found.path not in kept:
            doomed.append(found.path)
            incomplete.append(f"{found.path.name} ({problem})")
    kept |= _kept(complete, keep_last, keep_best, mode)
    doomed += [f.path for f, _ in complete if f.path not in kept]
    if incomplete:
        warnings.warn(
            f"removing incomplete checkpoint dir(s) under {root}, left by an interrupted save or prune: "
            + "; ".join(incomplete),
            stacklevel=2,
        )
    return _delete(root, doomed)


def _complete(root: Path) -> list[tuple[Found, Manifest]]:
    """The checkpoints under ``root`` whose manifest reads and whose files are all there, oldest first, each
    with its manifest. One whose manifest does not read is left out (damaged, or another version's: as
    :func:`prune`, nothing removes or ranks it unless it is provably incomplete)."""
    complete = []
    for found in list_checkpoints(root):
        try:
            parsed, _ = read_manifest(found.path)
        except CheckpointError:
            continue
        if _missing(found.path, parsed) is None:
            complete.append((found, parsed))
    return complete


def _kept(complete: list[tuple[Found, Manifest]], keep_last: int | None, keep_best: int, mode: str) -> set[Path]:
    """The newest ``keep_last`` of ``complete`` (oldest first; None: all) and the ``keep_best`` best by the
    manifests' ``monitor_value``."""
    kept: set[Path] = set()
    if keep_last is None:
        kept |= {f.path for f, _ in complete}
    elif keep_last > 0:
        kept |= {f.path for f, _ in complete[-keep_last:]}
    if keep_best > 0:
        kept |= set(rank_by_monitor(complete, mode)[:keep_best])
    return kept


def make_room(
    root: Path, keep_last: int | None, keep_best: int = 0, mode: str = "min", need: int | None = None
) -> list[Path]:
    """Main process, for a save into ``root``: remove the complete checkpoints beyond the newest ``keep_last``
    (and the ``keep_best`` best), the ones that save's own prune would remove once it is complete, so that
    a disk holding ``keep_last`` + 1 checkpoints keeps training. With ``need`` (bytes) only where less is
    free (before a save); None: at once (a write just failed for lack of space). Never a save in progress,
    never one of the newest ``keep_last``: a complete checkpoint always remains. Returns what it removed
    (and says so, once per call that removes something).

    Example:

        >>> import warnings
        >>> from pathlib import Path
        >>> from framework.checkpoint import make_room
        >>> engine = framework.Engine(max_steps=3, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/x",
        ...                           progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> root = Path("runs/x/checkpoints")
        >>> make_room(root, keep_last=1, need=1)  # enough space: nothing goes
        []
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     removed = make_room(root, keep_last=1)  # need=None: a write just failed for lack of space
        >>> [path.name for path in removed]
        ['step-00000001', 'step-00000002']
        >>> print(caught[0].message)
        the disk holding runs/x/checkpoints has ... MB free, too little for the next checkpoint: removing
        step-00000001, step-00000002 (beyond keep_last=1) before it is written, not after
    """
    if keep_last is None or not root.is_dir():
        return []
    free = shutil.disk_usage(root).free
    if need is not None and free >= need:
        return []
    complete = _complete(root)
    kept = _kept(complete, keep_last, keep_best, mode)
    doomed = [f.path for f, _ in complete if f.path not in kept]
    if doomed:
        warnings.warn(
            f"the disk holding {root} has {free / 1e6:.1f} MB free, too little for the next checkpoint: removing "
            f"{', '.join(p.name for p in doomed)} (beyond keep_last={keep_last}) before it is written, not after",
            stacklevel=2,
        )
    return _delete(root, doomed)


def rank_by_monitor(complete: list[tuple[Found, Manifest]], mode: str) -> list[Path]:
    """The checkpoints that have a ``monitor_value``, best first (lowest for ``mode="min"``, highest for
    ``"max"``; of equal values the earlier step first): how ``keep_best`` keeps them and ``best`` picks one.
    ``complete`` pairs each checkpoint with its manifest; the first path returned is the best.
    """
    sign = 1.0 if mode == "min" else -1.0
    scored = sorted((sign * m.monitor_value, f.step, f.path) for f, m in complete if m.monitor_value is not None)
    return [p for _, _, p in scored]


def best_checkpoint(root: Path, mode: str) -> Path | None:
    """The best complete checkpoint under ``root`` (``RUN_DIR/checkpoints``) by its manifest's ``monitor_value``
    (:func:`rank_by_monitor`: as ``keep_best`` ranks them), or None where none has one. Cheap: nothing is
    hashed (a reader verifies what it opens).
    """
    if mode not in ("min", "max"):
        raise ValueError(f'mode={mode!r}; use "min" or "max"')
    ranked = rank_by_monitor(_complete(root), mode)
    return ranked[0] if ranked else None


def best_of_run(run_dir: Path) -> Path:
    """The best checkpoint of a run dir, ranked by the ``monitor``/``mode`` its ``config.json`` records, as
    ``keep_best`` kept it: what ``load_weights(..., which="best")`` and ``export --best`` read. A
    :class:`CheckpointError` names ``keep_best`` where the run kept none. ``run_dir`` is the run dir itself
    (``runs/digits``), not its ``checkpoints/``.
    """
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(
            f"{run_dir} is not a run dir (no checkpoints/ in it); the best checkpoint is picked among a run dir's, "
            "so pass the run dir (Engine(run_dir=...)), e.g. runs/digits"
        )
    try:
        config = json.loads((run_dir / "config.json").read_text())
        keep_best, monitor, mode = int(config["keep_best"]), str(config["monitor"]), str(config["mode"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{run_dir / 'config.json'} cannot say how the run ranked its checkpoints ({type(e).__name__}: {e}); "
            "pass a checkpoint dir (runs/x/checkpoints/step-N) instead"
        ) from None
    best = best_checkpoint(run_dir / "checkpoints", mode) if keep_best > 0 else None
    if best is None:
        why = "keep_best=0" if keep_best == 0 else f"none of its checkpoints has a {monitor} value yet"
        raise CheckpointError(
            f"{run_dir} kept no best checkpoint ({why}); train with Engine(keep_best=1, monitor={monitor!r}, "
            f"mode={mode!r}, ...) and validation data, which keeps the best checkpoint by {monitor}, or load the "
            "newest (which='latest')"
        )
    return best


def _delete(root: Path, doomed: list[Path]) -> list[Path]:
    trash = []
    for path in doomed:
        if path.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            trash.append(path)
            continue
        target = root / f"{TRASH_PREFIX}{path.name}"
        if os.path.lexists(target):
            files.remove_tree(target)
        os.replace(path, target)  # (one atomic step: it is no longer a checkpoint)
        trash.append(target)
    if trash:
        files.fsync_dir(root)
    for path in trash:
        files.remove_tree(path)
    return doomed


def publish(
    writer: CheckpointWriter | DeferredWriter,
    *,
    keep_last: int | None = None,
    keep_best: int = 0,
    mode: str = "min",
    monitor_value: float | None = None,
) -> Path:
    """Main process, after every rank committed: finalize ``writer``'s checkpoint (manifest, atomic rename),
    point ``latest`` at it, then prune (:func:`prune`: the leftovers of interrupted saves, and with
    ``keep_last`` all but the newest ``keep_last`` and the ``keep_best`` best by ``monitor_value``;
    ``keep_last=None`` keeps every complete checkpoint). Returns its path. A background writer
    (:class:`AsyncCheckpointer`) queues all of it and returns the path the checkpoint will have.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import CheckpointWriter, list_checkpoints, publish, read_latest
        >>> root = Path("runs/x/checkpoints")
        >>> for step in (1, 2, 3):
        ...     w = CheckpointWriter(root, f"step-{step:08d}")
        ...     w.prepare(); w.json("state.json", {"step": step}); w.commit()
        ...     path = publish(w, keep_last=2, monitor_value=0.41)
        >>> path.name, read_latest(root), [found.step for found in list_checkpoints(root)]
        ('step-00000003', 'step-00000003', [2, 3])
    """
    if isinstance(writer, DeferredWriter):
        return writer.finalize(keep_last=keep_last, keep_best=keep_best, mode=mode, monitor_value=monitor_value)
    final = writer.finalize(monitor_value=monitor_value)
    try:
        write_latest(writer.root, writer.name)
    except OSError as e:
        if not files.is_disk_full(e):
            raise
        prune(writer.root, keep_last, keep_best, mode, keep=[final])  # (it is complete: the old ones may go first)
        write_latest(writer.root, writer.name)
    prune(writer.root, keep_last, keep_best, mode, keep=[final])
    return final


def abandon_newer(root: Path, step: int) -> list[Path]:
    """Move every ``step-*`` dir under ``root`` newer than ``step`` to ``root/abandoned/`` (``.2``, ``.3``,
    ... if a name is taken), so that a run resumed from ``step`` starts a clean branch: ``resume="auto"``
    can never pick the old timeline's later checkpoints, and pruning never mixes them in. ``latest`` is
    pointed back at ``step-{step}`` (or the newest remaining). Returns the new paths of what moved.

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import abandon_newer, read_latest
        >>> engine = framework.Engine(max_steps=3, batch_size=32, checkpoint_every_n_steps=1, run_dir="runs/x",
        ...                           progress=False)
        >>> _ = engine.fit(Classifier(), train_data)
        >>> root = Path("runs/x/checkpoints")
        >>> [path.relative_to(root).as_posix() for path in abandon_newer(root, 1)]  # resuming from step 1
        ['abandoned/step-00000002', 'abandoned/step-00000003']
        >>> read_latest(root)
        'step-00000001'
    """
    newer = [f for f in list_checkpoints(root) if f.step > step]
    if not newer:
        return []
    aside = root / ABANDONED
    files.ensure_dir(aside)
    moved = []
    for found in newer:
        target, n = aside / found.path.name, 2
        while os.path.lexists(target):
            target, n = aside / f"{found.path.name}.{n}", n + 1
        os.replace(found.path, target)
        moved.append(target)
    files.fsync_dir(aside)
    files.fsync_dir(root)
    remaining = [f for f in list_checkpoints(root) if validate(f.path) is None]
    if remaining:
        write_latest(root, remaining[-1].path.name)
    elif os.path.lexists(root / LATEST):
        files.refuse_symlink(root / LATEST)
        os.unlink(root / LATEST)
    return moved


# ---------------------------------------------------------------- background writes


class SnapshotPool:
    """Host buffers for copies of tensors, kept per (file, name) (``("model.safetensors", "net.0.weight")``)
    and reused while shape and dtype match."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._used: set[tuple[str, str]] = set()
        self.from_gpu = False  # whether a copy of this round came from a GPU (non_blocking)

    def copy(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` in the buffer kept for ``key`` (allocated on first use)."""
        t = t.detach()
        cuda = t.device.type == "cuda"
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or (cuda and not buf.is_pinned()):
            # (pinned: a device-to-host copy into it is asynchronous and runs at full bandwidth)
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=cuda)
        self._used.add(key)
        self.from_gpu |= cuda
        return buf

    def end_round(self) -> Any:
        """Drop the buffers this save did not use; returns a CUDA event to wait on (None without GPU copies)."""
        for key in set(self._buffers) - self._used:
            del self._buffers[key]
        self._used = set()
        event = None
        if self.from_gpu:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record()  # (after every copy of this round, on the stream that issued them)
        self.from_gpu = False
        return event


class DeferredWriter:
    """A :class:`~framework.checkpoint.io.CheckpointWriter` whose writes run in the background; made by
    :meth:`AsyncCheckpointer.writer`. Same methods; ``finalize`` returns the checkpoint's path at once.
    """

    def __init__(self, owner: AsyncCheckpointer, writer: CheckpointWriter) -> None:
        self._owner, self._writer = owner, writer
        self._ops: list[Callable[[], Any]] = []
        self.staging = writer.staging

    @property
    def room(self) -> Callable[[], list[Path]] | None:
        """The writer's :attr:`~framework.checkpoint.io.CheckpointWriter.room` (used by its background writes)."""
        return self._writer.room

    @room.setter
    def room(self, room: Callable[[], list[Path]] | None) -> None:
        self._writer.room = room

    def prepare(self) -> None:
        """Now, on the calling thread (the caller's barrier follows it)."""
        self._writer.prepare()

    def json(self, filename: str, obj: Any) -> None:
        """Serialised now (a snapshot of ``obj``), written in the background."""
        self.json_bytes(filename, json.dumps(obj).encode())

    def json_bytes(self, filename: str, data: bytes) -> None:
        """Written in the background."""
        fileformat.check_file_name(filename)  # (a bad name fails here, not later in the background)
        self._ops.append(lambda: self._writer.json_bytes(filename, data))

    def tensors(self, filename: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Copied now into reused host buffers, written in the background."""
        fileformat.check_file_name(filename)
        for name, t in tensors.items():  # (what the background write would refuse fails here, at the call)
            if t.dtype not in fileformat.DTYPES:
                raise TypeError(f"cannot store tensor {name!r} of dtype {t.dtype} in a safetensors file")
        snapshot = {name: self._owner.pool.copy((filename, name), t) for name, t in tensors.items()}
        meta = dict(metadata) if metadata is not None else None
        self._ops.append(lambda: self._writer.tensors(filename, snapshot, meta))

    def external(self, filename: str) -> None:
        """Hashed in the background (the file must be complete before the write is submitted)."""
        fileformat.check_file_name(filename)
        self._ops.append(lambda: self._writer.external(filename))

    def commit(self) -> None:
        """Queued; on a process other than the main one this submits the write."""
        self._ops.append(self._writer.commit)
        if not self._writer.is_main:
            self._owner._submit(self._writer, self._ops)

    def abort(self, reason: str) -> None:
        """Now: record this rank's failure for the main process."""
        self._writer.abort(reason)

    def finalize(
        self,
        *,
        keep_last: int | None = None,
        keep_best: int = 0,
        mode: str = "min",
        monitor_value: float | None = None,
    ) -> Path:
        """Main process: submit the write, manifest, rename, ``latest`` and prune; returns the path it will have."""
        if not self._writer.is_main:
            raise RuntimeError("CheckpointWriter.finalize runs on the main process only")
        w = self._writer

        def finalize() -> Path:
            return publish(w, keep_last=keep_last, keep_best=keep_best, mode=mode, monitor_value=monitor_value)

        self._owner._submit(w, [*self._ops, finalize])
        return w.root / w.name


class AsyncCheckpointer:
    """Writes checkpoints in a background thread, one at a time (``Engine(checkpoint_async=True)``).

    Example:

        >>> from pathlib import Path
        >>> from framework.checkpoint import AsyncCheckpointer, publish
        >>> saver = AsyncCheckpointer()
        >>> w = saver.writer(Path("runs/x/checkpoints"), "step-00000001", rank=0, world_size=1, is_main=True)
        >>> w.prepare()  # as with CheckpointWriter
        >>> w.tensors("model.safetensors", nn.Linear(8, 3).state_dict())  # copied now, written in the background
        >>> w.commit()
        >>> publish(w, keep_last=3).name  # queued: the path the checkpoint will have
        'step-00000001'
        >>> saver.wait().as_posix()  # the path of the checkpoint just completed, or None
        'runs/x/checkpoints/step-00000001'
    """

    def __init__(self) -> None:
        self.pool = SnapshotPool()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._name = ""
        self._final: Path | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a write is still running.

        Example:

            >>> from framework.checkpoint import AsyncCheckpointer
            >>> saver = AsyncCheckpointer()
            >>> saver.in_flight  # (True between a publish() and the end of its background write)
            False
        """
        return self._thread is not None and self._thread.is_alive()

    def writer(
        self, root: Path, name: str, *, rank: int = 0, world_size: int = 1, is_main: bool = True, timeout: float = 600.0
    ) -> DeferredWriter:
        """A writer for checkpoint ``root/name``, after the previous write finished (its error raised here).

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import AsyncCheckpointer, CheckpointReader, publish
            >>> saver = AsyncCheckpointer()
            >>> for step in (1, 2):  # the second writer waits for the first write
            ...     w = saver.writer(Path("ckpt"), f"step-{step:08d}", rank=0, world_size=1, is_main=True)
            ...     w.prepare(); w.json("state.json", {"step": step}); w.commit()
            ...     path = publish(w)
            >>> CheckpointReader(saver.wait()).json("state.json")
            {'step': 2}
        """
        self.wait()  # (also: the pool's buffers are free again only once the previous write is done)
        return DeferredWriter(self, CheckpointWriter(root, name, rank=rank, world_size=world_size,
                                                     is_main=is_main, timeout=timeout))  # fmt: skip

    def _submit(self, writer: CheckpointWriter, ops: list[Callable[[], Any]]) -> None:
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is already in flight; get each writer from AsyncCheckpointer.writer")
        event = self.pool.end_round()

        def run() -> None:
            try:
                if event is not None:
                    event.synchronize()  # (the device-to-host copies have landed)
                for op in ops:
                    op()
            except BaseException as e:  # (handed to the training thread at its next wait)
                self._error = e
                writer.abort(f"{type(e).__name__}: {e}")

        self._name, self._final = writer.name, writer.root / writer.name
        self._thread = threading.Thread(target=run, name=f"checkpoint-{writer.name}", daemon=False)
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is done; returns that checkpoint's path (on the main
        process it is complete; on the others, their part is written), or None with none in flight.
        An error of that write is raised here. The engine waits before exiting on preemption, and at the end
        of a fit.

        Example:

            >>> from pathlib import Path
            >>> from framework.checkpoint import AsyncCheckpointer, publish
            >>> saver = AsyncCheckpointer()
            >>> print(saver.wait())  # nothing in flight
            None
            >>> w = saver.writer(Path("ckpt"), "step-00000001")
            >>> w.prepare(); w.json("state.json", {"step": 1}); w.commit()
            >>> _ = publish(w)
            >>> saver.wait().name
            'step-00000001'
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(
                f"the background write of checkpoint {self._name} failed ({type(error).__name__}: {error}); the "
                "previous checkpoint is intact"
            ) from error
        return self._final
