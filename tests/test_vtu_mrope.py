"""VTU with M-RoPE: the text models of tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL, fp32 on CPU.

Mirrors tests/test_vtu.py. Every virtual position has the (t, h, w) position the stock ``get_rope_index`` gives the
*unmerged* sequence (an image of h x w LLM tokens at (start, start + row, start + col), the text after it at
start + max(h, w)). The reference is the definition of VTU, written without dymu: per layer, copy every merged token
to each of its virtual positions, run the stock attention module over the whole sequence with stock M-RoPE cos/sin at
those positions (causal), average each group's outputs back to its merged token; norms and the MLP on merged tokens.
Language-model weights are re-initialised with std 0.3 so attention is far from uniform.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from dymu.vtu import (  # noqa: E402
    concat_groups, disable_vtu, enable_vtu, output_cache, prepare_vtu, vtu_context, vtu_forward, vtu_generate,
    vtu_kernels,
)
from dymu.vtu.mrope import mrope_components  # noqa: E402
import vtu_helpers as helpers  # noqa: E402
from vtu_helpers import maxdiff, redraw_except_norms  # noqa: E402

HIDDEN, VOCAB, IMAGE = 64, 97, 96
TEXT = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16: 8 frequencies
TOKENS = dict(image_token_id=IMAGE, video_token_id=95, vision_start_token_id=94)
VISION2 = dict(depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, spatial_merge_size=2)


def _qwen3_config() -> Qwen3VLConfig:
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                  spatial_merge_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    text = dict(TEXT, head_dim=16, rope_parameters={**ROPE, "mrope_interleaved": True})
    return Qwen3VLConfig(text_config=text, vision_config=vision, **TOKENS)


BUILDERS = {
    "qwen2_vl": lambda: Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=ROPE), vision_config=VISION2, **TOKENS)),
    "qwen2_5_vl": lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters=ROPE),
        vision_config=dict(VISION2, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN, window_size=56,
                           fullatt_block_indexes=[0]), **TOKENS)),
    "qwen3_vl": lambda: Qwen3VLForConditionalGeneration(_qwen3_config()),
}


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    model.set_attn_implementation("sdpa")
    redraw_except_norms(list(model.model.language_model.named_parameters()) + list(model.lm_head.named_parameters()))
    model.generation_config.eos_token_id = None  # fixed-length greedy runs, comparable token by token
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {kind: make_model(kind) for kind in ("qwen2_vl", "qwen3_vl")}


# ---------------------------------------------------------------------------------------------
# Sequences: text, (image, text)*, with stock positions and random groups
# ---------------------------------------------------------------------------------------------


def stock_sequence(model: nn.Module, gen: torch.Generator, images: int = 1, text_first: int | None = None,
                   image_last: bool = False):
    """``(input_ids [N], mm_token_type_ids [N], image_grid_thw [I, 3], positions [3, N], local group maps)`` of one
    unmerged sequence: images of h x w LLM tokens (h != w, so the text after one resumes at max(h, w), not at h*w),
    the positions from the stock ``get_rope_index``, each image's tokens merged into random non-contiguous groups.
    ``image_last``: the prompt ends with the last image (decoding then continues at its last patch + 1)."""
    first = int(torch.randint(1, 4, (1,), generator=gen)) if text_first is None else text_first
    ids = [torch.randint(0, 90, (first,), generator=gen)]
    grids, locals_ = [], []
    for _ in range(images):
        h, w = (int(torch.randint(2, 5, (1,), generator=gen)) for _ in range(2))
        w = w + 1 if w == h else w
        n = h * w
        k = int(torch.randint(1, n // 2 + 2, (1,), generator=gen))
        local = torch.randint(0, k, (n,), generator=gen)
        local[torch.randperm(n, generator=gen)[:k]] = torch.arange(k)
        after = int(torch.randint(1, 4, (1,), generator=gen))
        ids += [torch.full((n,), IMAGE), torch.randint(0, 90, (after,), generator=gen)]
        grids.append([1, 2 * h, 2 * w])  # the patch grid; the LLM sees it merged 2 x 2
        locals_.append(local)
    ids = torch.cat(ids[:-1] if image_last else ids)
    types = (ids == IMAGE).int()
    grid = torch.tensor(grids)
    positions, _ = model.model.get_rope_index(ids[None], types[None], image_grid_thw=grid)
    return ids, types, grid, positions[:, 0], locals_


def merged_case(model: nn.Module, gen: torch.Generator, images: int = 1, image_last: bool = False):
    """``(groups [N], positions [3, N], merged embeds [M, C], wrong positions [3, N], visual slots [M] bool)`` for
    VTU, from a stock sequence. The wrong positions continue the text after each image at start + (its merged count)
    instead of start + max(h, w): positions counted on the merged layout."""
    _, types, _, positions, locals_ = stock_sequence(model, gen, images, image_last=image_last)
    parts: list = []
    wrong = positions.clone()
    runs = torch.unique_consecutive(types, return_counts=True)
    it, end = iter(locals_), 0
    for kind, count in zip(*(r.tolist() for r in runs)):
        end += count
        if not kind:
            parts.append(count)
            continue
        local = next(it)
        parts.append(local)
        span = int(positions[1:, end - count:end].max() - positions[0, end - count]) + 1  # max(h, w)
        wrong[:, end:] += int(local.max()) + 1 - span
    groups = concat_groups(parts)
    m = int(groups.max()) + 1
    visual = torch.zeros(m, dtype=torch.bool).index_fill_(0, groups[types.bool()], True)
    return groups, positions, torch.randn(m, HIDDEN, generator=gen), wrong, visual


# ---------------------------------------------------------------------------------------------
# The reference: plain, no dymu, one sequence at a time
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logits(model: nn.Module, embeds: torch.Tensor, groups: torch.Tensor, positions: torch.Tensor,
                     deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None):
    """VTU by definition: logits ``[M, V]`` of merged tokens ``embeds [M, C]`` with ``groups [N]`` at M-RoPE
    ``positions [3, N]``: stock attention modules and stock M-RoPE cos/sin over the expanded sequence.
    ``deepstack``: (visual slots [M] bool, features [K, C] per layer) added to the visual slots after those layers
    (Qwen3-VL; a merged token's feature is its group's, so adding it to the token adds it to every copy)."""
    dec = model.model.language_model
    m, n = embeds.shape[0], groups.numel()
    sizes = torch.bincount(groups, minlength=m).float()[None, :, None]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    h = embeds[None]
    cos, sin = dec.rotary_emb(h, positions[:, None])  # [1, N, D]
    for i, layer in enumerate(dec.layers):
        x = layer.input_layernorm(h)[:, groups]  # expand: copy each merged token to its positions
        a, _ = layer.self_attn(hidden_states=x, attention_mask=causal, position_embeddings=(cos, sin))
        h = h + torch.zeros(1, m, a.shape[-1]).index_add_(1, groups, a) / sizes  # group mean (o_proj is linear)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if deepstack is not None and i < len(deepstack[1]):
            h[:, deepstack[0]] += deepstack[1][i]
    return model.lm_head(dec.norm(h))[0]


@torch.no_grad()
def reference_step_logits(model, embeds, groups, positions, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[S, V]`` of every decode step by the definition, teacher-forced on ``tokens [S]``:
    generated tokens are groups of one, each at the previous position + 1 in all three components (where the
    stock model continues after the prompt's last token)."""
    rows = []
    for tok in tokens.tolist():
        rows.append(reference_logits(model, embeds, groups, positions)[-1])
        embeds = torch.cat([embeds, model.model.language_model.embed_tokens.weight[tok][None]])
        groups = torch.cat([groups, groups.max()[None] + 1])
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
    return torch.stack(rows)


