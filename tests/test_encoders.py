"""DToMe encoder adapters (transformers CLIP/SigLIP, open_clip ViT, open_clip SigLIP via timm), dymu.encode,
token budgets, DyMU names and threshold checkpoints.

Every family is a tiny random model saved to disk and loaded back through dymu's loading code, weights drawn
with std 0.3.
"""

from __future__ import annotations

import pytest
import torch

import dymu
from dymu.encoders import base as encoders_base
from dymu.encoders.encoding import mean_tokens
from dymu.encoders.names import base_encoder, canonical_identity, dymu_name, is_dymu_name, parse_dymu_name
from dymu.thresholds import ThresholdCheckpoint, load_thresholds, merge_schedule, save_thresholds

pytest.importorskip("skimage")

import encoder_zoo  # noqa: E402

needs_open_clip = pytest.mark.skipif("open_clip" not in encoder_zoo.FAMILIES, reason="open_clip not installed")
R_TOTAL = 20  # of 36 patches, over 4 layers


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: encoder_zoo.build(name, root) for name in encoder_zoo.FAMILIES}


@pytest.fixture(scope="module")
def pics():
    return encoder_zoo.images()


@pytest.fixture(params=encoder_zoo.FAMILIES)
def fam(request, zoo):
    family = zoo[request.param]
    yield family
    dymu.unpatch(family.model)  # a failing test must not leave the shared model patched


def found_thresholds(fam, x=None, r_total=R_TOTAL):
    """Patch in finding mode, run ``x`` (default: the separate finding images, so that no score of the test images
    sits exactly on a threshold), return the thresholds and the per-layer merge counts (model unpatched)."""
    if x is None:
        x = fam.pixels(list(encoder_zoo.finding_images().values()))
    counts = merge_schedule("constant", r_total, encoder_zoo.LAYERS)
    dymu.patch(fam.model, merge_counts=counts)
    with torch.no_grad():
        fam.pooled(fam.model, x)
    run = dymu.last_run(fam.model)
    dymu.unpatch(fam.model)
    return run.found_thresholds, counts, run


def assert_close_scaled(ours, ref, rel=2e-6):
    """Equal up to float32 rounding: max |ours - ref| <= rel * max |ref| (+1e-6). With std-0.3 weights hidden
    states reach ~30, where one float32 ulp is ~2e-6: a fixed 1e-5 would test the BLAS blocking, not dymu."""
    scale = float(ref.abs().max())
    worst = float((ours - ref).abs().max())
    assert worst <= rel * scale + 1e-6, f"max deviation {worst} at magnitude {scale}"


def all_hidden(model, x):
    """Padded hidden states 0..L of a patched model, recorded by the patched blocks."""
    state = dymu.get_state(model)
    with state.overrides(record_layers=frozenset(range(state.num_layers + 1))), torch.no_grad():
        state.forward(x)
    return [state.run.hidden_states[i] for i in range(state.num_layers + 1)]


