"""Train the small real VLM's projector (and optional LoRA adapters) on easy-VQA, vision tower and LLM frozen.

The model is :func:`dymu.small_vlm.build_small_vlm` (DINOv2-S/14 + mlp2x_gelu + SmolLM2-135M-Instruct). Each
training sample is one train image with its questions as one multi-turn chat conversation (the processor's chat
template; the image in the first user turn); the loss is the cross-entropy of the answers (answer word(s) and the
closing ``<|im_end|>``) only, and the LM head runs only at those positions. DINOv2 features of the chosen train
images are computed once and cached (``--work-dir``/features-*.pt). A state checkpoint (trainable weights,
optimizer, RNG states, data position) is written every ``--checkpoint-minutes`` and at the end; a rerun with the
same ``--work-dir`` resumes exactly where it stopped (``--restart`` starts over). The result is written to
``--out`` as ``projector.safetensors`` (projector + LoRA deltas) and ``train_settings.json``.

Example:
  dymu train-projector --images 800 --steps 600 --max-minutes 60 --out checkpoints/small_vlm
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

NAME = "train-projector"
HELP = "train the small real VLM's projector (DINOv2-S + SmolLM2-135M) on easy-VQA, resumable"

IGNORE = -100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=800, help="train images used (the first N image ids)")
    parser.add_argument("--turns", type=int, default=0, help="questions per conversation (0: all of the image's)")
    parser.add_argument("--batch", type=int, default=4, help="conversations per optimiser step")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps planned (the lr schedule's length)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (projector)")
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="peak learning rate (LoRA)")
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LLM (0: projector only)")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="LLM linear layers that get LoRA")
    parser.add_argument("--seed", type=int, default=0, help="random seed (data order, initialisation)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this long; 0: no limit")
    parser.add_argument("--stop-after", type=int, default=0, help="stop (and save) after this step; 0: no limit")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0, help="state checkpoint interval")
    parser.add_argument("--work-dir", default=None, help="feature cache, state checkpoint and loss log "
                        "(default ~/.cache/dymu/small_vlm_run)")
    parser.add_argument("--out", default=None, help="write projector.safetensors and train_settings.json here")
    parser.add_argument("--restart", action="store_true", help="ignore an existing state checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-whiten", dest="whiten", action="store_false",
                        help="keep the projector's default initialisation (by default its first layer is initialised "
                        "to standardise the DINOv2 features per channel: their norm is ~43 while the image-to-image "
                        "variation that carries colour is ~0.75 per channel)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the frozen LLM's matmuls "
                        "(weights, optimizer and loss stay fp32; ~2x faster on CPUs with AMX/AVX512-BF16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------------------------
# data


def easy_vqa_by_image(split: str = "train") -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """``{image id: [(question, answer), ...]}`` in the package's order, and ``{image id: png path}``."""
    import easy_vqa

    if split == "train":
        qs, ans, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        qs, ans, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in zip(qs, ans, ids):
        by_image.setdefault(int(i), []).append((q, a))
    return by_image, {int(k): v for k, v in paths.items()}


def image_features(model: Any, pixel_values: Any) -> Any:
    """The features the stock Llava forward feeds to its projector: ``vision_feature_layer``'s hidden states,
    CLS dropped ('default'). ``[B, 256, 384]``."""
    import torch

    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_hidden_states=True)
        return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def cached_features(model: Any, processor: Any, image_ids: list[int], paths: dict[int, str], cache: Path,
                    progress: bool = True) -> dict[int, Any]:
    """DINOv2 features of ``image_ids``, computed once and stored in ``cache`` (a torch file)."""
    import torch
    from tqdm import tqdm

    from dymu.data import load_image

    stored: dict[int, Any] = torch.load(cache) if cache.exists() else {}
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
            piece = piece.replace(image_token, image_token * _num_image_tokens(processor))
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


def _num_image_tokens(processor: Any) -> int:
    from dymu.small_vlm import NUM_IMAGE_TOKENS

    return NUM_IMAGE_TOKENS


