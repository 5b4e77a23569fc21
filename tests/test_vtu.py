"""VTU (virtual token unmerging) on tiny random Llama / Qwen2 / Mistral decoders, fp32 on CPU.

Weights are re-initialised with std 0.3 so attention is far from uniform: with the default 0.02
every position looks alike and position bugs hide. The reference below is the *definition* of VTU,
written without dymu: per layer, expand the merged tokens to the full virtual sequence (M·e), run
plain causal attention with RoPE at positions 0..N-1, average each group's attention outputs back to
its merged token; the residual adds, norms, o_proj and MLP act on merged tokens (VTU unmerges
attention only; copies of one token are identical before attention, so norms/projections commute).
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from dymu.testing import plain_attention  # noqa: E402
from vtu_helpers import definition_and_vtu_gradients, maxdiff, redraw_except_norms, vtu_logits  # noqa: E402

from dymu.vtu import cache_kwarg, output_cache  # noqa: E402
from dymu.vtu import (  # noqa: E402
    concat_groups,
    current_vtu_batch,
    disable_vtu,
    enable_vtu,
    prepare_vtu,
    vtu_context,
    vtu_forward,
    vtu_generate,
    vtu_kernels,
    vtu_mode,
)

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 64
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}
SMALL = dict(
    hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=97, max_position_embeddings=256,
)


def make_model(kind: str, seed: int = 0, **overrides) -> nn.Module:
    config_cls, model_cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**SMALL, **extra, **overrides})
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    redraw_except_norms(model.named_parameters())
    model.generation_config.eos_token_id = None  # fixed-length greedy runs, comparable token by token
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {kind: make_model(kind) for kind in FAMILIES}


def random_groups(gen: torch.Generator, images: int = 1) -> torch.Tensor:
    """text, (image, text)*: images of 6..20 positions merged to 1..n slots, non-contiguous groups."""
    parts: list = [int(torch.randint(0, 4, (1,), generator=gen))]
    for _ in range(images):
        n = int(torch.randint(6, 21, (1,), generator=gen))
        k = int(torch.randint(1, n // 2 + 2, (1,), generator=gen))
        local = torch.randint(0, k, (n,), generator=gen)
        local[torch.randperm(n, generator=gen)[:k]] = torch.arange(k)
        parts += [local, int(torch.randint(1, 5, (1,), generator=gen))]
    return concat_groups(parts)


def random_embeds(groups: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(int(groups.max()) + 1, HIDDEN, generator=gen)


# ---------------------------------------------------------------------------------------------
# The reference: plain, no dymu, one sequence at a time
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logits(
    model: nn.Module, embeds: torch.Tensor, groups: torch.Tensor, virtual_positions=None, decoder=None
) -> torch.Tensor:
    """VTU by definition: logits [M, V] of merged tokens ``embeds [M, C]`` with ``groups [N]``."""
    dec = model.model if decoder is None else decoder
    m, n = embeds.shape[0], groups.numel()
    positions = torch.arange(n)[None] if virtual_positions is None else virtual_positions[None]
    sizes = torch.bincount(groups, minlength=m).float()[None, :, None]
    h = embeds[None]
    for layer in dec.layers:
        x = layer.input_layernorm(h)[:, groups]  # expand: copy each merged token to its positions
        cos, sin = dec.rotary_emb(x, positions)
        a = plain_attention(layer.self_attn, x, cos, sin)
        a = torch.zeros(1, m, a.shape[-1]).index_add_(1, groups, a) / sizes  # group mean
        h = h + layer.self_attn.o_proj(a)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(dec.norm(h))[0]


@torch.no_grad()
def reference_greedy(model: nn.Module, embeds: torch.Tensor, groups: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding by the definition: every step recomputes the reference on the grown sequence."""
    out = []
    for _ in range(steps):
        tok = int(reference_logits(model, embeds, groups)[-1].argmax())
        out.append(tok)
        embeds = torch.cat([embeds, model.model.embed_tokens.weight[tok][None]])
        groups = torch.cat([groups, groups.max()[None] + 1])
    return out


def greedy(model: nn.Module, groups: list[torch.Tensor], embeds: list[torch.Tensor], steps: int) -> list[list[int]]:
    batch = prepare_vtu(groups)
    with torch.no_grad():
        out = vtu_generate(model, batch, inputs_embeds=batch.pad(embeds), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0)
    return out[:, -steps:].tolist()


