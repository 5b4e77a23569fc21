"""DToMe merge core: invariants, a naive reference, padded batches, finding vs inference, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dymu.merge import (
    AUTHORS_BATCH_EPS,
    TokenState,
    bipartite_scores,
    dtome_step,
    merge_tokens,
    select_top,
    size_bias,
)


# ---------------------------------------------------------------- naive reference (plain Python loops)
def naive_infer(x0: torch.Tensor, proj: torch.Tensor, thresholds: list[float], protect_first: bool):
    """One image, several layers, metric = token @ proj: the member sets per final token, in final order."""
    groups = [[j] for j in range(x0.shape[0])]
    for thr in thresholds:
        n = len(groups)
        metric = [x0[g].mean(0) @ proj for g in groups]
        unit = [m / m.norm().clamp_min(1e-12) for m in metric]
        target = {}
        for i in range(0, n, 2):  # A = even
            if protect_first and i == 0:
                continue
            best, best_j = -math.inf, None
            for j in range(1, n, 2):  # B = odd
                s = float(unit[i] @ unit[j])
                if s > best:
                    best, best_j = s, j
            if best_j is not None and best > thr:
                target[i] = best_j
        new_groups = []
        for i in range(n):
            if i in target:
                continue
            members = list(groups[i])
            for a, b in target.items():
                if b == i:
                    members += groups[a]
            new_groups.append(sorted(members))
        # merged tokens keep the order of their first member, as dymu does
        groups = sorted(new_groups, key=min)
    return groups


def groups_of(state: TokenState, b: int) -> list[list[int]]:
    n = int(state.num_tokens[b])
    sm = state.source_map[b]
    return [sorted(torch.nonzero(sm == i).flatten().tolist()) for i in range(n)]


def run_infer(x, metrics_fn, thresholds, protect_first, mask=None, order="raster"):
    """Several inference steps; raster order by default (this file's naive reference is raster order, the
    authors' order has its own reference in test_token_order.py)."""
    state = TokenState.init(x, mask)
    metrics = []
    for thr in thresholds:
        metric = metrics_fn(state)
        metrics.append(metric)
        state, _ = dtome_step(state, metric, mode="infer", protect_first=protect_first, threshold=thr, order=order)
    return state, metrics


def check_mass(state: TokenState, x0: torch.Tensor, n0: torch.Tensor, batch_layers: int = 0) -> None:
    """Sizes sum to N, each original position covered exactly once, x = mean of its members — up to the authors'
    ``size + 1e-4`` divisor after ``batch_layers`` merging layers on their batch path (each member's weight shrinks
    by at most 1e-4 per layer)."""
    atol = 1e-5 + batch_layers * AUTHORS_BATCH_EPS * float(x0.abs().max())
    for b in range(x0.shape[0]):
        n = int(state.num_tokens[b])
        sm = state.source_map[b, : int(n0[b])]
        assert bool((sm >= 0).all()) and bool((sm < n).all())
        assert float(state.sizes[b].sum()) == pytest.approx(float(n0[b]))
        counts = torch.bincount(sm, minlength=n)
        assert torch.equal(counts.float(), state.sizes[b, :n])
        for i in range(n):
            expected = x0[b, : int(n0[b])][sm == i].mean(0)
            torch.testing.assert_close(state.x[b, i], expected, atol=atol, rtol=1e-5)
        assert bool((state.sizes[b, n:] == 0).all()) and bool((state.x[b, n:] == 0).all())


# ---------------------------------------------------------------- tests
def test_merging_nothing_is_identity():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 8)
    state = TokenState.init(x)
    for kwargs in ({"mode": "infer", "threshold": math.inf}, {"mode": "find", "r": 0}, {"mode": "off"}):
        out, _ = dtome_step(state, torch.randn(3, 11, 5), protect_first=True, **kwargs)
        assert torch.equal(out.x, x)
        assert torch.equal(out.sizes, torch.ones(3, 11))
        assert torch.equal(out.source_map, torch.arange(11).expand(3, 11))


