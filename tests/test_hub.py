"""Hub names as from_pretrained takes them (issue 29, item 9) and name typos (item 15): a tiny llava-hf model and
DyMU threshold checkpoints in a pre-filled Hugging Face cache (the layout huggingface_hub reads:
models--owner--name/refs/main + snapshots/<commit>/...) resolved by name with HF_HUB_OFFLINE=1, through the CLI and
dymu.vlm.load; offline and not cached: errors naming the repository and how to use a local copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from dymu.encoders import resolve_thresholds_path
from dymu.samples import make_image
from dymu.testing import save_tiny_llava
from dymu.thresholds import load_thresholds

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]


def prefill(cache: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """Put ``files`` (in-repo path -> source file or bytes) into the hub cache as huggingface_hub lays it out."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path) and source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif isinstance(source, Path):
            shutil.copy(source, target)
        else:
            target.write_bytes(source)
    return snapshot


def authors_pth(path: Path, values: list[float], prefix: str = "visual.transformer.resblocks") -> Path:
    """A threshold file in the authors' format (torch-saved dict with a state_dict of per-block buffers)."""
    state = {f"module.{prefix}.{i}.threshold": torch.tensor(v) for i, v in enumerate(values)}
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline, no local threshold folder; the hub repository setting as a user's (unset)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    # huggingface_hub reads these at import: set the module's values (and the environment, for subprocesses)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path / "no-local-checkpoints"))
    for var in ("DYMU_HUB_REPO", "DYMU_HUB_FILES"):
        monkeypatch.delenv(var, raising=False)
    return cache


# ---------------------------------------------------------------------------------------------- DyMU names
def test_authors_name_resolves_from_their_hub_repository(hub, tmp_path):
    values = [0.5 + i / 100 for i in range(24)]
    prefill(hub, "mikewang/DyMU", {"ViT-L-14-336-tome-72out.pth": authors_pth(tmp_path / "a.pth", values)})
    path = resolve_thresholds_path("ViT-L-14-336-tome-72out")
    assert path.is_relative_to(hub) and path.name == "ViT-L-14-336-tome-72out.pth"
    ckpt = load_thresholds(path, encoder="ViT-L-14-336", num_layers=24)
    torch.testing.assert_close(ckpt.thresholds, torch.tensor(values))


def test_hub_repository_and_layout_are_configurable(hub, tmp_path, monkeypatch):
    """Another repository and in-repo path; a dymu-spelled SigLIP name finds the authors' spelling (-tome-)."""
    values = [0.9 - i / 100 for i in range(26)]
    pth = authors_pth(tmp_path / "s.pth", values, "vision_model.encoder.layers")
    prefill(hub, "someone/thresholds", {"sets/v1/siglip-so400m-patch14-384-tome-81out.pth": pth})
    with pytest.raises(FileNotFoundError, match="mikewang/DyMU"):  # not where the default layout looks
        resolve_thresholds_path("siglip-so400m-patch14-384-81out")
    monkeypatch.setenv("DYMU_HUB_REPO", "someone/thresholds")
    with pytest.raises(FileNotFoundError, match=r"someone/thresholds.*siglip-so400m-patch14-384-tome-81out\.pth"):
        resolve_thresholds_path("siglip-so400m-patch14-384-81out")
    monkeypatch.setenv("DYMU_HUB_FILES", "other/{name}.pth, sets/v1/{name}.pth")
    path = resolve_thresholds_path("siglip-so400m-patch14-384-81out")
    assert path.name == "siglip-so400m-patch14-384-tome-81out.pth"
    assert load_thresholds(path, encoder="siglip-so400m-patch14-384").thresholds.tolist() == pytest.approx(values)
    monkeypatch.setenv("DYMU_HUB_REPO", "")  # empty: never the hub
    with pytest.raises(FileNotFoundError) as err:
        resolve_thresholds_path("siglip-so400m-patch14-384-81out")
    assert "hub repository" not in str(err.value)


def test_offline_and_not_cached_names_the_repository(hub):
    with pytest.raises(FileNotFoundError) as err:
        resolve_thresholds_path("ViT-L-14-336-tome-192out")
    message = str(err.value)
    for part in ("no thresholds for ViT-L-14-336-tome-192out", "'mikewang/DyMU'", "HF_HUB_OFFLINE", str(hub),
                 "ViT-L-14-336-tome-192out.pth", "pass a thresholds file"):
        assert part in message, (part, message)
    assert "\n" not in message


def test_name_without_a_count_says_what_is_needed(hub):
    """The authors' OneVision spelling of the tower: not 'not found', but what to give instead."""
    with pytest.raises(ValueError, match="without a token count.*siglip-so400m-patch14-384-81out.*thresholds file"):
        resolve_thresholds_path("ViT-SO400M-14-SigLIP-384-tome")
    from dymu.encoders.loading import load_encoder

    with pytest.raises(ValueError, match="without a token count"):
        load_encoder("ViT-SO400M-14-SigLIP-384-tome")


