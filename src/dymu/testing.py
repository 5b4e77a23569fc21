"""Small randomly initialised models, tokenizers and processors built from configs (no downloads).

Used by the tests, the docs' examples and the benchmarks. Real weights cannot be
fetched here, so equivalence on random weights is the proof; ``scale_weights``
makes attention far from uniform so that position and masking bugs show.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # Qwen2's is the same function
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionConfig, Qwen3VLVisionModel

import dymu
from dymu.samples import image_set
from dymu.thresholds import ThresholdCheckpoint, merge_schedule, save_thresholds

# A word-level vocabulary: special tokens, chat words, and w0..w{N} filler words.
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def scale_weights(model: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Re-draw every matrix (dim >= 2) with ``std``: tiny random models otherwise attend almost uniformly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def word_tokenizer(num_words: int = 120):
    """A fast word-level tokenizer with ``<image>`` and ``<pad>`` tokens (ids 4 and 3)."""
    words = SPECIAL + [f"w{i}" for i in range(num_words - len(SPECIAL))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_clip_vision_config(image_size: int = 56, patch_size: int = 14, layers: int = 4, hidden: int = 64, **kw):
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        **kw,
    )


def tiny_llama_config(vocab_size: int = 120, layers: int = 2, hidden: int = 64, **kw):
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def tiny_llava(image_size: int = 56, seed: int = 0, std: float | None = 0.3, text_layers: int = 2, vision_layers: int = 4):
    """A tiny random ``LlavaForConditionalGeneration`` (CLIP tower + Llama) and its ``LlavaProcessor``."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    config = LlavaConfig(
        vision_config=tiny_clip_vision_config(image_size=image_size, layers=vision_layers),
        text_config=tiny_llama_config(vocab_size=len(tokenizer), layers=text_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    if std is not None:
        scale_weights(model, std, seed)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny_llava(directory: str | Path, **kw) -> Path:
    """Build :func:`tiny_llava` and save model + processor to ``directory`` (HF llava format)."""
    model, processor = tiny_llava(**kw)
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def plain_attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of a stock Llama/Qwen2 attention module's weights over ``x [1, N, C]`` (eager math,
    before ``o_proj``): the reference VTU is checked against."""
    n, d = x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(1, n, -1, d).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, d).transpose(1, 2)
    v = attn.v_proj(x).view(1, n, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    v = v.repeat_interleave(attn.num_key_value_groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v  # [1, H, N, d]
    return out.transpose(1, 2).reshape(1, n, -1)


def find_and_save_thresholds(tower: nn.Module, pixel_values: torch.Tensor, r_total: int, path: str | Path) -> Path:
    """Find constant-schedule thresholds for ``tower`` on ``pixel_values`` and save them to ``path`` (the tower is
    left unpatched). Check them on other images: on the finding batch one edge per layer sits on its threshold."""
    state = dymu.patch(tower)
    try:
        dymu.configure(tower, merge_counts=merge_schedule("constant", r_total, state.num_layers))
        with torch.no_grad():
            tower(pixel_values)
        found = dymu.last_run(tower).found_thresholds
    finally:
        dymu.unpatch(tower)
    return save_thresholds(path, ThresholdCheckpoint(found, encoder=state.encoder, r_total=r_total))


#: ``utils.py`` of the tiny local lmms-eval tasks the plugin tests write (image from the task folder, question as
#: the prompt, exact match; log-likelihood as the metric of loglikelihood tasks)
LMMS_TASK_UTILS = '''
from pathlib import Path
from dymu.data import load_image

HERE = Path(__file__).parent


def doc_to_visual(doc):
    return [load_image(HERE / doc["image"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}


def ll_process_results(doc, results):
    logprob, is_greedy = results[0]
    return {"logprob": logprob}
'''


LMMS_VQA_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_lmms_vqa_task(folder: Path, task: str, questions: list[str], *, max_new_tokens: int) -> Path:
    """A tiny local lmms-eval VQA task in ``folder`` (its ``--include_path``): one image of
    :func:`dymu.samples.image_set` (64 px, images of different complexity) per question, answer ``"w5"``,
    :data:`LMMS_TASK_UTILS` as ``utils.py`` and ``<task>.yaml`` (exact match, greedy). Returns ``folder``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, question) in enumerate(zip(image_set(len(questions), 64), questions)):
        img.save(folder / "images" / f"{i}.png")
        rows.append({"id": i, "image": f"images/{i}.png", "question": question, "answer": "w5"})
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(LMMS_TASK_UTILS)
    (folder / f"{task}.yaml").write_text(LMMS_VQA_YAML.format(task=task, max_new_tokens=max_new_tokens))
    return folder