def vtu_logits(model, groups, positions, embeds, **kw) -> list[torch.Tensor]:
    return helpers.vtu_logits(model, groups, embeds, positions=positions, **kw)


def generate_with_logits(model, groups, positions, embeds, steps: int):
    batch = prepare_vtu(groups, positions=positions)
    with torch.no_grad():
        out = vtu_generate(model, batch, inputs_embeds=batch.pad(embeds), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, -steps:], torch.stack(out.logits, 1)


def decode_errors(model, groups, positions, embeds, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``max |VTU − reference|`` per sequence and step ``[B, S]`` (step 0 = prefill), and the logits."""
    tokens, logits = generate_with_logits(model, groups, positions, embeds, steps)
    refs = torch.stack([reference_step_logits(model, e, g, p, t)
                        for g, p, e, t in zip(groups, positions, embeds, tokens)])
    return (logits - refs).abs().amax(-1), logits


def cases(model, layout: str, seed: int = 3):
    """``single``: one sequence with two images; ``padded``: three sequences of different virtual and merged
    lengths (one ending with an image, one plain text), left-padded."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [merged_case(model, gen, images=2)[:4]]
    if layout == "padded":
        seqs.append(merged_case(model, gen, images=1, image_last=True)[:4])
        n = min(set(range(3, 64)) - {s[0].numel() for s in seqs} - {s[2].shape[0] for s in seqs})
        text = torch.arange(n).expand(3, n)
        seqs.append((torch.arange(n), text, torch.randn(n, HIDDEN, generator=gen), text))
        assert len({s[0].numel() for s in seqs}) == 3 and len({s[2].shape[0] for s in seqs}) == 3
    groups, positions, embeds, wrong = (list(x) for x in zip(*seqs))
    return groups, positions, embeds, wrong


TOL = 1e-4
STEPS = 5


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def test_sections_are_read_from_the_stock_rotary(models):
    """Qwen2-VL chunks the 8 frequencies t,t | h,h,h | w,w,w; Qwen3-VL interleaves t,h,w,t,h,w,t,h (mrope_section
    [2, 3, 3]): what each stock rotary applies, and the frequency matrix turns each by its own component."""
    assert mrope_components(models["qwen2_vl"].model.language_model.rotary_emb).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert mrope_components(models["qwen3_vl"].model.language_model.rotary_emb).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "padded"])
