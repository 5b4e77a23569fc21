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

Needs ``pip install 'dymu[real]' easy-vqa scikit-image``; the models come from ``dymu.weights``. The study itself is
:mod:`dymu.studies.vtu_kl` (the cases: :mod:`dymu.studies.vtu_kl_cases`); this script prints its tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dymu.studies import vtu_kl
from dymu.studies.vtu_kl_cases import PASSAGES, dino_cases, text_cases


def table(rows: list[dict]) -> str:
    """One row per case: KL of each variant, last position and suffix mean, top-1 agreement."""
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
    """One row per kind: how often VTU beats plain merging, median KLs."""
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
    model, tok = vtu_kl.load_llm()
    print("## checks\n", vtu_kl.checks(model, tok), flush=True)
    dino = vtu_kl.load_dino()
    if args.quick:
        cases = (text_cases(model, tok, keeps=(4,), passages=PASSAGES[:1])
                 + dino_cases(model, tok, dino, ["astronaut"], (64,)))
    else:
        cases = text_cases(model, tok) + dino_cases(model, tok, dino)
    rows = []
    for case in cases:
        rows.append(vtu_kl.measure(model, case))
        r = rows[-1]
        print(f"{r['kind']:>10} {r['case']:<22} {r['N']:>4}->{r['M']:<4} KL last plain {r['kl_last_plain']:.4f} "
              f"plain@pos {r['kl_last_plain_pos']:.4f} VTU {r['kl_last_fast']:.4f} (exact {r['kl_last_exact']:.4f}) | "
              f"suffix plain {r['kl_suffix_plain']:.4f} VTU {r['kl_suffix_fast']:.4f} | fast-exact {r['fast_vs_exact']:.1e}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n## KL table\n\n" + table(rows) + "\n\n## summary\n\n" + summary(rows))
    print("\n## greedy answers (qualitative)")
    for case in [c for c in cases if c.kind == "text"][:3] + [c for c in cases if c.kind == "dino-dtome"][:2]:
        print(case.name, vtu_kl.greedy_answers(model, tok, case))
    print(f"\n(total {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
