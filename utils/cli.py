"""The wrapper every script's ``main`` runs in: a user's error is one line and exit 2, not a traceback."""
from __future__ import annotations

import functools
import sys

import torch.distributed as dist

from .errors import PipelineError, os_error_message
from .io import release_locks

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
                release_locks()

    return wrapper
