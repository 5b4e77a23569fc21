"""dymu.distributed in a real 2-process gloo group (finding's torchrun test covers a process holding nothing):
ragged tensor gathers, object gathers, sums and means, and the lmms-eval token record gathered from both
processes; without a group every helper is the identity."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dymu import distributed
from dymu.testing import run_workers


def _worker(rank: int, world: int, port: int, queue) -> None:
    from dymu.lmms_eval.token_record import TokenRecord

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = torch.arange(float((rank + 1) * (2 + rank))).view(rank + 1, 2 + rank)  # [1, 2] and [2, 3]
        gathered = [t.tolist() for t in distributed.all_gather_2d(mine)]
        record = TokenRecord({"t": {("test", rank): [10 + rank]}, **({"only1": {("test", 7): [3]}} if rank else {})})
        queue.put((rank, {
            "rank_and_world": distributed.rank_and_world(),
            "gathered": gathered,
            "objects": distributed.all_gather_objects({"rank": rank}),
            "sum": distributed.all_reduce_sum(rank + 1),
            "mean": distributed.all_reduce_mean(torch.tensor([float(rank), 2.0])).tolist(),
            "record": record.gathered().samples,
        }))
    finally:
        dist.destroy_process_group()


def test_helpers_in_a_two_process_group():
    results = run_workers(_worker, world=2)
    for rank in (0, 1):
        got = results[rank]
        assert got["rank_and_world"] == (rank, 2)
        assert got["gathered"] == [[[0.0, 1.0]], [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]  # each process's own shape
        assert got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["sum"] == 3 and got["mean"] == pytest.approx([0.5, 2.0])
        assert got["record"] == {"t": {("test", 0): [10], ("test", 1): [11]}, "only1": {("test", 7): [3]}}


def test_without_a_group_every_helper_is_the_identity():
    assert not dist.is_initialized()
    values = torch.tensor([[1.0, 2.0]])
    assert distributed.rank_and_world() == (0, 1) and not distributed.is_distributed()
    assert distributed.all_gather_2d(values)[0] is values and distributed.all_reduce_mean(values) is values
    assert distributed.all_gather_objects("x") == ["x"] and distributed.all_reduce_sum(4) == 4