# ---------------------------------------------------------------- merging off = stock
def test_merging_off_reproduces_stock(fam, pics):
    x = fam.pixels(list(pics.values())[:3])
    with torch.no_grad():
        stock_hidden = fam.stock_hidden(x)
        stock_pooled = fam.pooled(fam.model, x)
    state = dymu.patch(fam.model)
    assert state.mode == "off" and state.num_layers == encoder_zoo.LAYERS
    assert state.input_tokens == 36 + fam.has_cls and state.protect_first == fam.has_cls
    hidden = all_hidden(fam.model, x)
    with torch.no_grad():
        pooled = fam.pooled(fam.model, x)
    for ours, ref in zip(hidden, stock_hidden, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, stock_pooled, rtol=0, atol=1e-5)
    dymu.unpatch(fam.model)
    # inference mode with thresholds that never merge: dymu's own attention path (open_clip computes it
    # itself from the fused weights) agrees with stock up to float32 rounding
    dymu.patch(fam.model, [float("inf")] * encoder_zoo.LAYERS)
    for ours, ref in zip(all_hidden(fam.model, x), stock_hidden, strict=True):
        assert_close_scaled(ours, ref)
    if fam.name.startswith("hf"):  # transformers' own hidden_states agree with what the blocks record
        with torch.no_grad():
            out = fam.model(pixel_values=x, output_hidden_states=True)
        for ours, ref in zip(hidden, out.hidden_states, strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_patch_unpatch_restores_stock(fam, pics):
    x = fam.pixels(list(pics.values())[:2])
    classes = [type(m) for m in fam.model.modules()]
    hooks = [len(m._forward_hooks) for m in fam.model.modules()]
    with torch.no_grad():
        ref = fam.pooled(fam.model, x)
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds)
    with torch.no_grad():
        merged = fam.pooled(fam.model, x)
    assert dymu.last_run(fam.model).num_tokens().min() < 36  # it did merge
    assert not torch.allclose(merged, ref, atol=1e-3)
    dymu.unpatch(fam.model)
    assert [type(m) for m in fam.model.modules()] == classes
    assert [len(m._forward_hooks) for m in fam.model.modules()] == hooks
    assert not any(k.startswith("_dymu") for m in fam.model.modules() for k in m.__dict__)
    with torch.no_grad():
        torch.testing.assert_close(fam.pooled(fam.model, x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        dymu.get_state(fam.model)


# ---------------------------------------------------------------- merged model = stock model on the expanded sequence
def expand(tokens, source_map):
    """[n, C] merged tokens -> [N0, C]: each original position gets the token that covers it."""
    return tokens[source_map]


def group_mean(h, source_map):
    """Replace every original position's row by the mean over its group (a merge, written on the full sequence)."""
    n = int(source_map.max()) + 1
    sums = torch.zeros(n, h.shape[-1], dtype=h.dtype).index_add_(0, source_map, h)
    counts = torch.bincount(source_map, minlength=n).to(h.dtype)
    return (sums / counts[:, None])[source_map]


def reference_deviation(fam, x1, run):
    """Largest deviation between the patched run on one image and the stock blocks run on the full-length
    sequence where every merged token is repeated at each position it covers.

    Proportional attention (log-size key bias) over a token of size s equals stock attention over s identical
    copies, and a size-weighted merge equals the mean over the covered positions; so if the adapter is right,
    the stock computation on the expanded sequence stays an exact expansion of the merged one.
    """
    worst = 0.0
    with torch.no_grad():
        h = fam.embed(fam.model, x1)  # [1, N0, C]
        for layer, block in enumerate(fam.blocks(fam.model)):
            smap = run.source_maps[layer + 1][0]
            mid = group_mean((h + fam.attn_part(block, h))[0], smap)[None]
            h = mid + fam.mlp_part(block, mid)
            ours = run.hidden_states[layer + 1][0, : int(run.num_tokens(layer + 1)[0])]
            worst = max(worst, float((expand(ours, smap) - h[0]).abs().max()))
        pooled_ref = fam.pool_last(fam.model, h)
    return worst, pooled_ref


def merged_run_single(fam, x1, thresholds):
    dymu.patch(fam.model, thresholds)
    try:
        all_hidden(fam.model, x1)
        run = dymu.last_run(fam.model)
        with torch.no_grad():
            pooled = fam.pooled(fam.model, x1)
    finally:
        dymu.unpatch(fam.model)
    return run, pooled


def test_merged_equals_stock_on_expanded_sequence(fam, pics):
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    for b in (0, 2):  # camera (many tokens), flat (few)
        run, pooled = merged_run_single(fam, x[b : b + 1], thresholds)
        assert int(run.num_tokens()[0]) < 36  # merging happened
        worst, pooled_ref = reference_deviation(fam, x[b : b + 1], run)
        assert worst < 2e-4, f"{fam.name} image {b}: merged tokens deviate by {worst}"
        torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=2e-4)


def test_dropping_the_size_bias_is_caught(zoo, pics, monkeypatch):
    """The expanded-sequence check fails for a wrong variant: attention without log(size) (padding mask only)."""
    fam = zoo["hf-clip"]
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)

    def mask_only(sizes, dtype=None):
        dtype = dtype or torch.float32
        bias = torch.zeros(sizes.shape, dtype=dtype).masked_fill(sizes <= 0, torch.finfo(dtype).min)
        return bias[:, None, None, :]

    monkeypatch.setattr(encoders_base.DToMeState, "attention_bias", lambda self, dtype: mask_only(self.tokens.sizes, dtype))
    run, _ = merged_run_single(fam, x[:1], thresholds)
    worst, _ = reference_deviation(fam, x[:1], run)
    assert worst > 1e-2