@torch.no_grad()
def reference_step_logits(
    model: nn.Module, embeds: torch.Tensor, groups: torch.Tensor, tokens: torch.Tensor, decoder=None
) -> torch.Tensor:
    """Next-token logits ``[S, V]`` of every decode step by the definition, teacher-forced on ``tokens [S]``.

    Step t is the reference on the prompt plus ``tokens[:t]``, recomputed from scratch (each merged token
    expanded to its virtual positions, each copy at its own RoPE position; generated tokens are groups of
    one at ``N, N+1, ...``): no cache, no dymu. Feeding the tokens the model under test generated keeps
    the comparison meaningful at every step even where two logits are close.
    """
    dec = model.model if decoder is None else decoder
    rows = []
    for tok in tokens.tolist():
        rows.append(reference_logits(model, embeds, groups, decoder=decoder)[-1])
        embeds = torch.cat([embeds, dec.embed_tokens.weight[tok][None]])
        groups = torch.cat([groups, groups.max()[None] + 1])
    return torch.stack(rows)


def generate_with_logits(
    model: nn.Module, groups: list[torch.Tensor], embeds: list[torch.Tensor], steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy VTU generation: new tokens ``[B, S]`` and the logits ``generate`` scored each step with ``[B, S, V]``."""
    batch = prepare_vtu(groups)
    with torch.no_grad():
        out = vtu_generate(model, batch, inputs_embeds=batch.pad(embeds), max_new_tokens=steps, do_sample=False,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1)
    assert logits.shape[:2] == (len(groups), steps)
    return out.sequences[:, -steps:], logits


def decode_errors(
    model: nn.Module, groups: list[torch.Tensor], embeds: list[torch.Tensor], steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``max |VTU − reference|`` per sequence and step ``[B, S]`` (step 0 = prefill, then cached decode steps),
    and the generated logits. The reference runs each sequence alone on the tokens the batch generated."""
    tokens, logits = generate_with_logits(model, groups, embeds, steps)
    refs = torch.stack([reference_step_logits(model, e, g, t) for g, e, t in zip(groups, embeds, tokens)])
    return (logits - refs).abs().amax(-1), logits


# ---------------------------------------------------------------------------------------------
# Groups and layout
# ---------------------------------------------------------------------------------------------


def test_concat_groups_and_layout():
    g = concat_groups([2, torch.tensor([0, 0, 1, 0]), 1])
    assert g.tolist() == [0, 1, 2, 2, 3, 2, 4]
    batch = prepare_vtu([g, torch.arange(3)])
    assert batch.max_merged == 5 and batch.max_virtual == 7
    assert batch.num_virtual.tolist() == [7, 3] and batch.num_merged.tolist() == [5, 3]
    # left padding; last real slot sits at N_b - 1 so generate continues at N_b
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch.position_ids[0, -1] == 6 and batch.position_ids[1, -1] == 2
    assert batch.position_ids[0, 2] in (2, 3, 5)  # a member of its group
    assert batch.group_index[1].tolist() == [-1, -1, -1, -1, 2, 3, 4]
    assert batch.group_sizes[0].tolist() == [1, 1, 3, 1, 1]
    right = prepare_vtu([g, torch.arange(3)], padding_side="right")
    assert right.attention_mask[1].tolist() == [1, 1, 1, 0, 0]
    x = right.pad([torch.ones(5, 2), torch.ones(3, 2)])
    assert x.shape == (2, 5, 2) and x[1, 3:].abs().sum() == 0
    assert [t.shape[0] for t in right.unpad(x)] == [5, 3]


# ---------------------------------------------------------------------------------------------
# Stock equivalence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_identity_groups_equal_stock_after_save_and_load(kind, tmp_path):
    stock = make_model(kind, seed=1)
    stock.save_pretrained(tmp_path)
    loaded = type(stock).from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = stock(input_ids=ids).logits
    for mode in ("fast", "exact"):
        enable_vtu(loaded, mode)
        assert vtu_mode(loaded) == mode
        batch = prepare_vtu([torch.arange(ids.shape[1])])
        with torch.no_grad():
            got = vtu_forward(loaded, batch, input_ids=ids).logits
        assert float((got - want).abs().max()) <= 1e-5, mode
    disable_vtu(loaded)
    assert vtu_mode(loaded) == "off" and loaded.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_enabled_without_groups_is_stock_sdpa(models, kind):
    """No VTU batch => the registered function is stock sdpa, padding mask included."""
    model = models[kind]
    ids = torch.randint(1, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        want_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        enable_vtu(model, "fast")
        try:
            got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            got_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
            with vtu_context(None):
                again = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        finally:
            disable_vtu(model)
    assert torch.equal(got[mask.bool()], want[mask.bool()]) and torch.equal(again, got)
    assert torch.equal(got_gen, want_gen)


# ---------------------------------------------------------------------------------------------
# VTU = its definition; fast = exact
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_fast_and_exact_equal_reference(models, kind):
    model = models[kind]
    gen = torch.Generator().manual_seed(3)
    groups = [random_groups(gen, images=1 + i % 2) for i in range(3)]
    embeds = [random_embeds(g, gen) for g in groups]
    refs = [reference_logits(model, e, g) for g, e in zip(groups, embeds)]
    try:
        for mode in ("fast", "exact"):
            enable_vtu(model, mode)
            single = [vtu_logits(model, [g], [e])[0] for g, e in zip(groups, embeds)]
            assert maxdiff(single, refs) <= 1e-4, mode
        enable_vtu(model, "fast")
        fast = [vtu_logits(model, [g], [e])[0] for g, e in zip(groups, embeds)]
        enable_vtu(model, "exact")
        exact = [vtu_logits(model, [g], [e])[0] for g, e in zip(groups, embeds)]
    finally:
        disable_vtu(model)
    assert maxdiff(fast, exact) <= 1e-4
    assert max(float(r.abs().max()) for r in refs) > 1.0  # logits are not trivially small


def test_exact_in_small_blocks_equals_fast(models, monkeypatch):
    """The exact path's blocking over kv heads and query slots (used for long sequences) changes nothing."""
    import dymu.vtu.exact

    model = models["qwen2"]
    gen = torch.Generator().manual_seed(7)
    groups = [random_groups(gen, images=2), random_groups(gen, images=1)]
    embeds = [random_embeds(g, gen) for g in groups]
    try:
        enable_vtu(model, "fast")
        fast = vtu_logits(model, groups, embeds)
        enable_vtu(model, "exact")
        monkeypatch.setattr(dymu.vtu.exact, "EXACT_CHUNK_ELEMENTS", 1)  # one kv head x one query slot per block
        exact = vtu_logits(model, groups, embeds)
    finally:
        disable_vtu(model)
    assert maxdiff(fast, exact) <= 1e-4


def test_reference_comparison_is_sensitive(models):
    """Plain merged tokens, or virtual positions one off, are far from VTU: the tests can fail."""
    model = models["llama"]
    gen = torch.Generator().manual_seed(4)
    g = concat_groups([2, torch.tensor([0, 1, 0, 2, 2, 1, 3, 0, 3, 3, 1, 2]), 3])
    e = random_embeds(g, gen)
    enable_vtu(model, "fast")
    try:
        got = vtu_logits(model, [g], [e])[0]
    finally:
        disable_vtu(model)
    ref = reference_logits(model, e, g)
    assert float((got - ref).abs().max()) <= 1e-4
    with torch.no_grad():
        plain = model(inputs_embeds=e[None]).logits[0]  # merged tokens at positions 0..M-1, no unmerging
    assert float((plain - ref).abs().max()) > 0.1
    # each image position gets its neighbour's slot: copies one position off
    shifted = g.clone()
    shifted[2:14] = g[2:14].roll(1)
    assert float((reference_logits(model, e, shifted) - got).abs().max()) > 0.1
    # a merged token re-rotated one position too far
    pos = torch.arange(g.numel())
    pos[2:14] += 1
    pos[14:] += 1
    off = reference_logits(model, e, g, virtual_positions=pos)
    assert float((off - got).abs().max()) > 0.1


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_matches_reference_and_keeps_merged_cache(models, kind):
    model = models[kind]
    gen = torch.Generator().manual_seed(5)
    g = random_groups(gen, images=2)
    e = random_embeds(g, gen)
    want = reference_greedy(model, e, g, steps=5)
    try:
        results = {}
        for mode in ("fast", "exact"):
            enable_vtu(model, mode)
            results[mode] = greedy(model, [g], [e], steps=5)[0]
        batch = prepare_vtu([g])
        with torch.no_grad(), vtu_context(batch):
            out = model(inputs_embeds=batch.pad([e]), attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=True)
            gen_out = model.generate(inputs_embeds=batch.pad([e]), attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids, max_new_tokens=4, do_sample=False,
                                     pad_token_id=0, return_dict_in_generate=True)
    finally:
        disable_vtu(model)
    assert results["fast"] == want and results["exact"] == want
    m = int(g.max()) + 1
    assert m < g.numel()
    assert output_cache(out).get_seq_length() == m  # merged length, not N
    assert output_cache(gen_out).get_seq_length() == m + 4 - 1  # + generated tokens fed back


# Decode, step by step: the logits of every generated token, not only the greedy tokens (whose top-1 /
# top-2 margins go down to a few hundredths here, so a smaller decode error would pass a token test).
DECODE_STEPS = 6
DECODE_TOL = 1e-4


def decode_case(layout: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``single``: one sequence (two images); ``padded``: four sequences of different virtual and merged
    lengths, left-padded in both layouts (one of them plain text, N = M)."""
    gen = torch.Generator().manual_seed(8)
    groups = [random_groups(gen, images=2), random_groups(gen, images=1), torch.arange(5), random_groups(gen, images=1)]
    embeds = [random_embeds(g, gen) for g in groups]
    if layout == "single":
        return groups[:1], embeds[:1]
    assert len({g.numel() for g in groups}) == 4 and len({e.shape[0] for e in embeds}) == 4
    return groups, embeds


@pytest.mark.parametrize("layout", ["single", "padded"])
@pytest.mark.parametrize("mode", ["fast", "exact"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decode_logits_equal_reference_every_step(models, kind, mode, layout):
    model = models[kind]
    groups, embeds = decode_case(layout)
    enable_vtu(model, mode)
    try:
        err, logits = decode_errors(model, groups, embeds, DECODE_STEPS)
    finally:
        disable_vtu(model)
    assert float(err.max()) <= DECODE_TOL, (kind, mode, layout, err.amax(0).tolist())
    assert float(logits.abs().max()) > 1.0  # logits are not trivially small


def _decode_attends_padded_columns(monkeypatch):
    """Wrong decode: the new token also attends the padded columns of the virtual prompt layout."""
    import dymu.vtu.layout

    build = dymu.vtu.layout._build_layout

    def wrong(batch, q_len, kv_len, device):
        lay = build(batch, q_len, kv_len, device)
        if q_len != kv_len:  # decode steps only; prefill stays right
            padded = batch.group_index.to(device) < 0  # [B, N_max]
            mask = lay.mask.clone()
            mask[:, :, : padded.shape[1]] |= padded[:, None, :]
            lay.mask, lay.sdpa_mask = mask, mask[:, None]
        return lay

    monkeypatch.setattr(dymu.vtu.layout, "_build_layout", wrong)


def _decode_positions_from_merged_count(monkeypatch, decoder):
    """Wrong decode: generated tokens rotated at M_b, M_b+1, ... (what generate does with positions numbered
    from the merged slots) while VTU places them at N_b, N_b+1, ... The position guard is switched off.
    Returns the hook handle on ``decoder`` (the text decoder module)."""
    import dymu.vtu.integration

    monkeypatch.setattr(dymu.vtu.integration, "check_call_positions", lambda *args: None)

    def shift(module, args, kwargs):
        batch = current_vtu_batch()
        positions = kwargs["position_ids"]
        if batch is not None and positions.shape[-1] != batch.max_merged:  # decode steps; prefill stays right
            kwargs["position_ids"] = positions - (batch.num_virtual - batch.num_merged).to(positions.device)[:, None]
        return args, kwargs

    return decoder.register_forward_pre_hook(shift, with_kwargs=True)


@pytest.mark.parametrize("variant", ["attends-padded-columns", "positions-from-merged-count"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decode_logits_comparison_catches_wrong_decode(models, kind, variant, monkeypatch):
    """The step-by-step comparison fails for a deliberately wrong decode step: prefill (step 0) still
    matches, every later step is far off the reference."""
    model = models[kind]
    groups, embeds = decode_case("padded")
    hook = None
    if variant == "attends-padded-columns":
        _decode_attends_padded_columns(monkeypatch)
    else:
        hook = _decode_positions_from_merged_count(monkeypatch, model.model)
    try:
        for mode in ("fast", "exact"):
            # the step-by-step test itself fails ...
            with pytest.raises(AssertionError, match="padded"):
                test_decode_logits_equal_reference_every_step(models, kind, mode, "padded")
            # ... because of the decode steps alone: prefill matches, every decode step is far off
            enable_vtu(model, mode)
            err, _ = decode_errors(model, groups, embeds, DECODE_STEPS)
            assert float(err[:, 0].max()) <= DECODE_TOL, (variant, mode)
            assert float(err[:, 1:].amax(0).min()) > 1000 * DECODE_TOL, (variant, mode, err.tolist())
    finally:
        disable_vtu(model)
        if hook is not None:
            hook.remove()


def test_cache_argument_follows_the_installed_transformers(models):
    """dymu passes the KV cache as ``cache`` (transformers >= 5.24) or ``past_key_values`` (before), whichever the
    installed forward names, and reads it back from outputs without the deprecated attribute."""
    import inspect
    import warnings

    model = models["llama"]
    name = cache_kwarg(model)
    assert name in inspect.signature(type(model).forward).parameters and cache_kwarg(model.model) == name
    assert cache_kwarg(nn.Identity()) == name  # no forward names it: decided by the transformers version
    ids = torch.randint(1, SMALL["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecate_kwarg warns with FutureWarning
        prefix = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], use_cache=True, **{name: output_cache(prefix)})
        full = model(input_ids=ids, use_cache=False)
    assert output_cache(step).get_seq_length() == 6 and output_cache(full) is None
    assert float((step.logits[0, -1] - full.logits[0, -1]).abs().max()) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batch_equals_one_by_one(models, kind):
    model = models[kind]
    gen = torch.Generator().manual_seed(6)
    groups = [random_groups(gen, images=1), random_groups(gen, images=2), torch.arange(5)]
    embeds = [random_embeds(g, gen) for g in groups]
    assert len({g.numel() for g in groups}) == 3 and len({e.shape[0] for e in embeds}) == 3
    try:
        for mode in ("fast", "exact"):
            enable_vtu(model, mode)
            single = [vtu_logits(model, [g], [e])[0] for g, e in zip(groups, embeds)]
            assert maxdiff(vtu_logits(model, groups, embeds), single) <= 1e-4, mode
            assert maxdiff(vtu_logits(model, groups, embeds, padding_side="right"), single) <= 1e-4, mode
            one_by_one = [greedy(model, [g], [e], steps=4)[0] for g, e in zip(groups, embeds)]
            assert greedy(model, groups, embeds, steps=4) == one_by_one, mode
        # the state can also travel as a forward kwarg
        batch = prepare_vtu(groups)
        with torch.no_grad():
            kw = model(inputs_embeds=batch.pad(embeds), attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, vtu_batch=batch).logits
        assert current_vtu_batch() is None
        assert maxdiff(batch.unpad(kw), single) <= 1e-4
    finally:
        disable_vtu(model)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fast_prefill_blocked_and_sdpa_equal_reference(models, kind, monkeypatch):
    """The fast path's CPU prefill in blocks (keys cut per row block, rows summed per slot before V) and its
    SDPA form (GPU) both equal the definition, alone and in padded batches, in big and in tiny blocks."""
    import dymu.vtu.fast_blocked_cpu as blocked_cpu

    model = models[kind]
    gen = torch.Generator().manual_seed(11)
    groups = [random_groups(gen, images=2), random_groups(gen, images=1), torch.arange(5)]
    # as many merged slots as the first, fewer virtual rows: its padding rows' index points at a real slot
    groups.append(concat_groups([1, torch.tensor([0, 1, 0, 2, 1, 0, 2, 2]), int(groups[0].max()) + 1 - 4]))
    embeds = [random_embeds(g, gen) for g in groups]
    assert groups[-1].max() == groups[0].max() and groups[-1].numel() < groups[0].numel()
    refs = [reference_logits(model, e, g) for g, e in zip(groups, embeds)]
    calls = []
    blocked = blocked_cpu._blocked_prefill
    monkeypatch.setattr(blocked_cpu, "_blocked_prefill", lambda *a: calls.append(1) or blocked(*a))
    results = {}
    settings = {"sdpa": ("fast_sdpa", {}), "blocked": (None, {}),  # (forced prefill kernel, module constants)
                "tiny blocks": (None, dict(BLOCK_ROWS=3, BLOCK_SCORE_ELEMENTS=1)),
                "mask too big": (None, dict(BLOCK_MASK_BYTES=0))}
    enable_vtu(model, "fast")
    try:
        for name, (forced, values) in settings.items():
            with monkeypatch.context() as m, vtu_kernels(prefill=forced):
                for attr, value in values.items():
                    m.setattr(blocked_cpu, attr, value)
                calls.clear()
                single = [vtu_logits(model, [g], [e])[0] for g, e in zip(groups, embeds)]
                left = vtu_logits(model, groups, embeds)
                right = vtu_logits(model, groups, embeds, padding_side="right")
                assert bool(calls) == (name in ("blocked", "tiny blocks")), name
            assert maxdiff(single, refs) <= 1e-4, name
            assert maxdiff(left, single) <= 1e-4 and maxdiff(right, single) <= 1e-4, name
            results[name] = left
    finally:
        disable_vtu(model)
    assert maxdiff(results["blocked"], results["sdpa"]) <= 1e-4
    assert maxdiff(results["tiny blocks"], results["sdpa"]) <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_forward_with_autograd_gives_the_definitions_gradients(kind):
    """Outside torch.no_grad (the parameters require grad) VTU runs and is differentiable: the gradients of the
    merged inputs and of a projection equal those of the definition, for the fast path (blocked and SDPA forms)
    and the exact path, in a padded batch."""
    model = make_model(kind, seed=5)
    gen = torch.Generator().manual_seed(12)
    groups = [random_groups(gen, images=2), random_groups(gen, images=1)]
    embeds = [random_embeds(g, gen) for g in groups]
    weights = [torch.randn(int(g.max()) + 1, SMALL["vocab_size"], generator=gen) for g in groups]
    definition = reference_logits.__wrapped__  # without its no_grad
    want, got = definition_and_vtu_gradients(
        model, embeds, weights, model.model.layers[0].self_attn.k_proj.weight,
        lambda xs: [definition(model, x, g) for x, g in zip(xs, groups)], lambda: prepare_vtu(groups))
    scale = max(float(w.abs().max()) for w in want)
    for name, grads in got.items():
        assert maxdiff(grads, want) <= 1e-4 * scale, name
    assert maxdiff(got["fast blocked"], got["fast sdpa"]) > 0  # both forms ran


def test_vlm_switches_only_the_text_model():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**SMALL), image_token_id=SMALL["vocab_size"] - 1)
    vlm = LlavaForConditionalGeneration(config).eval()
    redraw_except_norms(vlm.model.language_model.named_parameters())
    vlm.set_attn_implementation("sdpa")
    enable_vtu(vlm, "fast")
    try:
        assert vlm.config.text_config._attn_implementation == "dymu_vtu_fast"
        assert vlm.config.vision_config._attn_implementation == "sdpa"
        g = concat_groups([1, torch.tensor([0, 1, 1, 0]), 2])
        e = torch.randn(int(g.max()) + 1, HIDDEN)
        got = vtu_logits(vlm, [g], [e])[0]
        want = reference_logits(vlm, e, g, decoder=vlm.model.language_model)
        assert got.shape == (5, SMALL["vocab_size"]) and float((got - want).abs().max()) <= 1e-4
    finally:
        disable_vtu(vlm)
    assert vlm.config.text_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups, kw, message",
    [
        ([torch.tensor([0, 2, 2])], {}, r"does not cover merged slots \[1\]"),
        ([torch.tensor([0, -1, 1])], {}, r"groups\[0\]\[1\] = -1 is out of range"),
        ([torch.tensor([0, 1, 3])], {"num_merged": [3]}, r"groups\[0\]\[2\] = 3 is out of range.*0\.\.2"),
        ([torch.tensor([[0, 1]])], {}, r"must be a 1-D LongTensor"),
        ([torch.tensor([0.0, 1.0])], {}, r"integer slot indices"),
        ([], {}, r"at least one sequence"),
        ([torch.arange(3)], {"padding_side": "middle"}, r"padding_side must be 'left' or 'right'"),
    ],
)
def test_bad_groups(groups, kw, message):
    with pytest.raises(ValueError, match=message):
        prepare_vtu(groups, **kw)


def test_bad_calls(models):
    model = models["llama"]
    g = concat_groups([2, torch.tensor([0, 1, 0]), 2])
    e = torch.randn(int(g.max()) + 1, HIDDEN)
    batch = prepare_vtu([g])
    with pytest.raises(ValueError, match=r"merged length 4, but its groups have 6"):
        batch.pad([e[:4]])
    enable_vtu(model, "fast")
    try:
        with torch.no_grad(), vtu_context(batch):
            with pytest.raises(ValueError, match=r"merged length 5, but the VTU batch expects M_max = 6"):
                model(inputs_embeds=e[None, :5], attention_mask=batch.attention_mask[:, :5],
                      position_ids=batch.position_ids[:, :5])
            with pytest.raises(ValueError, match=r"batch has 1 sequences but the model input has batch size 2"):
                model(inputs_embeds=e[None].expand(2, -1, -1))
            with pytest.raises(ValueError, match=r"position_ids do not match.*continues at M instead of N"):
                model.generate(inputs_embeds=e[None], attention_mask=batch.attention_mask, max_new_tokens=2,
                               pad_token_id=0)
        with pytest.raises(ValueError, match=r"attention_mask comes from the VTU batch"):
            vtu_forward(model, batch, inputs_embeds=e[None], attention_mask=batch.attention_mask)
    finally:
        disable_vtu(model)
    with pytest.raises(ValueError, match=r"'fast', 'exact', 'off'"):
        enable_vtu(model, "fastest")
    with pytest.raises(TypeError, match="VTUBatch"):
        with vtu_context([g]):
            pass


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)),
         r"needs a RoPE text decoder.*GPT2LMHeadModel \(model_type 'gpt2'\)"),
        (lambda: make_model("llama", rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                      "original_max_position_embeddings": 128}),
         r"rope_type in \('default', 'linear', 'dynamic', 'llama3'\).*uses rope_type 'yarn'"),
        (lambda: make_model("llama", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                      "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                                      "original_max_position_embeddings": 128}),
         r"uses rope_type 'longrope'"),
        (lambda: make_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
         r"sliding-window attention.*sliding_window=16 on layers \[1\].*use_sliding_window=False"),
        (lambda: make_model("mistral", sliding_window=32),
         r"sliding-window attention.*sliding_window=32.*sliding_window=None"),
    ],
    ids=["gpt2", "yarn", "longrope", "qwen2-sliding", "mistral-sliding"],
)
def test_unsupported_models(build, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        enable_vtu(model, "fast")
    assert vtu_mode(model) == "off"


def test_qwen2_default_config_is_supported():
    model = make_model("qwen2")  # sliding_window is set in the config but not used (use_sliding_window=False)
    enable_vtu(model, "exact")
    assert model.config._attn_implementation == "dymu_vtu_exact"
    disable_vtu(model)


# ---------------------------------------------------------------------------------------------
# Benchmark smoke test (no timing assertions)
# ---------------------------------------------------------------------------------------------


def test_benchmark_tiny_runs_and_prints_wellformed_figures(monkeypatch, capsys):
    # `python -m bench.vtu_prefill --tiny`, run in this interpreter (runpy is what -m uses) to skip re-imports
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setattr(sys, "argv", ["vtu_prefill", "--tiny"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bench.vtu_prefill", run_name="__main__")
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    rows = {}
    pattern = re.compile(r"^(.+?)\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+\.\d+)$")
    for line in stdout.splitlines():
        m = pattern.match(line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)), int(m.group(5)), float(m.group(6)))
    assert list(rows) == ["full (stock sdpa)", "merged, no VTU", "VTU fast", "VTU exact"], stdout
    full = rows["full (stock sdpa)"]
    assert full[2] == 1.0 and full[4] == 1.0
    for name, (tokens, seconds, ratio, kv, kv_ratio) in rows.items():
        assert seconds > 0 and ratio > 0 and kv > 0
        if name != "full (stock sdpa)":
            assert tokens < full[0] and kv < full[3] and kv_ratio < 1.0  # merged-length cache
    check = re.search(r"max \|fast - exact\| on the last hidden state = (\S+)", stdout)
    assert check and float(check.group(1)) < 1e-3


def test_exact_size_buckets_trade_padding_against_op_count():
    """Slots sorted by size are cut into runs at size changes only: one run when ops are dear, one per size when
    padding is; every slot in exactly one run."""
    from dymu.vtu.exact import _BUCKET_OVERHEAD, _size_runs

    sizes = [5, 5, 4, 1, 1, 1]
    assert _size_runs(sizes, weight=1) == [(0, 6)]  # padding 5x6 - 17 = 13 elements ≪ one more bucket
    assert _size_runs(sizes, weight=10 * _BUCKET_OVERHEAD) == [(0, 2), (2, 3), (3, 6)]
    assert _size_runs([3], weight=1) == [(0, 1)]
