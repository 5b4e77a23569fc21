"""VTU on the real SmolLM2-135M-Instruct: checks, and how far merging moves the next-token distribution (issue 10).

Checks (fp32): identity groups ≡ stock logits; VTU exact ≡ fast; greedy chat generation unchanged when nothing is
merged.

KL study. A chat prompt has a run of ``N`` "visual" input embeddings in the middle of the user turn; the run is
merged into ``M < N`` tokens (each the size-weighted mean of its group), and the next-token distribution at the
last position (the assistant's first token) is compared with the unmerged prompt's:

    KL(full ‖ plain)   merged tokens at consecutive positions, stock model (what a VLM does without VTU)
    KL(full ‖ VTU)     the same merged tokens with VTU (fast and exact), at their virtual positions
    KL(full ‖ plain@pos)  ablation: merged tokens, stock attention, but each at its group's median virtual
                       position (so the text after the run keeps its original positions)

Also reported: the same KL averaged over every text position after the run (the question and the chat
scaffolding), and whether the top-1 token agrees with the full prompt's.

Three kinds of runs (why: SmolLM2 is a text model, so "visual" tokens must be made of something it can read or of
real image features with real redundancy; both are shown):

* ``text``: the real token embeddings of a descriptive passage (its words *are* the content the question asks
  about); groups = adjacent tokens merged agglomeratively, most similar (cosine) neighbouring groups first, down to
  N/2, N/4 and N/8 tokens.
* ``text-dup``: control: the same merged passage, but the "full" prompt is each merged token repeated over its
  group (the sequence VTU claims to emulate), so the KL shows VTU's own approximation error (copies at different
  positions drift apart inside the model; VTU re-averages them after every layer).
* ``dino-mean``: DINOv2-S/14 patch features of a real photo at 224 px (256 patches, after the final layer norm)
  mapped into SmolLM2's embedding space by a fixed random linear projector (Gaussian, scaled so token norms match
  the mean norm of SmolLM2's token embeddings) — an untrained stand-in for a VLM projector. Groups = the source
  maps of real DToMe merging in DINOv2 (per image, finding mode at K = 128, 64, 32 of 256, constant schedule);
  merged token = mean of the group's projected unmerged features. This isolates the LLM side: VTU is exact when a
  group's members are identical, so the KL measures the effect of within-group variation alone.
* ``dino-dtome``: as ``dino-mean`` but the merged tokens are what DToMe's encoder itself outputs (merging inside
  the encoder changes later layers), projected; full = the stock encoder's output. The real DyMU pipeline.

Usage::

    python eval_scripts/real_vtu_kl.py              # checks + full KL table (markdown on stdout)
    python eval_scripts/real_vtu_kl.py --quick      # one case per kind

Needs ``pip install 'dymu[real]' easy-vqa scikit-image``; the models come from ``dymu.weights``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMOL, DINO = "smollm2-135m-instruct", "dinov2-small"
MARK = "<<<VISUAL>>>"

PASSAGES: list[tuple[str, str]] = [
    (
        "A red fox sits on a snowy hill under a pale blue sky. Behind it, a line of dark pine trees runs along the "
        "horizon, and a broken wooden fence leans to the left. Two crows stand on the fence. The fox's breath makes "
        "a small cloud in the cold air, and its tail is wrapped around its front paws. In the lower right corner, a "
        "set of small footprints crosses the snow towards a frozen stream.",
        "What animal sits on the hill?",
    ),
    (
        "The kitchen table is covered with a green checkered cloth. On it stand a white teapot, three blue mugs and "
        "a plate of sliced lemon cake. A yellow cat sleeps on the chair closest to the window, where sunlight falls "
        "across a pile of old newspapers. A clock on the wall shows a quarter past four, and a basket of apples "
        "sits on the floor next to the door.",
        "What color is the cat?",
    ),
    (
        "A busy harbor at sunset: fishing boats painted orange and white are tied to a long concrete pier. Men in "
        "rubber boots carry crates of silver fish towards a small market hall with a red roof. Seagulls circle "
        "above the masts. Far out on the water, a large cargo ship with stacked containers moves slowly towards the "
        "lighthouse at the end of the breakwater.",
        "What is at the end of the breakwater?",
    ),
    (
        "The photograph shows a mountain road in autumn. The asphalt curves between maple trees with bright orange "
        "and red leaves. A cyclist in a yellow jacket climbs the slope, followed at a distance by a blue camper van. "
        "Low clouds hide the summit, and a wooden sign at the roadside says that the pass is twelve kilometers "
        "ahead.",
        "What is the cyclist wearing?",
    ),
    (
        "Inside the museum hall, a giant dinosaur skeleton stretches from the entrance to the staircase. Children "
        "in school uniforms gather around a guide who points at the long neck. Glass cases along the walls hold "
        "fossil shells and ammonites, and a large painted map of the ancient oceans covers the back wall above a "
        "row of wooden benches.",
        "What stretches from the entrance to the staircase?",
    ),
]
IMAGES = ["astronaut", "chelsea", "coffee", "rocket", "china", "easy-vqa-0"]
TEXT_KEEP = (2, 4, 8)  # N/2, N/4, N/8
DINO_KEEP = (128, 64, 32)  # of 256 patches


# ------------------------------------------------------------------------------------------- models
def load_llm(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (``dymu.weights``) with sdpa attention, eval mode, and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from dymu import weights

    path = weights.install(SMOL)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_dino():
    from transformers import Dinov2Model

    from dymu import weights

    return Dinov2Model.from_pretrained(weights.install(DINO), attn_implementation="sdpa").eval()


def chat_ids(tok, before: str, after: str) -> tuple[Tensor, Tensor]:
    """Token ids of the chat prompt up to the visual run and after it (system turn, generation prompt included)."""
    text = tok.apply_chat_template([{"role": "user", "content": before + MARK + after}], add_generation_prompt=True,
                                   tokenize=False)
    head, tail = text.split(MARK)
    ids = lambda s: torch.tensor(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return ids(head), ids(tail)


# ------------------------------------------------------------------------------------------- merging
def adjacent_groups(x: Tensor, keep: int) -> Tensor:
    """Contiguous groups of ``x [N, C]`` down to ``keep`` groups: repeatedly merge the adjacent pair of groups whose
    size-weighted means are most similar (cosine). Returns the local group map ``[N]`` (values ``0..keep-1``)."""
    n = x.shape[0]
    sums, sizes = [r.double() for r in x], [1] * n
    members = [[i] for i in range(n)]
    while len(sums) > keep:
        means = torch.stack([s / c for s, c in zip(sums, sizes)])
        sim = F.cosine_similarity(means[:-1], means[1:], dim=-1)
        i = int(sim.argmax())
        sums[i : i + 2] = [sums[i] + sums[i + 1]]
        sizes[i : i + 2] = [sizes[i] + sizes[i + 1]]
        members[i : i + 2] = [members[i] + members[i + 1]]
    local = torch.empty(n, dtype=torch.long)
    for g, idx in enumerate(members):
        local[idx] = g
    return local


def group_mean(x: Tensor, local: Tensor) -> Tensor:
    """``[k, C]``: mean of ``x [N, C]`` over each group of ``local [N]``."""
    k = int(local.max()) + 1
    total = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, local, x.double())
    return (total / torch.bincount(local, minlength=k)[:, None]).to(x.dtype)


@torch.no_grad()
def dtome_groups(dino: nn.Module, pixel_values: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Real DToMe on one image merged to exactly ``keep`` patches (finding mode, batch of one, constant schedule).

    Returns the local group map of the 256 (etc.) patches ``[P]`` and DToMe's own merged output ``[keep, C]``
    (after the final layer norm), CLS dropped."""
    import dymu

    patches = (pixel_values.shape[-1] // 14) * (pixel_values.shape[-2] // 14)
    dymu.patch(dino, merge_counts=dymu.merge_schedule("constant", patches - keep, len(dino.encoder.layer)))
    try:
        out = dino(pixel_values=pixel_values).last_hidden_state[0]
        source = dymu.last_run(dino).source_maps[-1][0]
    finally:
        dymu.unpatch(dino)
    return source[1:] - 1, out[1 : keep + 1]  # CLS is token 0 and original position 0


def projector(in_dim: int, embed: Tensor, seed: int = 0) -> Tensor:
    """A fixed random linear map ``[in_dim, C]`` into the LLM's embedding space (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(in_dim, embed.shape[1], generator=gen) / in_dim**0.5
    return w * (embed.norm(dim=-1).mean() / embed.shape[1] ** 0.5)  # unit-variance inputs -> typical embedding norm


# ------------------------------------------------------------------------------------------- the study
@dataclass
class Case:
    """A prompt whose middle run ``full [N, C]`` is merged into ``merged [M, C]`` by ``local [N]``."""

    name: str
    kind: str
    prefix: Tensor  # [P] ids
    suffix: Tensor  # [S] ids
    full: Tensor  # [N, C] embeddings of the visual run
    local: Tensor  # [N] group map
    merged: Tensor  # [M, C]
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def case_logits(model: nn.Module, case: Case, modes: tuple[str, ...] = ("fast", "exact")) -> dict[str, Tensor]:
    """Logits of the last ``S + 1`` positions (the last visual/merged token, then the suffix): ``full``, ``plain``,
    ``plain_pos`` and each VTU mode."""
    from dymu.vtu import concat_groups, disable_vtu, enable_vtu, prepare_vtu, vtu_forward

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


def text_cases(model: nn.Module, tok, keeps=TEXT_KEEP, passages=PASSAGES) -> list[Case]:
    emb = model.get_input_embeddings()
    cases = []
    for i, (passage, question) in enumerate(passages):
        prefix, suffix = chat_ids(tok, "Read this description of a photo.\n\n", f"\n\nQuestion: {question} Answer in a few words.")
        run = torch.tensor(tok(passage, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            full = emb(run)
        for div in keeps:
            local = adjacent_groups(full, max(1, full.shape[0] // div))
            merged = group_mean(full, local)
            cases.append(Case(f"passage{i}/N÷{div}", "text", prefix, suffix, full, local, merged))
            # VTU's ideal: the unmerged run *is* each merged token repeated over its group
            cases.append(Case(f"passage{i}/N÷{div}", "text-dup", prefix, suffix, merged[local], local, merged))
    return cases


def _thresholds_script():
    """The sibling script ``real_dinov2_thresholds.py`` as a module (its image sources and preprocessing)."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "_dymu_real_dinov2_thresholds"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("real_dinov2_thresholds.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def image_tensor(name: str, size: int = 224) -> Tensor:
    """``[1, 3, S, S]`` DINOv2 input of a named image (skimage/sklearn photo or ``easy-vqa-<i>`` test image)."""
    rdt = _thresholds_script()
    if name.startswith("easy-vqa-"):
        from easy_vqa import get_test_image_paths
        from PIL import Image

        paths = get_test_image_paths()
        image = Image.open(paths[sorted(paths)[int(name.rsplit("-", 1)[1])]]).convert("RGB")
    else:
        image = rdt.natural_photos()[name]
    return rdt.SquareTransform(size)(image)[None]


def dino_cases(model: nn.Module, tok, dino: nn.Module, images=IMAGES, keeps=DINO_KEEP) -> list[Case]:
    emb = model.get_input_embeddings().weight.detach()
    proj = projector(dino.config.hidden_size, emb)
    prefix, suffix = chat_ids(tok, "Here is an image:\n", "\nDescribe the image in one sentence.")
    cases = []
    for name in images:
        x = image_tensor(name)
        with torch.no_grad():
            stock = dino(pixel_values=x).last_hidden_state[0, 1:]
        full = stock @ proj
        for keep in keeps:
            local, merged_out = dtome_groups(dino, x, keep)
            cases.append(Case(f"{name}/{keep}", "dino-mean", prefix, suffix, full, local, group_mean(full, local)))
            cases.append(Case(f"{name}/{keep}", "dino-dtome", prefix, suffix, full, local, merged_out @ proj))
    return cases


# ------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def checks(model: nn.Module, tok, max_new_tokens: int = 24) -> dict:
    """Identity groups ≡ stock, exact ≡ fast, greedy generation unchanged when nothing merges."""
    from dymu.vtu import disable_vtu, enable_vtu, prepare_vtu, vtu_forward, vtu_generate

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
    from dymu.vtu import concat_groups, disable_vtu, enable_vtu, prepare_vtu, vtu_generate

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


# ------------------------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = [
        "| kind | case | N→M | KL plain | KL plain@pos | KL VTU | suffix-mean KL plain / plain@pos / VTU "
        "| top-1 same: plain / VTU | max abs(fast−exact) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mark = lambda b: "✓" if b else "✗"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['case']} | {r['N']}→{r['M']} | {r['kl_last_plain']:.3f} | {r['kl_last_plain_pos']:.3f} | "
            f"{r['kl_last_fast']:.3f} | {r['kl_suffix_plain']:.3f} / {r['kl_suffix_plain_pos']:.3f} / "
            f"{r['kl_suffix_fast']:.3f} | {mark(r['top1_plain'])} / {mark(r['top1_fast'])} | "
            f"{r.get('fast_vs_exact', float('nan')):.1e} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    import statistics

    lines = ["| kind | cases | VTU < plain (last) | VTU < plain (suffix mean) | VTU < plain@pos (last) | median KL plain "
             "| median KL plain@pos | median KL VTU | top-1 same: plain / VTU |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == kind]
        n = len(rs)
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        lines.append(
            f"| {kind} | {n} | {sum(r['kl_last_fast'] < r['kl_last_plain'] for r in rs)}/{n} "
            f"| {sum(r['kl_suffix_fast'] < r['kl_suffix_plain'] for r in rs)}/{n} "
            f"| {sum(r['kl_last_fast'] < r['kl_last_plain_pos'] for r in rs)}/{n} | {med('kl_last_plain'):.3f} "
            f"| {med('kl_last_plain_pos'):.3f} | {med('kl_last_fast'):.3f} "
            f"| {sum(r['top1_plain'] for r in rs)}/{n} / {sum(r['top1_fast'] for r in rs)}/{n} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one case per kind")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="also write the rows (one dict per case) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_llm()
    print("## checks\n", checks(model, tok), flush=True)
    dino = load_dino()
    if args.quick:
        cases = text_cases(model, tok, keeps=(4,), passages=PASSAGES[:1]) + dino_cases(model, tok, dino, ["astronaut"], (64,))
    else:
        cases = text_cases(model, tok) + dino_cases(model, tok, dino)
    rows = []
    for case in cases:
        rows.append(measure(model, case))
        r = rows[-1]
        print(f"{r['kind']:>10} {r['case']:<22} {r['N']:>4}->{r['M']:<4} KL last plain {r['kl_last_plain']:.4f} "
              f"plain@pos {r['kl_last_plain_pos']:.4f} VTU {r['kl_last_fast']:.4f} (exact {r['kl_last_exact']:.4f}) | "
              f"suffix plain {r['kl_suffix_plain']:.4f} VTU {r['kl_suffix_fast']:.4f} | fast-exact {r['fast_vs_exact']:.1e}",
              flush=True)
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n## KL table\n\n" + table(rows) + "\n\n## summary\n\n" + summary(rows))
    print("\n## greedy answers (qualitative)")
    for case in [c for c in cases if c.kind == "text"][:3] + [c for c in cases if c.kind == "dino-dtome"][:2]:
        print(case.name, greedy_answers(model, tok, case))
    print(f"\n(total {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