def test_typos_suggest_the_closest_known_names(hub):
    from dymu import parse_dymu_name
    from dymu.encoders.loading import load_encoder

    with pytest.raises(ValueError, match="did you mean ViT-L-14-336-tome-72out"):
        parse_dymu_name("ViT-L-14-363-tome-72out")
    with pytest.raises(FileNotFoundError, match=r"did you mean dinov2-small-224-tome-64out"):
        resolve_thresholds_path("dinov2-small-224-tome-64ot")  # not a DyMU name: a missing file, or a typo
    with pytest.raises(FileNotFoundError, match=r"dinov2-small-224-tome-46out .*did you mean dinov2-small-224-tome-64out"):
        resolve_thresholds_path("dinov2-small-224-tome-46out")  # a name without a checkpoint: the ones there are
    with pytest.raises(FileNotFoundError, match=r"did you mean dinov2-small\b"):
        load_encoder("dinov2-smal")
    with pytest.raises(FileNotFoundError) as err:  # nothing close: no suggestion
        resolve_thresholds_path("cat.jpg")
    assert "did you mean" not in str(err.value)


# ---------------------------------------------------------------------------------------------- models
@pytest.fixture()
def hub_llava(hub, tmp_path):
    """A tiny llava-hf model cached as llava-hf/tiny-llava, and authors'-format thresholds for its tower cached in
    another repository (read through DYMU_HUB_REPO / DYMU_HUB_FILES)."""
    folder = save_tiny_llava(tmp_path / "llava", image_size=56)
    prefill(hub, "llava-hf/tiny-llava", {".": folder})
    pth = authors_pth(tmp_path / "t.pth", [0.0] * 4)  # merges about half of each block's tokens
    prefill(hub, "someone/thresholds", {"thr/clip-56px-p14-d64-tome-8out.pth": pth})
    return folder


def test_vlm_loads_by_hub_name_offline(hub_llava, monkeypatch):
    from dymu.vlm import load, load_llava

    model, processor = load("llava-hf/tiny-llava", dymu=False)
    ref, _ = load_llava(hub_llava, dymu=False)
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), name
    monkeypatch.setenv("DYMU_HUB_REPO", "someone/thresholds")
    monkeypatch.setenv("DYMU_HUB_FILES", "thr/{name}.pth")
    model, processor = load("llava-hf/tiny-llava", thresholds="clip-56px-p14-d64-tome-8out")
    inputs = processor(images=[make_image("flat", 64, 0)], text=["USER: <image> w1 ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert out.visual_token_counts[0] < 16  # the hub's thresholds merged


@pytest.mark.slow
def test_generate_cli_takes_hub_names_offline(hub_llava, hub, tmp_path):
    """A real run, as a user starts it: the environment variables only, from another folder."""
    image = tmp_path / "flat.png"
    make_image("flat", 64, 0).save(image)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "DYMU_HUB_REPO": "someone/thresholds",
           "DYMU_HUB_FILES": "thr/{name}.pth"}
    run = subprocess.run(
        [sys.executable, "-m", "dymu", "generate", "--model", "llava-hf/tiny-llava", "--image", str(image),
         "--prompt", "w1", "--thresholds", "clip-56px-p14-d64-tome-8out", "--max-new-tokens", "2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr
    tokens = float(run.stdout.split("visual tokens per image:")[1].split()[0])
    assert tokens < 16, run.stdout


def test_offline_missing_models_name_the_repository(hub, tmp_path, capsys):
    from dymu.cli import main
    from dymu.encoders.loading import load_encoder
    from dymu.vlm import load

    with pytest.raises(FileNotFoundError) as err:
        load("llava-hf/llava-1.5-7b-hf")
    assert "'llava-hf/llava-1.5-7b-hf'" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert "local folder" in str(err.value) and "--model FOLDER" in str(err.value)
    # an original LLaVA-1.5 whose CLIP tower is a hub name that is not cached: the tower's repository, --vision-tower
    original = tmp_path / "llava-v1.5-tiny"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    }))
    with pytest.raises(FileNotFoundError, match=r"CLIP tower.*'openai/clip-vit-large-patch14-336'.*--vision-tower"):
        load(original)
    # an encoder by hub name, and a DyMU name whose base encoder is on the hub
    with pytest.raises(FileNotFoundError, match=r"'google/siglip-so400m-patch14-384'.*HF_HUB_OFFLINE.*--model FOLDER"):
        load_encoder("google/siglip-so400m-patch14-384")
    with pytest.raises(FileNotFoundError, match=r"'openai/clip-vit-large-patch14-336'.*--weights FOLDER"):
        load_encoder("ViT-L-14-336-tome-72out")
    # the CLI says it in one line, without a traceback
    image = tmp_path / "flat.png"
    make_image("flat", 64, 0).save(image)
    capsys.readouterr()
    assert main(["generate", "--model", "llava-hf/llava-1.5-7b-hf", "--image", str(image), "--prompt", "q"]) != 0
    err = capsys.readouterr().err
    assert "'llava-hf/llava-1.5-7b-hf'" in err and "Traceback" not in err, err
