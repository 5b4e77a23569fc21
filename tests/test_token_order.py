"""Token order after a merge: dymu's DToMe against a naive plain-Python reference of the original authors' code.

The reference below is written from the description of their two paths (see ``dymu.merge``'s module doc and
issue 15), not from dymu's code:

* batch path (finding; inference of several images): at a merging layer every image becomes
  ``[unmerged A tokens in index order] + [B tokens in index order]`` (a protected CLS is A token 0), merged or not;
  finding merges the batch's ``B*r`` best edges and the threshold is the best unmerged score, clamped at 0;
* single-image path (inference of one image): only when something merged, ``[unmerged A] + [B]``, the unmerged A in
  index order when the first token is protected, else in descending order of their best score; at most
  ``(n - protected) // 2`` merges.

Groups are lists of original positions; every token carries its feature, merged as their code merges it: the batch
path (``batch_level_merge_wavg``) divides every token's size-weighted sum by ``size + 1e-4`` (their constant), the
single path (ToMe's ``merge_wavg``) by ``size``. A token's metric is its feature ``@ proj``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dymu.merge import TokenState, dtome_step

Groups = list[list[int]]
BATCH_EPS = 1e-4  # the authors' batch path: x / (size + 1e-4)


def _best_partners(feats: list[torch.Tensor], proj: torch.Tensor, protect: bool):
    unit = []
    for f in feats:
        m = f @ proj.to(f.dtype)
        unit.append(m / m.norm())
    best = {}
    for i in range(0, len(feats), 2):
        if protect and i == 0:
            continue
        score, partner = -math.inf, None
        for j in range(1, len(feats), 2):
            s = float(unit[i] @ unit[j])
            if s > score:
                score, partner = s, j
        if partner is not None:
            best[i] = (score, partner)
    return best


def _relayout(groups: Groups, feats: list[torch.Tensor], merged: dict[int, int], a_order: list[int], eps: float):
    """``[unmerged A in a_order] + [B in index order, with their merged members]``; each token's feature is the sum of
    its members' ``size * feature`` over ``size + eps``, unmerged tokens included."""
    members = {j: [j] for j in range(1, len(groups), 2)}
    for i, j in merged.items():
        members[j].append(i)
    keep = [[i] for i in a_order if i not in merged] + [members[j] for j in sorted(members)]
    new_groups = [sorted(p for k in ks for p in groups[k]) for ks in keep]
    new_feats = [sum(len(groups[k]) * feats[k] for k in ks) / (sum(len(groups[k]) for k in ks) + eps) for ks in keep]
    return new_groups, new_feats


def reference_batch(images: list[torch.Tensor], proj, protect: bool, *, thresholds=None, rs=None, eps=BATCH_EPS):
    """The authors' batch path over several layers: per-layer groups of every image, thresholds found, features."""
    groups = [[[p] for p in range(len(x))] for x in images]
    feats = [list(x) for x in images]
    history, found = [], []
    for layer in range(len(thresholds if thresholds is not None else rs)):
        best = [_best_partners(f, proj, protect) for f in feats]
        if rs is not None:
            r = rs[layer]
            edges = [(-s, b, i) for b, bb in enumerate(best) for i, (s, _) in bb.items()]
            edges.sort()  # best first; ties: earlier image, earlier token
            chosen = {(b, i) for _, b, i in edges[: len(images) * r]}
            nxt = -edges[len(images) * r][0] if len(edges) > len(images) * r else 0.0
            found.append(max(nxt, 0.0) if r > 0 else 1.0)
            active = r > 0
        else:
            chosen = {(b, i) for b, bb in enumerate(best) for i, (s, _) in bb.items() if s > thresholds[layer]}
            active = thresholds[layer] < 1
        if active:  # every image is re-laid (and divided by size + eps), merged or not
            for b, bb in enumerate(best):
                merged = {i: bb[i][1] for i in bb if (b, i) in chosen}
                groups[b], feats[b] = _relayout(groups[b], feats[b], merged, list(range(0, len(groups[b]), 2)), eps)
        history.append([list(map(list, g)) for g in groups])
    return history, found, feats