def test_inference_matches_naive_reference_and_conserves_mass():
    torch.manual_seed(1)
    x = torch.randn(2, 17, 6)
    proj = torch.randn(6, 4)
    state, metrics = run_infer(x, lambda s: s.x @ proj, [0.2, 0.0, -0.5], protect_first=True)
    check_mass(state, x, torch.tensor([17, 17]))
    for b in range(2):
        assert groups_of(state, b) == naive_infer(x[b], proj, [0.2, 0.0, -0.5], protect_first=True)
    # CLS (position 0) stays alone
    assert bool((state.source_map[:, 0] == 0).all()) and bool((state.sizes[:, 0] == 1).all())


def test_wrong_merge_fails_the_mass_check():
    """The mass check is sensitive: an unweighted average (ignoring sizes) is caught."""
    torch.manual_seed(2)
    x = torch.randn(1, 9, 4)
    state, _ = run_infer(x, lambda s: s.x, [-1.0, -1.0], protect_first=False)
    assert bool((state.sizes > 1).any())
    wrong = TokenState(state.x + 0.01 * (state.sizes[..., None] > 1), state.sizes, state.source_map)
    with pytest.raises(AssertionError):
        check_mass(wrong, x, torch.tensor([9]))


def test_find_merges_exactly_B_times_r_and_threshold_reproduces_it():
    torch.manual_seed(3)
    B, N, r = 4, 25, 5
    x = torch.randn(B, N, 8)
    metric = torch.randn(B, N, 8)
    state = TokenState.init(x)
    found_state, thr = dtome_step(state, metric, mode="find", protect_first=True, r=r)
    assert int(found_state.num_tokens.sum()) == B * N - B * r
    assert thr >= 0
    # counts per image vary: merging is batch-level, not per image
    scores, _ = bipartite_scores(metric, state.mask, protect_first=True)
    assert float(scores[torch.isfinite(scores)].sort(descending=True).values[B * r]) == pytest.approx(thr)
    infer_state, _ = dtome_step(state, metric, mode="infer", protect_first=True, threshold=thr)
    assert torch.equal(infer_state.num_tokens, found_state.num_tokens)
    assert torch.equal(infer_state.source_map, found_state.source_map)


def test_find_ties_are_deterministic():
    B, N, r = 2, 10, 2
    metric = torch.ones(B, N, 3)  # every score is 1.0: all tied
    x = torch.randn(B, N, 3)
    a, ta = dtome_step(TokenState.init(x), metric, mode="find", protect_first=False, r=r)
    b, tb = dtome_step(TokenState.init(x), metric, mode="find", protect_first=False, r=r)
    assert torch.equal(a.source_map, b.source_map) and ta == tb
    assert int(a.num_tokens.sum()) == B * N - B * r
    # ties go to the earliest candidates: image 0's first A tokens
    assert a.num_tokens.tolist() == [N - B * r, N]


def test_threshold_is_clamped_at_zero():
    torch.manual_seed(4)
    metric = torch.randn(1, 6, 2)
    merge, thr = select_top(torch.tensor([[-0.5, -0.7, -0.9]]), 1)
    assert thr == 0.0 and merge.tolist() == [[True, False, False]]
    del metric