@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_decode_logits_equal_reference_every_step(models, kind, mode, layout):
    """Prefill and every cached decode step of greedy generation equal the definition (each sequence alone)."""
    model = models[kind]
    groups, positions, embeds, _ = cases(model, layout)
    enable_vtu(model, mode)
    try:
        err, logits = decode_errors(model, groups, positions, embeds, STEPS)
    finally:
        disable_vtu(model)
    assert float(err.max()) <= TOL, (kind, mode, layout, err.tolist())
    assert float(logits.abs().max()) > 1.0


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_cache_stays_at_merged_length(models, kind):
    model = models[kind]
    groups, positions, embeds, _ = cases(model, "single")
    batch = prepare_vtu(groups, positions=positions)
    enable_vtu(model, "fast")
    try:
        with torch.no_grad():
            out = vtu_generate(model, batch, inputs_embeds=batch.pad(embeds), max_new_tokens=3, do_sample=False,
                               pad_token_id=0, return_dict_in_generate=True)
    finally:
        disable_vtu(model)
    assert batch.max_merged < batch.max_virtual
    assert output_cache(out).get_seq_length() == batch.max_merged + 3 - 1  # merged prompt + tokens fed back


def test_qwen3_deepstack_at_merged_slots(models):
    """Qwen3-VL's text model adds DeepStack features at ``visual_pos_masks`` after its first layers: with VTU the
    mask and the features are at merged length (one feature per merged visual token), and the logits equal the
    definition with the features added to the merged tokens."""
    model = models["qwen3_vl"]
    dec = model.model.language_model
    g, p, e, _, visual = merged_case(model, torch.Generator().manual_seed(4), images=2)
    gen = torch.Generator().manual_seed(5)
    features = [torch.randn(int(visual.sum()), HIDDEN, generator=gen) for _ in range(2)]
    want = reference_logits(model, e, g, p, deepstack=(visual, features))
    assert float((want - reference_logits(model, e, g, p)).abs().max()) > 100 * TOL  # the features matter
    batch = prepare_vtu([g], positions=[p])
    for mode in ("fast", "exact"):
        enable_vtu(dec, mode)
        try:
            with torch.no_grad():
                out = vtu_forward(dec, batch, inputs_embeds=batch.pad([e]), visual_pos_masks=batch.pad([visual]),
                                  deepstack_visual_embeds=features)
                got = model.lm_head(out.last_hidden_state)[0]
        finally:
            disable_vtu(dec)
        assert float((got - want).abs().max()) <= TOL, mode


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen3_vl"])
def test_fast_exact_batch_and_one_by_one_agree(models, kind):
    """Prefill logits of every merged token: fast (blocked CPU form and SDPA form) == exact == the definition,
    batched (left and right padding) == one by one; plain merged tokens at their representative positions (no VTU)
    are far off."""
    model = models[kind]
    groups, positions, embeds, _ = cases(model, "padded", seed=5)
    refs = [reference_logits(model, e, g, p) for g, p, e in zip(groups, positions, embeds)]
    got = {}
    for mode in ("fast", "fast sdpa", "exact"):
        enable_vtu(model, mode.split()[0])
        try:
            with vtu_kernels(prefill="fast_sdpa" if mode == "fast sdpa" else None):
                got[mode] = vtu_logits(model, groups, positions, embeds)
                got[mode + " right"] = vtu_logits(model, groups, positions, embeds, padding_side="right")
                got[mode + " alone"] = [vtu_logits(model, [g], [p], [e])[0]
                                        for g, p, e in zip(groups, positions, embeds)]
        finally:
            disable_vtu(model)
    for name, logits in got.items():
        assert maxdiff(logits, refs) <= TOL, (name, maxdiff(logits, refs))
    assert maxdiff(got["fast"], got["fast sdpa"]) > 0  # both forms ran
    # without VTU the merged tokens see each other at one position per slot: the comparison can tell
    batch = prepare_vtu(groups, positions=positions)
    with torch.no_grad():
        plain = batch.unpad(model(inputs_embeds=batch.pad(embeds), attention_mask=batch.attention_mask,
                                  position_ids=batch.model_position_ids).logits)
    assert maxdiff(plain, refs) > 100 * TOL


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_identity_groups_equal_stock_generate(kind):
    """Nothing merged: VTU's prefill and decode logits equal stock ``generate`` on the token ids with
    ``image_grid_thw`` and ``mm_token_type_ids`` (which builds the M-RoPE positions and their decode
    continuation itself), for a left-padded batch of two (one prompt ends with an image)."""
    model = make_model(kind)
    gen = torch.Generator().manual_seed(11)
    seqs = [stock_sequence(model, gen, images=i, text_first=2 + i, image_last=i == 1) for i in (1, 2)]
    n = max(s[0].numel() for s in seqs)
    pad = lambda x, v: torch.stack([torch.cat([x_.new_full((n - x_.numel(),), v), x_]) for x_ in x])  # noqa: E731
    ids, types = pad([s[0] for s in seqs], 0), pad([s[1] for s in seqs], 0)
    mask = pad([torch.ones_like(s[0]) for s in seqs], 0)
    with torch.no_grad():
        stock = model.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, max_new_tokens=STEPS,
                               image_grid_thw=torch.cat([s[2] for s in seqs]), do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
    stock_logits = torch.stack(stock.logits, 1)
    embed = model.model.language_model.embed_tokens
    groups = [torch.arange(s[0].numel()) for s in seqs]
    for mode in ("fast", "exact"):
        enable_vtu(model, mode)
        try:
            tokens, logits = generate_with_logits(model, groups, [s[3] for s in seqs],
                                                  [embed(s[0]).detach() for s in seqs], STEPS)
        finally:
            disable_vtu(model)
        assert torch.equal(tokens, stock.sequences[:, -STEPS:]), mode
        assert float((logits - stock_logits).abs().max()) <= TOL, (mode, float((logits - stock_logits).abs().max()))


