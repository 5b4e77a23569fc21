"""The small VLM's training parts that need no real weights: the projector file's LoRA round trip
(:mod:`dymu.small_vlm.lora`, :func:`dymu.small_vlm.model.save_trained` / ``load_trained``) and the mapping from
``dymu train-projector``'s flags to a :class:`~dymu.small_vlm.config.TrainConfig` and the settings a resume checks."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import shlex
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dymu.commands import train_projector
from dymu.small_vlm.config import TrainConfig, settings_of
from dymu.small_vlm.lora import add_lora
from dymu.small_vlm.model import load_trained, save_trained

REPO = Path(__file__).resolve().parents[1]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(self.q_proj(x) * self.k_proj(x))


def _tiny_vlm() -> nn.Module:
    """The attributes the small VLM's LoRA and projector file use: ``model.language_model``, ``model.multi_modal_projector``."""
    torch.manual_seed(0)
    vlm = nn.Module()
    vlm.model = nn.Module()
    vlm.model.language_model = nn.Sequential(_Attention(), _Attention())
    vlm.model.multi_modal_projector = nn.Linear(3, 6)
    return vlm


def test_lora_written_to_a_projector_file_merges_into_the_same_layers(tmp_path):
    """Adapters trained on a model, saved with save_trained and merged by load_trained into a fresh copy: the merged
    layers compute what base + adapter computed; the file holds projector, A, B and scale, and the prompt format."""
    vlm = _tiny_vlm()
    fresh = copy.deepcopy(vlm)
    adapters = add_lora(vlm, rank=2, targets=("q_proj", "v_proj"), seed=0)
    assert sorted(adapters) == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    with torch.no_grad():
        for a in adapters.values():
            a.B.normal_()  # as after training (B starts at zero)
        vlm.model.multi_modal_projector.weight.add_(1.0)
    save_trained(tmp_path / "projector.safetensors", vlm, adapters)
    meta = load_trained(fresh, tmp_path / "projector.safetensors")
    assert meta == {"format": "dymu-small-vlm-1", "dymu.prompt_suffix": ""}
    with safe_open(str(tmp_path / "projector.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {"multi_modal_projector.weight", "multi_modal_projector.bias"} | {
        f"lora.{p}.{part}" for p in adapters for part in ("A", "B", "scale")}
    x = torch.randn(5, 6)
    with torch.no_grad():
        adapted, merged = vlm.model.language_model(x), fresh.model.language_model(x)
        assert not torch.allclose(adapted, _tiny_vlm().model.language_model(x), atol=1e-3)  # the adapters matter
    assert torch.allclose(merged, adapted, atol=1e-5), float((merged - adapted).abs().max())
    assert torch.equal(fresh.model.multi_modal_projector.weight, vlm.model.multi_modal_projector.weight)


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    train_projector.add_arguments(parser)
    return train_projector.config_from_args(parser.parse_args(argv))


def test_every_flag_reaches_its_config_field():
    """Each flag given a value other than its default changes its TrainConfig field (none is dropped)."""
    config = _parse([
        "--images", "7", "--turns", "2", "--batch", "3", "--steps", "9", "--lr", "0.5", "--lora-lr", "0.25",
        "--warmup", "4", "--lora-rank", "8", "--lora-targets", "q_proj,k_proj,o_proj", "--seed", "5",
        "--max-minutes", "1.5", "--stop-after", "6", "--checkpoint-minutes", "0.5", "--work-dir", "/tmp/w",
        "--restart", "--device", "cuda", "--threads", "2", "--no-whiten", "--bf16", "--mix", "11",
        "--mix-seed", "12", "--mix-questions", "3", "--init", "default", "--no-progress",
    ])
    default = TrainConfig()
    same = [f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) == getattr(default, f.name)]
    assert same == [], same
    assert config.lora_targets == ("q_proj", "k_proj", "o_proj") and config.work_dir == Path("/tmp/w")
    assert _parse([]) == default  # the flags' defaults are the config's


def test_the_documented_mix_command_resumes_the_committed_state():
    """docs/adaptivity.md's mix training command gives the settings stored in checkpoints/small_vlm_mix/state.pt
    (a resume refuses any other), so rerunning it continues the committed run."""
    doc = (REPO / "docs" / "adaptivity.md").read_text()
    command = re.search(r"^dymu train-projector --images 1500 .*?--no-progress$", doc, re.MULTILINE | re.DOTALL)
    assert command, "the mix training command is no longer in docs/adaptivity.md"
    argv = shlex.split(command.group(0).replace("\\\n", " "))[2:]
    state = torch.load(REPO / "checkpoints" / "small_vlm_mix" / "state.pt", weights_only=False)
    assert settings_of(_parse(argv)) == state["settings"]
    assert state["step"] == len(state["losses"]) > 0
