"""dymu.studies on tiny random models and synthetic images (seconds): the logic the real-weight studies run
(``eval_scripts/real_dinov2_thresholds.py``, ``eval_scripts/real_vtu_kl.py``); tests/test_real_weights.py runs it
on the real weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dymu.studies import colour_probe, qwen_tower_design, vtu_kl
from dymu.studies import dinov2_thresholds as study
from dymu.studies.real_images import _rgb, dinov2_input, random_crops
from dymu.studies.vtu_kl_cases import Case, adjacent_groups, group_mean
from dymu.testing import tiny_llama_config, tiny_llava, tiny_qwen_vision_tower
from dymu.thresholds import ThresholdCheckpoint, save_thresholds

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ real_images
def test_rgb_converts_every_scikit_image_kind() -> None:
    assert np.asarray(_rgb(np.array([[True, False]]))).tolist() == [[[255] * 3, [0] * 3]]
    assert np.asarray(_rgb(np.array([[0.0, 0.5, 1.0]])))[0, :, 0].tolist() == [0, 127, 255]  # float: max -> 255
    rgba = np.array([[[0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8)  # transparent pixel: white
    assert np.asarray(_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_random_crops_are_seeded_and_sized() -> None:
    photos = {"a": Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)),
              "b": Image.new("RGB", (60, 40), (1, 2, 3))}
    first, again, other = (random_crops(photos, 3, 32, seed) for seed in (1, 1, 2))
    assert [n for n, _ in first] == ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2"]
    assert all(img.size == (32, 32) for _, img in first)
    same = [np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(first, again)]
    assert all(same)
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(first[:3], other[:3]))


def test_dinov2_input_is_a_bicubic_squash_with_imagenet_normalisation() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    x = dinov2_input(28)(image)
    want = np.asarray(image.resize((28, 28), Image.BICUBIC), dtype=np.float32) / 255.0
    want = (want - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    assert x.shape == (3, 28, 28)
    assert torch.allclose(x, torch.from_numpy(want).permute(2, 0, 1), atol=1e-6)


# ------------------------------------------------------------------------------------ dinov2_thresholds
def test_complexity_orders_flat_below_busy() -> None:
    flat = Image.new("RGB", (64, 64), (90, 90, 90))
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 255
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    c_flat, c_halves, c_noise = (study.complexity(im) for im in (flat, Image.fromarray(halves), noise))
    assert c_flat["edge_density"] == 0.0
    assert 0.0 < c_halves["edge_density"] < 0.1  # one vertical edge, a column or two wide
    assert c_flat["png_bpp"] < c_halves["png_bpp"] < c_noise["png_bpp"]
    assert c_flat["jpeg_bpp"] < c_noise["jpeg_bpp"]


def test_spearman_p_is_scipys_two_sided_p() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for n in (5, 12, 40):
        a, b = rng.random(n), rng.random(n)
        res = spearmanr(a, b)
        assert study.spearman_p(float(res.statistic), n) == pytest.approx(float(res.pvalue), rel=1e-9)
    assert study.spearman_p(1.0, 10) == 0.0 and np.isnan(study.spearman_p(0.3, 2))


def test_summarize_counts_per_kind_and_rank_correlations() -> None:
    kinds = ["easy-vqa"] * 4 + ["photo"] * 3 + ["photo-crop"] * 3 + ["synthetic"] * 2
    samples = [study.Sample(f"s{i}", kind, None) for i, kind in enumerate(kinds)]
    counts = [10, 12, 14, 16, 100, 90, 80, 50, 60, 70, 5, 200]
    cx = [{"png_bpp": float(c), "jpeg_bpp": -float(c), "edge_density": float(i % 2)} for i, c in enumerate(counts)]
    out = study.summarize(counts, samples, cx)
    assert out["tokens"]["easy-vqa"] == {"n": 4, "mean": 13.0, "std": pytest.approx(np.std([10, 12, 14, 16])),
                                         "min": 10, "max": 16}
    assert out["tokens"]["all"]["n"] == 12 and out["tokens"]["finding_mix_estimate"] == 0.5 * (13.0 + 60.0)
    assert out["spearman"]["all"]["png_bpp"] == pytest.approx(1.0)
    assert out["spearman"]["natural"]["jpeg_bpp"] == pytest.approx(-1.0)
    assert out["spearman_p"]["easy-vqa"]["png_bpp"] == 0.0


def _tiny_dinov2(seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=56, patch_size=14)
    return Dinov2Model(config).eval()


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_token_counts_are_patch_tokens_per_image_independent_of_the_batch(tmp_path, threshold) -> None:
    """Thresholds of 1 merge nothing (every patch, CLS excluded); thresholds of 0 merge; batching changes nothing."""
    model = _tiny_dinov2()
    ckpt = save_thresholds(tmp_path / "t.safetensors",
                           ThresholdCheckpoint(torch.full((2,), threshold), encoder="", r_total=0))
    rng = np.random.default_rng(0)
    samples = [study.Sample(f"s{i}", "photo", Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
               for i in range(3)] + [study.Sample("flat", "synthetic", Image.new("RGB", (40, 40), (7, 7, 7)))]
    counts = study.token_counts(model, ckpt, samples, 56, batch_size=3)
    assert counts == study.token_counts(model, ckpt, samples, 56, batch_size=1)
    if threshold == 1.0:
        assert counts == [16] * 4
    else:
        assert all(c < 16 for c in counts) and counts[-1] == min(counts)


# ------------------------------------------------------------------------------------------------ vtu_kl
def test_adjacent_groups_merge_the_most_similar_neighbours_first() -> None:
    x = torch.eye(6)
    x[3] = x[2]  # 2 and 3 identical: the first pair merged
    x[5] = x[4] + 0.1 * x[0]  # 4 and 5 nearly so: the second
    assert adjacent_groups(x, 5).tolist() == [0, 1, 2, 2, 3, 4]
    assert adjacent_groups(x, 4).tolist() == [0, 1, 2, 2, 3, 3]
    local = adjacent_groups(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), 7)
    assert local.unique().tolist() == list(range(7)) and bool((local.diff() >= 0).all())  # contiguous groups


def test_group_mean() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    local = torch.tensor([0, 0, 1, 2, 2, 2])
    assert group_mean(x, local).tolist() == [[1.0, 2.0], [4.0, 5.0], [8.0, 9.0]]


@pytest.fixture(scope="module")
def tiny_llm():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")).eval()


def _case(model, local: list[int], dup: bool) -> Case:
    gen = torch.Generator().manual_seed(1)
    local_t = torch.tensor(local)
    full = torch.randn(len(local), model.config.hidden_size, generator=gen)
    merged = group_mean(full, local_t)
    if dup:  # the run VTU emulates: each merged token repeated over its group
        full = merged[local_t]
    return Case("c", "test", torch.tensor([1, 5, 6, 7]), torch.tensor([8, 9, 10]), full, local_t, merged)


def test_measure_identity_groups_move_nothing(tiny_llm) -> None:
    row = vtu_kl.measure(tiny_llm, _case(tiny_llm, [0, 1, 2, 3, 4], dup=False))
    assert (row["N"], row["M"]) == (5, 5) and row["fast_vs_exact"] <= 1e-4
    for variant in ("plain", "plain_pos", "fast", "exact"):
        assert row[f"kl_last_{variant}"] <= 1e-9 and row[f"kl_suffix_{variant}"] <= 1e-9, variant
        assert row[f"top1_{variant}"], variant


def test_measure_merged_groups_vtu_at_virtual_positions(tiny_llm) -> None:
    """Merged runs: the variants differ (plain@pos is not plain: positions matter), VTU fast ≡ exact, and KL is a
    divergence (> 0) for plain merging."""
    case = _case(tiny_llm, [0, 0, 1, 1, 1, 2], dup=True)
    logits = vtu_kl.case_logits(tiny_llm, case)
    assert all(v.shape[0] == case.suffix.numel() + 1 for v in logits.values())
    row = vtu_kl.measure(tiny_llm, case)
    assert (row["N"], row["M"]) == (6, 3) and row["fast_vs_exact"] <= 1e-4
    assert row["kl_last_plain"] > 1e-6
    assert abs(row["kl_last_plain"] - row["kl_last_plain_pos"]) > 1e-7
    assert float(vtu_kl.kl(logits["full"], logits["full"]).abs().max()) <= 1e-12


# ------------------------------------------------------------------------------------------- colour_probe
def test_image_labels_read_colour_and_shape_from_the_questions() -> None:
    questions = ["what color is the circle?", "what shape is in the image?", "what is the blue shape?",
                 "what color is the shape?", "is there a circle?", "what is the color of the triangle?",
                 "what color is the shape?"]
    answers = ["red", "circle", "rectangle", "teal", "yes", "pink", "brown"]
    ids = [0, 0, 1, 2, 2, 3, 4]
    labels = colour_probe.image_labels(questions, answers, ids)
    # 2 has a colour only, 3 an unknown colour, 4 no shape: left out
    assert labels == {0: {"colour": "red", "shape": "circle"}, 1: {"colour": "blue", "shape": "rectangle"}}
    assert colour_probe.pick({5: "e.png", 1: "b.png", 0: "a.png"}, labels, 2) == [
        ("a.png", labels[0]), ("b.png", labels[1])]
    with pytest.raises(ValueError, match="only 2 images"):
        colour_probe.pick({0: "a.png", 1: "b.png"}, labels, 3)


def test_probe_separates_separable_classes_and_reports_per_class() -> None:
    rng = np.random.default_rng(0)
    centres = {"red": (5.0, 0.0), "blue": (0.0, 5.0), "teal": (-5.0, -5.0)}
    y = [c for c in centres for _ in range(20)]
    x = np.array([centres[c] for c in y]) + rng.normal(0, 0.3, (60, 2))
    res = colour_probe.probe(x[::2], y[::2], x[1::2], y[1::2], colour_probe.COLOURS)
    assert res == {"accuracy": 1.0, "per_class": {"blue": 1.0, "red": 1.0, "teal": 1.0}}
    noise = colour_probe.probe(rng.normal(size=(30, 2)), y[::2], rng.normal(size=(30, 2)), y[1::2], ("red", "blue"))
    assert noise["accuracy"] < 0.8 and set(noise["per_class"]) == {"red", "blue"}


def test_colour_features_are_what_the_projector_reads_and_writes(tmp_path) -> None:
    model, processor = tiny_llava()
    items = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 128, 128)]):
        image = Image.new("RGB", (56, 56), (255, 255, 255))
        image.paste(colour, (10, 10, 30, 30))
        image.save(tmp_path / f"{i}.png")
        items.append((str(tmp_path / f"{i}.png"), {}))
    feats = colour_probe.features(model, processor, items, batch=2)
    assert feats["pixels"].tolist() == [[255, 0, 0], [0, 0, 255], [0, 128, 128]]  # the white background ignored
    pixel_values = processor.image_processor(images=[Image.open(items[1][0])], return_tensors="pt").pixel_values
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        projected = model.model.multi_modal_projector(hidden[:, 1:])
    assert np.allclose(feats["dinov2"][1], hidden[0, 1:].mean(0).numpy(), atol=1e-5)
    assert np.allclose(feats["projector"][1], projected[0].mean(0).numpy(), atol=1e-5)


# -------------------------------------------------------------------------------------- qwen_tower_design
def test_qwen_tower_design_rows() -> None:
    """Merging off is the stock tower; found thresholds keep fewer cells on flat than on textured images; a batch
    equals its images alone; the size sweep runs for the first share."""
    off, rows = qwen_tower_design.family_rows(tiny_qwen_vision_tower("qwen2_vl"), [0.5])
    assert off <= 1e-5
    assert [r.keep for r in rows] == [0.5]
    for row in rows:
        assert [c for _, c in row.cells_kept] == [h * w // 4 for h, w in qwen_tower_design.SIZES]
        assert all(0 < k <= c for k, c in row.cells_kept)
        assert row.cells_kept[0][0] < row.cells_kept[-1][0]  # flat < textured
        assert all(0.0 < v < 1.0 for v in row.rel_dev.values()) and set(row.rel_dev) == {"centroid", "first"}
        assert row.batch_vs_alone <= 1e-4
    assert set(rows[0].shares_at_sizes) == {8, 16, 24}
    assert all(0.0 < share <= 1.0 for pair in rows[0].shares_at_sizes.values() for share in pair)


# ------------------------------------------------------------------------------------------------ scripts
STUDY_SCRIPTS = ["real_dinov2_thresholds", "real_vtu_kl", "small_vlm_colour_probe", "qwen_tower_design",
                 "complexity_finding_list", "complexity_tokens_per_level"]


@pytest.mark.parametrize("script", STUDY_SCRIPTS)
def test_study_scripts_are_thin_and_load_no_script_by_path(script) -> None:
    """Argument parsing and tables over library calls: at most ~200 lines, no other script loaded by file path."""
    text = (REPO / "eval_scripts" / f"{script}.py").read_text()
    assert len(text.splitlines()) <= 200
    for loader in ("spec_from_file_location", "eval_script(", "runpy", "sys.path.insert"):
        assert loader not in text, loader