def test_forward_with_autograd_gives_the_definitions_gradients():
    """Outside torch.no_grad VTU with M-RoPE is differentiable: the gradients of the merged inputs and of a key
    projection equal the definition's (Qwen3-VL, padded batch; fast blocked, fast SDPA, exact)."""
    model = make_model("qwen3_vl", seed=5)
    groups, positions, embeds, _ = cases(model, "padded", seed=12)
    gen = torch.Generator().manual_seed(13)
    weights = [torch.randn(e.shape[0], VOCAB, generator=gen) for e in embeds]
    definition = reference_logits.__wrapped__  # without its no_grad
    want, got = helpers.definition_and_vtu_gradients(
        model, embeds, weights, model.model.language_model.layers[0].self_attn.k_proj.weight,
        lambda xs: [definition(model, x, g, p) for x, g, p in zip(xs, groups, positions)],
        lambda: prepare_vtu(groups, positions=positions))
    scale = max(float(w.abs().max()) for w in want)
    for name, grads in got.items():
        assert maxdiff(grads, want) <= 1e-4 * scale, (name, maxdiff(grads, want), scale)


# ---------------------------------------------------------------------------------------------
# Deliberately wrong variants
# ---------------------------------------------------------------------------------------------


def _decode_positions_from_merged_count(monkeypatch, decoder):
    """Wrong decode: generated tokens rotated N_b − M_b too early in every component (the stock rope-delta
    continuation counted on a merged-length cache). The position guard is switched off."""
    import dymu.vtu.integration

    monkeypatch.setattr(dymu.vtu.integration, "check_call_positions", lambda *args: None)

    def shift(module, args, kwargs):
        from dymu.vtu import current_vtu_batch

        batch, positions = current_vtu_batch(), kwargs["position_ids"]
        if batch is not None and positions.shape[-1] != batch.max_merged:  # decode steps; prefill stays right
            kwargs["position_ids"] = positions - (batch.num_virtual - batch.num_merged)[None, :, None]
        return args, kwargs

    return decoder.register_forward_pre_hook(shift, with_kwargs=True)


