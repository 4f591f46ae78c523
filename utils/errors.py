"""One exception type for every problem a user can fix (the lowest module: it imports nothing of the
project; utils/cli.py turns these errors into one line for the user)."""
from __future__ import annotations

import errno
import os


class PipelineError(Exception):
    """A problem with the user's input or environment; the message names the fix."""


def os_error_message(err: OSError, where=None) -> PipelineError:
    """A one-line, actionable error for a file-system failure (full disk, no permission, not a folder)."""
    path = err.filename or where
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return PipelineError(f"no space left on the device while writing {path}; free some space and run the "
                             "same command again (finished samples are kept)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PipelineError(f"cannot write {path} ({os.strerror(err.errno)}); make the folder writable or "
                             "choose another --result_dir")
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return PipelineError(f"cannot create the result folder {where or path}: {path} or a folder above it is a "
                             "file, not a folder; choose another --result_dir")
    return PipelineError(f"{type(err).__name__} on {path}: {err.strerror or err}; check the path and run the "
                         "same command again")