def reference_single(x0: torch.Tensor, proj, protect: bool, thresholds) -> tuple[list[Groups], list[torch.Tensor]]:
    """The authors' single-image path over several layers: the groups after each layer, the final features."""
    groups: Groups = [[p] for p in range(len(x0))]
    feats = list(x0)
    history = []
    for thr in thresholds:
        best = _best_partners(feats, proj, protect)
        above = sorted((i for i, (s, _) in best.items() if s > thr), key=lambda i: -best[i][0])
        merged = {i: best[i][1] for i in above[: (len(groups) - int(protect)) // 2]}
        if merged:
            a = list(range(0, len(groups), 2))
            if not protect:  # ToMe's order: A tokens by descending best score
                a.sort(key=lambda i: -best.get(i, (-math.inf,))[0])
            groups, feats = _relayout(groups, feats, merged, a, 0.0)
        history.append([list(g) for g in groups])
    return history, feats


def groups_of(state: TokenState, b: int) -> Groups:
    n = int(state.num_tokens[b])
    sm = state.source_map[b]
    return [sorted(torch.nonzero(sm == i).flatten().tolist()) for i in range(n)]


def padded(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(x) for x in images)
    x = torch.zeros(len(images), n, images[0].shape[1], dtype=images[0].dtype)
    mask = torch.zeros(len(images), n, dtype=torch.bool)
    for b, xb in enumerate(images):
        x[b, : len(xb)], mask[b, : len(xb)] = xb, True
    return x, mask


def run_dymu(images, proj, protect, order, *, thresholds=None, rs=None):
    x, mask = padded(images)
    state = TokenState.init(x, mask if not bool(mask.all()) else None)
    history, found = [], []
    for layer in range(len(thresholds if thresholds is not None else rs)):
        metric = state.x @ proj.to(state.x.dtype)
        if rs is not None:
            state, t = dtome_step(state, metric, mode="find", protect_first=protect, r=rs[layer], order=order)
            found.append(t)
        else:
            state, _ = dtome_step(
                state, metric, mode="infer", protect_first=protect, threshold=thresholds[layer], order=order
            )
        history.append([groups_of(state, b) for b in range(len(images))])
    return history, found, state


def make_images(lengths, channels=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(n, channels, generator=g).to(dtype) for n in lengths]
    return images, torch.randn(channels, 4, generator=g)


def assert_features(state: TokenState, want: list[list[torch.Tensor]]) -> None:
    """dymu's merged hidden states (float64) equal the reference's features, token by token."""
    for b, feats in enumerate(want):
        n = int(state.num_tokens[b])
        torch.testing.assert_close(state.x[b, :n], torch.stack(feats), rtol=0, atol=1e-12)


THRESHOLDS = [0.55, 0.4, 0.6, 0.3, 0.5, 0.2]


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("order", ["authors", "batch", "single"])
def test_finding_equals_authors_batch_path(protect, order):
    images, proj = make_images([21] * 4, seed=1, dtype=torch.float64)
    rs = [3, 2, 2, 0, 2, 1]
    ref_groups, ref_found, ref_feats = reference_batch(images, proj, protect, rs=rs)
    groups, found, state = run_dymu(images, proj, protect, order, rs=rs)
    for layer, (want, got) in enumerate(zip(ref_groups, groups)):
        assert got == want, f"layer {layer}"
    assert found == pytest.approx(ref_found, abs=1e-6)
    assert found[3] == 1.0  # r = 0: nothing merges, the authors' untouched 1.0
    assert_features(state, ref_feats)  # their x / (size + 1e-4), finding included


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("seed", [2, 3])
def test_lone_image_equals_authors_single_path(protect, seed):
    images, proj = make_images([25], seed=seed, dtype=torch.float64)
    want, want_feats = reference_single(images[0], proj, protect, THRESHOLDS)
    got, _, state = run_dymu(images, proj, protect, "authors", thresholds=THRESHOLDS)
    assert [layer[0] for layer in got] == want
    assert_features(state, [want_feats])  # the lone-image path divides by size exactly
    # "single" applies that path to every image; on one image it is "authors"
    single, _, _ = run_dymu(images, proj, protect, "single", thresholds=THRESHOLDS)
    assert single == got


@pytest.mark.parametrize("protect", [True, False])
def test_padded_batch_equals_authors_batch_path(protect):
    images, proj = make_images([23, 14, 19], seed=4, dtype=torch.float64)
    want, _, want_feats = reference_batch(images, proj, protect, thresholds=THRESHOLDS)
    got, _, state = run_dymu(images, proj, protect, "authors", thresholds=THRESHOLDS)
    assert got == want
    assert_features(state, want_feats)
    assert bool((state.source_map[1, 14:] == -1).all())  # padding positions stay unmapped
    assert bool((state.x[1, int(state.num_tokens[1]):] == 0).all())  # and padded slots hold zeros
    # "batch" is that path at every batch size: a lone image too
    for b, x in enumerate(images):
        alone, _, alone_state = run_dymu([x], proj, protect, "batch", thresholds=THRESHOLDS)
        assert alone[-1][0] == want[-1][b]
        assert_features(alone_state, [want_feats[b]])


def test_the_batch_path_divides_by_size_plus_their_epsilon():
    """The 1e-4 is visible: without it the reference's features differ from dymu's by far more than the tolerance
    (so the feature checks above can fail), while the groups on this data stay the same."""
    images, proj = make_images([23, 14, 19], seed=4, dtype=torch.float64)
    groups, _, state = run_dymu(images, proj, True, "authors", thresholds=THRESHOLDS)
    exact_groups, _, exact_feats = reference_batch(images, proj, True, thresholds=THRESHOLDS, eps=0.0)
    assert groups == exact_groups
    n = int(state.num_tokens[0])
    gap = (state.x[0, :n] - torch.stack(exact_feats[0])).abs().max()
    assert gap > 1e-6
    # the fixed-count ToMe baseline is ToMe's merge_wavg: an exact mean, no 1e-4
    x = images[0][None]
    fixed, _ = dtome_step(TokenState.init(x), x @ proj.double(), mode="fixed", protect_first=True, r=5)
    assert fixed.x[0, 0].tolist() == x[0, 0].tolist()  # CLS, unmerged: unchanged (the batch path would shrink it)


@pytest.mark.parametrize("protect", [True, False])
def test_single_order_on_a_padded_batch_is_each_image_alone(protect):
    images, proj = make_images([23, 14, 19], seed=5, dtype=torch.float64)
    got, _, state = run_dymu(images, proj, protect, "single", thresholds=THRESHOLDS)
    for b, x in enumerate(images):
        want, feats = reference_single(x, proj, protect, THRESHOLDS)
        assert [layer[b] for layer in got] == want
        assert_features(TokenState(state.x[b:b + 1], state.sizes[b:b + 1], state.source_map[b:b + 1]), [feats])


def test_the_reference_is_sensitive_to_the_order():
    """Orders really differ on this data (so the tests above can fail): raster, batch and single paths."""
    images, proj = make_images([23, 14, 19], seed=4)
    authors, _, _ = run_dymu(images, proj, False, "authors", thresholds=THRESHOLDS)
    raster, _, _ = run_dymu(images, proj, False, "raster", thresholds=THRESHOLDS)
    single, _, _ = run_dymu(images, proj, False, "single", thresholds=THRESHOLDS)
    assert authors[-1] != raster[-1] and authors[-1] != single[-1]
    counts = lambda h: [len(g) for g in h[-1]]  # noqa: E731
    assert counts(authors) != counts(raster)  # the order changes how many tokens survive, not only where


def test_single_image_cap_binds_without_protection():
    """Every A token above the threshold: the single path merges (n - 0) // 2, the batch path all of them."""
    x = torch.ones(1, 7, 3) + 0.01 * torch.randn(1, 7, 3)
    state = TokenState.init(x)
    lone, _ = dtome_step(state, x, mode="infer", protect_first=False, threshold=-1.0, order="authors")
    batch, _ = dtome_step(state, x, mode="infer", protect_first=False, threshold=-1.0, order="batch")
    assert lone.num_tokens.tolist() == [7 - 3] and batch.num_tokens.tolist() == [7 - 4]


def test_threshold_of_one_merges_nothing_even_for_identical_tokens():
    x = torch.ones(2, 9, 4)  # every score rounds to 1 (or just above)
    state = TokenState.init(x)
    out, _ = dtome_step(state, x, mode="infer", protect_first=True, threshold=1.0, order="batch")
    assert out is state


def test_bad_order_is_refused():
    x = torch.randn(1, 5, 2)
    with pytest.raises(ValueError, match="token order must be one of authors, batch, single, raster"):
        dtome_step(TokenState.init(x), x, mode="infer", protect_first=True, threshold=0.0, order="spatial")  # type: ignore[arg-type]


# ---------------------------------------------------------------- checkpoints remember the order they were found in
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("skimage")
    import encoder_zoo

    return encoder_zoo.build("hf-clip", tmp_path_factory.mktemp("order"))


def test_checkpoint_order_is_recorded_adopted_and_mismatch_flagged(tiny_clip, tmp_path):
    import warnings

    import encoder_zoo

    import dymu
    from dymu.thresholds import ThresholdCheckpoint, load_thresholds, save_thresholds

    fam = tiny_clip
    x = fam.pixels(list(encoder_zoo.images().values()))
    found = {}
    for order in ("authors", "raster"):
        dymu.patch(fam.model, merge_counts=[5, 5, 5, 5], token_order=order)
        with torch.no_grad():
            fam.pooled(fam.model, fam.pixels(list(encoder_zoo.finding_images().values())))
        found[order] = dymu.last_run(fam.model).found_thresholds
        dymu.unpatch(fam.model)
        ckpt = ThresholdCheckpoint(found[order], encoder="clip-84px-p14-d64", token_order=order)
        save_thresholds(tmp_path / f"{order}.safetensors", ckpt)
        assert load_thresholds(tmp_path / f"{order}.safetensors").token_order == order
    assert found["authors"] != found["raster"]  # the order changes what finding finds

    # without token_order, the checkpoint's order is used
    state = dymu.patch(fam.model, tmp_path / "raster.safetensors")
    assert state.token_order == "raster"
    dymu.configure(fam.model, tmp_path / "authors.safetensors")
    assert state.token_order == "authors"
    dymu.unpatch(fam.model)
    # explicitly in the other order: a warning naming both
    with pytest.warns(UserWarning, match="found in 'raster' token order but are used in 'authors' order"):
        dymu.patch(fam.model, tmp_path / "raster.safetensors", token_order="authors")
    dymu.unpatch(fam.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch/single find the authors' thresholds: no warning
        dymu.patch(fam.model, tmp_path / "authors.safetensors", token_order="single")
    dymu.unpatch(fam.model)
    # a checkpoint written before the order was recorded was found in raster order
    from safetensors.torch import save_file

    save_file(
        {"thresholds": torch.tensor(found["raster"])},
        str(tmp_path / "old.safetensors"),
        metadata={"format": "dymu-thresholds", "encoder": "clip-84px-p14-d64", "num_layers": "4"},
    )
    assert load_thresholds(tmp_path / "old.safetensors").token_order == "raster"


def test_authors_pth_edge_cases(tiny_clip, tmp_path):
    import dymu
    from dymu.thresholds import load_thresholds

    fam = tiny_clip
    values = [0.3, 0.2, 0.25, 0.1]
    keys = lambda vals: {f"module.visual.transformer.resblocks.{i}.threshold": torch.tensor(v) for i, v in enumerate(vals)}  # noqa: E731
    renamed = tmp_path / "my_thresholds.pth"
    torch.save({"state_dict": keys(values)}, renamed)
    ckpt = load_thresholds(renamed)
    assert ckpt.encoder == "" and ckpt.token_order == "authors"
    state = dymu.patch(fam.model, renamed)  # identity unknown: checked by layer count only
    assert state.thresholds.tolist() == pytest.approx(values)
    dymu.unpatch(fam.model)
    six = tmp_path / "renamed6.pth"
    torch.save({"state_dict": keys(values + [0.1, 0.1])}, six)
    with pytest.raises(ValueError, match="hold 6 per-layer thresholds, but 'clip-84px-p14-d64' has 4 blocks"):
        dymu.patch(fam.model, six)
    named = tmp_path / "siglip-so400m-patch14-384-256out.pth"  # the authors' file name: identity from it
    torch.save({"state_dict": keys(values)}, named)
    assert load_thresholds(named).encoder == "siglip-so400m-patch14-384"
    vector = tmp_path / "vector.pth"
    torch.save({"state_dict": {**keys(values), "visual.transformer.resblocks.0.threshold": torch.tensor([0.3, 0.4])}}, vector)
    with pytest.raises(ValueError, match="two '.threshold' entries|holds 2 values"):
        load_thresholds(vector)
    vector2 = tmp_path / "vector2.pth"
    torch.save({"state_dict": {f"resblocks.{i}.threshold": torch.tensor([v, v]) for i, v in enumerate(values)}}, vector2)
    with pytest.raises(ValueError, match=r"holds 2 values \(2,\); expected one threshold per block"):
        load_thresholds(vector2)
    for bad in (-math.inf, 1.5, -1.2):
        path = tmp_path / "bad.pth"
        torch.save({"state_dict": keys([0.3, bad, 0.2, 0.1])}, path)
        with pytest.raises(ValueError, match="layer 1 has threshold .*expected a cosine similarity in \\[-1, 1\\]"):
            load_thresholds(path)
        with pytest.raises(ValueError, match="layer 1 has threshold"):
            dymu.patch(fam.model, [0.3, bad, 0.2, 0.1])
    # +inf (never merge) and the authors' untouched 1.0 are fine
    torch.save({"state_dict": keys([0.3, math.inf, 1.0, 0.1])}, tmp_path / "ok.pth")
    assert load_thresholds(tmp_path / "ok.pth").num_layers == 4
    # a safetensors file under a .pth name is read by content
    from dymu.thresholds import ThresholdCheckpoint, save_thresholds

    save_thresholds(tmp_path / "st.safetensors", ThresholdCheckpoint(values, encoder="clip-84px-p14-d64"))
    (tmp_path / "st.safetensors").rename(tmp_path / "st.pth")
    assert load_thresholds(tmp_path / "st.pth").thresholds.tolist() == pytest.approx(values)


# ---------------------------------------------------------------- what the LLM sees does not depend on the order
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_vtu_output_does_not_depend_on_the_merged_token_order(mode):
    """The encoder's token order (authors' or spatial) only renumbers an image's merged tokens: with VTU every copy
    sits at its own virtual position, so the text logits are the same and the visual ones are permuted alike.
    Plain merged decoding (VTU off) feeds the tokens at consecutive positions, so there the order matters: dymu
    hands tokens over in spatial order (by first patch) in every mode."""
    from transformers import LlamaForCausalLM

    from dymu.testing import scale_weights, tiny_llama_config
    from dymu.vtu import concat_groups, enable_vtu, prepare_vtu, vtu_forward

    model = scale_weights(LlamaForCausalLM(tiny_llama_config()).eval())
    g = torch.Generator().manual_seed(0)
    local = torch.tensor([0, 0, 1, 2, 1, 3, 2, 3, 4, 4, 0, 1])  # 12 patches -> 5 merged tokens
    image = torch.randn(5, 64, generator=g)
    text_before, text_after = torch.randn(3, 64, generator=g), torch.randn(4, 64, generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])  # another order of the same tokens
    inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(5))

    def logits(vtu_mode, tokens, local_map):
        enable_vtu(model, vtu_mode)
        batch = prepare_vtu([concat_groups([3, local_map, 4])])
        embeds = torch.cat([text_before, tokens, text_after])[None]
        with torch.no_grad():
            if vtu_mode == "off":
                return model(inputs_embeds=embeds).logits[0]
            return vtu_forward(model, batch, inputs_embeds=embeds).logits[0]

    spatial = logits(mode, image, local)
    permuted = logits(mode, image[perm], inverse[local])
    torch.testing.assert_close(permuted[:3], spatial[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(permuted[8:], spatial[8:], rtol=0, atol=1e-5)
    torch.testing.assert_close(permuted[3:8], spatial[3:8][perm], rtol=0, atol=1e-5)
    off_spatial, off_permuted = logits("off", image, local), logits("off", image[perm], inverse[local])
    assert float((off_permuted[8:] - off_spatial[8:]).abs().max()) > 1e-2


def test_vocabulary_table_is_what_merge_path_runs():
    """The table in ``dymu.token_order``'s module doc (the one place that says which merge path each token order
    runs) agrees with :func:`merge_path`, row by row."""
    import dymu.token_order as vocabulary

    rows = [line.split() for line in vocabulary.__doc__.splitlines() if line.startswith('``"')]
    assert [row[0].strip('`"') for row in rows] == list(vocabulary.TOKEN_ORDERS)
    for order, single, several, finding, *_ in rows:
        order = order.strip('`"')
        assert vocabulary.merge_path(order, "infer", 1) == single.strip("`")
        assert vocabulary.merge_path(order, "infer", 4) == several.strip("`")
        assert vocabulary.merge_path(order, "find", 4) == finding.strip("`")
        assert vocabulary.merge_path(order, "fixed", 1) == finding.strip("`")
