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

Example::

    path = newest_complete(Path("runs/x/checkpoints"))
    prune(Path("runs/x/checkpoints"), keep_last=3, keep_best=1, mode="min")
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import files
from .errors import CheckpointError, CorruptCheckpointError
from .io import STAGING_PREFIX, TRASH_PREFIX, read_manifest, verify
from .manifest import MANIFEST, SUMS, Manifest

CHECKPOINT_RE = re.compile(r"^step-(\d{8,})$")
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
    """A ``step-*`` checkpoint directory (complete or not) and its step.

    Example::

        Found(Path("runs/x/checkpoints/step-00000120"), 120)
    """

    path: Path
    step: int


def list_checkpoints(root: Path) -> list[Found]:
    """Every ``step-*`` directory directly under ``root`` (complete or not; links are not
    checkpoints), oldest first.

    Example::

        [f.step for f in list_checkpoints(Path("runs/x/checkpoints"))]   # [40, 80, 120]
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

    Example::

        validate(Path("runs/x/checkpoints/step-00000120"))   # None, or "... has no manifest.json ..."
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


def load_newest(root: Path, load: Callable[[Path], None] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (``load(path)`` then applies it and may raise
    :class:`CorruptCheckpointError` for malformed content, leaving nothing applied); older ones are
    tried in turn. The ones skipped are named, with the one used, in ONE warning.

    Returns None where ``root`` holds no ``step-*`` dir at all; raises :class:`CheckpointError` where
    it holds some but none is usable (starting over on top of them would be a silent fresh start).
    ``load`` must verify what it reads (:class:`~framework.checkpoint_io.CheckpointReader` does); without
    it, each candidate is verified here.

    Example::

        path = load_newest(root, lambda p: load_engine(engine, fit, p))
    """
    skipped: list[str] = []
    for found in reversed(list_checkpoints(root)):
        try:
            (load or verify)(found.path)
        except CorruptCheckpointError as e:
            skipped.append(f"{found.path.name} ({e})")
            continue
        if skipped:
            warnings.warn(
                f"skipping checkpoint(s) under {root} that fail verification: {'; '.join(skipped)}. Using the older "
                f"{found.path.name} instead",
                stacklevel=2,
            )
        return found.path
    if skipped:
        raise CheckpointError(
            f"no checkpoint under {root} can be used: {'; '.join(skipped)}. resume='auto' will not start over on "
            "top of them. Fix: restore one from a backup, or move them away (or use a new run_dir) to start fresh"
        )
    return None


def newest_complete(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (sizes and SHA-256); see :func:`load_newest`.

    Example::

        newest_complete(Path("runs/x/checkpoints"))   # runs/x/checkpoints/step-00000120, or None
    """
    return load_newest(root)


def read_latest(root: Path) -> str | None:
    """The checkpoint name in ``root/latest`` (None without one); a :class:`CorruptCheckpointError`
    naming the file if it holds anything but one checkpoint name.

    ``resume="auto"`` does not trust it (it checks the ``step-*`` dirs themselves); it is the pointer
    for people and tools, rewritten atomically by every save.

    Example::

        read_latest(Path("runs/x/checkpoints"))   # "step-00000120"
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

    Example::

        write_latest(Path("runs/x/checkpoints"), "step-00000120")
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

    Example::

        prune(Path("runs/x/checkpoints"), keep_last=3, keep_best=1, mode="min", keep=[just_written])
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
    if keep_last is None:
        kept |= {f.path for f, _ in complete}
    elif keep_last > 0:
        kept |= {f.path for f, _ in complete[-keep_last:]}
    if keep_best > 0:
        sign = 1.0 if mode == "min" else -1.0
        scored = sorted((sign * m.monitor_value, f.step, f.path) for f, m in complete if m.monitor_value is not None)
        kept |= {p for _, _, p in scored[:keep_best]}
    doomed += [f.path for f, _ in complete if f.path not in kept]
    if incomplete:
        warnings.warn(
            f"removing incomplete checkpoint dir(s) under {root}, left by an interrupted save or prune: "
            + "; ".join(incomplete),
            stacklevel=2,
        )
    return _delete(root, doomed)


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


def abandon_newer(root: Path, step: int) -> list[Path]:
    """Move every ``step-*`` dir under ``root`` newer than ``step`` to ``root/abandoned/`` (``.2``, ``.3``,
    ... if a name is taken), so that a run resumed from ``step`` starts a clean branch: ``resume="auto"``
    can never pick the old timeline's later checkpoints, and pruning never mixes them in. ``latest`` is
    pointed back at ``step-{step}`` (or the newest remaining). Returns the new paths of what moved.

    Example::

        abandon_newer(Path("runs/x/checkpoints"), 4)   # [.../abandoned/step-00000008, .../abandoned/step-00000012]
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
