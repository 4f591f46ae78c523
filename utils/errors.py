"""One exception type for every problem a user can fix, and the wrapper that turns it into one line."""
from __future__ import annotations

import functools
import sys

import torch.distributed as dist


class PipelineError(Exception):
    """A problem with the user's input or environment; the message names the fix."""


def cli_entry(main):
    """Run a script's ``main``: user errors print one line and exit 2, Ctrl-C exits 130 quietly."""

    @functools.wraps(main)
    def wrapper(argv=None):
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
        except KeyboardInterrupt:
            print("\ninterrupted: finished samples are saved; run the same command again to resume.",
                  file=sys.stderr)
            sys.exit(130)

    return wrapper