def test_padded_batch_equals_one_by_one():
    torch.manual_seed(5)
    lengths = [13, 7, 10]
    N, C = max(lengths), 6
    x = torch.zeros(3, N, C)
    mask = torch.zeros(3, N, dtype=torch.bool)
    singles = []
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n, C)
        mask[b, :n] = True
        singles.append(x[b : b + 1, :n].clone())
    proj = torch.randn(C, C)
    thresholds = [0.1, -0.2, 0.3]
    batched, _ = run_infer(x, lambda s: s.x @ proj, thresholds, True, mask)
    check_mass(batched, x, torch.tensor(lengths))
    for b, xs in enumerate(singles):
        alone, _ = run_infer(xs, lambda s: s.x @ proj, thresholds, True)
        n = int(alone.num_tokens[0])
        assert int(batched.num_tokens[b]) == n
        torch.testing.assert_close(batched.x[b, :n], alone.x[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(batched.source_map[b, : lengths[b]], alone.source_map[0])
        assert bool((batched.source_map[b, lengths[b] :] == -1).all())


def test_per_image_threshold_tensor():
    torch.manual_seed(6)
    x = torch.randn(2, 9, 4)
    state = TokenState.init(x)
    out, _ = dtome_step(state, x, mode="infer", protect_first=False, threshold=torch.tensor([math.inf, -1.0]))
    assert out.num_tokens.tolist() == [9, 4]  # all 5 A tokens merge into the 4 B tokens


@pytest.mark.parametrize("order", ["authors", "single", "raster"])
@pytest.mark.parametrize("threshold", [-0.3, 0.2, 1 - 1e-9, 1e39, -1e39])
def test_number_threshold_equals_its_tensor_form(threshold, order):
    """A Python-number threshold (decided without tensor ops) and the same value as a per-image tensor take
    identical merges, on a padded batch and a lone image; 1 - 1e-9 rounds to 1.0 in float32 and merges nothing."""
    torch.manual_seed(7)
    x = torch.randn(3, 11, 6) * 3
    mask = torch.arange(11)[None] < torch.tensor([[11], [8], [5]])
    for state in (TokenState.init(x * mask[..., None], mask), TokenState.init(x[:1])):
        for protect in (True, False):
            number, _ = dtome_step(state, state.x, mode="infer", protect_first=protect, threshold=threshold,
                                   order=order)
            per_image = torch.tensor([threshold] * state.x.shape[0], dtype=torch.float32)  # ±1e39 → ±inf
            tensor, _ = dtome_step(state, state.x, mode="infer", protect_first=protect, threshold=per_image,
                                   order=order)
            for a, b in ((number.x, tensor.x), (number.sizes, tensor.sizes), (number.source_map, tensor.source_map)):
                assert torch.equal(a, b)
            if threshold == 1 - 1e-9:
                assert number.x.shape == state.x.shape and torch.equal(number.sizes, state.sizes)


def test_size_bias():
    sizes = torch.tensor([[1.0, 3.0, 0.0]])
    bias = size_bias(sizes)
    assert bias.shape == (1, 1, 1, 3)
    assert float(bias[0, 0, 0, 0]) == 0.0
    assert float(bias[0, 0, 0, 1]) == pytest.approx(math.log(3))
    assert float(bias[0, 0, 0, 2]) == torch.finfo(torch.float32).min
    # proportional attention: a token of size 3 gets the weight of 3 identical tokens
    scores = torch.tensor([0.3, 0.3, 0.7])
    dup = torch.softmax(torch.tensor([0.3, 0.3, 0.3, 0.3, 0.7]), 0)
    prop = torch.softmax(scores + size_bias(torch.tensor([[1.0, 3.0, 1.0]]))[0, 0, 0], 0)
    torch.testing.assert_close(prop[2], dup[4])
    torch.testing.assert_close(prop[1], dup[1:4].sum())


def test_source_map_covers_and_averages():
    torch.manual_seed(7)
    x = torch.randn(2, 12, 3)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    state, _ = run_infer(x * mask[..., None], lambda s: s.x, [0.0, 0.0], False, mask)
    for b, n0 in enumerate([12, 9]):
        n = int(state.num_tokens[b])
        smap = state.source_map[b]
        assert torch.equal(smap[n0:], torch.full((12 - n0,), -1))  # padding stays uncovered
        members = smap[:n0]
        # every real token covers exactly `size` original positions and is their mean
        assert torch.equal(torch.bincount(members, minlength=n).float(), state.sizes[b, :n])
        means = torch.zeros(n, 3).index_add_(0, members, x[b, :n0]) / state.sizes[b, :n, None]
        torch.testing.assert_close(means, state.x[b, :n])


# ---------------------------------------------------------------- bad input
def test_bad_input_errors():
    x = torch.randn(2, 8, 4)
    state = TokenState.init(x)
    with pytest.raises(ValueError, match="batch and token dimensions"):
        dtome_step(state, torch.randn(2, 7, 4), mode="infer", protect_first=True, threshold=0.0)
    with pytest.raises(ValueError, match=r"\[batch, tokens, channels\]"):
        TokenState.init(torch.randn(8, 4))
    with pytest.raises(ValueError, match="cannot merge"):
        dtome_step(state, torch.randn(2, 8, 4), mode="find", protect_first=True, r=4)
    with pytest.raises(ValueError, match="NaN"):
        dtome_step(state, torch.randn(2, 8, 4), mode="infer", protect_first=True, threshold=float("nan"))
    with pytest.raises(ValueError, match="mode must be"):
        dtome_step(state, torch.randn(2, 8, 4), mode="merge", protect_first=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="left-aligned"):
        TokenState.init(x, torch.tensor([[False] + [True] * 7, [True] * 8]))
    with pytest.raises(ValueError, match="needs r"):
        dtome_step(state, x, mode="find", protect_first=True)


# ---------------------------------------------------------------- property-based
@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
    channels=st.integers(1, 6),
    thresholds=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=4),
    protect_first=st.booleans(),
    seed=st.integers(0, 2**16),
    order=st.sampled_from(["raster", "batch", "single"]),
)
def test_property_infer_invariants(lengths, channels, thresholds, protect_first, seed, order):
    g = torch.Generator().manual_seed(seed)
    N = max(lengths)
    mask = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    x = torch.randn(len(lengths), N, channels, generator=g) * mask[..., None]
    proj = torch.randn(channels, channels, generator=g)
    state, _ = run_infer(x, lambda s: s.x @ proj, thresholds, protect_first, mask, order)
    check_mass(state, x, torch.tensor(lengths), sum(t < 1 for t in thresholds) if order == "batch" else 0)
    for b, n in enumerate(lengths):
        alone, _ = run_infer(x[b : b + 1, :n], lambda s: s.x @ proj, thresholds, protect_first, order=order)
        assert torch.equal(alone.source_map[0], state.source_map[b, :n])
        if protect_first:
            assert int(state.sizes[b, 0]) == 1


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    n=st.integers(3, 30),
    r=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_property_find_counts(batch, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 4, generator=g)
    metric = torch.randn(batch, n, 4, generator=g)
    state = TokenState.init(x)
    max_r = (n + 1) // 2 - 1  # A tokens minus the protected one
    if r > max_r:
        with pytest.raises(ValueError, match="cannot merge"):
            dtome_step(state, metric, mode="find", protect_first=True, r=r)
        return
    out, thr = dtome_step(state, metric, mode="find", protect_first=True, r=r)
    assert int(out.num_tokens.sum()) == batch * (n - r)
    assert thr >= 0
    check_mass(out, x, torch.full((batch,), n), int(r > 0))  # finding takes the authors' batch path


