"""What a request to a VLM looks like: the checkpoint it goes to, its images and text, and the chat prompt built
from them (LLaVA-1.5's layout: images first, then the text; the checkpoint's own prompt suffix)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dymu.hub import is_hub_name, unavailable

# LLaVA-1.5's short-answer instruction (its VQAv2 / GQA / TextVQA prompts)
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def choose_prompt_suffix(model: Any, given: str | None, fallback: str) -> str:
    """The text appended to each question: ``given`` when set (a flag or model_arg wins), else the one the
    checkpoint records (:func:`dymu.vlm.prompt_suffix`: the small VLM's is ""), else ``fallback`` (``dymu eval``:
    LLaVA-1.5's :data:`SHORT_ANSWER`; lmms-eval: "", its tasks add their own instruction)."""
    from dymu.vlm.settings import prompt_suffix  # heavy: dymu.vlm pulls transformers; make_table needs none of it

    if given is not None:
        return given
    recorded = prompt_suffix(model)
    return fallback if recorded is None else recorded


def resolve_pretrained(pretrained: Any) -> Path:
    """A local checkpoint folder (made absolute: a later change of folder does not move it), or a hub name's
    snapshot (downloaded, or from the cache with HF_HUB_OFFLINE=1)."""
    if pretrained is None or str(pretrained) == "":
        raise ValueError("pass the checkpoint: pretrained=<LLaVA-1.5 folder or hub name>")
    path = Path(str(pretrained)).expanduser().absolute()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: expected a llava-hf or original LLaVA-1.5 checkpoint folder")
        return path
    text = str(pretrained)
    if is_hub_name(text):
        try:
            from huggingface_hub import snapshot_download  # optional until a hub name is given

            return Path(snapshot_download(text, ignore_patterns=["*.msgpack", "*.h5", "*.ot", "*.onnx"]))
        except Exception as err:  # offline, unknown repo, ...: say so, without the hub's traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            hint = "or pass the checkpoint's local folder instead"
            raise unavailable(text, f"checkpoint not found: {text!r} is not a folder", hint, f"{type(err).__name__}: {first}") from None
    raise FileNotFoundError(f"checkpoint not found: {path} (expected a LLaVA-1.5 folder or a hub name)")


@dataclass
class Prompt:
    """One request: the user's text and its images (shown before the text, LLaVA-1.5's layout)."""

    text: str
    images: list[Any] = field(default_factory=list)  # PIL images (or paths)


def image_token(processor: Any) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def ensure_chat_template(processor: Any) -> None:
    """Give a processor without a chat template LLaVA-1.5's conversation format (``vicuna_v1``)."""
    if getattr(processor, "chat_template", None):
        return
    from dymu.vlm.loading import LLAVA_V1_TEMPLATE  # heavy: dymu.vlm pulls transformers

    processor.chat_template = LLAVA_V1_TEMPLATE


def chat_text(processor: Any, text: str, num_images: int) -> str:
    """The prompt as the model reads it: one user turn (images, then the text) and the assistant's cue.

    ``<image>`` markers already in ``text`` are dropped (their images go first, as LLaVA-1.5 was trained).
    """
    clean = text.replace(image_token(processor), "").strip() if num_images else text.strip()
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": clean}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