def tiny_qwen_vision_tower(family: str, depth: int = 4, std: float | None = 0.3, seed: int = 0) -> nn.Module:
    """A tiny random Qwen vision tower: ``"qwen2_vl"``, ``"qwen2_5_vl"`` (windows of 2×2 units, full attention in
    blocks 1 and 3) or ``"qwen3_vl"`` (DeepStack after blocks 0 and 2); width 32, 2 heads, output width 48."""
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        config = Qwen2VLVisionConfig(depth=depth, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2)
        tower_class = Qwen2VisionTransformerPretrainedModel
    elif family == "qwen2_5_vl":
        config = Qwen2_5_VLVisionConfig(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2,
                                        out_hidden_size=48, window_size=56,
                                        fullatt_block_indexes=[i for i in range(depth) if i % 2 == 1])
        tower_class = Qwen2_5_VisionTransformerPretrainedModel
    elif family == "qwen3_vl":
        config = Qwen3VLVisionConfig(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2,
                                     out_hidden_size=48, num_position_embeddings=16,
                                     deepstack_visual_indexes=list(range(0, depth - 1, 2)))
        tower_class = Qwen3VLVisionModel
    else:
        raise ValueError(f"family must be qwen2_vl, qwen2_5_vl or qwen3_vl, got {family!r}")
    tower = tower_class._from_config(config, attn_implementation="sdpa").eval()
    return scale_weights(tower, std, seed) if std is not None else tower


def tiny_onevision(
    crop: int = 28, patch: int = 7, max_tiles: int = 4, seed: int = 0, std: float | None = 0.3,
    vision_layers: int = 3, text_layers: int = 2, vision_aspect_ratio: str = "anyres_max_9",
):
    """A tiny random ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) and its processor.

    Crops of ``crop`` px (``(crop/patch)²`` patches each); grid pinpoints up to ``max_tiles × max_tiles`` crops.
    """
    torch.manual_seed(seed)
    tok = word_tokenizer()
    pins = [[crop * a, crop * b] for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1)]
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=crop, patch_size=patch,
    )
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=3, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=8192,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("USER:"),  # unused id (video is refused)
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_grid_pinpoints=pins,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    if std is not None:
        scale_weights(model, std, seed)
        with torch.no_grad():
            model.model.image_newline.normal_(0, std, generator=torch.Generator().manual_seed(seed + 1))
    size = {"height": crop, "width": crop}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pins, crop_size=size),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tok,
        num_image_tokens=(crop // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=tok.chat_template,
    )
    return model, processor


QWEN_IMAGE, QWEN_VIDEO, QWEN_START = 96, 95, 94  # token ids of the tiny Qwen VLMs (vocabulary 97)


def tiny_qwen_vlm(family: str, seed: int = 0, std: float | None = 0.3) -> nn.Module:
    """A tiny random Qwen VLM: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"`` with the tower of
    :func:`tiny_qwen_vision_tower` (depth 2) and a 2-layer M-RoPE text model (hidden 64, 4 heads / 2 KV heads);
    image / video / vision-start tokens 96 / 95 / 94; weights std ``std``."""
    torch.manual_seed(seed)
    tower = tiny_qwen_vision_tower(family, depth=2, std=None, seed=seed).config.to_dict()
    tower["out_hidden_size" if family != "qwen2_vl" else "hidden_size"] = 64
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                num_key_value_heads=2, vocab_size=97, max_position_embeddings=512, rope_parameters=rope,
                pad_token_id=3, bos_token_id=None, eos_token_id=None)
    config = AutoConfig.for_model(family, text_config=text, vision_config=tower, image_token_id=QWEN_IMAGE,
                                  video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START)
    model = AutoModelForImageTextToText.from_config(config).eval()
    if std is not None:
        scale_weights(model, std, seed)
    model.generation_config.eos_token_id = None  # fixed-length greedy runs, comparable token by token
    return model


QWEN_WORDS = SPECIAL + [f"w{i}" for i in range(86)] + ["<|vision_end|>", "<|vision_start|>", "<|video_pad|>", "<|image_pad|>"]
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", "<|vision_start|> <|image_pad|> <|vision_end|> ")


def tiny_qwen_processor(patch_size: int = 14, max_cells: int = 16):
    """A ``Qwen2VLProcessor`` for :func:`tiny_qwen_vlm` (word-level vocabulary of 97 whose last ids are the vision
    tokens; images resized to at most ``max_cells`` LLM tokens)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(QWEN_WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", extra_special_tokens=special, padding_side="left")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    unit = (patch_size * 2) ** 2
    images = Qwen2VLImageProcessor(min_pixels=4 * unit, max_pixels=max_cells * unit, patch_size=patch_size)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)


def save_tiny_qwen_vlm(directory: str | Path, family: str, dymu_block: dict | None = None) -> Path:
    """Save :func:`tiny_qwen_vlm` and its processor to ``directory`` (config.json with ``dymu_block``)."""
    model = tiny_qwen_vlm(family)
    model.save_pretrained(directory)
    tiny_qwen_processor(model.config.vision_config.patch_size).save_pretrained(directory)
    if dymu_block is not None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "dymu": dymu_block}, indent=2))
    return Path(directory)


def run_workers(worker: Any, world: int = 2, timeout: float = 300) -> dict[int, Any]:
    """Run ``worker(rank, world, port, queue)`` in ``world`` spawned processes sharing a free local port (for a
    gloo process group); each worker puts ``(rank, result)`` on the queue. Returns ``{rank: result}``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(rank, world, port, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results
