"""Several processes (``torchrun --nproc_per_node N script.py ...``): each takes every N-th sample.

A process saves each finished sample into the step's checkpoint folder (``utils/io.SampleCheckpoint``),
waits for the others, and the first process assembles the final files from all the parts, so the files
are the same, sample for sample, as a one-process run's.  Without torchrun nothing changes.  On a machine
with GPUs each process takes its own (``LOCAL_RANK``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PipelineError
from .io import SampleCheckpoint, lock_folder

# ranks that finish their shard early wait at a barrier for the slowest: allow a long step
_BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


_SHARD: Shard | None = None


def current_shard() -> Shard:
    """This process's shard; joins the torchrun group the first time (gloo: it only synchronises)."""
    global _SHARD
    if _SHARD is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=_BARRIER_TIMEOUT)
            _SHARD = Shard(dist.get_rank(), dist.get_world_size())
        else:
            _SHARD = Shard()
    return _SHARD


def shard_device(device: torch.device) -> torch.device:
    """Under torchrun on GPUs, process k uses GPU ``LOCAL_RANK`` instead of the one asked for."""
    if device.type == "cuda" and current_shard().world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def lock_result_dir(root) -> None:
    """Take the result folder's lock (utils/io.lock_folder) for this job: under torchrun only the first
    process holds it (every process of one job writes into the folder), and if it is refused, every
    process of the job stops with the same message."""
    shard = current_shard()
    if shard.world == 1:
        lock_folder(root)
        return
    box = [None]
    if shard.is_main:
        try:
            lock_folder(root)
        except PipelineError as err:
            box = [str(err)]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise PipelineError(box[0])


def open_checkpoint(final_path, key: str) -> SampleCheckpoint:
    """The step's checkpoint, opened by the first process before the others (it may clear stale parts)."""
    shard = current_shard()
    ckpt = SampleCheckpoint(final_path, key) if shard.is_main else None
    shard.barrier()
    return ckpt or SampleCheckpoint(final_path, key)


def map_samples(ckpt: SampleCheckpoint, count: int, compute, skipped=None, group: int | None = None):
    """``compute(i)`` for each sample this process owns that ``ckpt`` lacks, each saved as it finishes.

    Returns, in the first process once every process is done, all ``count`` results in order; None in
    the others.  ``skipped(i)`` is called for samples already finished (progress bars).  With a ``group``
    size, ``compute`` takes a list of up to ``group`` sample indices and returns their results in order
    (samples computed together, e.g. decoded in one batch); each is still saved on its own."""
    shard = current_shard()
    todo = []
    for i in range(count):
        if not shard.owns(i):
            continue
        if ckpt.done(i):
            if skipped is not None:
                skipped(i)
            continue
        todo.append(i)
    compute_part = compute if group is not None else (lambda part: [compute(part[0])])
    size = group or 1
    fresh = {}
    for s in range(0, len(todo), size):
        part = todo[s:s + size]
        for i, result in zip(part, compute_part(part), strict=True):
            fresh[i] = result
            ckpt.save(i, result)
    shard.barrier()
    if not shard.is_main:
        return None
    return [fresh[i] if i in fresh else ckpt.load(i) for i in range(count)]
