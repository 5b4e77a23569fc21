"""VTU — virtual token unmerging for RoPE decoders (Llama, Qwen2, Mistral; with M-RoPE the Qwen2-VL, Qwen2.5-VL and
Qwen3-VL text models, in transformers 5).

After DToMe, an image is a handful of merged tokens instead of its full patch grid. VTU lets the
language model act as if it saw the full *virtual* sequence ``M·e`` (every merged token copied back
to each original position, each copy at its own RoPE position) while linear layers, norms and the
MLP run only once per merged token. Per decoder layer:

* ``fast``: project Q, K, V on merged tokens; gather them to virtual length; RoPE at the virtual
  positions; causal SDPA over the virtual sequence; average each group's outputs back to one token.
* ``exact``: the same numbers without expanding Q and K: per-frequency ``dot = q1·k1 + q2·k2`` and
  ``cross = q2·k1 − q1·k2`` on merged pairs, combined with the virtual positions' cos/sin
  (``score = Σ_f dot·cos(θ_f Δ) − cross·sin(θ_f Δ)``); values are never expanded: attention weights
  are summed per key group and multiplied with the merged V. The fast path's verification twin (and its
  decode kernel: one query row per sequence makes it the cheaper one).

Three kernels compute these numbers, one algorithm per module (:mod:`dymu.vtu.fast_sdpa`,
:mod:`dymu.vtu.fast_blocked_cpu`, :mod:`dymu.vtu.exact`); which one a call runs for its mode, phase (prefill or
decode) and device is ONE table, :data:`dymu.vtu.integration.DISPATCH` (explained in ``docs/vtu.md``), and
:func:`vtu_kernels` forces one (tests, benchmarks).

Text tokens are groups of one, so a sequence without merged tokens is computed exactly as stock.

M-RoPE (:mod:`dymu.vtu.mrope`): each virtual position has its own ``(t, h, w)`` position, given per sequence to
``prepare_vtu(groups, positions=[pos [3, N_b]])`` (the stock ``get_rope_index`` of the *unmerged* sequence); every
rotary frequency turns by its own component (chunked sections for Qwen2/2.5-VL, interleaved for Qwen3-VL, read
from the stock rotary embedding). Pass ``position_ids=batch.model_position_ids`` (``[4, B, M_max]``, as stock
``generate`` builds them).

Interface
---------
Groups of one sequence
    ``groups [N]`` (LongTensor, N = virtual length): ``groups[p]`` is the merged slot (``0..M-1``) that
    virtual position ``p`` belongs to. Every slot must be covered; a slot may cover non-contiguous
    positions. :func:`concat_groups` builds it from text runs and per-image group maps.
Batch layout (:mod:`dymu.vtu.batch`, pure torch)
    :func:`prepare_vtu` turns a list of groups into a :class:`VTUBatch`: merged layout padded to
    ``M_max`` (left padding by default, as generation needs), with ``position_ids`` (one representative
    virtual position per slot; the last real slot has ``N_b - 1`` so ``generate`` continues at ``N_b``),
    ``attention_mask``, the padded group index and ``N_b``/``M_b``. :meth:`VTUBatch.pad` pads
    per-sequence merged ``inputs_embeds``/``input_ids`` to that layout.
Model (:mod:`dymu.vtu.integration`)
    :func:`enable_vtu(model, "fast" | "exact" | "off") <enable_vtu>` selects the registered attention
    function on the text decoder (a VLM's vision tower keeps its own; :mod:`dymu.vtu.decoders` says which
    decoders are supported); :func:`disable_vtu` restores the previous implementation. Per-call state
    travels in :func:`vtu_context` (a ``ContextVar``, since ``generate`` rejects unknown kwargs) or in a
    ``vtu_batch=`` forward kwarg. Outside both, the
    registered function *is* stock sdpa (same mask, same call), so an enabled model is unchanged.

::

    batch = prepare_vtu([groups_a, groups_b])
    embeds = batch.pad([merged_embeds_a, merged_embeds_b])      # [B, M_max, C]
    enable_vtu(model, "fast")
    with vtu_context(batch):
        out = model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, max_new_tokens=16)

(:func:`vtu_forward` / :func:`vtu_generate` do exactly that.) Always pass ``batch.position_ids`` and
``batch.attention_mask``: without explicit positions ``generate`` numbers the merged slots ``0..M-1``
and would continue at ``M``; the VTU function checks this and raises.

Kernels (pure torch; arguments in :mod:`dymu.vtu.ops`)
    :func:`vtu_attention_fast_sdpa` / :func:`vtu_attention_fast_blocked` / :func:`vtu_attention_exact` take q/k/v
    as transformers' attention functions receive them and the call's :class:`Layout` (:meth:`VTUBatch.layout`,
    :mod:`dymu.vtu.layout`).
KV cache
    The cache is the stock one and holds *merged*-length keys/values (``M_b`` + generated tokens, not
    ``N_b`` + generated), each key rotated at its slot's representative position. Decode steps
    re-expand cached keys to virtual length (re-rotating them by the angle difference) inside the
    attention function. See ``docs/vtu.md`` for memory and time figures. :func:`cache_kwarg` /
    :func:`output_cache` (:mod:`dymu.vtu.compat`) name the cache argument and output field as the
    installed transformers does (``cache`` from 5.24, ``past_key_values`` before).
"""

from dymu.vtu.batch import VTUBatch, concat_groups, prepare_vtu
from dymu.vtu.compat import CACHE_NAMES, cache_kwarg, output_cache
from dymu.vtu.decoders import (
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    DecoderInfo,
    check_vtu_support,
    find_decoder,
)
from dymu.vtu.exact import EXACT_CHUNK_ELEMENTS, vtu_attention_exact
from dymu.vtu.fast_blocked_cpu import vtu_attention_fast_blocked
from dymu.vtu.fast_sdpa import vtu_attention_fast_sdpa
from dymu.vtu.integration import (
    ATTN_IMPLEMENTATIONS,
    DISPATCH,
    KERNELS,
    VTU_MODES,
    KernelName,
    Phase,
    VTUMode,
    check_vtu_mode,
    current_vtu_batch,
    disable_vtu,
    enable_vtu,
    select_kernel,
    vtu_context,
    vtu_forward,
    vtu_generate,
    vtu_kernels,
    vtu_mode,
)
from dymu.vtu.layout import Layout
from dymu.vtu.mrope import MROPE_MODEL_TYPES, frequency_matrix, mrope_components

# written out (not concatenated from the modules' __all__) so that static checkers see the re-exports
__all__ = [
    # batch and layout
    "VTUBatch", "Layout", "concat_groups", "prepare_vtu",
    # kernels
    "vtu_attention_fast_sdpa", "vtu_attention_fast_blocked", "vtu_attention_exact", "EXACT_CHUNK_ELEMENTS",
    # integration
    "VTUMode", "VTU_MODES", "ATTN_IMPLEMENTATIONS", "check_vtu_mode", "vtu_context", "current_vtu_batch",
    "enable_vtu", "disable_vtu", "vtu_mode", "vtu_forward", "vtu_generate",
    # which kernel runs
    "Phase", "KernelName", "KERNELS", "DISPATCH", "select_kernel", "vtu_kernels",
    # decoders
    "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "DecoderInfo", "find_decoder", "check_vtu_support",
    # compat
    "CACHE_NAMES", "cache_kwarg", "output_cache",
    # M-RoPE
    "MROPE_MODEL_TYPES", "mrope_components", "frequency_matrix",
]