@pytest.mark.parametrize("variant", ["positions-from-merged-count", "text-shifted-by-merged-length", "qwen3-chunked"])
def test_comparison_catches_wrong_variants(models, variant, monkeypatch):
    """Each wrong variant makes the equivalence test fail, far beyond the tolerance."""
    kind = "qwen2_vl" if variant == "text-shifted-by-merged-length" else "qwen3_vl"
    model = models[kind]
    groups, positions, embeds, wrong = cases(model, "padded")
    hook = None
    if variant == "positions-from-merged-count":
        hook = _decode_positions_from_merged_count(monkeypatch, model.model.language_model)
    elif variant == "qwen3-chunked":
        import dymu.vtu.positions

        chunked = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
        monkeypatch.setattr(dymu.vtu.positions, "mrope_components", lambda rotary: chunked)
    try:
        enable_vtu(model, "fast")
        if variant == "text-shifted-by-merged-length":
            assert not all(torch.equal(w, p) for w, p in zip(wrong, positions))
            err = maxdiff(vtu_logits(model, groups, wrong, embeds),
                          [reference_logits(model, e, g, p) for g, p, e in zip(groups, positions, embeds)])
            assert err > 1000 * TOL, err
        else:
            err, _ = decode_errors(model, groups, positions, embeds, STEPS)
            if variant == "positions-from-merged-count":  # prefill right, every decode step of a merged row off
                assert float(err[:, 0].max()) <= TOL
                assert float(err[:2, 1:].min()) > 1000 * TOL, err.tolist()
            else:  # the chunked sections turn only some frequencies wrong: a smaller, still clear error
                assert float(err[:2, 0].min()) > 100 * TOL, err.tolist()
        disable_vtu(model)
        if variant != "text-shifted-by-merged-length":  # (wrong input positions: the assertion above is the check)
            for mode in ("fast", "exact"):  # the equivalence test itself fails
                with pytest.raises(AssertionError):
                    test_decode_logits_equal_reference_every_step(models, kind, mode, "padded")
    finally:
        disable_vtu(model)
        if hook is not None:
            hook.remove()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_positions_and_calls(models):
    model = models["qwen2_vl"]
    gen = torch.Generator().manual_seed(1)
    g, p, e, *_ = merged_case(model, gen)
    with pytest.raises(ValueError, match=r"positions\[0\] must be a \[P, N\] LongTensor with N = "):
        prepare_vtu([g], positions=[p[:, 1:]])
    with pytest.raises(ValueError, match=r"positions has 2 entries for 1 sequences"):
        prepare_vtu([g], positions=[p, p])
    with pytest.raises(ValueError, match=r"must hold integer positions"):
        prepare_vtu([g], positions=[p.float()])
    batch = prepare_vtu([g], positions=[p])
    enable_vtu(model, "fast")
    try:
        with torch.no_grad(), vtu_context(batch):
            # generate without positions numbers the merged slots 0..M-1
            with pytest.raises(ValueError, match=r"M-RoPE position ids do not match.*batch.model_position_ids"):
                model.generate(inputs_embeds=batch.pad([e]), attention_mask=batch.attention_mask, max_new_tokens=2,
                               pad_token_id=0)
        with pytest.raises(ValueError, match=r"uses M-RoPE; give prepare_vtu the \(3, N\) position ids"):
            vtu_forward(model, prepare_vtu([g]), inputs_embeds=batch.pad([e]))
        with pytest.raises(ValueError, match=r"has 3 position components \(t, h, w\); the batch's positions have 2"):
            vtu_forward(model, prepare_vtu([g], positions=[p[:2]]), inputs_embeds=batch.pad([e]))
    finally:
        disable_vtu(model)


