"""DToMe inside the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (tiny random towers, weights std 0.3)."""

from __future__ import annotations

import pytest
import torch

import dymu
from dymu.encoders.qwen_vl import keep_fraction_merge_counts, patchify
from dymu.samples import make_image
from dymu.testing import tiny_qwen_vision_tower
from dymu.thresholds import ROUNDING

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
MIXED = [(4, 6), (8, 8), (6, 10), (12, 4)]  # (h, w) in patches: 6, 16, 15, 12 cells


@pytest.fixture(scope="module", params=FAMILIES)
def tower(request):
    return tiny_qwen_vision_tower(request.param)


def pixels(kind: str, h: int, w: int, patch: int, seed: int = 0) -> torch.Tensor:
    """[1, 3, h*patch, w*patch] normalised pixels of a sample image (flat, textured, stripes …)."""
    import numpy as np

    img = make_image(kind, 64, seed=seed).resize((w * patch, h * patch))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - 0.5) / 0.25)[None]


def inputs(tower, sizes, kinds=None, seed=0):
    """Flat patches and grid_thw of a batch of images of ``sizes`` (h, w in patches)."""
    p = tower.config.patch_size
    kinds = kinds or ["textured"] * len(sizes)
    parts = [patchify(pixels(k, h, w, p, seed + i), p, 2, 2) for i, (k, (h, w)) in enumerate(zip(kinds, sizes))]
    return torch.cat([f for f, _ in parts]), torch.cat([g for _, g in parts])


def found_thresholds(tower, keep: float, seed: int = 100) -> list[float]:
    """Thresholds found (finding mode, constant schedule) on 4 textured 8x8-patch images of another seed."""
    depth = len(tower.blocks)
    x, grid = inputs(tower, [(8, 8)] * 4, seed=seed)
    dymu.patch(tower, merge_counts=keep_fraction_merge_counts(16, keep, depth))
    try:
        with torch.no_grad():
            tower(x, grid_thw=grid)
        return list(dymu.get_state(tower).run.found_thresholds)
    finally:
        dymu.unpatch(tower)


def run(tower, x, grid, thresholds):
    dymu.patch(tower, thresholds=thresholds)
    try:
        with torch.no_grad():
            out = tower(x, grid_thw=grid)
        return out, dymu.get_state(tower).images
    finally:
        dymu.unpatch(tower)


@pytest.mark.parametrize("sizes", [[(4, 6)], [(8, 8)], MIXED])
def test_merging_off_is_the_stock_tower(tower, sizes):
    x, grid = inputs(tower, sizes)
    with torch.no_grad():
        ref = tower(x, grid_thw=grid)
    out, images = run(tower, x, grid, [1.0] * len(tower.blocks))
    assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
    for a, b in zip(getattr(out, "deepstack_features", []), getattr(ref, "deepstack_features", [])):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert [len(m.features) for m in images] == [h * w // 4 for h, w in sizes]
    assert type(tower).__name__ in ("Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",
                                    "Qwen3VLVisionModel")  # unpatched again


def stock_last_block(tower, x, grid):
    """The stock tower's inputs of its last block (hidden, cu_seqlens, cos/sin) and the outputs of every block."""
    seen, outputs = {}, {}
    last = tower.blocks[-1]

    def pre(_module, args, kwargs):
        seen.update(hidden=args[0], **kwargs)

    hooks = [last.register_forward_pre_hook(pre, with_kwargs=True)]
    for i, blk in enumerate(tower.blocks):
        hooks.append(blk.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out)))
    try:
        with torch.no_grad():
            tower(x, grid_thw=grid)
    finally:
        for h in hooks:
            h.remove()
    return seen, outputs