# ---------------------------------------------------------------- batches
@pytest.mark.parametrize("order", ["batch", "single"])
def test_batch_equals_single_images(fam, pics, order):
    """The batch-invariant token orders (the default "authors" order follows the original code, whose lone-image
    path differs from its batch path; see test_authors_order_is_its_batch_or_single_path)."""
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds, token_order=order)
    batch_hidden = all_hidden(fam.model, x)
    batch_run = dymu.last_run(fam.model)
    with torch.no_grad():
        batch_pooled = fam.pooled(fam.model, x)
    counts = batch_run.num_tokens().tolist()
    assert len(set(counts)) >= 3, counts  # really mixed counts, so padding is exercised
    for b in range(len(x)):
        single_hidden = all_hidden(fam.model, x[b : b + 1])
        single_run = dymu.last_run(fam.model)
        with torch.no_grad():
            torch.testing.assert_close(fam.pooled(fam.model, x[b : b + 1])[0], batch_pooled[b], rtol=0, atol=2e-5)
        for layer in range(encoder_zoo.LAYERS + 1):
            n = int(single_run.num_tokens(layer)[0])
            assert int(batch_run.num_tokens(layer)[b]) == n
            assert_close_scaled(batch_hidden[layer][b, :n], single_hidden[layer][0, :n])
            assert torch.equal(batch_run.sizes[layer][b, :n], single_run.sizes[layer][0, :n])
            assert torch.equal(batch_run.source_maps[layer][b], single_run.source_maps[layer][0])
            assert not batch_hidden[layer][b, n:].any()  # padding rows stay zero


@pytest.mark.parametrize("order", ["authors", "raster"])
def test_per_image_batching_equals_the_padded_batch(fam, pics, order):
    """dymu.encode(batching="per_image") runs each image alone (no padding) and returns what the padded batch
    does: same features, sizes, source maps and padded tensors (the authors' order keeps its batch path)."""
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds, token_order=order)
    padded = dymu.encode(fam.model, x, layer=-1)
    per_image = dymu.encode(fam.model, x, layer=-1, batching="per_image")
    assert len(set(padded.num_tokens)) >= 3, padded.num_tokens  # mixed counts
    assert per_image.num_tokens == padded.num_tokens
    assert torch.equal(per_image.tokens_per_layer, padded.tokens_per_layer)
    assert torch.equal(per_image.padded_sizes, padded.padded_sizes)
    assert torch.equal(per_image.padded_source_map, padded.padded_source_map)
    assert_close_scaled(per_image.hidden_states, padded.hidden_states)
    for a, b in zip(per_image.source_maps, padded.source_maps):
        assert torch.equal(a, b)
    if order == "authors":  # a lone-image call alone takes the single-image path: other counts, caught here
        alone = [dymu.encode(fam.model, x[b : b + 1], layer=-1).num_tokens[0] for b in range(len(x))]
        assert alone != padded.num_tokens
    with pytest.raises(ValueError, match="batching must be"):
        dymu.encode(fam.model, x, batching="packed")


def test_auto_batching_runs_image_by_image_only_where_only_time_changes(fam, pics, monkeypatch, request):
    """batching="auto" (the default) takes the per-image path for several images on CPU on one torch thread when
    the forward stops before the last block (no model output to lose); a full forward, one image, finding or
    several threads (each per-image op would wait for all of them) stay padded."""
    from dymu.encoders import encoding

    request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
    torch.set_num_threads(1)
    calls = []
    per_image_run = encoding._run_per_image
    monkeypatch.setattr(encoding, "_run_per_image", lambda *a, **k: calls.append(len(a[1])) or per_image_run(*a, **k))
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds)
    auto = dymu.encode(fam.model, x, layer=-2)
    assert calls == [len(x)]
    padded = dymu.encode(fam.model, x, layer=-2, batching="padded")
    assert auto.num_tokens == padded.num_tokens and len(set(padded.num_tokens)) >= 3
    for a, b in zip(auto.source_maps, padded.source_maps):
        assert torch.equal(a, b)
    assert_close_scaled(auto.hidden_states, padded.hidden_states)
    full = dymu.encode(fam.model, x, layer=-1)  # the whole tower runs: its output is kept, padded
    alone = dymu.encode(fam.model, x[:1], layer=-2)
    assert calls == [len(x)] and full.output is not None and alone.num_tokens
    torch.set_num_threads(2)
    two = dymu.encode(fam.model, x, layer=-2)  # several threads: one padded call
    assert calls == [len(x)] and two.num_tokens == padded.num_tokens
    torch.set_num_threads(1)
    dymu.configure(fam.model, merge_counts=merge_schedule("constant", R_TOTAL, encoder_zoo.LAYERS))  # finding
    dymu.encode(fam.model, x, layer=-2)
    assert calls == [len(x)]
    dymu.unpatch(fam.model)


