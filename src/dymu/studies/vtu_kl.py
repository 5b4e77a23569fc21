"""How far merging a run of "visual" tokens moves the next-token distribution of a real RoPE LLM (SmolLM2-135M-Instruct),
with and without VTU (``eval_scripts/real_vtu_kl.py`` is the command, docs/real_weights.md the write-up); and the
checks that VTU is the stock model when nothing merges. A module of its own: the one measurement of VTU on real
weights. The cases come from :mod:`dymu.studies.vtu_kl_cases`.

For a case, the logits of the last positions are compared with the unmerged prompt's (``full``):

* ``plain``: merged tokens at consecutive positions, stock model (what a VLM does without VTU);
* ``fast`` / ``exact``: the same merged tokens with VTU, at their virtual positions;
* ``plain_pos``: ablation: merged tokens, stock attention, each at its group's median virtual position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, Dinov2Model, LlamaForCausalLM

from dymu import weights
from dymu.studies.vtu_kl_cases import Case
from dymu.vtu import concat_groups, disable_vtu, enable_vtu, prepare_vtu, vtu_forward, vtu_generate

SMOL, DINO = "smollm2-135m-instruct", "dinov2-small"


def load_llm(dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, object]:
    """SmolLM2-135M-Instruct (``dymu.weights``) with sdpa attention, eval mode, and its tokenizer."""
    path = weights.install(SMOL)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_dino() -> Dinov2Model:
    """DINOv2-S/14 (``dymu.weights``) with sdpa attention, eval mode."""
    return Dinov2Model.from_pretrained(weights.install(DINO), attn_implementation="sdpa").eval()


# ------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def case_logits(model: nn.Module, case: Case, modes: tuple[str, ...] = ("fast", "exact")) -> dict[str, Tensor]:
    """Logits of the last ``S + 1`` positions (the last visual/merged token, then the suffix): ``full``, ``plain``,
    ``plain_pos`` and each VTU mode."""
    emb = model.get_input_embeddings()
    pre, suf = emb(case.prefix), emb(case.suffix)
    s = case.suffix.numel() + 1
    disable_vtu(model)
    keep = {"logits_to_keep": s}  # the LM head only where we compare (it dominates the cost at vocab 49k)
    out = {
        "full": model(inputs_embeds=torch.cat([pre, case.full, suf])[None], **keep).logits[0],
        "plain": model(inputs_embeds=torch.cat([pre, case.merged, suf])[None], **keep).logits[0],
    }
    groups = concat_groups([case.prefix.numel(), case.local, case.suffix.numel()])
    batch = prepare_vtu([groups])  # one sequence: no padding, so the last s rows are the last s slots
    merged_seq = torch.cat([pre, case.merged, suf])
    # ablation: merged tokens at their virtual (median member) positions, stock attention. The explicit mask
    # matters: without one, transformers reads non-contiguous position_ids as packed sequences.
    out["plain_pos"] = model(inputs_embeds=merged_seq[None], position_ids=batch.position_ids,
                             attention_mask=batch.attention_mask, **keep).logits[0]
    try:
        for mode in modes:
            enable_vtu(model, mode)
            out[mode] = vtu_forward(model, batch, inputs_embeds=batch.pad([merged_seq]), **keep).logits[0]
    finally:
        disable_vtu(model)
    return out


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p ‖ q) per row, in nats, computed in float64."""
    p, q = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def measure(model: nn.Module, case: Case, modes: tuple[str, ...] = ("fast", "exact")) -> dict:
    """KL numbers of one case (see module doc); ``fast_vs_exact`` (max abs logit difference) when both run."""
    lg = case_logits(model, case, modes)
    full = lg["full"]
    row = {"case": case.name, "kind": case.kind, "N": case.full.shape[0], "M": case.merged.shape[0], **case.extra}
    if "fast" in lg and "exact" in lg:
        row["fast_vs_exact"] = float((lg["fast"] - lg["exact"]).abs().max())
    for v in ("plain", "plain_pos", *modes):
        per_pos = kl(full[1:], lg[v][1:])  # suffix positions (row 0 = last run token, not comparable)
        row[f"kl_last_{v}"] = float(per_pos[-1])
        row[f"kl_suffix_{v}"] = float(per_pos.mean())
        row[f"top1_{v}"] = bool(full[-1].argmax() == lg[v][-1].argmax())
    return row


# ------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def checks(model: nn.Module, tok, max_new_tokens: int = 24) -> dict:
    """Identity groups ≡ stock, exact ≡ fast, greedy generation unchanged when nothing merges."""
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt")["input_ids"]
    disable_vtu(model)
    stock = model(input_ids=ids).logits
    stock_gen = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    batch = prepare_vtu([torch.arange(ids.shape[1])])
    res: dict = {"prompt_tokens": ids.shape[1]}
    logits = {}
    try:
        for mode in ("fast", "exact"):
            enable_vtu(model, mode)
            logits[mode] = vtu_forward(model, batch, input_ids=ids).logits
            res[f"identity_{mode}_vs_stock"] = float((logits[mode] - stock).abs().max())
            gen = vtu_generate(model, batch, input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
            res[f"greedy_{mode}_equal"] = torch.equal(gen, stock_gen)
    finally:
        disable_vtu(model)
    res["identity_fast_vs_exact"] = float((logits["fast"] - logits["exact"]).abs().max())
    res["answer"] = tok.decode(stock_gen[0, ids.shape[1]:], skip_special_tokens=True)
    res["logit_scale"] = float(stock.abs().max())
    return res


@torch.no_grad()
def greedy_answers(model: nn.Module, tok, case: Case, max_new_tokens: int = 24) -> dict[str, str]:
    """Greedy answers of one case for full, plain merged and VTU fast (qualitative)."""
    emb = model.get_input_embeddings()
    pre, suf = emb(case.prefix), emb(case.suffix)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
    dec = lambda out: tok.decode(out[0, -max_new_tokens:] if out.shape[1] > max_new_tokens else out[0], skip_special_tokens=True)  # noqa: E731
    disable_vtu(model)
    full_seq, merged_seq = torch.cat([pre, case.full, suf])[None], torch.cat([pre, case.merged, suf])[None]
    ones = lambda x: torch.ones(x.shape[:2], dtype=torch.long)  # noqa: E731
    answers = {
        "full": dec(model.generate(inputs_embeds=full_seq, attention_mask=ones(full_seq), **kw)),
        "plain": dec(model.generate(inputs_embeds=merged_seq, attention_mask=ones(merged_seq), **kw)),
    }
    batch = prepare_vtu([concat_groups([case.prefix.numel(), case.local, case.suffix.numel()])])
    try:
        enable_vtu(model, "fast")
        answers["vtu"] = dec(vtu_generate(model, batch, inputs_embeds=batch.pad([merged_seq[0]]), **kw))
    finally:
        disable_vtu(model)
    return {k: v.strip() for k, v in answers.items()}
