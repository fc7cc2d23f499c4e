"""A checkpoint's ``manifest.json`` and ``SHA256SUMS``: what the checkpoint holds, and how to check it.

``manifest.json`` (format 2) is written last, after every other file of the checkpoint is on
disk::

    {
      "format": 2,
      "files": {
        "model.safetensors": {"size": 402653384, "sha256": "9f86d08..."},
        "state.json":        {"size": 5321,      "sha256": "e3b0c44..."},
        ...
      },
      "monitor_value": 0.4132
    }

``files`` lists every file of the checkpoint except the manifest itself and ``SHA256SUMS``:
its size in bytes and the SHA-256 of its contents (lowercase hex). A file name is one path
component of letters, digits, ``.``, ``_`` and ``-`` (never ``.``/``..``, never a ``/``).
``monitor_value`` is the value of ``Engine(monitor=...)`` that ranks the checkpoint for
``keep_best`` (``null`` when it has none, e.g. a mid-epoch checkpoint, or a non-finite value).
Unknown keys are errors (a newer format bumps ``format``).

``SHA256SUMS`` holds the same hashes, and the manifest's own, in the format of coreutils'
``sha256sum``, so any machine can check a checkpoint without this framework::

    cd runs/x/checkpoints/step-00000120 && sha256sum -c SHA256SUMS

Example::

    m = decode(data, where=ckpt / "manifest.json")
    m.files["model.safetensors"].sha256
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from .errors import CheckpointError, CorruptCheckpointError
from .schema import Float, Int, Keys, MapOf, Maybe, Str, expect

FORMAT = 2
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
MAX_MANIFEST_BYTES = 64 << 20  # (a manifest of a million files is ~100 MB; ours are a few KB)
FILE_NAME = r"(?!\.\.?$)[A-Za-z0-9._-]{1,200}"  # one path component, never . or ..
SHA256 = r"[0-9a-f]{64}"
RECORD_PREFIX = ".writer-rank"  # (the writer's per-rank records: never part of a checkpoint)
RESERVED = (MANIFEST, SUMS)

_ENTRY = Keys({"size": Int(min=0), "sha256": Str(pattern=SHA256)})
_SCHEMA = Keys(
    {
        "format": Int(FORMAT, FORMAT),
        "files": MapOf(_ENTRY, key=Str(pattern=FILE_NAME)),
        "monitor_value": Maybe(Float()),  # (finite: NaN never ranks as best)
    }
)


@dataclass(frozen=True)
class Entry:
    """One file of a checkpoint: its size in bytes and SHA-256 (hex).

    Example::

        Entry(size=4, sha256=hashlib.sha256(b"data").hexdigest())
    """

    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``.

    Example::

        Manifest(files={"state.json": Entry(2, "...")}, monitor_value=None)
    """

    files: dict[str, Entry]
    monitor_value: float | None


def check_file_name(name: str) -> None:
    """Raise ValueError unless ``name`` may be a file of a checkpoint (one safe path component, not reserved).

    Example::

        check_file_name("rng-rank0.json")   # fine; "../x", "a/b", "manifest.json" raise
    """
    if not isinstance(name, str) or not re.fullmatch(FILE_NAME, name):
        raise ValueError(
            f"{name!r} cannot be a checkpoint file name: use one path component of letters, digits, '.', '_' "
            "and '-' (no '/', not '.' or '..')"
        )
    if name in RESERVED or name.startswith(RECORD_PREFIX):
        raise ValueError(f"{name!r} is reserved for the checkpoint writer itself; choose another file name")


def finite_or_none(value: float | None) -> float | None:
    """A monitored value as the manifest keeps it: a finite float, or None (NaN/inf never rank as best).

    Example::

        finite_or_none(float("nan"))   # None
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def encode(manifest: Manifest) -> bytes:
    """The bytes of ``manifest.json`` (keys sorted, one file per line: easy to read and to diff).

    Example::

        data = encode(Manifest({"state.json": Entry(2, sha)}, 0.41))
    """
    files = {name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(manifest.files.items())}
    body = {"format": FORMAT, "files": files, "monitor_value": finite_or_none(manifest.monitor_value)}
    return (json.dumps(body, indent=1, allow_nan=False) + "\n").encode()


def decode(data: bytes, where: object) -> Manifest:
    """Parse and check ``manifest.json``; a :class:`CorruptCheckpointError` naming ``where`` and the key
    for anything malformed, a :class:`CheckpointError` for another format.

    Example::

        manifest = decode((ckpt / "manifest.json").read_bytes(), where=ckpt / "manifest.json")
    """
    hint = "the checkpoint is damaged or was edited; resume from another checkpoint"
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise CorruptCheckpointError(f"{where} is not valid JSON ({type(e).__name__}: {e}); {hint}") from None
    if isinstance(obj, dict) and obj.get("format") != FORMAT and type(obj.get("format")) is int:
        old = obj["format"]
        what = "an earlier framework version (sizes only, no SHA-256)" if old == 1 else "a newer framework version"
        raise CheckpointError(
            f"{where} has format {old}, written by {what}; this version reads format {FORMAT} only. "
            "Load it with the framework version that wrote it, or start a new run"
        )
    expect(obj, _SCHEMA, where=where, hint=hint)
    files = {name: Entry(e["size"], e["sha256"]) for name, e in obj["files"].items()}
    for name in files:
        if name in RESERVED or name.startswith(RECORD_PREFIX):
            raise CorruptCheckpointError(f"{where}: files[{name!r}]: a reserved name cannot be listed; {hint}")
    value = obj["monitor_value"]
    return Manifest(files, None if value is None else float(value))


def encode_sums(files: dict[str, Entry], manifest_bytes: bytes) -> bytes:
    """``SHA256SUMS``: one ``<sha256>  <name>`` line per file and for ``manifest.json`` (``sha256sum -c`` reads it).

    Example::

        data = encode_sums(manifest.files, encode(manifest))
    """
    lines = [f"{e.sha256}  {name}\n" for name, e in sorted(files.items())]
    lines.append(f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n")
    return "".join(lines).encode()


def check_sums(data: bytes, files: dict[str, Entry], manifest_bytes: bytes, where: object) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``where`` unless ``SHA256SUMS`` says exactly what the
    manifest says (and hashes the manifest as it is).

    Example::

        check_sums(sums_bytes, manifest.files, manifest_bytes, where=ckpt / "SHA256SUMS")
    """
    if data != encode_sums(files, manifest_bytes):
        hint = "the checkpoint is damaged or was edited; resume from another checkpoint"
        listed: dict[str, str] = {}
        try:
            for line in data.decode().splitlines():
                digest, name = line.split("  ", 1)
                listed[name] = digest
        except (UnicodeDecodeError, ValueError):
            raise CorruptCheckpointError(f"{where} is not a sha256sum list; {hint}") from None
        if listed.get(MANIFEST) != hashlib.sha256(manifest_bytes).hexdigest():
            raise CorruptCheckpointError(f"{where}: {MANIFEST} does not match its SHA-256 here; {hint}")
        raise CorruptCheckpointError(f"{where} does not list the same files and hashes as {MANIFEST}; {hint}")