# ---------------------------------------------------------------------------------------------------------------
# LoRA (minimal, so that state and merging stay under our control)


def add_lora(model: Any, rank: int, targets: tuple[str, ...], seed: int) -> dict[str, Any]:
    """Wrap the target linear layers of the language model with LoRA (B = 0 at start); returns the adapters."""
    import torch
    from torch import nn

    from dymu.small_vlm import lora_targets

    class LoRALinear(nn.Module):
        def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator) -> None:
            super().__init__()
            self.base = base
            self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
            self.B = nn.Parameter(torch.zeros(base.out_features, rank))
            self.scale = 2.0  # alpha / rank with alpha = 2 * rank

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    lm = model.model.language_model
    gen = torch.Generator().manual_seed(seed + 1)
    adapters = {}
    for path, linear in lora_targets(lm, targets).items():
        parent_path, attr = path.rsplit(".", 1)
        parent = lm.get_submodule(parent_path)
        wrapped = LoRALinear(linear, rank, gen)
        setattr(parent, attr, wrapped)
        adapters[path] = wrapped
    return adapters


def whiten_projector(projector: Any, features: dict[int, Any]) -> None:
    """Fold a per-channel standardisation of ``features`` into the projector's first linear layer (a
    data-dependent initialisation; the model stays a stock mlp2x_gelu): ``W x + b`` becomes
    ``W (x - mean) / std + b``."""
    import torch

    stacked = torch.cat([f.reshape(-1, f.shape[-1]) for f in features.values()]).double()
    mean, std = stacked.mean(0), stacked.std(0).clamp(min=1e-6)
    linear = projector.linear_1
    with torch.no_grad():
        w = linear.weight.double() / std
        linear.bias.copy_((linear.bias.double() - w @ mean).to(linear.bias.dtype))
        linear.weight.copy_(w.to(linear.weight.dtype))


# ---------------------------------------------------------------------------------------------------------------
# training