def test_fixed_mode_is_tome_same_count_every_image(fam, pics):
    """mode="fixed" (the ToMe baseline): every image merges merge_counts[l] at block l, so all keep the same count,
    and an image in a batch equals the image alone."""
    x = fam.pixels(list(pics.values()))
    counts = merge_schedule("constant", R_TOTAL, encoder_zoo.LAYERS)
    dymu.patch(fam.model, merge_counts=counts, mode="fixed")
    batch_hidden = all_hidden(fam.model, x)
    run = dymu.last_run(fam.model)
    assert run.found_thresholds == []  # nothing is found in fixed mode
    start = int(run.num_tokens(0)[0])
    for layer in range(1, encoder_zoo.LAYERS + 1):
        assert run.num_tokens(layer).tolist() == [start - sum(counts[:layer])] * len(x)
    for b in range(len(x)):
        single_hidden = all_hidden(fam.model, x[b : b + 1])
        single = dymu.last_run(fam.model)
        assert torch.equal(run.source_maps[-1][b], single.source_maps[-1][0])
        assert_close_scaled(batch_hidden[-1][b], single_hidden[-1][0])


def test_authors_order_is_its_batch_or_single_path(fam, pics):
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    runs = {}
    for order in ("authors", "batch", "single", "raster"):
        dymu.patch(fam.model, thresholds, token_order=order)
        runs[order] = (dymu.encode(fam.model, x), dymu.encode(fam.model, x[:1]))
        dymu.unpatch(fam.model)
    (batch_a, lone_a), (batch_b, _), (_, lone_s), (batch_r, _) = runs.values()
    assert torch.equal(batch_a.padded_source_map, batch_b.padded_source_map)  # several images: the batch path
    assert torch.equal(lone_a.padded_source_map, lone_s.padded_source_map)  # one image: the single-image path
    assert batch_a.num_tokens != batch_r.num_tokens  # raster order really keeps other counts
    # features come in spatial order (by first patch) whatever the order inside the encoder
    for enc in (batch_a, batch_r, lone_a):
        for smap in enc.source_maps:
            first = [int(torch.nonzero(smap == i)[0]) for i in range(int(smap.max()) + 1)]
            assert first == sorted(first)


# ---------------------------------------------------------------- thresholds reproduce the schedule
def test_finding_meets_the_schedule(fam, pics):
    x = fam.pixels(list(pics.values()))
    B = len(x)
    thresholds, counts, find_run = found_thresholds(fam, x)
    n0 = 36 + fam.has_cls
    for layer in range(encoder_zoo.LAYERS + 1):
        assert int(find_run.num_tokens(layer).sum()) == B * (n0 - sum(counts[:layer]))
    # inference is checked on other images than the thresholds were found on: on the finding batch one edge per
    # layer sits exactly on the threshold, and float rounding would decide it
    held_out = fam.pixels(list(pics.values()))
    held_thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, held_thresholds)
    with torch.no_grad():
        fam.pooled(fam.model, held_out)
    counts_per_layer = dymu.last_run(fam.model).tokens_per_layer().float().mean(1)
    dymu.unpatch(fam.model)
    assert bool((counts_per_layer[1:] < counts_per_layer[:-1]).all()), counts_per_layer  # every layer merges


def test_flat_image_keeps_far_fewer_tokens_than_photos(zoo, pics):
    fam = zoo["hf-clip"]
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds)
    enc = dymu.encode(fam.model, x, drop_cls=True)
    tokens = dict(zip(pics, enc.num_tokens))
    dymu.unpatch(fam.model)
    # astronaut and chelsea (cat) are busy photos; camera has a large smooth sky at 84 px
    assert tokens["flat"] * 4 < min(tokens["astronaut"], tokens["chelsea"], tokens["textured"]), tokens
    assert tokens["flat"] == min(tokens.values()) and tokens["flat"] < tokens["camera"], tokens


