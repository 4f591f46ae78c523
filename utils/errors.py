"""One exception type for every problem a user can fix, and the wrapper that turns it into one line."""
from __future__ import annotations

import errno
import functools
import os
import sys

import torch.distributed as dist


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


_DEPTH = 0   # nesting of cli_entry calls (run_pipeline.py calls every step's main)


def cli_entry(main):
    """Run a script's ``main``: user errors and file-system failures print one line and exit 2, Ctrl-C
    exits 130 quietly.  Result-folder locks taken during the command are released when the outermost
    command ends (the OS releases them anyway if the process dies)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        global _DEPTH
        _DEPTH += 1
        try:
            result = main(argv)
            # under torchrun the first process writes the step's files after the others are done: hold
            # everyone here until it has, so a next step in the same process (run_pipeline.py) finds them
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            return result
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except OSError as err:
            print(f"error: {os_error_message(err)}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted: finished samples are saved; run the same command again to resume.",
                  file=sys.stderr)
            sys.exit(130)
        finally:
            _DEPTH -= 1
            if _DEPTH == 0:
                from .io import release_locks  # io imports this module
                release_locks()

    return wrapper
