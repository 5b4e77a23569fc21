"""`dymu visualize`: merge-group pictures drawn from the source map, and the complexity scatter plot."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

import dymu  # noqa: E402
from dymu import visualize as viz  # noqa: E402
from dymu.cli import main  # noqa: E402
from dymu.samples import KINDS, make_image  # noqa: E402


@pytest.fixture(scope="module")
def tower():
    return viz.demo_tower(layers=3, image_size=112, r_total=36, calibration_images=8)


def half_flat_image(size: int = 112) -> Image.Image:
    """Left half one flat colour (merges), right half textured (mostly kept)."""
    a = np.array(make_image("flat", size, seed=1))
    b = np.array(make_image("textured", size, seed=2))
    a[:, size // 2 :] = b[:, size // 2 :]
    return Image.fromarray(a)


def test_groups_and_colours_follow_the_source_map(tower):
    view = viz.merge_view(tower, half_flat_image())
    source_map = dymu.last_run(tower.model).source_maps[-1][0, 1:].numpy()  # CLS dropped
    gh, gw = view.grid
    assert (gh, gw) == (8, 8) and view.colors.shape == (8, 8, 3) and view.colors.dtype == np.uint8
    same_token = source_map[:, None] == source_map[None, :]
    colors = view.colors.reshape(-1, 3)
    same_colour = (colors[:, None] == colors[None, :]).all(-1)
    assert np.array_equal(same_colour, same_token)  # two patches share a colour iff they share a merged token
    assert same_token.sum() > len(source_map)  # some patches did merge ...
    assert view.num_groups == len(np.unique(source_map)) > 1  # ... and not into one token
    assert view.num_groups == view.tokens_per_layer[-1] - 1
    assert view.tokens_per_layer[0] == 65 and len(view.tokens_per_layer) == 4


def test_png_pixels_at_patch_centres_show_the_groups(tower, tmp_path):
    view = viz.merge_view(tower, half_flat_image())
    rendered = viz.render_merge_view(view, tmp_path / "merged.png")
    with Image.open(rendered.path) as img:
        assert img.format == "PNG" and img.size == rendered.size
        png = np.asarray(img.convert("RGB"))
    gh, gw = view.grid
    centres = rendered.patch_centers
    assert centres.shape == (gh, gw, 2)
    p = view.patch_size * rendered.scale
    ox, oy = rendered.overlay_origin
    # the overlay panel is in the PNG pixel for pixel
    assert np.array_equal(png[oy : oy + gh * p, ox : ox + gw * p], rendered.overlay)
    pixels = png[centres[..., 1], centres[..., 0]]  # [gh, gw, 3]
    # the left half is one flat colour, so its centre pixels differ only by the group tint:
    # equal iff the patches are in the same group
    left = view.groups[:, : gw // 2].ravel()
    left_pixels = pixels[:, : gw // 2].reshape(-1, 3)
    same_group = left[:, None] == left[None, :]
    same_pixel = (left_pixels[:, None] == left_pixels[None, :]).all(-1)
    assert np.array_equal(same_pixel, same_group)
    assert same_group.sum() > len(left) and not same_group.all()  # at least one merged and one separate pair
    # and the original panel shows the input view unchanged
    x0, y0 = rendered.original_origin
    assert np.array_equal(png[y0 : y0 + gh * p : rendered.scale, x0 : x0 + gw * p : rendered.scale], view.image)


def test_palette_colours_are_distinct():
    for n in (1, 20, 21, 577, 1025):
        palette = viz.group_palette(n)
        assert palette.shape == (n, 3) and len({tuple(c) for c in palette}) == n


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert viz.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert viz.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(viz.spearman([1, 1, 1], [1, 2, 3]))


def test_jpeg_complexity_orders_the_sample_images():
    values = [viz.jpeg_bytes_per_pixel(make_image(k, 112, seed=0)) for k in ("flat", "gradient", "textured")]
    assert values[0] < values[1] < values[2]


def test_visualize_command_writes_png(tmp_path, capsys):
    image = tmp_path / "in.png"
    half_flat_image(150).save(image)
    out = tmp_path / "out" / "merged.png"
    assert main(["visualize", str(image), "--out", str(out), "--r-total", "100"]) == 0
    text = capsys.readouterr().out
    assert "tokens per layer (incl. CLS): 257 ->" in text and f"wrote {out}" in text
    with Image.open(out) as img:
        img.verify()


def test_scatter_command_reports_a_correlation(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        make_image(KINDS[i % len(KINDS)], 160, seed=i).save(folder / f"{KINDS[i % len(KINDS)]}_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "scatter.png"
    assert main(["visualize", "--scatter", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rho = float(text.split("Spearman rank correlation (complexity vs tokens): ")[1].split()[0])
    assert -1.0 <= rho <= 1.0 and rho > 0  # flat images keep fewer tokens than textured ones
    assert "over 8 images" in text
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_command_errors_are_clear(tmp_path, capsys, monkeypatch):
    assert main(["visualize"]) == 2
    assert "either an IMAGE or --scatter" in capsys.readouterr().err
    assert main(["visualize", "--scatter", str(tmp_path / "nope")]) == 2
    assert "image folder not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install"):
        viz.require_matplotlib()
    assert main(["visualize", "x.png"]) == 2
    assert "need matplotlib" in capsys.readouterr().err


def test_local_model_folder(tmp_path, tower):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size=56).save_pretrained(tmp_path / "clip")
    local = viz.load_tower(tmp_path / "clip", r_total=6)
    assert len(local.thresholds) == 2 and "built-in" in local.description
    view = viz.merge_view(local, make_image("flat", 56))
    assert view.grid == (4, 4) and view.num_groups < 16
    given = viz.load_tower(tmp_path / "clip", viz.parse_checkpoint_or_floats("0.5,0.5"))
    assert given.thresholds == [0.5, 0.5]