# ---------------------------------------------------------------- dymu.encode
def test_encode_matches_llava_feature_selection(zoo, pics):
    fam = zoo["hf-clip"]
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds)
    full = dymu.encode(fam.model, x, layer=-2, drop_cls=True, stop_early=False)
    early = dymu.encode(fam.model, x, layer=-2, drop_cls=True, keep_layers=[1, -3], batching="padded")  # bitwise
    with torch.no_grad():
        all_hs = fam.model(pixel_values=x, output_hidden_states=True).hidden_states
    hs = all_hs[-2]
    assert sorted(early.run.hidden_states) == [1, 2, 3]
    for layer in (1, 2):  # more layers kept on request, padded as transformers returns them
        torch.testing.assert_close(early.run.hidden_states[layer], all_hs[layer], rtol=0, atol=0)
    run = dymu.last_run(fam.model)
    dymu.unpatch(fam.model)
    assert early.output is None and full.output is not None
    assert full.layer == early.layer == encoder_zoo.LAYERS - 1
    assert early.tokens_per_layer.shape[0] == encoder_zoo.LAYERS  # the last block did not run
    for b in range(len(x)):
        n = full.num_tokens[b]
        torch.testing.assert_close(early.features[b], full.features[b], rtol=0, atol=0)
        # CLS dropped; features in spatial order: each patch gets the same hidden state as in the padded output
        torch.testing.assert_close(full.features[b][full.source_maps[b]], hs[b][run.source_maps[-2][b, 1:]], rtol=0, atol=0)
        assert float(full.sizes[b].sum()) == 36  # patches only
        smap = full.source_maps[b]
        assert smap.shape == (36,) and set(smap.tolist()) == set(range(n))
        # a feature's size is the number of patches mapped to it
        assert torch.equal(torch.bincount(smap, minlength=n).float(), full.sizes[b])
        assert torch.equal(full.padded_source_map[b], run.source_maps[-2][b])
    dymu.patch(fam.model, thresholds)
    with pytest.raises(ValueError, match="out of range"):
        dymu.encode(fam.model, x, layer=7)
    dymu.unpatch(fam.model)


def test_encode_siglip_keeps_all_tokens_and_refuses_cls_drop(zoo, pics):
    fam = zoo["hf-siglip"]
    x = fam.pixels(list(pics.values())[:2])
    dymu.patch(fam.model, [float("inf")] * encoder_zoo.LAYERS)  # never merge
    enc = dymu.encode(fam.model, x)
    with pytest.raises(ValueError, match="no CLS"):
        dymu.encode(fam.model, x, drop_cls=True)
    dymu.unpatch(fam.model)
    assert enc.num_tokens == [36, 36] and torch.equal(enc.source_maps[0], torch.arange(36))


# ---------------------------------------------------------------- budgets
def test_threshold_offset_and_calibrated_budget(fam, pics):
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds)
    base = mean_tokens(fam.model, x)
    dymu.configure(fam.model, threshold_offset=0.05)
    more = mean_tokens(fam.model, x)
    dymu.configure(fam.model, threshold_offset=-0.05)
    fewer = mean_tokens(fam.model, x)
    assert fewer < base < more
    for target in (8.0, 25.0):
        cal = dymu.calibrate_budget(fam.model, x, target)
        assert dymu.get_state(fam.model).threshold_offset == cal.offset
        assert abs(cal.mean_tokens - target) <= 1.0, cal
        assert mean_tokens(fam.model, x) == cal.mean_tokens
    # per call: calibrates for this call only
    kept = dymu.get_state(fam.model).threshold_offset
    enc = dymu.encode(fam.model, x, token_budget=12)
    assert abs(sum(enc.num_tokens) / len(x) - fam.has_cls - 12) <= 1.0
    assert dymu.get_state(fam.model).threshold_offset == kept != enc.threshold_offset
    with pytest.raises(ValueError, match="budget of 1000 is out of range"):
        dymu.calibrate_budget(fam.model, x, 1000)
    dymu.unpatch(fam.model)


