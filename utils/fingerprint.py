"""Content fingerprints (METHOD §9): the sha256 of a file's bytes, which every artefact records for the files
it was made from and every reader compares.

Hashing costs about a second per GB.  A file's hash is remembered, in this process and (for model weights,
which are large and read by every step) in a small JSON file in the model cache, under the file's identity:
its resolved path, size, modification time, inode and *change* time.  Writing, replacing or truncating a file
changes its ctime, which no user call can set back, so a remembered hash is never taken for a changed file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .io import read_json, write_json

_BLOCK = 1 << 22
_SEEN: dict = {}          # (path, identity) -> sha256, for this process
PERSIST_LIMIT = 512       # entries kept in a persistent cache file (the oldest go first)


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def hash_file(path: Path) -> str:
    """The sha256 of ``path``'s bytes, always read (no remembered value)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path, persist: Path | None = None) -> str:
    """The sha256 of ``path``'s content, remembered under the file's identity (see the module); with
    ``persist``, also across processes in that JSON file (best effort: an unreadable or unwritable cache
    only costs the hashing)."""
    real = os.path.realpath(path)
    ident = _identity(Path(real))
    key = (real, ident)
    if key in _SEEN:
        return _SEEN[key]
    stored = _read_cache(persist).get(real) if persist else None
    if stored and stored.get("identity") == list(ident):
        _SEEN[key] = stored["sha256"]
        return stored["sha256"]
    digest = hash_file(Path(real))
    if _identity(Path(real)) == ident:      # not remembered if the file changed while it was read
        _SEEN[key] = digest
        if persist:
            _remember(persist, real, ident, digest)
    return digest


def _read_cache(persist: Path) -> dict:
    try:
        data = read_json(persist)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _remember(persist: Path, real: str, ident: tuple, digest: str) -> None:
    cache = {p: e for p, e in _read_cache(persist).items() if os.path.exists(p) and p != real}
    cache[real] = {"identity": list(ident), "sha256": digest}
    try:
        write_json(persist, dict(list(cache.items())[-PERSIST_LIMIT:]))
    except OSError:
        pass                                 # a read-only or full cache: the next process hashes again


def combined_sha256(named: dict) -> str:
    """One sha256 for several files: of the sorted ``{name: sha256}`` pairs (names relative, so the same
    content elsewhere gives the same fingerprint)."""
    return hashlib.sha256(json.dumps(sorted(named.items())).encode()).hexdigest()
