"""Schedules, running means (incl. 2 processes over gloo) and threshold checkpoints."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from dymu.testing import run_workers
from dymu.thresholds import (
    RunningThresholds,
    ThresholdCheckpoint,
    import_authors_pth,
    load_thresholds,
    merge_schedule,
    save_thresholds,
)


def test_schedules_hand_computed():
    assert merge_schedule("constant", 504, 24) == [21] * 24
    assert merge_schedule("constant", 10, 4) == [3, 3, 2, 2]
    assert merge_schedule("linear", 12, 4) == [6, 4, 2, 0]
    assert merge_schedule("reverse_linear", 12, 4) == [0, 2, 4, 6]
    assert merge_schedule("reverse-linear", 12, 4) == [0, 2, 4, 6]
    assert merge_schedule("linear", 10, 4) == [5, 3, 2, 0]
    # the authors' ramp (r0 = 2M // N, minus r0 / N per layer, truncated; the rest on the last non-zero layer)
    assert merge_schedule("linear", 504, 24) == [42, 40, 38, 36, 35, 33, 31, 29, 28, 26, 24, 22, 21, 19, 17, 15, 14, 12, 10, 8, 4, 0, 0, 0]
    assert merge_schedule("linear", 20, 4) == [10, 7, 3, 0]  # not 10, 6.67, 3.33 rounded
    assert merge_schedule("reverse_linear", 192, 24)[:3] == [0, 1, 2]
    # their loop never ends for 96 over 24 layers: proportional ramp instead
    assert merge_schedule("linear", 96, 24)[0] == 8 and sum(merge_schedule("linear", 96, 24)) == 96
    assert merge_schedule("linear", 7, 1) == [7]
    assert merge_schedule("constant", 0, 3) == [0, 0, 0]


@given(
    kind=st.sampled_from(["constant", "linear", "reverse_linear"]),
    r_total=st.integers(0, 2000),
    layers=st.integers(1, 40),
)
def test_schedules_sum_to_r_total(kind, r_total, layers):
    counts = merge_schedule(kind, r_total, layers)
    assert len(counts) == layers and sum(counts) == r_total and min(counts) >= 0
    if kind == "linear":
        assert counts == sorted(counts, reverse=True)
    if kind == "reverse_linear":
        assert counts == sorted(counts)


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        merge_schedule("cosine", 10, 4)
    with pytest.raises(ValueError, match="num_layers"):
        merge_schedule("constant", 10, 0)


def test_running_mean():
    rt = RunningThresholds(3)
    batches = [[0.5, 0.6, 0.7], [0.1, 0.2, 0.3], [0.9, 0.0, 0.2]]
    for b in batches:
        rt.update(b)
    torch.testing.assert_close(rt.mean, torch.tensor(batches, dtype=torch.float64).mean(0))
    # resume from a saved state gives the same mean as an uninterrupted run
    first = RunningThresholds(3)
    first.update(batches[0])
    resumed = RunningThresholds(3)
    resumed.load_state_dict(first.state_dict())
    for b in batches[1:]:
        resumed.update(b)
    torch.testing.assert_close(resumed.mean, rt.mean)
    assert resumed.batches == 3
    with pytest.raises(ValueError, match="NaN"):
        rt.update([0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match="expected 3"):
        rt.update([0.1, 0.2])


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = RunningThresholds(2)
    rt.update([0.2 + rank, 0.4])  # rank 0: 0.2, rank 1: 1.2 -> 0.7
    rt.update([0.0, 0.6 + rank])  # -> 0.0, 1.1
    queue.put((rank, rt.mean.tolist()))
    dist.destroy_process_group()


def test_running_mean_all_reduces_over_processes():
    results = run_workers(_worker, world=2, timeout=120)
    for rank in (0, 1):
        assert results[rank] == pytest.approx([0.35, 0.75])


def test_checkpoint_round_trip(tmp_path):
    ckpt = ThresholdCheckpoint(
        thresholds=torch.tensor([0.9, 0.8, math.inf]),
        encoder="ViT-L-14-336",
        schedule="linear",
        r_total=12,
        merge_counts=[8, 4, 0],
        images_seen=1234,
    )
    path = save_thresholds(tmp_path / "sub" / "t.safetensors", ckpt)
    back = load_thresholds(path, encoder="ViT-L-14-336", num_layers=3)
    assert torch.equal(back.thresholds, ckpt.thresholds)
    assert (back.encoder, back.schedule, back.r_total, back.merge_counts, back.images_seen) == (
        "ViT-L-14-336",
        "linear",
        12,
        [8, 4, 0],
        1234,
    )
    with pytest.raises(ValueError, match="not 'siglip"):
        load_thresholds(path, encoder="siglip-so400m-patch14-384")
    with pytest.raises(ValueError, match="3 layers but the model has 24"):
        load_thresholds(path, num_layers=24)
    with pytest.raises(FileNotFoundError):
        load_thresholds(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_thresholds(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        ThresholdCheckpoint(thresholds=torch.tensor([0.1, float("nan")]), encoder="x")


def test_import_authors_pth(tmp_path):
    values = [0.91, 0.87, 0.85, 0.5]
    state = {f"module.visual.transformer.resblocks.{i}.threshold": torch.tensor(v) for i, v in enumerate(values)}
    state["module.visual.proj"] = torch.randn(4, 4)  # other weights are ignored
    path = tmp_path / "ViT-L-14-336-tome-72out.pth"
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": state}, path)
    ckpt = import_authors_pth(path)
    assert ckpt.encoder == "ViT-L-14-336"
    torch.testing.assert_close(ckpt.thresholds, torch.tensor(values))
    assert load_thresholds(path, num_layers=4).thresholds.tolist() == ckpt.thresholds.tolist()
    # SigLIP keys, without the 'module.' prefix, in shuffled order
    siglip = {f"vision_model.encoder.layers.{i}.threshold": torch.tensor([v]) for i, v in reversed(list(enumerate(values)))}
    torch.save({"state_dict": siglip}, tmp_path / "s.pth")
    torch.testing.assert_close(import_authors_pth(tmp_path / "s.pth").thresholds, torch.tensor(values))
    torch.save({"state_dict": {"a.0.threshold": torch.tensor(0.1), "a.2.threshold": torch.tensor(0.2)}}, tmp_path / "gap.pth")
    with pytest.raises(ValueError, match="not numbered"):
        import_authors_pth(tmp_path / "gap.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "none.pth")
    with pytest.raises(ValueError, match="no keys ending"):
        import_authors_pth(tmp_path / "none.pth")
    with pytest.raises(ValueError, match="4 layers but the model has 24"):
        load_thresholds(path, num_layers=24)


def test_found_threshold_rounded_just_above_one_is_accepted():
    """Finding on identical tokens records their cosine, which float32 rounding can put just above 1."""
    from dymu.merge import select_top
    from dymu.thresholds import check_thresholds

    scores = torch.full((2, 5), 1.0 + 2 ** -23)  # the float32 just above 1, as a normalised dot product can give
    scores[:, 0] = 0.5
    _, found = select_top(scores, 2)  # 2 per image of 4 rounded ones: the highest unmerged is rounded too
    assert float(found) > 1.0
    assert float(check_thresholds(torch.tensor([float(found), 0.9]))[0]) == float(found)
    with pytest.raises(ValueError, match="layer 1"):
        check_thresholds(torch.tensor([0.5, 1.01]))
    with pytest.raises(ValueError, match="layer 0"):
        check_thresholds(torch.tensor([-1.01, 0.5]))