# ---------------------------------------------------------------- open_clip specifics
@needs_open_clip
def test_open_clip_sequence_first_blocks(zoo, pics):
    """Older open_clip runs the stack sequence-first (transformer.batch_first False): same results."""
    fam = zoo["open_clip"]
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    dymu.patch(fam.model, thresholds)
    ref = all_hidden(fam.model, x)
    dymu.unpatch(fam.model)
    with torch.no_grad():
        stock = fam.model(x)
    visual = fam.model
    try:
        visual.transformer.batch_first = False
        for block in visual.transformer.resblocks:
            block.attn.batch_first = False
        with torch.no_grad():
            torch.testing.assert_close(visual(x), stock, rtol=0, atol=1e-5)
        dymu.patch(visual, thresholds)
        for ours, theirs in zip(all_hidden(visual, x), ref, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        dymu.unpatch(visual)
    finally:
        visual.transformer.batch_first = True
        for block in visual.transformer.resblocks:
            block.attn.batch_first = True


@needs_open_clip
def test_open_clip_avg_pool_is_size_weighted(tmp_path, pics):
    fam = encoder_zoo.open_clip_family(encoder_zoo.save_open_clip(tmp_path / "avg", pool_type="avg"))
    x = fam.pixels(list(pics.values()))
    thresholds, _, _ = found_thresholds(fam)
    run, pooled = merged_run_single(fam, x[:1], thresholds)
    _, pooled_ref = reference_deviation(fam, x[:1], run)
    torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=2e-4)


@needs_open_clip
def test_whole_open_clip_model_can_be_patched(tmp_path, pics):
    import open_clip

    directory = encoder_zoo.save_open_clip(tmp_path / "whole")
    model = open_clip.create_model(f"local-dir:{directory}").eval()
    x = torch.stack([encoder_zoo.load_encoder(f"open_clip:local-dir:{directory}").preprocess(p) for p in pics.values()])
    with torch.no_grad():
        ref = model.encode_image(x)
    state = dymu.patch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref, rtol=0, atol=1e-5)
    assert state.forward is model.visual
    dymu.unpatch(model)


# ---------------------------------------------------------------- names
def test_authors_names():
    expected = {72: 504, 192: 384, 384: 192, 480: 96}
    for k, r_total in expected.items():
        name = parse_dymu_name(f"ViT-L-14-336-tome-{k}out")
        assert (name.r_total, name.schedule, name.base.identity) == (r_total, "constant", "ViT-L-14-336")
        assert name.merge_counts() == merge_schedule("constant", r_total, 24)
        assert name.base.hf_name == "openai/clip-vit-large-patch14-336"
        assert name.base.open_clip == ("ViT-L-14-336", "openai")
        assert str(name.checkpoint_path) == f"checkpoints/threshold_checkpoints/ViT-L-14-336-tome-{k}out.safetensors"
        assert dymu_name("ViT-L-14-336", k) == name.name
    lin = parse_dymu_name("ViT-L-14-336-tome-72out-linear")
    assert lin.schedule == "linear" and lin.merge_counts() == merge_schedule("linear", 504, 24)
    rev = parse_dymu_name("ViT-L-14-336-tome-480out-reverse-linear")
    assert rev.schedule == "reverse_linear" and rev.r_total == 96
    assert dymu_name("ViT-L-14-336", 480, "reverse_linear") == rev.name
    sig = parse_dymu_name("siglip-so400m-patch14-384-256out")
    assert sig.r_total == 729 - 256 and len(sig.merge_counts()) == 26 and not sig.base.has_cls
    assert sig.base.hf_name == "google/siglip-so400m-patch14-384"
    assert sig.base.open_clip == ("ViT-SO400M-14-SigLIP-384", "webli")
    assert parse_dymu_name("ViT-SO400M-14-SigLIP-384-tome-100out").base is sig.base  # open_clip spelling
    assert dymu_name("siglip-so400m-patch14-384", 256) == sig.name
    tiny = parse_dymu_name("clip-84px-p14-d64-tome-16out")  # any identity works
    assert tiny.r_total == 20 and tiny.base.num_layers is None and tiny.merge_counts(4) == [5, 5, 5, 5]
    assert canonical_identity("ViT-SO400M-14-SigLIP-384-tome") == "siglip-so400m-patch14-384"
    assert is_dymu_name("ViT-L-14-336-tome-72out") and not is_dymu_name("openai/clip-vit-large-patch14-336")
    assert base_encoder("ViT-L-14-336").patch_tokens == 576


