"""The small VLM's training data: question/answer pairs by image (easy-VQA, generated complexity-VQA), one image's
questions as one multi-turn chat conversation, and the frozen DINOv2 features of the images, cached on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dymu.complexity_vqa import generate, write
from dymu.data import load_image
from dymu.small_vlm.model import NUM_IMAGE_TOKENS

IGNORE = -100  # label of tokens without loss
MIX_ID_OFFSET = 10_000_000  # generated images' ids in the training pool (easy-VQA ids are below)

QA = dict[int, list[tuple[str, str]]]  # image id -> [(question, answer), ...]


def easy_vqa_by_image(split: str = "train") -> tuple[QA, dict[int, str]]:
    """``{image id: [(question, answer), ...]}`` in the package's order, and ``{image id: png path}``."""
    import easy_vqa  # why: optional (dymu[real]); only training and evaluation read it

    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    by_image: QA = {}
    for q, a, i in zip(qs, ans, ids):
        by_image.setdefault(int(i), []).append((q, a))
    return by_image, {int(k): v for k, v in paths.items()}


def complexity_vqa_by_image(seed: int, count: int, questions: int, work: Path) -> tuple[QA, dict[int, str]]:
    """Like :func:`easy_vqa_by_image` for ``count`` generated complexity-VQA images (written once under ``work``);
    ids start at ``MIX_ID_OFFSET``."""
    folder = work / f"complexity-vqa-seed{seed}-{count}x{questions}"
    qfile = folder / "questions.json"
    if not qfile.exists():
        write(generate(seed, count, questions_per_image=questions), folder, name="questions.tmp")
        os.replace(folder / "questions.tmp", qfile)  # complete sets only
    by_image: QA = {}
    paths: dict[int, str] = {}
    for r in json.loads(qfile.read_text()):
        i = MIX_ID_OFFSET + int(r["item"])
        by_image.setdefault(i, []).append((r["question"], r["answer"]))
        paths[i] = str(folder / r["image"])
    return by_image, paths


def image_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """The features the stock Llava forward feeds to its projector: ``vision_feature_layer``'s hidden states,
    CLS dropped ('default'). ``[B, 256, 384]``."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
        return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def cached_features(model: Any, processor: Any, image_ids: list[int], paths: dict[int, str], cache: Path,
                    progress: bool = True) -> dict[int, torch.Tensor]:
    """DINOv2 features of ``image_ids``, computed once and stored in ``cache`` (a torch file)."""
    stored: dict[int, torch.Tensor] = torch.load(cache) if cache.exists() else {}
    missing = [i for i in image_ids if i not in stored]
    if missing:
        device = next(model.model.vision_tower.parameters()).device
        for start in tqdm(range(0, len(missing), 16), desc="DINOv2 features", disable=not progress):
            chunk = missing[start : start + 16]
            images = [load_image(paths[i]) for i in chunk]
            pv = processor.image_processor(images, return_tensors="pt").pixel_values.to(device)
            feats = image_features(model, pv).cpu()
            for i, f in zip(chunk, feats):
                stored[i] = f.clone()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(stored, tmp)
        os.replace(tmp, cache)
    return {i: stored[i] for i in image_ids}


def conversation_ids(processor: Any, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one multi-turn conversation (image in the first turn); labels are the answer
    tokens and their ``<|im_end|>``, everything else ``IGNORE``. The first segment is exactly the single-turn
    prompt that evaluation uses."""
    tok = processor.tokenizer
    image_token = processor.image_token
    ids: list[int] = []
    labels: list[int] = []
    messages: list[dict[str, Any]] = []
    rendered = ""
    for k, (q, a) in enumerate(qa):
        content: Any = [{"type": "image"}, {"type": "text", "text": q}] if k == 0 else [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        piece = prompt[len(rendered) :]
        assert prompt.startswith(rendered)
        if k == 0:
            piece = piece.replace(image_token, image_token * NUM_IMAGE_TOKENS)
        p_ids = tok(piece, add_special_tokens=False).input_ids
        ids += p_ids
        labels += [IGNORE] * len(p_ids)
        messages.append({"role": "assistant", "content": a})
        full = processor.apply_chat_template(messages)
        answer = full[len(prompt) :]  # "a<|im_end|>\n"
        assert answer.endswith("<|im_end|>\n"), answer
        a_ids = tok(answer[: -1], add_special_tokens=False).input_ids  # answer + <|im_end|>
        nl_ids = tok("\n", add_special_tokens=False).input_ids
        ids += a_ids + nl_ids
        labels += a_ids + [IGNORE] * len(nl_ids)
        rendered = full
    return ids, labels
