"""How many CPU threads dymu's own small ops run on (DToMe's merge bookkeeping, VTU's attention kernels).

DyMU replaces a few large ops of the stock model by many small ones: per encoder block the matching, the
re-layout and the size-weighted merge; per decoder layer VTU's gathers, rotations and blocked attention. With
several threads each of those ops is an OpenMP parallel region that waits for all its threads at the end. On a
busy machine a thread that is not scheduled stalls the region for a scheduler time slice, so a small op that
takes 0.3 ms on one thread can take several ms on two, and DyMU, with ~10x the stock model's op count, lost to
full tokens (docs/performance.md, "Threads"). So dymu runs them on :data:`SMALL_OP_THREADS` threads on the CPU;
the model's own large ops (projections, MLP, stock attention) keep torch's setting. Each of these ops works on
a small, cache-sized block, so little is lost on a quiet machine; on a quiet many-core machine with a large
decoder, ``dymu.threads.SMALL_OP_THREADS = None`` gives VTU's prefill all of torch's threads again.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Threads for dymu's small ops on the CPU; ``None`` leaves torch's setting (``torch.set_num_threads``) alone.
SMALL_OP_THREADS: int | None = 1


@contextlib.contextmanager
def small_ops(device: torch.device) -> Iterator[None]:
    """Run the block on at most :data:`SMALL_OP_THREADS` torch threads when ``device`` is the CPU."""
    limit = SMALL_OP_THREADS
    saved = torch.get_num_threads()
    if limit is None or device.type != "cpu" or saved <= limit:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