class Trainer:
    """Everything one training run needs; ``step()`` runs one optimiser step."""

    def __init__(self, args: argparse.Namespace, model: Any = None, processor: Any = None) -> None:
        """``model``/``processor``: an already built, untrained :func:`build_small_vlm` pair (tests pass copies to
        skip the ~10 s build); by default they are built here with ``args.seed``."""
        import torch

        from dymu.small_vlm import build_small_vlm

        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        self.work = Path(args.work_dir or Path.home() / ".cache" / "dymu" / "small_vlm_run")
        self.work.mkdir(parents=True, exist_ok=True)
        if model is None or processor is None:
            model, processor = build_small_vlm(seed=args.seed)
        self.model, self.processor = model.to(self.device), processor
        for p in model.parameters():
            p.requires_grad_(False)
        projector = model.model.multi_modal_projector
        for p in projector.parameters():
            p.requires_grad_(True)
        self.adapters = add_lora(model, args.lora_rank, tuple(args.lora_targets.split(",")), args.seed) \
            if args.lora_rank > 0 else {}
        by_image, paths = easy_vqa_by_image("train")
        self.image_ids = sorted(by_image)[: args.images]
        self.qa = {i: by_image[i] for i in self.image_ids}
        self.features = cached_features(model, processor, self.image_ids, paths,
                                        self.work / f"features-{args.images}.pt", progress=not args.no_progress)
        if getattr(args, "whiten", False):
            whiten_projector(projector, self.features)
        groups = [{"params": list(projector.parameters()), "lr": args.lr}]
        if self.adapters:
            lora_params = [p for a in self.adapters.values() for p in (a.A, a.B)]
            groups.append({"params": lora_params, "lr": args.lora_lr})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0)
        self.peak = [g["lr"] for g in groups]
        self.step_index = 0  # optimiser steps done
        self.elapsed = 0.0  # training seconds over all runs
        self.losses: list[float] = []
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        self.model.train()  # no dropout in either model; train() only matters for hooks

    # data order: epoch e uses a permutation seeded by (seed, e); position = step_index * batch
    def batch_ids(self, step: int) -> list[tuple[int, int]]:
        n, b = len(self.image_ids), self.args.batch
        out = []
        for pos in range(step * b, (step + 1) * b):
            epoch, index = divmod(pos, n)
            perm = random.Random(f"{self.args.seed}-{epoch}").sample(self.image_ids, n)
            out.append((epoch, perm[index]))
        return out

    def sample(self, epoch: int, image_id: int) -> tuple[list[int], list[int]]:
        qa = list(self.qa[image_id])
        random.Random(f"{self.args.seed}-{epoch}-{image_id}").shuffle(qa)
        if self.args.turns:
            qa = qa[: self.args.turns]
        return conversation_ids(self.processor, qa)

    def lr_factor(self, step: int) -> float:
        a = self.args
        if step < a.warmup:
            return (step + 1) / a.warmup
        progress = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def loss_on(self, items: list[tuple[int, list[int], list[int]]]) -> Any:
        """Mean answer-token cross-entropy of a batch of conversations (right padded)."""
        import torch
        import torch.nn.functional as F

        model = self.model
        lm = model.model.language_model
        pad = self.processor.tokenizer.pad_token_id
        length = max(len(ids) for _, ids, _ in items)
        input_ids = torch.full((len(items), length), pad, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for b, (_, ids, lab) in enumerate(items):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(lab)] = torch.tensor(lab)
            mask[b, : len(ids)] = 1
        input_ids, labels, mask = input_ids.to(self.device), labels.to(self.device), mask.to(self.device)
        feats = torch.stack([self.features[i] for i, _, _ in items]).to(self.device)
        with torch.autocast(self.device.type, enabled=False):  # the projector stays fp32 (small, precision-critical)
            projected = model.model.multi_modal_projector(feats)  # [B, 256, D]
        embeds = lm.embed_tokens(input_ids)
        image_mask = input_ids == model.config.image_token_index
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected.reshape(-1, projected.shape[-1]).to(embeds.dtype))
        hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # position t predicts token t + 1: LM head only where a label follows
        targets = labels[:, 1:]
        where = targets != IGNORE
        logits = model.lm_head(hidden[:, :-1][where])
        return F.cross_entropy(logits.float(), targets[where])

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        items = []
        for epoch, image_id in self.batch_ids(self.step_index):
            ids, labels = self.sample(epoch, image_id)
            items.append((image_id, ids, labels))
        factor = self.lr_factor(self.step_index)
        for g, peak in zip(self.optimizer.param_groups, self.peak):
            g["lr"] = peak * factor
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            loss = self.loss_on(items)
        loss.backward()
        self.optimizer.step()
        self.step_index += 1
        value = float(loss.detach())
        self.losses.append(value)
        self.elapsed += time.perf_counter() - start
        return value

    # --- state
    def trainable_state(self) -> dict[str, Any]:
        state = {f"multi_modal_projector.{k}": v.detach().cpu().clone()
                 for k, v in self.model.model.multi_modal_projector.state_dict().items()}
        for path, a in self.adapters.items():
            state[f"lora.{path}.A"] = a.A.detach().cpu().clone()
            state[f"lora.{path}.B"] = a.B.detach().cpu().clone()
        return state

    def load_trainable(self, state: dict[str, Any]) -> None:
        import torch

        proj = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
        self.model.model.multi_modal_projector.load_state_dict(proj)
        with torch.no_grad():
            for path, a in self.adapters.items():
                a.A.copy_(state[f"lora.{path}.A"])
                a.B.copy_(state[f"lora.{path}.B"])

    def save_state(self) -> Path:
        import numpy as np
        import torch

        path = self.work / "state.pt"
        state = {
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "elapsed": self.elapsed,
            "losses": self.losses,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "settings": settings_of(self.args),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def try_resume(self) -> bool:
        import numpy as np
        import torch

        path = self.work / "state.pt"
        if self.args.restart or not path.exists():
            return False
        state = torch.load(path, weights_only=False)
        if state["settings"] != settings_of(self.args):
            raise ValueError(f"{path} was written with other settings {state['settings']}; use --restart or "
                             f"another --work-dir")
        self.load_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_index = state["step"]
        self.elapsed = state["elapsed"]
        self.losses = list(state["losses"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        return True

    def export(self, out: Path, extra: dict[str, Any]) -> None:
        import torch
        from safetensors.torch import save_file

        from dymu.small_vlm import PROMPT_SUFFIX_KEY

        out.mkdir(parents=True, exist_ok=True)
        tensors = self.trainable_state()
        for path, a in self.adapters.items():
            tensors[f"lora.{path}.scale"] = torch.tensor(a.scale)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        # the prompt format it was trained with (the bare question): dymu eval, lmms-eval and the demo use it
        metadata = {"format": "dymu-small-vlm-1", PROMPT_SUFFIX_KEY: ""}
        save_file(tensors, str(out / "projector.safetensors"), metadata=metadata)
        info = {"settings": settings_of(self.args), **extra}
        (out / "train_settings.json").write_text(json.dumps(info, indent=2) + "\n")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define a run (a resumed run must match them)."""
    keys = ("images", "turns", "batch", "steps", "lr", "lora_lr", "warmup", "lora_rank", "lora_targets", "seed")
    settings = {k: getattr(args, k) for k in keys}
    for flag in ("bf16", "whiten"):  # only written when on, so earlier runs keep their settings
        if getattr(args, flag, False):
            settings[flag] = True
    return settings


def train(args: argparse.Namespace, model: Any = None, processor: Any = None) -> Trainer:
    from tqdm import tqdm

    trainer = Trainer(args, model, processor)
    resumed = trainer.try_resume()
    start_wall = time.monotonic()
    last_ckpt = start_wall
    bar = tqdm(total=args.steps, initial=trainer.step_index, desc="train", disable=args.no_progress)
    log = open(trainer.work / "loss_log.jsonl", "a")  # noqa: SIM115 (closed after the loop)
    if resumed:
        print(f"resumed at step {trainer.step_index} ({trainer.elapsed / 60:.1f} min trained)", flush=True)
    stop_reason = "steps"
    while trainer.step_index < args.steps:
        if args.stop_after and trainer.step_index >= args.stop_after:
            stop_reason = "stop-after"
            break
        if args.max_minutes and time.monotonic() - start_wall >= args.max_minutes * 60:
            stop_reason = "max-minutes"
            break
        loss = trainer.step()
        log.write(json.dumps({"step": trainer.step_index, "loss": loss}) + "\n")
        log.flush()
        recent = trainer.losses[-20:]
        bar.set_postfix(loss=f"{loss:.3f}", avg20=f"{sum(recent) / len(recent):.3f}")
        bar.update(1)
        if time.monotonic() - last_ckpt >= args.checkpoint_minutes * 60:
            trainer.save_state()
            last_ckpt = time.monotonic()
    bar.close()
    log.close()
    trainer.save_state()
    trainer.stop_reason = stop_reason
    return trainer


def run(args: argparse.Namespace) -> int:
    trainer = train(args)
    print(f"stopped ({trainer.stop_reason}) at step {trainer.step_index}/{args.steps}, "
          f"{trainer.elapsed / 60:.1f} min of training", flush=True)
    if args.out:
        recent = trainer.losses[-20:]
        trainer.export(Path(args.out), {
            "steps_done": trainer.step_index,
            "stop_reason": trainer.stop_reason,
            "train_minutes": round(trainer.elapsed / 60, 2),
            "final_loss_avg20": round(sum(recent) / max(1, len(recent)), 4),
            "conversations_seen": trainer.step_index * args.batch,
            "device": args.device,
            "threads": args.threads,
        })
        print(f"wrote {args.out}/projector.safetensors", flush=True)
    return 0