def test_merge_tokens_keeps_dtype():
    x = torch.randn(1, 6, 4, dtype=torch.bfloat16)
    state = TokenState.init(x)
    out = merge_tokens(state, torch.tensor([[False, True, False]]), torch.tensor([[1, 3, 5]]))
    assert out.x.dtype == torch.bfloat16 and out.num_tokens.tolist() == [5]


def test_fixed_mode_is_tome_per_image():
    """Fixed mode merges each image's own r best pairs (ToMe), independent of the other images, on a held-out
    batch; a batch-wide top-B·r (finding's selection) picks differently and fails the same check."""
    from dymu.merge import TokenState, bipartite_scores, dtome_step, select_top

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 17, 8, generator=g)
    x[0] = x[0, :1] + 0.05 * torch.randn(17, 8, generator=g)  # image 0: near-duplicates, high scores everywhere
    metric = x.clone()
    r = 4
    state, found = dtome_step(TokenState.init(x), metric, mode="fixed", protect_first=True, r=r)
    assert found is None
    assert state.num_tokens.tolist() == [17 - r] * 3
    for b in range(3):
        alone, _ = dtome_step(TokenState.init(x[b : b + 1]), metric[b : b + 1], mode="fixed", protect_first=True, r=r)
        torch.testing.assert_close(state.x[b], alone.x[0])
        assert torch.equal(state.source_map[b], alone.source_map[0])
    scores, _ = bipartite_scores(metric, torch.ones(3, 17, dtype=torch.bool), True)
    batch_top, _ = select_top(scores, r)
    assert batch_top.sum(1).tolist() != [r] * 3  # the batch-wide selection is not per image
    with pytest.raises(ValueError, match="cannot merge 9 tokens"):
        dtome_step(TokenState.init(x), metric, mode="fixed", protect_first=True, r=9)