def test_bad_names():
    with pytest.raises(ValueError, match="unknown encoder"):
        parse_dymu_name("ViT-Q-99-tome-72out")
    with pytest.raises(ValueError, match="not a DyMU encoder name"):
        parse_dymu_name("ViT-L-14-336")
    with pytest.raises(ValueError, match="out of range"):
        parse_dymu_name("ViT-L-14-336-tome-999out")
    with pytest.raises(ValueError, match="number of layers"):
        parse_dymu_name("clip-84px-p14-d64-tome-16out").merge_counts()


# ---------------------------------------------------------------- checkpoints
def test_checkpoints_authors_pth_and_bad_input(zoo, pics, tmp_path, monkeypatch):
    fam = zoo["hf-clip"]
    x = fam.pixels(list(pics.values()))
    thresholds, counts, _ = found_thresholds(fam)
    state = dymu.patch(fam.model)
    identity = state.encoder
    dymu.unpatch(fam.model)
    assert identity == "clip-84px-p14-d64"
    ckpt = ThresholdCheckpoint(thresholds, encoder=identity, r_total=R_TOTAL, merge_counts=counts, images_seen=6)
    ours = save_thresholds(tmp_path / "ours.safetensors", ckpt)
    # the authors' format: torch-saved {"name", "state_dict"} with DDP-prefixed per-block ".threshold" buffers
    authors = tmp_path / "theirs.pth"
    torch.save(
        {
            "name": f"{identity}-tome-16out",
            "state_dict": {f"module.visual.transformer.resblocks.{i}.threshold": torch.tensor([t]) for i, t in enumerate(thresholds)},
        },
        authors,
    )
    imported = load_thresholds(authors)
    assert imported.encoder == identity
    torch.testing.assert_close(imported.thresholds, load_thresholds(ours).thresholds, rtol=0, atol=0)
    outs = []
    for source in (ours, authors, torch.tensor(thresholds)):
        dymu.patch(fam.model, source)
        outs.append(dymu.encode(fam.model, x))
        dymu.unpatch(fam.model)
    for other in outs[1:]:
        assert other.num_tokens == outs[0].num_tokens
        torch.testing.assert_close(other.hidden_states, outs[0].hidden_states, rtol=0, atol=0)

    # by DyMU name from the default folder
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path / "ckpts"))
    save_thresholds(tmp_path / "ckpts" / "clip-84px-p14-d64-tome-16out.safetensors", ckpt)
    dymu.patch(fam.model, "clip-84px-p14-d64-tome-16out")
    assert dymu.encode(fam.model, x).num_tokens == outs[0].num_tokens
    dymu.unpatch(fam.model)

    # bad input: clear errors, model left unpatched
    with pytest.raises(ValueError, match="3 thresholds given but the encoder has 4 blocks"):
        dymu.patch(fam.model, thresholds[:3])
    other = ThresholdCheckpoint(thresholds, encoder="ViT-L-14-336")
    with pytest.raises(ValueError, match="thresholds are for encoder 'ViT-L-14-336', not 'clip-84px-p14-d64'"):
        dymu.patch(fam.model, other)
    siglip_ckpt = save_thresholds(tmp_path / "s.safetensors", ThresholdCheckpoint(thresholds, encoder="siglip-84px-p14-d64"))
    with pytest.raises(ValueError, match="not 'clip-84px-p14-d64'"):
        dymu.patch(fam.model, siglip_ckpt)
    with pytest.raises(FileNotFoundError, match="no thresholds for clip-84px-p14-d64-tome-5out"):
        dymu.patch(fam.model, "clip-84px-p14-d64-tome-5out")
    with pytest.raises(ValueError, match="unknown encoder"):
        dymu.patch(fam.model, "ViT-Q-99-tome-72out")
    with pytest.raises(FileNotFoundError, match="not found"):
        dymu.patch(fam.model, tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="NaN"):
        dymu.patch(fam.model, [float("nan")] * 4)
    assert not hasattr(fam.model, "_dymu_state")
    with pytest.raises(ValueError, match="no DToMe adapter"):
        dymu.patch(torch.nn.Linear(2, 2))