def packed_cells(tower, grid):
    """Each packed unit's cell (index into the images' concatenated merged grids) and, on Qwen2.5-VL, its window."""
    from transformers.vision_utils import get_vision_window_index

    cells = int((grid.prod(-1) // 4).sum())
    if not hasattr(tower, "window_size"):
        return torch.arange(cells), None
    window_index, bounds = get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)
    window_of_packed = torch.searchsorted(bounds[1:].long() // 4, torch.arange(cells), right=True)
    return window_index, torch.empty(cells, dtype=torch.long).scatter_(0, window_index, window_of_packed)


def group_mean(units: torch.Tensor, source_map: torch.Tensor, k: int) -> torch.Tensor:
    sums = units.new_zeros(k, units.shape[1]).index_add_(0, source_map, units)
    return sums / torch.bincount(source_map, minlength=k)[:, None]


def test_merge_at_the_last_block_averages_whole_units_position_wise(tower):
    """Merging only at the last block: each output token = merger(MLP block of the position-wise mean of its
    group's 4-token units), with the stock tower's hidden states; groups lie inside one image (and one window)."""
    depth = len(tower.blocks)
    x, grid = inputs(tower, MIXED, seed=7)
    t = found_thresholds(tower, keep=0.5)[-1]
    _, images = run(tower, x, grid, [1.0] * (depth - 1) + [t])
    counts = [len(m.features) for m in images]
    cells = [h * w // 4 for h, w in MIXED]
    assert sum(counts) < sum(cells) and all(c > 0 for c in counts)  # some merges, never a whole image
    seen, outputs = stock_last_block(tower, x, grid)
    blk = tower.blocks[-1]
    with torch.no_grad():
        h = seen["hidden"] + blk.attn(blk.norm1(seen["hidden"]), cu_seqlens=seen["cu_seqlens"],
                                      position_embeddings=seen["position_embeddings"])
    order, window = packed_cells(tower, grid)
    C = h.shape[1]
    by_cell = torch.empty(len(order), 4 * C).index_copy_(0, order, h.reshape(-1, 4 * C))
    deep = [torch.empty(len(order), 4 * C).index_copy_(0, order, outputs[i].reshape(-1, 4 * C))
            for i in getattr(tower, "deepstack_visual_indexes", [])]
    start = 0
    for image, n in zip(images, cells):
        sm = image.source_map
        assert torch.equal(image.sizes, torch.bincount(sm).float())
        if window is not None:  # a group never spans two windows
            w = window[start:start + n]
            assert all(len(set(w[sm == k].tolist())) == 1 for k in range(len(image.features)))
        g = group_mean(by_cell[start:start + n], sm, len(image.features)).reshape(-1, C)
        with torch.no_grad():
            expected = tower.merger(g + blk.mlp(blk.norm2(g)))
            assert torch.allclose(image.features, expected, atol=1e-4, rtol=1e-4)
            for j, merger in enumerate(getattr(tower, "deepstack_merger_list", [])):
                groups = group_mean(deep[j][start:start + n], sm, len(image.features))
                assert torch.allclose(image.deepstack[j], merger(groups.reshape(-1, C)), atol=1e-4, rtol=1e-4)
        start += n


def test_batch_of_mixed_sizes_equals_each_image_alone(tower):
    thresholds = found_thresholds(tower, keep=0.4)
    x, grid = inputs(tower, MIXED, seed=3)
    out, images = run(tower, x, grid, thresholds)
    assert sum(len(m.features) for m in images) < int((grid.prod(-1) // 4).sum())  # it merged
    patches = (grid.prod(-1)).tolist()
    for i, (xi, image) in enumerate(zip(x.split(patches), images)):
        _, (alone,) = run(tower, xi, grid[i:i + 1], thresholds)
        assert torch.equal(alone.source_map, image.source_map)
        assert torch.allclose(alone.features, image.features, atol=1e-4, rtol=1e-5)  # outputs are ~20
        for a, b in zip(alone.deepstack, image.deepstack):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.pooler_output, torch.cat([m.features for m in images]))


def test_merged_counts_follow_image_content(tower):
    """Thresholds found on textured images (another seed): a flat image keeps far fewer tokens than a textured
    one of the same size (on Qwen2.5-VL at least one per window is left: 4 here)."""
    thresholds = found_thresholds(tower, keep=0.5)
    x, grid = inputs(tower, [(8, 8), (8, 8)], kinds=["flat", "textured"], seed=11)
    _, images = run(tower, x, grid, thresholds)
    flat, textured = (len(m.features) for m in images)
    assert flat <= textured / 2


def test_video_frames_merge_separately(tower):
    """A 2-frame video (4 temporal patches): merging off is stock; merged, no token covers cells of both frames."""
    p = tower.config.patch_size
    frames = torch.cat([pixels("textured", 8, 8, p, seed=s) for s in (1, 1, 2, 2)])  # t = 4 / temporal patch 2
    g = frames.reshape(2, 2, 3, 4, 2, p, 4, 2, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # processor's video order
    x, grid = g.reshape(2 * 64, -1), torch.tensor([[2, 8, 8]])
    with torch.no_grad():
        ref = tower(x, grid_thw=grid)
    out, _ = run(tower, x, grid, [1.0] * len(tower.blocks))
    assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    _, (video,) = run(tower, x, grid, found_thresholds(tower, keep=0.4))
    first, second = video.source_map[:16], video.source_map[16:]
    assert len(video.features) < 32 and not set(first.tolist()) & set(second.tolist())


def test_bad_input_is_refused_before_work(tower):
    x, grid = inputs(tower, [(4, 6)])
    dymu.patch(tower, thresholds=[1.0] * len(tower.blocks))
    try:
        with pytest.raises(ValueError, match="multiple of spatial_merge_size=2"):
            tower(x, grid_thw=torch.tensor([[1, 3, 8]]))
        with pytest.raises(ValueError, match="output_hidden_states is not supported"):
            tower(x, grid_thw=grid, output_hidden_states=True)
        with pytest.raises(ValueError, match="multiples of patch_size"):
            dymu.get_state(tower).forward(torch.zeros(1, 3, 30, 30))
    finally:
        dymu.unpatch(tower)


def test_block_after_a_merge_is_proportional_attention_at_the_centroids(tower):
    """Merging only at the second-to-last block, the last block equals the definition: plain attention over each
    image's merged units (full attention on every family's last block here), keys biased by log(size), each token at
    the centroid of the (h, w) positions it covers (recomputed from the source map), stock rotary and weights."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_position_ids

    depth = len(tower.blocks)
    thresholds = [1.0] * depth
    thresholds[-2] = found_thresholds(tower, keep=0.5)[-2]
    x, grid = inputs(tower, MIXED, seed=5)
    _, images = run(tower, x, grid, thresholds)
    seen = {}
    hook = tower.blocks[-2].register_forward_pre_hook(lambda _m, a, k: seen.update(hidden=a[0], **k), with_kwargs=True)
    try:
        with torch.no_grad():
            tower(x, grid_thw=grid)
    finally:
        hook.remove()
    blk, last = tower.blocks[-2], tower.blocks[-1]
    order, _ = packed_cells(tower, grid)
    positions = get_vision_position_ids(grid, 2).reshape(-1, 8).float()  # per cell, 4 tokens x (h, w)
    with torch.no_grad():
        h = seen["hidden"] + blk.attn(blk.norm1(seen["hidden"]), cu_seqlens=seen["cu_seqlens"],
                                      position_embeddings=seen["position_embeddings"])
        C = h.shape[1]
        by_cell = torch.empty(len(order), 4 * C).index_copy_(0, order, h.reshape(-1, 4 * C))
        start, merged_somewhere = 0, False
        for image, n in zip(images, (grid.prod(-1) // 4).tolist()):
            sm, k = image.source_map, len(image.features)
            merged_somewhere |= k < n
            g = group_mean(by_cell[start:start + n], sm, k).reshape(-1, C)
            g = g + blk.mlp(blk.norm2(g))
            pos = group_mean(positions[start:start + n], sm, k).reshape(-1, 2)
            cos, sin = tower.rotary_pos_emb(g, pos)
            q, key, v = last.attn.qkv(last.norm1(g)).reshape(4 * k, 3, 2, -1).unbind(1)
            q, key = apply_rotary_pos_emb_vision(q, key, cos, sin)
            logits = torch.einsum("ihd,jhd->hij", q, key) * last.attn.scaling
            logits = logits + torch.log(image.sizes).repeat_interleave(4)[None, None, :]
            a = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v).reshape(4 * k, C)
            y = g + last.attn.proj(a)
            y = y + last.mlp(last.norm2(y))
            assert torch.allclose(image.features, tower.merger(y), atol=1e-4, rtol=1e-4)
            start += n
    assert merged_somewhere


def test_thresholds_found_on_an_image_list_reach_about_the_target(tmp_path):
    """The library's finding API (``dymu thresholds``' engine) on an image list, ``-tome-50pct`` naming: per frame
    50% of the cells at the finding size; on other images of that size the kept share comes out near it."""
    import json

    from dymu.data import SquashResize, read_image_list
    from dymu.finding import find_thresholds

    tower = tiny_qwen_vision_tower("qwen2_5_vl")
    names = []
    for i, kind in enumerate(["textured", "stripes", "gradient", "textured", "flat", "stripes"] * 2):
        make_image(kind, 64, seed=i).save(tmp_path / f"{i}.png")
        names.append({"image": f"{i}.png"})
    (tmp_path / "list.json").write_text(json.dumps(names))
    side = 8 * tower.config.patch_size  # 8x8 patches = 16 cells
    counts = keep_fraction_merge_counts(16, 0.5, len(tower.blocks))
    result = find_thresholds(tower, read_image_list(tmp_path / "list.json", tmp_path), SquashResize(side, (0.5,) * 3,
                             (0.25,) * 3), merge_counts=counts, batch_size=4, progress=False,
                             output=tmp_path / "qwen2_5_vl-p14-d32-l4-tome-50pct.safetensors")
    assert result.finished and result.checkpoint.encoder == "qwen2_5_vl-p14-d32-l4" and sum(counts) == 8
    dymu.patch(tower, thresholds=tmp_path / "qwen2_5_vl-p14-d32-l4-tome-50pct.safetensors")
    try:
        x, grid = inputs(tower, [(8, 8)] * 6, kinds=["textured", "stripes", "gradient"] * 2, seed=50)
        with torch.no_grad():
            tower(x, grid_thw=grid)
        kept = sum(len(m.features) for m in dymu.get_state(tower).images) / (6 * 16)
    finally:
        dymu.unpatch(tower)
    assert 0.25 < kept < 0.8


def test_fixed_count_tome_merges_r_units_per_frame(tower):
    """The fixed-count baseline (``mode="fixed"``): every image loses exactly sum(r) cells, whatever its content and
    size (on Qwen2.5-VL a frame's r best over its windows, some of which hold one unit)."""
    x, grid = inputs(tower, [(4, 6), (8, 8), (12, 4)], kinds=["flat", "textured", "stripes"])
    dymu.patch(tower, merge_counts=[1, 2, 0, 1], mode="fixed")
    try:
        with torch.no_grad():
            tower(x, grid_thw=grid)
        kept = [len(m.features) for m in dymu.get_state(tower).images]
    finally:
        dymu.unpatch(tower)
    assert kept == [6 - 4, 16 - 4, 12 - 4]


def test_thresholds_found_on_flat_images_are_usable(tower):
    """Identical units score 1 + rounding: a found threshold may lie that little past 1 (thresholds.ROUNDING), which
    the threshold check accepts and which merges nothing at inference, as 1 does."""
    x, grid = inputs(tower, [(8, 8)] * 4, kinds=["flat", "textured"] * 2)
    dymu.patch(tower, merge_counts=keep_fraction_merge_counts(16, 0.5, len(tower.blocks)))
    try:
        with torch.no_grad():
            tower(x, grid_thw=grid)
        found = dymu.get_state(tower).run.found_thresholds
        assert all(0 <= t <= 1 + ROUNDING for t in found)
        dymu.configure(tower, thresholds=found)
    finally:
        dymu.unpatch(tower)