def test_one_dimensional_decoder_refuses_mrope_positions():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**TEXT)).eval()
    g = concat_groups([1, torch.tensor([0, 1, 0]), 1])
    batch = prepare_vtu([g], positions=[torch.arange(5).expand(3, 5)])
    enable_vtu(model, "fast")
    try:
        with pytest.raises(ValueError, match=r"batch has M-RoPE positions .* but this decoder uses 1-D RoPE"):
            vtu_forward(model, batch, inputs_embeds=torch.randn(1, 4, HIDDEN))
    finally:
        disable_vtu(model)


def test_benchmark_tiny_mrope_runs(capsys, monkeypatch):
    """``python -m bench.vtu_prefill --tiny --family qwen2_5_vl``: every row, a merged-length cache and fast ≈ exact
    (no timing assertions)."""
    import re
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from bench import vtu_prefill

    assert vtu_prefill.main(["--tiny", "--family", "qwen2_5_vl"]) == 0
    out = capsys.readouterr().out
    assert "(qwen2_5_vl)" in out
    row = r"^(full \(stock sdpa\)|merged, no VTU|VTU fast|VTU exact)\s+\d+\s+\S+\s+\S+\s+(\d+)"  # name ... kv bytes
    kv = {name: int(b) for name, b in re.findall(row, out, re.MULTILINE)}
    assert len(kv) == 4 and all(kv[n] < kv["full (stock sdpa)"] for n in kv if not n.startswith("full"))
    check = re.search(r"max \|fast - exact\| on the last hidden state = (\S+)", out)
    assert check and float(check.group(1)) < 1e-3
