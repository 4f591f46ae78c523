"""Crash-safe file writing and per-sample checkpoints.

Every result file is written to a temporary file in the same folder and renamed into place, so a crash
or Ctrl-C never leaves a half-written file.  Long steps save each finished sample under
``<final file>.parts/`` and skip it when the same command is run again.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: json.dump(obj, f, indent=1), "w")


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def write_torch(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically; the format comes from the path's suffix."""
    fmt = Path(path).suffix.lstrip(".")
    _atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=150, bbox_inches="tight"), "wb")


class SampleCheckpoint:
    """Per-sample results of one step, kept under ``<final>.parts/`` until the step finishes.

    ``key`` identifies what produced the parts (settings and inputs); parts left by a run with a
    different key are discarded rather than mixed in.
    """

    def __init__(self, final_path: Path, key: str):
        self.dir = Path(str(final_path) + ".parts")
        self.key = key
        key_file = self.dir / "key.txt"
        if self.dir.exists() and (not key_file.exists() or key_file.read_text() != key):
            shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            write_text(key_file, key)

    def _path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.pt"

    def done(self, index: int) -> bool:
        return self._path(index).exists()

    def save(self, index: int, value: Any) -> None:
        write_torch(self._path(index), value)

    def load(self, index: int) -> Any:
        return torch.load(self._path(index), weights_only=False)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
