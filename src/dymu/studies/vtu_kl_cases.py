"""The prompts of the VTU KL study (:mod:`dymu.studies.vtu_kl`): a chat prompt whose user turn holds a run of ``N``
"visual" input embeddings, and that run merged into ``M < N`` tokens by a group map. A module of its own: how the
cases are built (which tokens, which groups) is apart from how they are measured.

Kinds of cases (SmolLM2 is a text model, so "visual" tokens must be made of something it can read or of real image
features with real redundancy):

* ``text``: the real token embeddings of a descriptive passage; groups = adjacent tokens merged agglomeratively,
  most similar (cosine) neighbouring groups first, down to N/2, N/4 and N/8 tokens.
* ``text-dup``: control: the same merged passage, but the "full" run is each merged token repeated over its group
  (the sequence VTU claims to emulate), so the KL shows VTU's own approximation error.
* ``dino-mean``: DINOv2-S/14 patch features of a real photo at 224 px mapped into SmolLM2's embedding space by a
  fixed random linear projector; groups = the source maps of real DToMe merging in DINOv2 (finding mode, constant
  schedule, K of 256 kept); merged token = mean of the group's projected unmerged features.
* ``dino-dtome``: as ``dino-mean`` but the merged tokens are what DToMe's encoder itself outputs, projected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dymu
from dymu.studies.real_images import dinov2_input, named_image

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


# ------------------------------------------------------------------------------------------- cases
def text_cases(model: nn.Module, tok, keeps: tuple[int, ...] = TEXT_KEEP,
               passages: list[tuple[str, str]] = PASSAGES) -> list[Case]:
    """``text`` and ``text-dup`` cases: each passage merged to N/d tokens for each ``d`` of ``keeps``."""
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


def dino_cases(model: nn.Module, tok, dino: nn.Module, images: list[str] = IMAGES,
               keeps: tuple[int, ...] = DINO_KEEP) -> list[Case]:
    """``dino-mean`` and ``dino-dtome`` cases: each named image (:func:`named_image`) merged to each of ``keeps``."""
    emb = model.get_input_embeddings().weight.detach()
    proj = projector(dino.config.hidden_size, emb)
    prefix, suffix = chat_ids(tok, "Here is an image:\n", "\nDescribe the image in one sentence.")
    cases = []
    for name in images:
        x = dinov2_input(224)(named_image(name))[None]
        with torch.no_grad():
            stock = dino(pixel_values=x).last_hidden_state[0, 1:]
        full = stock @ proj
        for keep in keeps:
            local, merged_out = dtome_groups(dino, x, keep)
            cases.append(Case(f"{name}/{keep}", "dino-mean", prefix, suffix, full, local, group_mean(full, local)))
            cases.append(Case(f"{name}/{keep}", "dino-dtome", prefix, suffix, full, local, merged_out @ proj))
    return cases
