"""Train the small VLM's projector (and optional LoRA adapters), vision tower and LLM frozen; resumable.

:func:`train` runs a :class:`TrainConfig` (``dymu train-projector`` builds one from its flags). Each sample is one
image with its questions as one chat conversation (:mod:`dymu.small_vlm.training_data`); the loss is the
cross-entropy of the answer tokens only, and the LM head runs only at those positions. A state checkpoint
(trainable weights, AdamW, RNG states, step, losses) is written to ``<work_dir>/state.pt`` every
``checkpoint_minutes`` and at the end; a run with the same work dir and settings resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from dymu.small_vlm.config import DEFAULT_WORK_DIR, TrainConfig, settings_of
from dymu.small_vlm.lora import LORA_PREFIX, add_lora, lora_tensors
from dymu.small_vlm.model import (
    PROJECTOR_PREFIX,
    build_small_vlm,
    projector_path,
    save_trained,
    trained_tensors,
)
from dymu.small_vlm.training_data import (
    IGNORE,
    cached_features,
    complexity_vqa_by_image,
    conversation_ids,
    easy_vqa_by_image,
)


def whiten_projector(projector: torch.nn.Module, features: dict[int, torch.Tensor]) -> None:
    """Fold a per-channel standardisation of ``features`` into the projector's first linear layer (a
    data-dependent initialisation; the model stays a stock mlp2x_gelu): ``W x + b`` becomes
    ``W (x - mean) / std + b``."""
    stacked = torch.cat([f.reshape(-1, f.shape[-1]) for f in features.values()]).double()
    mean, std = stacked.mean(0), stacked.std(0).clamp(min=1e-6)
    linear = projector.linear_1
    with torch.no_grad():
        w = linear.weight.double() / std
        linear.bias.copy_((linear.bias.double() - w @ mean).to(linear.bias.dtype))
        linear.weight.copy_(w.to(linear.weight.dtype))


Item = tuple[int, list[int], list[int]]  # (image id, token ids, labels)


class Trainer:
    """Everything one training run needs; ``step()`` runs one optimiser step."""

    def __init__(self, config: TrainConfig, model: Any = None, processor: Any = None) -> None:
        """``model``/``processor``: an already built, untrained :func:`build_small_vlm` pair (tests pass copies to
        skip the ~10 s build); by default they are built here with ``config.seed``."""
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = torch.device(config.device)
        self.work = Path(config.work_dir or DEFAULT_WORK_DIR)
        self.work.mkdir(parents=True, exist_ok=True)
        if model is None or processor is None:
            model, processor = build_small_vlm(seed=config.seed)
        self.model, self.processor = model.to(self.device), processor
        for p in model.parameters():
            p.requires_grad_(False)
        projector = model.model.multi_modal_projector
        for p in projector.parameters():
            p.requires_grad_(True)
        self.adapters = add_lora(model, config.lora_rank, config.lora_targets, config.seed) \
            if config.lora_rank > 0 else {}
        self._load_data()
        resumable = not config.restart and (self.work / "state.pt").exists()
        if config.init and not resumable:  # a resumed run needs no init file
            self.init_from(config.init)
        elif config.whiten:
            whiten_projector(projector, self.features)
        groups = [{"params": list(projector.parameters()), "lr": config.lr}]
        if self.adapters:
            lora_params = [p for a in self.adapters.values() for p in (a.A, a.B)]
            groups.append({"params": lora_params, "lr": config.lora_lr})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=0.0)
        self.peak = [g["lr"] for g in groups]
        self.step_index = 0  # optimiser steps done
        self.elapsed = 0.0  # training seconds over all runs
        self.losses: list[float] = []
        self.stop_reason = ""  # why train() stopped: "steps", "stop-after" or "max-minutes"
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model.train()  # no dropout in either model; train() only matters for hooks

    def _load_data(self) -> None:
        """The pool of image ids (easy-VQA, then the mix), their questions and cached features."""
        c = self.config
        by_image, paths = easy_vqa_by_image("train")
        self.image_ids = sorted(by_image)[: c.images]
        self.qa = {i: by_image[i] for i in self.image_ids}
        self.features = cached_features(self.model, self.processor, self.image_ids, paths,
                                        self.work / f"features-{c.images}.pt", progress=c.progress)
        if c.mix:
            mix_qa, mix_paths = complexity_vqa_by_image(c.mix_seed, c.mix, c.mix_questions, self.work)
            mix_ids = sorted(mix_qa)
            self.features.update(cached_features(
                self.model, self.processor, mix_ids, mix_paths,
                self.work / f"features-mix-{c.mix_seed}-{c.mix}x{c.mix_questions}.pt", progress=c.progress))
            self.image_ids += mix_ids
            self.qa.update(mix_qa)

    def init_from(self, path: str) -> None:
        """Projector and LoRA A/B from a ``projector.safetensors`` (``'default'``: the shipped small VLM's)."""
        state = load_file(str(projector_path(path)))  # "default": the shipped one; a missing file says so
        lora = {k for k in state if k.startswith(LORA_PREFIX) and not k.endswith(".scale")}
        wanted = lora_tensors(self.adapters)
        if lora != set(wanted) or any(state[k].shape != v.shape for k, v in wanted.items()):
            raise ValueError(f"--init {path}: its LoRA tensors do not match --lora-rank {self.config.lora_rank} / "
                             f"--lora-targets {','.join(self.config.lora_targets)}; expected the same LoRA layout")
        self.load_trainable(state)

    # data order: epoch e uses a permutation seeded by (seed, e); position = step_index * batch
    def batch_ids(self, step: int) -> list[tuple[int, int]]:
        n, b = len(self.image_ids), self.config.batch
        out = []
        for pos in range(step * b, (step + 1) * b):
            epoch, index = divmod(pos, n)
            perm = random.Random(f"{self.config.seed}-{epoch}").sample(self.image_ids, n)
            out.append((epoch, perm[index]))
        return out

    def sample(self, epoch: int, image_id: int) -> tuple[list[int], list[int]]:
        qa = list(self.qa[image_id])
        random.Random(f"{self.config.seed}-{epoch}-{image_id}").shuffle(qa)
        if self.config.turns:
            qa = qa[: self.config.turns]
        return conversation_ids(self.processor, qa)

    def lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup:
            return (step + 1) / c.warmup
        progress = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def loss_on(self, items: list[Item]) -> torch.Tensor:
        """Mean answer-token cross-entropy of a batch of conversations (right padded)."""
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
        projected = projected.reshape(-1, projected.shape[-1]).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), projected)
        hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # position t predicts token t + 1: LM head only where a label follows
        targets = labels[:, 1:]
        where = targets != IGNORE
        logits = model.lm_head(hidden[:, :-1][where])
        return F.cross_entropy(logits.float(), targets[where])

    def step(self) -> float:
        start = time.perf_counter()
        items = []
        for epoch, image_id in self.batch_ids(self.step_index):
            ids, labels = self.sample(epoch, image_id)
            items.append((image_id, ids, labels))
        factor = self.lr_factor(self.step_index)
        for g, peak in zip(self.optimizer.param_groups, self.peak):
            g["lr"] = peak * factor
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            loss = self.loss_on(items)
        loss.backward()
        self.optimizer.step()
        self.step_index += 1
        value = float(loss.detach())
        self.losses.append(value)
        self.elapsed += time.perf_counter() - start
        return value

    # --- state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return trained_tensors(self.model, self.adapters)

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        proj = {k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        self.model.model.multi_modal_projector.load_state_dict(proj)
        with torch.no_grad():
            for path, a in self.adapters.items():
                a.A.copy_(state[f"{LORA_PREFIX}{path}.A"])
                a.B.copy_(state[f"{LORA_PREFIX}{path}.B"])

    def save_state(self) -> Path:
        path = self.work / "state.pt"
        state = {
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_index,
            "elapsed": self.elapsed,
            "losses": self.losses,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "settings": settings_of(self.config),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def try_resume(self) -> bool:
        path = self.work / "state.pt"
        if self.config.restart or not path.exists():
            return False
        state = torch.load(path, weights_only=False)
        if state["settings"] != settings_of(self.config):
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

    def summary(self) -> dict[str, Any]:
        """What ``train_settings.json`` records about the run beside its settings."""
        recent = self.losses[-20:]
        return {
            "steps_done": self.step_index,
            "stop_reason": self.stop_reason,
            "train_minutes": round(self.elapsed / 60, 2),
            "final_loss_avg20": round(sum(recent) / max(1, len(recent)), 4),
            "conversations_seen": self.step_index * self.config.batch,
            "device": self.config.device,
            "threads": self.config.threads,
        }

    def export(self, out: Path, extra: dict[str, Any]) -> None:
        """``out/projector.safetensors`` (projector + LoRA A, B, scale) and ``out/train_settings.json``."""
        out.mkdir(parents=True, exist_ok=True)
        save_trained(out / "projector.safetensors", self.model, self.adapters)
        info = {"settings": settings_of(self.config), **extra}
        (out / "train_settings.json").write_text(json.dumps(info, indent=2) + "\n")


def train(config: TrainConfig, model: Any = None, processor: Any = None) -> Trainer:
    """Run (or resume) ``config`` until its steps, ``stop_after`` or ``max_minutes``; the state is saved at the end.
    Returns the trainer (``stop_reason`` says why it stopped); :meth:`Trainer.export` writes the result."""
    trainer = Trainer(config, model, processor)
    resumed = trainer.try_resume()
    start_wall = time.monotonic()
    last_ckpt = start_wall
    bar = tqdm(total=config.steps, initial=trainer.step_index, desc="train", disable=not config.progress)
    if resumed:
        print(f"resumed at step {trainer.step_index} ({trainer.elapsed / 60:.1f} min trained)", flush=True)
    stop_reason = "steps"
    with open(trainer.work / "loss_log.jsonl", "a") as log:
        while trainer.step_index < config.steps:
            if config.stop_after and trainer.step_index >= config.stop_after:
                stop_reason = "stop-after"
                break
            if config.max_minutes and time.monotonic() - start_wall >= config.max_minutes * 60:
                stop_reason = "max-minutes"
                break
            loss = trainer.step()
            log.write(json.dumps({"step": trainer.step_index, "loss": loss}) + "\n")
            log.flush()
            recent = trainer.losses[-20:]
            bar.set_postfix(loss=f"{loss:.3f}", avg20=f"{sum(recent) / len(recent):.3f}")
            bar.update(1)
            if time.monotonic() - last_ckpt >= config.checkpoint_minutes * 60:
                trainer.save_state()
                last_ckpt = time.monotonic()
    bar.close()
    trainer.save_state()
    trainer.stop_reason = stop_reason
    return trainer
