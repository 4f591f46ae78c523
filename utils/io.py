"""Crash-safe file writing, per-sample checkpoints, and the result folder's lock.

Every result file is written to a temporary file in the same folder and renamed into place, so a crash
or Ctrl-C never leaves a half-written file.  Long steps save each finished sample under
``<final file>.parts/`` and skip it when the same command is run again; every part carries the key
(fingerprint of the settings) it was computed with and is adopted only under that key.  A process that
writes into a result folder holds an advisory lock on ``<folder>/.lock`` so that a second process is
refused instead of mixing its files in.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import PipelineError, os_error_message


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None:
            # name the file being written (not the temporary one) in the message
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: json.dump(obj, f, indent=1), "w")


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


class _Recorded:
    """A file handle that remembers the OSError its write raised: torch.save turns it into a RuntimeError
    ("unexpected pos ...") that no longer says the disk was full."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        return self.handle.flush()


def _save_torch(obj: Any, handle) -> None:
    recorded = _Recorded(handle)
    try:
        torch.save(obj, recorded)
    except RuntimeError:
        if recorded.error is not None:
            raise recorded.error from None      # e.g. ENOSPC: one line naming the fix (utils/errors.py)
        raise


def write_torch(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: _save_torch(obj, f), "wb")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically; the format comes from the path's suffix.  A PDF carries no
    creation date, so the same figure gives the same bytes (the sweep records each file's sha256)."""
    fmt = Path(path).suffix.lstrip(".")
    metadata = {"CreationDate": None} if fmt == "pdf" else None
    _atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata),
                  "wb")


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


# errors a read would raise on a truncated or otherwise damaged file (torch.load raises several types)
DAMAGED = (EOFError, RuntimeError, ValueError, OSError, KeyError, TypeError, AttributeError, IndexError,
           json.JSONDecodeError, UnicodeDecodeError, __import__("pickle").UnpicklingError)


class SampleCheckpoint:
    """Per-sample results of one step, kept under ``<final>.parts/`` until the step finishes.

    ``key`` identifies what produced the parts (settings and inputs).  It is stored in ``key.txt`` and in
    every part: a folder left by a run with a different key is discarded, a part whose key differs (or
    that cannot be read, e.g. truncated by a full disk) is discarded with a note and recomputed.
    """

    def __init__(self, final_path: Path, key: str):
        self.dir = Path(str(final_path) + ".parts")
        self.key = key
        key_file = self.dir / "key.txt"
        if self.dir.exists():
            try:
                same = key_file.read_text() == key
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                parts = len(list(self.dir.glob("*.pt")))
                if parts:
                    note(f"discarding {parts} saved sample(s) in {self.dir} made with other settings")
                shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            write_text(key_file, key)

    def _path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.pt"

    def _read(self, index: int):
        """The part's value, or a reason it cannot be adopted."""
        try:
            blob = torch.load(self._path(index), weights_only=True)
        except DAMAGED as err:
            return None, f"damaged ({type(err).__name__})"
        if not isinstance(blob, dict) or "key" not in blob or "value" not in blob:
            return None, "not a part of this pipeline"
        if blob["key"] != self.key:
            return None, "made with other settings"
        return blob["value"], None

    def done(self, index: int) -> bool:
        """The part exists and is adoptable; a bad one is removed (with a note) so it is recomputed."""
        if not self._path(index).exists():
            return False
        _, problem = self._read(index)
        if problem is None:
            return True
        note(f"discarding saved sample {index} in {self.dir} ({problem}); recomputing it")
        self._path(index).unlink(missing_ok=True)
        return False

    def save(self, index: int, value: Any) -> None:
        write_torch(self._path(index), {"key": self.key, "value": value})

    def load(self, index: int) -> Any:
        value, problem = self._read(index)
        if problem is not None:
            # only possible if something changed the part after done() accepted it
            raise PipelineError(f"saved sample {index} in {self.dir} is {problem}; run the same command again "
                                "(it recomputes that sample)")
        return value

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the result folder's lock ---------------------------------------------------------------------------
LOCK_NAME = ".lock"
_HELD: dict = {}        # resolved folder -> open lock file (held until release_locks or process exit)


def lock_folder(root: Path) -> None:
    """Take the advisory lock of ``root`` (created if missing) for this process, or refuse at once.

    Re-entrant: a process that holds it (run_pipeline.py runs every step in one process) takes it again
    freely.  The OS drops an flock when its process ends, so a crash or SIGKILL leaves no stale lock."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        key = root.resolve()
        if key in _HELD:
            return
        # O_NOFOLLOW: a .lock that is a symbolic link must not lead the truncation below to another file
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = os.fdopen(fd, "r+")
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PipelineError(f"{root / LOCK_NAME} is a symbolic link, not this folder's lock file; remove it "
                                "(rm) and run the same command again") from None
        raise os_error_message(err, root) from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            handle.close()
            raise os_error_message(err, root) from None
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise PipelineError(f"result folder {root} is in use by {holder}; wait for it to finish (or stop it), "
                            "or use another --result_dir") from None
    holder = f"pid {os.getpid()} on {socket.gethostname()} ({shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:])})"
    handle.seek(0)
    handle.truncate()
    handle.write(holder + "\n")
    handle.flush()
    _HELD[key] = handle


def release_locks() -> None:
    """Release every folder lock this process holds (at the end of a command)."""
    while _HELD:
        _, handle = _HELD.popitem()
        handle.close()      # closing the last descriptor drops the flock

